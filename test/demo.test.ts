// The README's main job: `npm run demo` on a fresh machine, including the
// primary's death, the takeover and the re-protection of a fresh secondary.
import { describe, expect, it } from 'vitest';
import { ROOT, runOk } from './helpers.js';

describe('demo', () => {
  it('runs a live pair, survives the primary being killed, re-protects, and verifies every checkpoint', async () => {
    const r = await runOk(
      process.execPath,
      ['dist/tools/demo.js', '--seconds', '3', '--size', '16M', '--json'],
      {
        timeoutMs: 90_000,
        cwd: ROOT,
      },
    );
    const s = JSON.parse(r.stdout);
    expect(s.ok).toBe(true);
    expect(s.verified).toBe(s.checkpoints);
    expect(s.checkpointsAfterFailover).toBeGreaterThan(0);
    expect(s.failover.generation).toBe(2);
    expect(s.reprotect.mode).toBe('full');
    expect(s.exitCodes).toEqual([0, 0]);
  });
});
