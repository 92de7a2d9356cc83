#!/usr/bin/env node
// `npm run test:crash -- [options]`: the crash-point suite (test/crash.test.ts)
// with more points, a fixed seed, one scenario, or one point replayed. It sets
// the COLO_BLK_CRASH_* variables the suite reads and runs it through
// tools/run-tests.mjs (so the run ends with "N passed, M failed" and the
// fault-injection count). Other arguments go to vitest.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const usage = `usage: npm run test:crash -- [options]

  --points N         crash points to run (default 200, as in CI)
  --seed S           base seed of the run (printed by every run), to replay it whole
  --replay SC:S      run one point again: scenario SC with seed S (printed with every failure)
  --scenario NAME    only scenarios whose name contains NAME (e.g. promotion, secondary@random, resync-)
  --concurrency C    points run at the same time (default 4)
  --keep             keep the directories of failed points
  --verbose          one line per point (twice: with its notes)

examples:
  npm run test:crash -- --points 1000
  npm run test:crash -- --replay secondary@secondary-mid-apply:0x1a2b3c4d`;

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const env = { ...process.env };
const rest = [];
const args = process.argv.slice(2);
const options = {
  '--points': 'COLO_BLK_CRASH_POINTS',
  '--seed': 'COLO_BLK_CRASH_SEED',
  '--replay': 'COLO_BLK_CRASH_REPLAY',
  '--scenario': 'COLO_BLK_CRASH_SCENARIO',
  '--concurrency': 'COLO_BLK_CRASH_CONCURRENCY',
};
let verbose = 0;
for (let i = 0; i < args.length; i++) {
  const arg = args[i];
  const eq = arg.indexOf('=');
  const name = eq > 0 ? arg.slice(0, eq) : arg;
  if (name === '-h' || name === '--help') {
    console.log(usage);
    process.exit(0);
  } else if (name === '--keep') env.COLO_BLK_CRASH_KEEP = '1';
  else if (name === '--verbose' || name === '-v') verbose++;
  else if (name in options) {
    const value = eq > 0 ? arg.slice(eq + 1) : args[++i];
    if (value === undefined || value === '') {
      console.error(`test:crash: ${name} needs a value\n\n${usage}`);
      process.exit(2);
    }
    env[options[name]] = value;
  } else rest.push(arg);
}
for (const key of ['COLO_BLK_CRASH_POINTS', 'COLO_BLK_CRASH_CONCURRENCY']) {
  const v = env[key];
  if (v !== undefined && !(Number.isSafeInteger(Number(v)) && Number(v) > 0)) {
    console.error(
      `test:crash: ${key === 'COLO_BLK_CRASH_POINTS' ? '--points' : '--concurrency'} must be a positive integer, not '${v}'`,
    );
    process.exit(2);
  }
}
if (verbose) env.COLO_BLK_CRASH_VERBOSE = String(verbose);
// The suite's processes must not inherit a crash point meant for one of them.
delete env.COLO_BLK_CRASH_AT;
delete env.COLO_BLK_CRASH_SKIP;

const r = spawnSync(
  process.execPath,
  [path.join(root, 'tools', 'run-tests.mjs'), 'test/crash.test.ts', ...rest],
  {
    stdio: 'inherit',
    env,
    cwd: root,
  },
);
process.exit(r.status ?? 1);
