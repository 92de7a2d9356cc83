// The simulator with longer walks (seeds apart from test/sim.test.ts): deeper
// sequences of failovers, restarts and re-protections in one run. Runs beside
// sim.test.ts on the other core.
import { describe, expect, it } from 'vitest';
import { describeFailure, runSeeds } from './sim/run.js';

const count = Number(process.env.COLO_BLK_SIM_LONG_SEEDS ?? 400);
const actions = 100;

describe('whole-system simulator, long walks', () => {
  it(
    `${count} seeded scenarios of ${actions} actions keep every invariant`,
    // Deterministic seeds: the timeout only guards against a hang. 1,000 seeds took 94 s in CI and
    // over 180 s with only Node (every suite that needs no tool runs at once, all on the CPU).
    { timeout: 600_000 },
    async () => {
      const { totals, failures } = await runSeeds('simulator, long walks', 1_000_001, count, { actions });
      for (const f of failures) console.error(describeFailure(f, actions));
      expect(failures.map((f) => f.violation)).toEqual([]);
      // 99 %: with a simulated wire that never reorders nor skips bytes, 2,500 seeds left 4 apart.
      expect(totals.converged, 'scenarios that ended protected and equal').toBeGreaterThanOrEqual(
        totals.scenarios * 0.99,
      );
    },
  );
});
