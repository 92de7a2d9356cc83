/**
 * `npm run bench`: colo-blk side by side with nbdkit, qemu-nbd and nbd-server,
 * every server serving the same raw image on tmpfs, every client workload run
 * against every server it applies to; then the replication scenarios
 * (checkpoint latency, memory), each on a fresh pair. Prints a table per
 * workload and per scenario (or --json) and rewrites docs/BENCHMARKS.md,
 * keeping its hand-written Analysis section.
 *
 * Servers are in servers.ts, workloads in workloads.ts and scenarios in
 * scenarios.ts; this file only crosses the lists, records failures as results
 * and writes the report.
 */
import process from 'node:process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import os from 'node:os';
import { fillRandom, freeBytes } from './image.js';
import { freePort, liveServers, liveTools, runCommand, stopProcess } from './proc.js';
import {
  compare,
  describeMachine,
  existingAnalysis,
  formatRatio,
  formatValue,
  markdownReport,
  overheadTargets,
  allOverheadRows,
  textTables,
  verdict,
  applies,
  type RelayCeiling,
  type BenchResult,
  type ScenarioRecord,
  type ServerRecord,
} from './report.js';
import { SCENARIOS } from './scenarios.js';
import { SERVERS, versionOf } from './servers.js';
import type { BenchContext, Outcome, RunningServer, ScenarioDef, ServerDef, WorkloadDef } from './types.js';
import { WORKLOADS } from './workloads.js';

const USAGE = `usage: npm run bench -- [options]      (or: node dist/bench/run.js [options])

Benchmarks colo-blk against nbdkit, qemu-nbd and nbd-server on a tmpfs image,
measures a replicated pair (checkpoint latency, memory) and writes
docs/BENCHMARKS.md.

options:
  --quick              short runs, a 256 MiB image and fewer checkpoints (smoke check)
  --runs N             runs of each workload per server, the best one kept (default 2;
                       the machine's noise moves a single run by ±15 %)
  --only LIST          workloads and scenarios to run, comma-separated ids or groups
  --servers LIST       servers to run, comma-separated (with --servers, scenarios run
                       only when --only names them; they start a pair of their own)
  --json               print the whole result as JSON on stdout instead of tables
  --no-write           do not rewrite docs/BENCHMARKS.md
  -h, --help           this help

workloads: ${WORKLOADS.map((w) => w.id).join(', ')}
groups:    ${[...new Set(WORKLOADS.map((w) => w.group))].join(', ')}
scenarios: ${SCENARIOS.map((x) => x.id).join(', ')} (loop: all the loop-* ones; vm: the vm-* ones)
servers:   ${SERVERS.map((s) => s.name).join(', ')}
`;

const EXPORT_NAME = 'disk0';
const FULL_IMAGE = 2 ** 30;
const QUICK_IMAGE = 256 * 2 ** 20;
const TMPFS = '/dev/shm';

class UsageError extends Error {}

interface Options {
  json: boolean;
  quick: boolean;
  runs: number;
  write: boolean;
  servers: ServerDef[];
  workloads: WorkloadDef[];
  scenarios: ScenarioDef[];
  subset: BenchResult['subset'];
}

function splitList(text: string, flag: string): string[] {
  const items = text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  if (items.length === 0) throw new UsageError(`${flag} needs a comma-separated list`);
  return items;
}

