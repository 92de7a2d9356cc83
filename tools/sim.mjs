#!/usr/bin/env node
// `npm run test:sim -- [options]`: the seeded whole-system simulator
// (test/sim.test.ts) with more seeds, other seeds, longer walks, or one seed
// replayed with its whole log. It sets the COLO_BLK_SIM_* variables the suite
// reads and runs it through tools/run-tests.mjs (so the run ends with
// "N passed, M failed" and the scenario count).
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const usage = `usage: npm run test:sim -- [options]

  --seeds N      scenarios to run (default 1000, as in npm test)
  --first S      first seed (default 1); seeds S .. S+N-1 run
  --actions A    actions per scenario (default 40)
  --seed S       replay one seed, printing every step it took (with --actions if the failure said so)

examples:
  npm run test:sim -- --seeds 20000
  npm run test:sim -- --seed 1234`;

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const env = { ...process.env };
const args = process.argv.slice(2);
const options = {
  '--seeds': 'COLO_BLK_SIM_SEEDS',
  '--first': 'COLO_BLK_SIM_FIRST',
  '--actions': 'COLO_BLK_SIM_ACTIONS',
};
for (let i = 0; i < args.length; i++) {
  const arg = args[i];
  const eq = arg.indexOf('=');
  const name = eq > 0 ? arg.slice(0, eq) : arg;
  if (name === '-h' || name === '--help') {
    console.log(usage);
    process.exit(0);
  }
  const value = eq > 0 ? arg.slice(eq + 1) : args[++i];
  if (!(name in options) && name !== '--seed') {
    console.error(`test:sim: unknown option ${name}\n\n${usage}`);
    process.exit(2);
  }
  if (!(Number.isSafeInteger(Number(value)) && Number(value) > 0)) {
    console.error(`test:sim: ${name} needs a positive integer, not '${value ?? ''}'\n\n${usage}`);
    process.exit(2);
  }
  if (name === '--seed') {
    env.COLO_BLK_SIM_FIRST = value;
    env.COLO_BLK_SIM_SEEDS = '1';
    env.COLO_BLK_SIM_VERBOSE = '1';
  } else env[options[name]] = value;
}
const seeds = Number(env.COLO_BLK_SIM_SEEDS ?? 1000);
const r = spawnSync(
  process.execPath,
  [
    path.join(root, 'tools', 'run-tests.mjs'),
    'test/sim.test.ts',
    // A long run gets time to finish: ~0.1 s per scenario on a slow machine.
    `--testTimeout=${Math.max(180_000, seeds * 200)}`,
  ],
  { stdio: 'inherit', env, cwd: root },
);
process.exit(r.status ?? 1);
