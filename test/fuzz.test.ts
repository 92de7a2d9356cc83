/**
 * A short coverage-guided fuzz pass (Jazzer.js, tools/fuzz/run.mjs) over the
 * NBD server's handshake and transmission phases and the replication link's
 * frame decoder, from the seed corpora in fixtures/fuzz/. It fails on any
 * crash (the reproducer is named in the output) and prints the figures.
 * Longer runs: `npm run fuzz -- --seconds 600`.
 */
import path from 'node:path';
import { expect, it } from 'vitest';
import { ROOT, run } from './helpers.js';
import { describeWith } from './tools.js';

const SECONDS = Number(process.env.COLO_BLK_FUZZ_SECONDS ?? 10);

describeWith(['c++'], 'coverage-guided fuzzing (short pass)', () => {
  it(
    `runs each target for ${SECONDS} s without a crash`,
    async () => {
      const r = await run(
        process.execPath,
        [path.join(ROOT, 'tools', 'fuzz', 'run.mjs'), '--seconds', String(SECONDS), '--json'],
        { timeoutMs: (SECONDS * 2 + 60) * 1000 },
      );
      const reports = r.stdout
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Record<string, unknown>);
      expect(
        reports.map((x) => x.target),
        r.stderr,
      ).toEqual(['nbd-server', 'link-frames']);
      for (const rep of reports) {
        expect(rep.crashes, `${rep.target}: ${String(rep.tail)}`).toEqual([]);
        expect(rep.exitCode, String(rep.tail)).toBe(0);
        expect(rep.runs as number).toBeGreaterThan(100);
        expect(rep.edges as number).toBeGreaterThan(50);
        console.log(
          `fuzz ${rep.target}: ${rep.runs} inputs in ${SECONDS} s, ${rep.edges} edges, ` +
            `${rep.newUnits} new corpus entries, peak RSS ${rep.peakRssMb} MiB, 0 crashes`,
        );
      }
      expect(r.code).toBe(0);
    },
    (SECONDS * 2 + 90) * 1000,
  );
});
