/**
 * `npm run bench`: colo-blk side by side with nbdkit, qemu-nbd and nbd-server,
 * every server serving the same raw image on tmpfs, every client workload run
 * against every server. Prints a table per workload (or --json) and rewrites
 * docs/BENCHMARKS.md, keeping its hand-written Analysis section.
 *
 * Servers are in servers.ts and workloads in workloads.ts; this file only
 * crosses the two lists, records failures as results and writes the report.
 */
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
  textTables,
  type BenchResult,
  type ServerRecord,
} from './report.js';
import { SERVERS, versionOf } from './servers.js';
import type { BenchContext, Outcome, RunningServer, ServerDef, WorkloadDef } from './types.js';
import { WORKLOADS } from './workloads.js';

const USAGE = `usage: npm run bench -- [options]      (or: node dist/bench/run.js [options])

Benchmarks colo-blk against nbdkit, qemu-nbd and nbd-server on a tmpfs image
and writes docs/BENCHMARKS.md.

options:
  --quick              short runs and a 256 MiB image (smoke check; takes about a minute)
  --only LIST          workloads to run, comma-separated ids or groups
  --servers LIST       servers to run, comma-separated
  --json               print the whole result as JSON on stdout instead of tables
  --no-write           do not rewrite docs/BENCHMARKS.md
  -h, --help           this help

workloads: ${WORKLOADS.map((w) => w.id).join(', ')}
groups:    ${[...new Set(WORKLOADS.map((w) => w.group))].join(', ')}
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
  write: boolean;
  servers: ServerDef[];
  workloads: WorkloadDef[];
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
  let onlyNames: string[] | null = null;
  if (values.only !== undefined) {
    onlyNames = splitList(values.only, '--only');
    const unknown = onlyNames.filter((n) => !WORKLOADS.some((w) => w.id === n || w.group === n));
    if (unknown.length)
      throw new UsageError(
        `unknown workload ${unknown.map((u) => `'${u}'`).join(', ')} in --only; ` +
          `known: ${WORKLOADS.map((w) => w.id).join(', ')} (or a group: ${[...new Set(WORKLOADS.map((w) => w.group))].join(', ')})`,
      );
    workloads = WORKLOADS.filter((w) => onlyNames!.includes(w.id) || onlyNames!.includes(w.group));
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
  }
  return {
    json: !!values.json,
    quick: !!values.quick,
    write: !values['no-write'],
    servers,
    workloads,
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
  const sync = r.servers.find((s) => s.name === 'colo-blk');
  const async = r.servers.find((s) => s.name === 'colo-blk-async');
  if (sync && async) {
    const parts = r.workloads.flatMap((w) => {
      const a = r.results[w.id]?.[async.name];
      const b = r.results[w.id]?.[sync.name];
      return a?.ok && b?.ok ? [`${w.id} ${formatRatio(a.value / b.value)}`] : [];
    });
    if (parts.length) notes.push(`I/O modes, \`--io async\` ÷ \`--io sync\`: ${parts.join(', ')}.`);
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
  const needsSource = opts.workloads.some((w) => w.prepare);
  const needed = imageSize * (needsSource ? 2 : 1) + 64 * 2 ** 20;
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
    log,
  };

  try {
    if (!fs.existsSync(path.join(root, 'dist/tools/colo-blk.js')))
      log('warning: dist/tools/colo-blk.js is missing (run `npm run build`); colo-blk will fail to start');
    log(
      `${opts.quick ? 'quick' : 'full'} run: ${opts.servers.length} servers × ${opts.workloads.length} workloads, ` +
        `${imageSize / 2 ** 20} MiB image in ${workDir}`,
    );
    const toolNames = [...new Set(['nbdinfo', ...opts.workloads.map((w) => w.tool)])];
    const [serverVersions, toolVersions] = await Promise.all([
      Promise.all(opts.servers.map((s) => s.version(ctx))),
      Promise.all(toolNames.map((t) => versionOf(t, ['--version']))),
    ]);
    const tools = Object.fromEntries(toolNames.map((t, i) => [t, toolVersions[i]]));

    let t = performance.now();
    fillRandom(ctx.image, imageSize);
    log(`created ${ctx.image} (${imageSize / 2 ** 20} MiB of random data) in ${sec(performance.now() - t)}`);
    for (const w of opts.workloads) await w.prepare?.(ctx);

    const results: BenchResult['results'] = Object.fromEntries(opts.workloads.map((w) => [w.id, {}]));
    const records: ServerRecord[] = opts.servers.map((s, i) => ({
      name: s.name,
      role: s.role,
      summary: s.summary,
      version: serverVersions[i],
      command: s.commandLine(ctx, 'PORT'),
    }));

    for (const [si, def] of opts.servers.entries()) {
      if (interrupted) return 130;
      const rec = records[si];
      currentName = def.name;
      log(`[${si + 1}/${opts.servers.length}] ${def.name}: starting`);
      let server: RunningServer | null = null;
      t = performance.now();
      try {
        const port = await freePort();
        server = await def.start(ctx, port);
        const info = await verify(ctx, server);
        rec.multiConn = info.multiConn;
        rec.startS = Math.round(performance.now() - t) / 1000;
        log(
          `  ${def.name} up on port ${port} (pid ${server.pid}, ${sec(performance.now() - t)}, multi-conn ${info.multiConn ? 'yes' : 'no'})`,
        );
      } catch (err) {
        rec.startError = (err as Error).message;
        log(`  ${def.name} failed to start: ${rec.startError}`);
        for (const w of opts.workloads)
          results[w.id][def.name] = { ok: false, error: `server did not start: ${rec.startError}` };
        if (server) await server.stop();
        currentName = null;
        continue;
      }
      try {
        for (const w of opts.workloads) {
          if (interrupted) break;
          const gone = server.exited();
          let outcome: Outcome;
          if (gone) outcome = { ok: false, error: gone };
          else {
            log(`  ${def.name}: ${w.id} (${w.title})`);
            t = performance.now();
            try {
              const m = await w.run(ctx, server);
              outcome = { ok: true, ...m };
              log(`    ${formatValue(m.value, w.unit)} ${w.unit}  (${sec(performance.now() - t)})`);
            } catch (err) {
              const why = server.exited() ?? (err as Error).message;
              outcome = { ok: false, error: why };
              log(`    failed: ${why}`);
            }
          }
          results[w.id][def.name] = outcome;
        }
      } finally {
        log(`  ${def.name}: stopping`);
        await server.stop();
        currentName = null;
      }
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
        sizeBytes: imageSize,
        setup:
          `a ${imageSize / 2 ** 20} MiB raw file on tmpfs, \`${ctx.image}\`, filled once per run with random ` +
          'data (bench/image.ts, crypto.randomFillSync in 16 MiB chunks — like `head -c ' +
          `${imageSize / 2 ** 20}M /dev/urandom > IMG\`) and deleted at the end. All servers serve this same file` +
          ' as export `disk0`.',
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
      notes: [],
    };
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
    const anyOk = Object.values(results).some((byServer) => Object.values(byServer).some((o) => o.ok));
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
