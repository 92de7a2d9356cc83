// Crash-point fault injection (invariants 4 and 7): real processes killed with
// SIGKILL at named points (COLO_BLK_CRASH_AT) and at random moments, across
// the secondary (replication, commit, apply, promotion, a resync into it), the
// primary (checkpoints, a restart, a resync it runs) and `colo-blk recover`
// itself; after every crash, recover must leave exactly one allowed checkpoint
// image (part-way through a resync: only old and new blocks, and no
// promotion), and a resynchronised pair must end with equal exports. The
// scenarios are in test/crash-scenarios.ts, the machinery in
// test/crash-harness.ts.
//
// Environment (tools/crash.mjs sets these from its options):
//   COLO_BLK_CRASH_POINTS       crash points to run (default 200)
//   COLO_BLK_CRASH_SEED         base seed, to replay a whole run (default: random, printed)
//   COLO_BLK_CRASH_REPLAY       scenario:seed, to run exactly one point again
//   COLO_BLK_CRASH_SCENARIO     only scenarios whose name contains this
//   COLO_BLK_CRASH_CONCURRENCY  points run at the same time (default 4)
//   COLO_BLK_CRASH_KEEP=1       keep the directories of failed points
import { randomInt } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import {
  checkImage,
  CheckpointModel,
  crashLabel,
  describeFailure,
  hex,
  parseSeed,
  planMutations,
  Rng,
  runCampaign,
  summarize,
} from './crash-harness.js';
import { DEFAULT_DECK, SCENARIOS } from './crash-scenarios.js';
import { recordFaults } from './fault-counts.js';
import { killAll, rmDir, tmpDir } from './helpers.js';

const env = process.env;
const TARGET = Number(env.COLO_BLK_CRASH_POINTS || 200);
const CONCURRENCY = Number(env.COLO_BLK_CRASH_CONCURRENCY || 4);
const SEED = env.COLO_BLK_CRASH_SEED ? parseSeed(env.COLO_BLK_CRASH_SEED) : randomInt(0, 0x1_0000_0000);
const REPLAY = env.COLO_BLK_CRASH_REPLAY
  ? (() => {
      const [scenario, seed] = env.COLO_BLK_CRASH_REPLAY.split(/:(?=[^:]*$)/);
      return { scenario, seed: parseSeed(seed ?? '') };
    })()
  : undefined;
const FILTER = env.COLO_BLK_CRASH_SCENARIO ?? '';

const deck = (() => {
  if (!FILTER) return DEFAULT_DECK;
  const inDeck = DEFAULT_DECK.filter((n) => n.includes(FILTER));
  return inDeck.length ? inDeck : SCENARIOS.map((s) => s.name).filter((n) => n.includes(FILTER));
})();

const root = tmpDir('colo-blk-crash-');
afterAll(async () => {
  await killAll();
  rmDir(root);
});

describe('crash points', () => {
  it('the image check accepts exactly the allowed checkpoint image', () => {
    const rng = new Rng(7);
    const model = new CheckpointModel(256 * 1024);
    for (let e = 0; e < 3; e++) model.addEpoch(planMutations(rng, model.size, 5, 16 * 1024));
    expect(checkImage(model.images[2], model, [2], 2)).toEqual([]);
    expect(checkImage(model.images[3], model, [2, 3], 3)).toEqual([]);
    // An older checkpoint, a newer one, one that may not be, a torn one: all rejected.
    expect(checkImage(model.images[1], model, [2], 2).join()).toMatch(/equals checkpoint 1/);
    expect(checkImage(model.images[3], model, [2], 3).join()).toMatch(/only 2 may be/);
    expect(checkImage(model.images[2], model, [2, 3], 3).join()).toMatch(
      /reports checkpoint 3.*equals checkpoint 2/,
    );
    // Half of the epoch: the first differing 4 KiB of checkpoint 3 over checkpoint 2.
    let at = 0;
    while (model.images[2][at] === model.images[3][at]) at++;
    const torn = Buffer.from(model.images[2]);
    model.images[3].copy(torn, at, at, at + 4096);
    expect(torn.equals(model.images[2]) || torn.equals(model.images[3])).toBe(false);
    expect(checkImage(torn, model, [2, 3], 2).join()).toMatch(/equals no checkpoint image/);
    expect(checkImage(model.images[2], model, [2], undefined).join()).toMatch(/no committed epoch/);
  });

  it(
    `${REPLAY ? `replays ${REPLAY.scenario}:${hex(REPLAY.seed)}` : `${TARGET} crash points`}: every recovery is exactly one allowed checkpoint image`,
    async () => {
      expect(deck.length, `no scenario matches '${FILTER}'`).toBeGreaterThan(0);
      console.log(
        REPLAY
          ? `crash: replaying ${REPLAY.scenario} with seed ${hex(REPLAY.seed)}`
          : `crash: base seed ${hex(SEED)} (replay the run with COLO_BLK_CRASH_SEED=${hex(SEED)}), ` +
              `${TARGET} crash points, ${CONCURRENCY} at a time`,
      );
      const run = await runCampaign({
        scenarios: SCENARIOS,
        deck,
        seed: SEED,
        target: TARGET,
        concurrency: CONCURRENCY,
        root,
        keepFailed: env.COLO_BLK_CRASH_KEEP === '1',
        replay: REPLAY,
        onResult: (r) => {
          if (env.COLO_BLK_CRASH_VERBOSE)
            console.log(
              `crash: ${r.scenario} ${hex(r.seed)}: ${r.crashes.map(crashLabel).join('; ')} ` +
                `(${Math.round(r.ms)} ms ${JSON.stringify(r.phases)})` +
                (env.COLO_BLK_CRASH_VERBOSE === '2' ? r.notes.map((n) => `\n    ${n}`).join('') : ''),
            );
          if (r.problems.length) console.error(`crash: BAD POINT\n${describeFailure(r)}`);
        },
      });
      recordFaults('crash points', run.crashes, `crash points, ${run.bad.length} bad recoveries`);
      console.log(
        `crash: ${run.crashes} crash points in ${run.results.length} runs, ${(run.ms / 1000).toFixed(1)} s` +
          `${REPLAY ? '' : ` (seed ${hex(SEED)})`}: ${summarize(run.results)}; ${run.bad.length} bad`,
      );
      if (REPLAY) for (const n of run.results[0].notes) console.log(`crash:   ${n}`);
      expect(run.bad.map(describeFailure), `${run.bad.length} bad crash points`).toEqual([]);
      if (!REPLAY) expect(run.crashes).toBeGreaterThanOrEqual(TARGET);
    },
    Math.max(180_000, TARGET * 2_000),
  );
});
