#!/usr/bin/env node
// `npm run fuzz -- [--target nbd-server|link-frames|all] [--seconds N] [--json] [--keep DIR]`
//
// Runs the coverage-guided fuzz targets (test/fuzz/*.fuzz.mjs, Jazzer.js)
// from a copy of their seed corpora (fixtures/fuzz/<target>/), each for N
// seconds, and reports per target: inputs run, rate, coverage, new corpus
// entries, peak RSS and crashes. Exit 1 on a crash (its reproducer is kept
// and named). --keep DIR keeps the grown corpora (to merge into fixtures
// with libFuzzer's -merge=1). Needs `npm run build` first.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { toolArgs } from '../cli-args.mjs';
import { jazzerEnv } from './jazzer-compat.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const TARGETS = ['nbd-server', 'link-frames'];

const usage = `usage: npm run fuzz -- [options]

  --target T     nbd-server, link-frames or all (default all)
  --seconds N    how long each target runs (default 60)
  --seed S       libFuzzer's seed, to repeat a run (default 0: libFuzzer picks one)
  --keep DIR     keep the grown corpora in DIR/<target>
  --json         one JSON line per target instead of text

Exits 1 on a crash (its reproducer is kept and named), 2 on a usage error.`;

const o = toolArgs('fuzz', usage, {
  target: { type: 'string', default: 'all' },
  seconds: { type: 'string', default: '60' },
  seed: { type: 'string', default: '0' },
  keep: { type: 'string' },
  json: { type: 'boolean', default: false },
});
const targets = o.target === 'all' ? TARGETS : [o.target];
const seconds = Number(o.seconds);
if (!targets.every((t) => TARGETS.includes(t))) {
  process.stderr.write(`fuzz: --target must be one of ${TARGETS.join(', ')} or all\n`);
  process.exit(2);
}
if (!(seconds >= 1)) {
  process.stderr.write('fuzz: --seconds must be at least 1\n');
  process.exit(2);
}
if (!fs.existsSync(path.join(root, 'dist', 'src', 'net', 'server.js'))) {
  process.stderr.write('fuzz: run `npm run build` first (the targets load dist/)\n');
  process.exit(2);
}

let env;
try {
  env = { ...process.env, ...jazzerEnv() };
} catch (err) {
  process.stderr.write(`fuzz: ${err.message}\n`);
  process.exit(2);
}

function runTarget(target) {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), `colo-blk-fuzz-${target}-`));
  const corpus = o.keep ? path.join(o.keep, target) : path.join(work, 'corpus');
  const artifacts = path.join(work, 'artifacts') + path.sep;
  fs.mkdirSync(corpus, { recursive: true });
  fs.mkdirSync(artifacts, { recursive: true });
  const seeds = path.join(root, 'fixtures', 'fuzz', target);
  for (const f of fs.readdirSync(seeds)) fs.copyFileSync(path.join(seeds, f), path.join(corpus, f));
  const jazzer = path.join(root, 'node_modules', '@jazzer.js', 'core', 'dist', 'cli.js');
  const args = [
    jazzer,
    path.join(root, 'test', 'fuzz', `${target}.fuzz.mjs`),
    corpus,
    '--',
    `-max_total_time=${seconds}`,
    `-artifact_prefix=${artifacts}`,
    '-print_final_stats=1',
    ...(Number(o.seed) > 0 ? [`-seed=${o.seed}`] : []),
  ];
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: root, env, stdio: ['ignore', 'pipe', 'pipe'] });
    // Fuzzing takes every cycle it can get: let anything else on the machine (a test suite) go first.
    try {
      os.setPriority(child.pid, 19);
    } catch {
      // not allowed here: run at normal priority
    }
    let out = '';
    const take = (d) => {
      out += d.toString();
      if (out.length > 4_000_000) out = out.slice(-2_000_000);
    };
    child.stdout.on('data', take);
    child.stderr.on('data', take);
    // Progress: libFuzzer's pulse lines, at most one every 5 s.
    let last = 0;
    const pulse = setInterval(() => {
      const m = [...out.matchAll(/#(\d+)\s+\w+\s+cov: (\d+)/g)].at(-1);
      if (m && !o.json && Date.now() - last > 4_000) {
        last = Date.now();
        process.stderr.write(`fuzz ${target}: ${m[1]} inputs, ${m[2]} edges\n`);
      }
    }, 1000);
    child.on('close', (code) => {
      clearInterval(pulse);
      // libFuzzer's final stats; its last status line when they are missing.
      const lastLine = [...out.matchAll(/#(\d+)\s+\w+\s+cov: (\d+).*?exec\/s: (\d+) rss: (\d+)Mb/g)].at(-1);
      const fallback = { number_of_executed_units: 1, average_exec_per_sec: 3, peak_rss_mb: 4 };
      const stat = (name) =>
        Number(
          new RegExp(`stat::${name}:\\s+(\\d+)`).exec(out)?.[1] ??
            (fallback[name] && lastLine ? lastLine[fallback[name]] : NaN),
        );
      const cov = lastLine?.[2] ?? [...out.matchAll(/cov: (\d+)/g)].at(-1)?.[1];
      const crashes = fs.readdirSync(artifacts).map((f) => path.join(artifacts, f));
      resolve({
        target,
        seconds,
        exitCode: code,
        runs: stat('number_of_executed_units'),
        execPerSec: stat('average_exec_per_sec'),
        newUnits: stat('new_units_added'),
        peakRssMb: stat('peak_rss_mb'),
        edges: cov === undefined ? null : Number(cov),
        crashes,
        tail: code === 0 ? undefined : out.split('\n').slice(-60).join('\n'),
      });
      if (!o.keep && crashes.length === 0) fs.rmSync(work, { recursive: true, force: true });
    });
  });
}

let failed = false;
for (const t of targets) {
  const r = await runTarget(t);
  if (r.exitCode !== 0 || r.crashes.length) failed = true;
  if (o.json) process.stdout.write(JSON.stringify(r) + '\n');
  else {
    process.stdout.write(
      `${t}: ${r.runs} inputs in ${seconds} s (${r.execPerSec}/s), ${r.edges} edges, ` +
        `${r.newUnits} new corpus entries, peak RSS ${r.peakRssMb} MiB, ${r.crashes.length} crashes\n`,
    );
    if (r.crashes.length) process.stdout.write(`  reproducers: ${r.crashes.join(' ')}\n`);
    if (r.tail) process.stdout.write(r.tail + '\n');
  }
}
process.exit(failed ? 1 : 0);
