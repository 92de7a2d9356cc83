/**
 * Runs a range of seeds of the simulator and sums up what they did; used by
 * the test files (test/sim*.test.ts) and by `npm run test:sim`.
 */
import { recordFaults } from '../fault-counts.js';
import { runScenario, type ScenarioOptions, type ScenarioResult } from './scenario.js';

export interface SeedRun {
  totals: {
    scenarios: number;
    actions: number;
    steps: number;
    crashes: number;
    cuts: number;
    drains: number;
    checkpoints: number;
    failovers: number;
    reprotects: number;
    fullDisks: number;
    slowDisks: number;
    stalls: number;
    converged: number;
  };
  failures: ScenarioResult[];
}

/** Seeds [first, first + count); stops after `maxFailures` violations. */
export async function runSeeds(
  suite: string,
  first: number,
  count: number,
  opts: ScenarioOptions,
  maxFailures = 3,
): Promise<SeedRun> {
  const totals = {
    scenarios: 0,
    actions: 0,
    steps: 0,
    crashes: 0,
    cuts: 0,
    drains: 0,
    checkpoints: 0,
    failovers: 0,
    reprotects: 0,
    fullDisks: 0,
    slowDisks: 0,
    stalls: 0,
    converged: 0,
  };
  const failures: ScenarioResult[] = [];
  for (let seed = first; seed < first + count; seed++) {
    const r = await runScenario(seed, opts);
    totals.scenarios++;
    totals.actions += r.actions;
    totals.steps += r.steps;
    totals.crashes += r.crashes;
    totals.cuts += r.cuts;
    totals.drains += r.drains;
    totals.checkpoints += r.checkpoints;
    totals.failovers += r.failovers;
    totals.reprotects += r.reprotects;
    totals.fullDisks += r.fullDisks;
    totals.slowDisks += r.slowDisks;
    totals.stalls += r.stalls;
    if (r.converged) totals.converged++;
    if (r.violation) {
      failures.push(r);
      if (failures.length >= maxFailures) break;
    }
  }
  const t = totals;
  recordFaults(
    suite,
    t.scenarios,
    `scenarios (${t.actions} actions, ${t.steps} steps, ${t.crashes} crashes, ${t.cuts} cut connections, ${t.drains} waits for drain, ` +
      `${t.checkpoints} checkpoints, ${t.failovers} failovers, ${t.reprotects} re-protections, ${t.fullDisks} full disks, ${t.slowDisks} slow disks, ${t.stalls} frozen processes; ` +
      `${t.converged} ended protected and equal)`,
  );
  return { totals, failures };
}

/** A failure as a person reads it: the violation, how to replay it, the last steps. */
export function describeFailure(f: ScenarioResult, actions: number): string {
  return (
    `${f.violation}\n  replay: npm run test:sim -- --seed ${f.seed} --actions ${actions}\n  last steps:\n    ` +
    f.log.slice(-40).join('\n    ')
  );
}
