import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, runOk } from './helpers.js';

/**
 * A child grows and drops an old generation of ~160 MB and counts its GCs by
 * kind (perf_hooks 'gc' entries). Without colo-blk's V8 settings V8 marks
 * incrementally; with them it must not. A flag V8 does not know is ignored
 * with a warning, so this is what catches a misspelt or retired flag.
 */
const CHILD = `
const { PerformanceObserver, constants } = await import('node:perf_hooks');
if (process.argv[1] === 'apply') (await import(process.argv[2])).applyV8Flags();
const kinds = { incremental: 0, major: 0, minor: 0 };
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    const k = e.detail.kind;
    if (k === constants.NODE_PERFORMANCE_GC_INCREMENTAL) kinds.incremental++;
    else if (k === constants.NODE_PERFORMANCE_GC_MAJOR) kinds.major++;
    else if (k === constants.NODE_PERFORMANCE_GC_MINOR) kinds.minor++;
  }
}).observe({ entryTypes: ['gc'] });
let keep = [];
for (let i = 0; i < 8000; i++) {
  keep.push(new Array(10000).fill(i));
  if (keep.length > 2000) keep = [];
  if (i % 100 === 0) await new Promise((r) => setImmediate(r));
}
await new Promise((r) => setTimeout(r, 50));
console.log(JSON.stringify(kinds));
`;

async function gcKinds(apply: boolean): Promise<{ incremental: number; major: number; minor: number }> {
  const flags = path.join(ROOT, 'dist', 'src', 'sys', 'v8-flags.js');
  const r = await runOk(
    process.execPath,
    ['--input-type=module', '-e', CHILD, apply ? 'apply' : 'none', `file://${flags}`],
    { timeoutMs: 60_000 },
  );
  return JSON.parse(r.stdout.trim()) as { incremental: number; major: number; minor: number };
}

describe('V8 settings', () => {
  it('turn incremental marking off (a control run without them marks incrementally)', async () => {
    const control = await gcKinds(false);
    expect(control.incremental).toBeGreaterThan(0);
    const applied = await gcKinds(true);
    expect(applied.minor).toBeGreaterThan(0);
    expect(applied.incremental).toBe(0);
  }, 120_000);
});
