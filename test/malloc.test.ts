import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { native } from '../src/block/native.js';
import { ROOT, runOk } from './helpers.js';

/**
 * Where glibc puts a process's first 4 MiB buffer: with its defaults, in a
 * mapping of its own (unmapped when freed, faulted in afresh next time); with
 * colo-blk's malloc settings (src/sys/malloc.ts), in the heap, which grows by
 * the buffer plus the 16 MiB top pad and keeps what is freed. The child reads
 * the size of its [heap] from /proc/self/maps before and after. A misspelt
 * option makes mallopt refuse, and the child says so.
 */
const CHILD = `
const fs = await import('node:fs');
if (process.argv[1] === 'apply' && !(await import(process.argv[2])).tuneMalloc()) throw new Error('mallopt refused');
const heap = () => {
  const line = fs.readFileSync('/proc/self/maps', 'utf8').split('\\n').find((l) => l.endsWith('[heap]'));
  if (!line) return 0;
  const [a, b] = line.split(' ')[0].split('-').map((x) => parseInt(x, 16));
  return b - a;
};
const before = heap();
const buf = Buffer.allocUnsafeSlow(4 << 20).fill(1);
console.log(JSON.stringify({ grew: heap() - before, bytes: buf.length }));
`;

async function heapGrowth(apply: boolean): Promise<number> {
  const malloc = path.join(ROOT, 'dist', 'src', 'sys', 'malloc.js');
  const r = await runOk(
    process.execPath,
    ['--input-type=module', '-e', CHILD, apply ? 'apply' : 'none', `file://${malloc}`],
    { timeoutMs: 60_000 },
  );
  return (JSON.parse(r.stdout.trim()) as { grew: number }).grew;
}

const glibc = !!(process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined)
  ?.header?.glibcVersionRuntime;

// Elsewhere (musl, or no native helper: `npm run install` builds it, with g++) there is nothing to tune.
const suite = glibc && native?.tuneMalloc ? describe : describe.skip;
const why = glibc ? 'needs the native helper: npm run install (g++)' : 'glibc only';

suite(`malloc settings${suite === describe ? '' : ` [skipped: ${why}]`}`, () => {
  it('serve a 4 MiB buffer from the heap, grown with room to spare (a control run maps it apart)', async () => {
    expect(await heapGrowth(false)).toBeLessThan(4 << 20);
    expect(await heapGrowth(true)).toBeGreaterThanOrEqual(16 << 20);
  }, 60_000);
});