function parseOptions(argv: string[]): Options | 'help' {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        json: { type: 'boolean' },
        quick: { type: 'boolean' },
        runs: { type: 'string' },
        only: { type: 'string' },
        servers: { type: 'string' },
        'no-write': { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (err) {
    throw new UsageError((err as Error).message);
  }
  if (values.help) return 'help';

  let workloads = WORKLOADS;
  let scenarios = SCENARIOS;
  let onlyNames: string[] | null = null;
  if (values.only !== undefined) {
    onlyNames = splitList(values.only, '--only');
    // 'loop' names every scenario of the COLO loop (loop-modes, loop-scale, ...).
    onlyNames = onlyNames.flatMap((n) =>
      n === 'loop' || n === 'vm' ? SCENARIOS.filter((x) => x.id.startsWith(`${n}-`)).map((x) => x.id) : [n],
    );
    const unknown = onlyNames.filter(
      (n) => !WORKLOADS.some((w) => w.id === n || w.group === n) && !SCENARIOS.some((x) => x.id === n),
    );
    if (unknown.length)
      throw new UsageError(
        `unknown workload ${unknown.map((u) => `'${u}'`).join(', ')} in --only; ` +
          `known: ${WORKLOADS.map((w) => w.id).join(', ')} (or a group: ${[...new Set(WORKLOADS.map((w) => w.group))].join(', ')}; ` +
          `or a scenario: ${SCENARIOS.map((x) => x.id).join(', ')})`,
      );
    workloads = WORKLOADS.filter((w) => onlyNames!.includes(w.id) || onlyNames!.includes(w.group));
    scenarios = SCENARIOS.filter((x) => onlyNames!.includes(x.id));
  }
  let servers = SERVERS;
  let serverNames: string[] | null = null;
  if (values.servers !== undefined) {
    serverNames = splitList(values.servers, '--servers');
    const unknown = serverNames.filter((n) => !SERVERS.some((s) => s.name === n));
    if (unknown.length)
      throw new UsageError(
        `unknown server ${unknown.map((u) => `'${u}'`).join(', ')} in --servers; known: ${SERVERS.map((s) => s.name).join(', ')}`,
      );
    servers = SERVERS.filter((s) => serverNames!.includes(s.name));
    // --servers alone measures servers; scenarios run only when --only names them.
    if (onlyNames === null) scenarios = [];
  }
  // A server none of whose workloads was selected is not started at all.
  servers = servers.filter((s) => workloads.some((w) => applies(s, w.id)));
  const runs = values.runs === undefined ? (values.quick ? 1 : 2) : Number(values.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 10)
    throw new UsageError(`--runs wants a whole number from 1 to 10, not '${values.runs}'`);
  return {
    json: !!values.json,
    quick: !!values.quick,
    runs,
    write: !values['no-write'],
    servers,
    workloads,
    scenarios,
    subset: { servers: serverNames, workloads: onlyNames },
  };
}

function log(message: string): void {
  process.stderr.write(`bench: ${message}\n`);
}

const sec = (ms: number) => `${(ms / 1000).toFixed(1)} s`;

/** Check that the server serves the image: right size over NBD; record whether it offers multi-conn. */
async function verify(ctx: BenchContext, server: RunningServer): Promise<{ multiConn: boolean }> {
  const r = await runCommand('nbdinfo', ['--size', server.uri], { timeoutMs: 15_000 });
  const size = Number(r.stdout.trim());
  if (size !== ctx.imageSize)
    throw new Error(`nbdinfo --size reports ${r.stdout.trim()}, expected ${ctx.imageSize}`);
  const mc = await runCommand('nbdinfo', ['--can', 'multi-conn', server.uri], {
    timeoutMs: 15_000,
    allowFailure: true,
  });
  return { multiConn: mc.code === 0 };
}

/** The server being measured, for the interruption message. */
let currentName: string | null = null;
let workDirToRemove: string | null = null;
/** Set by SIGINT/SIGTERM: main() stops starting things and prints nothing more; onSignal exits. */
let interrupted = false;

function cleanupWorkDir(): void {
  if (workDirToRemove) fs.rmSync(workDirToRemove, { recursive: true, force: true });
  workDirToRemove = null;
}

function onSignal(signal: NodeJS.Signals): void {
  interrupted = true;
  log(`${signal}: stopping${currentName ? ` ${currentName}` : ' the servers'} and removing the image`);
  const exitCode = signal === 'SIGINT' ? 130 : 143;
  void Promise.all([...liveTools, ...liveServers].map((p) => stopProcess(p, 3000)))
    .catch(() => {})
    .finally(() => {
      cleanupWorkDir();
      process.exit(exitCode);
    });
}

function buildNotes(r: BenchResult, ctx: BenchContext): string[] {
  const notes: string[] = [];
  const subjects = r.servers.filter((s) => s.role === 'subject');
  const load = r.machine.loadAvgStart[0];
  notes.push(
    `${r.machine.cores} cores, shared with other work during the run (1-min load average ${load} at start` +
      `${r.machine.loadAvgEnd ? `, ${r.machine.loadAvgEnd[0]} at the end` : ''}); client and server also ` +
      'compete with each other for them. Repeat a run before reading much into small differences.',
  );
  for (const s of subjects) {
    const rows = r.workloads
      .map((w) => ({ w, ratio: r.comparison[w.id].ratios[s.name] }))
      .filter((x): x is { w: (typeof r.workloads)[number]; ratio: number } => x.ratio !== null);
    if (!rows.length) continue;
    rows.sort((a, b) => a.ratio - b.ratio);
    const weak = rows.filter((x) => x.ratio < 0.8);
    notes.push(
      `${s.name} ÷ best peer ranges from ${formatRatio(rows[0].ratio)} (${rows[0].w.id}) to ` +
        `${formatRatio(rows[rows.length - 1].ratio)} (${rows[rows.length - 1].w.id})` +
        (weak.length
          ? `; below 0.8× on ${weak.map((x) => `${x.w.id} (${formatRatio(x.ratio)})`).join(', ')}.`
          : '; never below 0.8×.'),
    );
  }
  const byName = (name: string) => r.servers.find((s) => s.name === name);
  const sync = byName('colo-blk-sync');
  for (const [other, label] of [
    ['colo-blk', 'the default mode (auto)'],
    ['colo-blk-async', '`--io async`'],
  ] as const) {
    const o = byName(other);
    if (!sync || !o) continue;
    const parts = r.workloads.flatMap((w) => {
      const a = r.results[w.id]?.[o.name];
      const b = r.results[w.id]?.[sync.name];
      return a?.ok && b?.ok ? [`${w.id} ${formatRatio(a.value / b.value)}`] : [];
    });
    if (parts.length) notes.push(`I/O modes, ${label} ÷ \`--io sync\`: ${parts.join(', ')}.`);
  }
  const rep = byName('colo-blk-replicated');
  if (rep && !rep.startError) {
    const parts = r.workloads.flatMap((w) => {
      const o = r.results[w.id]?.[rep.name];
      const t = o?.ok ? (o.detail?.server as Record<string, unknown> | undefined) : undefined;
      if (!t || t.checkpoints === undefined) return [];
      return [
        `${w.id}: ${t.checkpoints} checkpoints, ${t.checkpointFailures} failed` +
          (t.checkpointP50Ms !== undefined
            ? ` (p50 ${t.checkpointP50Ms} ms, p99 ${t.checkpointP99Ms} ms, max ${t.checkpointMaxMs} ms)`
            : '') +
          (t.firstFailure ? `, first failure: ${String(t.firstFailure)}` : '') +
          (t.outOfSync
            ? `; the primary marked the secondary out of sync: ${JSON.stringify(t.outOfSync)}`
            : ''),
      ];
    });
    notes.push(
      `colo-blk-replicated: the benchmark's coordinator loop ran \`POST /checkpoint\` every 100 ms (start to ` +
        `start; back to back when one took longer) for as long as the pair was up. During the workloads — ` +
        (parts.length ? parts.join('; ') : 'no figures') +
        '. Its ratio to the best peer is in the table for reference; the figure that matters for it is the ' +
        'replication overhead (÷ colo-blk).',
    );
  }
  const fastest = r.workloads.flatMap((w) =>
    r.comparison[w.id].fastest ? [`${w.id}: ${r.comparison[w.id].fastest}`] : [],
  );
  if (fastest.length) notes.push(`Fastest server per workload — ${fastest.join('; ')}.`);
  const mc = r.servers.filter((s) => s.multiConn !== undefined);
  if (mc.length)
    notes.push(
      `Multi-conn advertised (nbdcopy opens 4 connections only when it is): ` +
        mc.map((s) => `${s.name} ${s.multiConn ? 'yes' : 'no'}`).join(', ') +
        '.',
    );
  if ((ctx.runs ?? 1) > 1)
    notes.push(
      `Every figure in the results table is the best of ${ctx.runs} runs of the workload against the same ` +
        "server (`--runs`; each run's figure is in the JSON output), made in passes over all the servers (each " +
        'pass starts each server again), so that servers compared are measured minutes, not a quarter of an ' +
        'hour, apart; a single run on this machine moves by ±15 %.' +
        (r.servers.some((x) => x.role === 'subject') && !ctx.quick
          ? ' Each colo-blk server first runs the first workload of its session once, uncounted (JIT warm-up): ' +
            'the replicated pairs, started afresh for each workload, run each one so.'
          : ''),
    );
  const has = (kind: string) => r.workloads.some((w) => w.group === kind || w.id === kind);
  const serving = (name: string) => r.servers.some((s) => s.name === name && !s.startError);
  if (has('fio'))
    notes.push(
      `fio runs one job, i.e. one NBD connection, at the queue depth shown${ctx.quick ? '' : '; figures after a 1 s ramp'}.`,
    );
  if (has('nbdcopy'))
    notes.push(
      'nbdcopy copies the whole export (median of the runs); its time includes process start and the NBD ' +
        'handshake. It asks for block status (base:allocation) where offered; nbd-server offers none.',
    );
  if (has('qemu-img'))
    notes.push(
      'qemu-img bench uses QEMU’s own NBD client on one connection: sequential 4 KiB offsets, 16 requests ' +
        'in flight; IOPS = requests ÷ the time it reports.',
    );
  if (has('qemu-img') && serving('qemu-nbd'))
    notes.push(
      'qemu-nbd 7.2 does not set TCP_NODELAY on accepted connections (strace shows no setsockopt on them), ' +
        'so with QEMU’s client its small replies meet Nagle + delayed-ACK stalls: a few hundred IOPS in ' +
        'qemu-img bench while fio gets tens of thousands from the same server. That figure measures the ' +
        'pairing, not qemu-nbd’s I/O path.',
    );
  if (serving('nbd-server'))
    notes.push(
      'nbd-server runs as a daemon (stopped by the PID in its PID file): its `-d` foreground mode serves a ' +
        'single connection and exits, which multi-conn clients cannot use.',
    );
  if (ctx.quick)
    notes.push(
      'This was a `--quick` run: figures are from 1 s runs on a small image and are only a smoke check.',
    );
  const failures = r.workloads.flatMap((w) =>
    r.servers.flatMap((s) => {
      const o = r.results[w.id]?.[s.name];
      return o && !o.ok ? [`${s.name} / ${w.id}: ${o.error}`] : [];
    }),
  );
  if (failures.length) notes.push(`Failures: ${failures.join('; ')}.`);
  return notes;
}

/**
 * The best of the runs (higher is better everywhere); every run's figure is kept in
 * the detail. A failed run counts only if all of them failed.
 */
/** The relay of the limits scenario, when it ran and measured one (set beside the 1 MiB replication rows). */
function relayCeiling(scenarios: ScenarioRecord[]): RelayCeiling | undefined {
  const sc = scenarios.find((x) => x.id === 'limits');
  if (!sc?.outcome.ok) return undefined;
  return (sc.outcome.data as { relay?: RelayCeiling }).relay;
}

function bestOf(outcomes: Outcome[]): Outcome {
  const ok = outcomes.filter((o): o is Extract<Outcome, { ok: true }> => o.ok);
  if (ok.length === 0) return outcomes[0];
  const best = ok.reduce((a, b) => (b.value > a.value ? b : a));
  if (outcomes.length === 1) return best;
  return { ...best, detail: { ...best.detail, runs: outcomes.map((o) => (o.ok ? o.value : o.error)) } };
}

/** One workload against a running server; failures become results. */
async function runWorkload(
  ctx: BenchContext,
  def: ServerDef,
  server: RunningServer,
  w: WorkloadDef,
): Promise<Outcome> {
  const gone = server.exited();
  if (gone) return { ok: false, error: gone };
  log(`  ${def.name}: ${w.id} (${w.title})`);
  const t = performance.now();
  try {
    const tally = server.tally?.();
    const m = await w.run(ctx, server);
    if (tally) {
      const extra = await tally();
      m.detail = { ...m.detail, server: extra };
      if (extra.checkpoints !== undefined)
        log(
          `    checkpoints during it: ${extra.checkpoints}, failed ${extra.checkpointFailures}` +
            (extra.checkpointP50Ms !== undefined
              ? ` (p50 ${extra.checkpointP50Ms} ms, max ${extra.checkpointMaxMs} ms)`
              : '') +
            (extra.firstFailure ? `; first failure: ${extra.firstFailure}` : '') +
            `; CPU primary ${extra.primaryCpuS} s, secondary ${extra.secondaryCpuS} s in ${extra.wallS} s` +
            (extra.outOfSync ? '; the primary marked the secondary OUT OF SYNC' : ''),
        );
      for (const line of (extra.nodeLog as string[] | undefined) ?? []) log(`      ${line}`);
    }
    log(`    ${formatValue(m.value, w.unit)} ${w.unit}  (${sec(performance.now() - t)})`);
    return { ok: true, ...m };
  } catch (err) {
    const why = server.exited() ?? (err as Error).message;
    log(`    failed: ${why}`);
    return { ok: false, error: why };
  }
}

async function main(): Promise<number> {
  let opts: Options | 'help';
  try {
    opts = parseOptions(process.argv.slice(2));
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`bench: ${err.message}\n(run with --help for usage)\n`);
    return 2;
  }
  if (opts === 'help') {
    process.stdout.write(USAGE);
    return 0;
  }
  const t0 = performance.now();
  const started = new Date().toISOString();
  const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
  const imageSize = opts.quick ? QUICK_IMAGE : FULL_IMAGE;
  const needsImage = opts.servers.length > 0;
  const needsSource = needsImage && opts.workloads.some((w) => w.prepare);
  const replicated = opts.servers.some((s) => s.name === 'colo-blk-replicated');
  const scenarioBytes = Math.max(
    0,
    ...opts.scenarios.map((x) => x.tmpfsBytes({ quick: opts.quick } as BenchContext)),
  );
  const needed =
    (needsImage ? imageSize * (needsSource ? 2 : 1) : 0) +
    // the replicated server's secondary image and both state directories
    (replicated ? imageSize + 512 * 2 ** 20 : 0) +
    scenarioBytes +
    64 * 2 ** 20;
  if (!fs.existsSync(TMPFS)) {
    log(`${TMPFS} does not exist; the benchmark needs a tmpfs there`);
    return 1;
  }
  if (freeBytes(TMPFS) < needed) {
    log(
      `${TMPFS} has ${Math.floor(freeBytes(TMPFS) / 2 ** 20)} MiB free; the benchmark needs ${needed / 2 ** 20} MiB`,
    );
    return 1;
  }
  const machine = describeMachine();
  const workDir = fs.mkdtempSync(path.join(TMPFS, 'colo-blk-bench-'));
  workDirToRemove = workDir;
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const ctx: BenchContext = {
    root,
    image: path.join(workDir, 'disk.img'),
    imageSize,
    exportName: EXPORT_NAME,
    workDir,
    quick: opts.quick,
    runs: opts.runs,
    log,
  };

  try {
    if (!fs.existsSync(path.join(root, 'dist/src/cli/main.js')))
      log('warning: dist/src/cli/main.js is missing (run `npm run build`); colo-blk will fail to start');
    log(
      `${opts.quick ? 'quick' : 'full'} run: ${opts.servers.length} servers × ${opts.workloads.length} workloads` +
        (needsImage ? `, ${imageSize / 2 ** 20} MiB image` : '') +
        `${opts.scenarios.length ? `, scenarios ${opts.scenarios.map((x) => x.id).join(', ')}` : ''} in ${workDir}`,
    );
    const toolNames = needsImage ? [...new Set(['nbdinfo', ...opts.workloads.map((w) => w.tool)])] : [];
    const [serverVersions, toolVersions] = await Promise.all([
      Promise.all(opts.servers.map((s) => s.version(ctx))),
      Promise.all(toolNames.map((t) => versionOf(t, ['--version']))),
    ]);
    const tools = Object.fromEntries(toolNames.map((t, i) => [t, toolVersions[i]]));

    let t = performance.now();
    if (needsImage) {
      fillRandom(ctx.image, imageSize);
      log(
        `created ${ctx.image} (${imageSize / 2 ** 20} MiB of random data) in ${sec(performance.now() - t)}`,
      );
      for (const w of opts.workloads) await w.prepare?.(ctx);
    }

    const results: BenchResult['results'] = Object.fromEntries(opts.workloads.map((w) => [w.id, {}]));
    const records: ServerRecord[] = opts.servers.map((s, i) => ({
      name: s.name,
      role: s.role,
      summary: s.summary,
      version: serverVersions[i],
      command: s.commandLine(ctx, 'PORT'),
      ...(s.workloads ? { workloads: s.workloads } : {}),
    }));

    // The runs go in passes over every server, not run after run against one: this machine drifts
    // by ±15 % within minutes, and a ratio of two servers measured minutes apart carried the drift.
    const outcomes: Record<string, Record<string, Outcome[]>> = Object.fromEntries(
      opts.workloads.map((w) => [w.id, {}]),
    );
    for (let pass = 0; pass < opts.runs; pass++)
      for (const [si, def] of opts.servers.entries()) {
        if (interrupted) return 130;
        const rec = records[si];
        const passNote = opts.runs > 1 ? `, pass ${pass + 1}/${opts.runs}` : '';
        const mine = opts.workloads.filter((w) => applies(def, w.id));
        // A server that asks for it is started afresh for each workload (one session each).
        const sessions = def.freshPerWorkload ? mine.map((w) => [w]) : [mine];
        for (const [k, session] of sessions.entries()) {
          if (interrupted) return 130;
          currentName = def.name;
          const again =
            sessions.length > 1 ? ` (fresh for ${session[0].id}, ${k + 1}/${sessions.length})` : '';
          log(`[${si + 1}/${opts.servers.length}] ${def.name}: starting${again}${passNote}`);
          let server: RunningServer | null = null;
          t = performance.now();
          try {
            const port = await freePort();
            server = await def.start(ctx, port);
            const info = await verify(ctx, server);
            rec.multiConn = info.multiConn;
            rec.startS ??= Math.round(performance.now() - t) / 1000;
            log(
              `  ${def.name} up on port ${port} (pid ${server.pid}, ${sec(performance.now() - t)}, multi-conn ${info.multiConn ? 'yes' : 'no'})`,
            );
          } catch (err) {
            const why = (err as Error).message;
            rec.startError ??= why;
            log(`  ${def.name} failed to start: ${why}`);
            for (const w of session)
              (outcomes[w.id][def.name] ??= []).push({ ok: false, error: `server did not start: ${why}` });
            if (server) await server.stop();
            currentName = null;
            continue;
          }
          try {
            for (const w of session) {
              if (interrupted) break;
              // A colo-blk server runs the first workload of its session once, not counted: its JIT
              // compiles for the first ~10 s (1.3 s of compiler time in a replicating primary's
              // first 12 s, 1.4 s in 30 s); the workloads after it find it warm. The peers are
              // compiled programs.
              if (def.role === 'subject' && w === session[0] && !ctx.quick) {
                log(`  ${def.name}: warm-up run of ${w.id} (not counted)`);
                await runWorkload(ctx, def, server!, w);
              }
              (outcomes[w.id][def.name] ??= []).push(await runWorkload(ctx, def, server!, w));
            }
          } finally {
            log(`  ${def.name}: stopping`);
            await server.stop();
            currentName = null;
          }
        }
      }

    for (const w of opts.workloads)
      for (const [name, list] of Object.entries(outcomes[w.id])) results[w.id][name] = bestOf(list);

    const scenarios: ScenarioRecord[] = [];
    for (const [i, sc] of opts.scenarios.entries()) {
      if (interrupted) return 130;
      log(`[scenario ${i + 1}/${opts.scenarios.length}] ${sc.id}: ${sc.title}`);
      t = performance.now();
      const rec: ScenarioRecord = {
        id: sc.id,
        title: sc.title,
        method: sc.method(ctx),
        outcome: { ok: false, error: 'not run' },
      };
      try {
        rec.outcome = { ok: true, ...(await sc.run(ctx)) };
        for (const target of rec.outcome.targets)
          log(
            `    target: ${target.what} ${target.target}: ${target.measured ?? '—'}  ${verdict(target.pass)}`,
          );
      } catch (err) {
        if (interrupted) return 130;
        rec.outcome = { ok: false, error: (err as Error).message };
        log(`    failed: ${rec.outcome.error}`);
      }
      rec.durationS = Math.round(performance.now() - t) / 1000;
      log(`  ${sc.id}: done in ${sec(performance.now() - t)}`);
      scenarios.push(rec);
    }

    if (interrupted) return 130;
    machine.loadAvgEnd = os.loadavg().map((x) => Math.round(x * 100) / 100);
    const result: BenchResult = {
      started,
      durationS: Math.round(performance.now() - t0) / 1000,
      mode: opts.quick ? 'quick' : 'full',
      subset: opts.subset,
      machine,
      tools,
      image: {
        path: ctx.image,
        sizeBytes: needsImage ? imageSize : 0,
        setup: needsImage
          ? `a ${imageSize / 2 ** 20} MiB raw file on tmpfs, \`${ctx.image}\`, filled once per run with random ` +
            'data (bench/image.ts, crypto.randomFillSync in 16 MiB chunks — like `head -c ' +
            `${imageSize / 2 ** 20}M /dev/urandom > IMG\`) and deleted at the end. All servers serve this same file` +
            ' as export `disk0` (colo-blk-replicated: its primary does; its secondary has a fresh sparse image of' +
            ' the same size next to it).'
          : 'none in this run (no server workloads); the scenarios create their own images.',
      },
      servers: records,
      workloads: opts.workloads.map((w) => ({
        id: w.id,
        group: w.group,
        title: w.title,
        unit: w.unit,
        tool: w.tool,
        command: w.commandLine(ctx, `nbd://127.0.0.1:PORT/${EXPORT_NAME}`),
      })),
      results,
      comparison: Object.fromEntries(opts.workloads.map((w) => [w.id, compare(results[w.id], records)])),
      replicationOverhead: [],
      scenarios,
      targets: [],
      notes: [],
    };
    result.replicationOverhead = allOverheadRows(results, records, result.workloads);
    result.targets = [
      ...overheadTargets(result.replicationOverhead, relayCeiling(scenarios)).map((x) => ({
        ...x,
        section: 'Replication overhead',
      })),
      ...scenarios.flatMap((sc) =>
        sc.outcome.ok
          ? sc.outcome.targets.map((x) => ({ ...x, section: sc.title }))
          : [
              {
                what: `failed: ${sc.outcome.error}`,
                target: '',
                measured: null,
                pass: null,
                section: sc.title,
              },
            ],
      ),
    ];
    result.notes = buildNotes(result, ctx);

    if (opts.json) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
    else process.stdout.write('\n' + textTables(result));

    if (opts.write) {
      const doc = path.join(root, 'docs/BENCHMARKS.md');
      fs.mkdirSync(path.dirname(doc), { recursive: true });
      const analysis = existingAnalysis(doc);
      fs.writeFileSync(doc, markdownReport(result, analysis));
      log(
        `wrote ${path.relative(process.cwd(), doc) || doc}${analysis !== null ? ' (kept its Analysis section)' : ''}`,
      );
    }
    log(`done in ${sec(performance.now() - t0)}`);
    const anyOk =
      Object.values(results).some((byServer) => Object.values(byServer).some((o) => o.ok)) ||
      scenarios.some((sc) => sc.outcome.ok);
    return anyOk ? 0 : 1;
  } finally {
    cleanupWorkDir();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`bench: ${(err as Error).stack ?? String(err)}\n`);
    cleanupWorkDir();
    process.exitCode = 1;
  },
);
