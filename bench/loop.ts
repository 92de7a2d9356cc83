/**
 * The COLO loop, measured the way the paper does: the same guest (the HTTP
 * key-value service) driven by wrk, an HTTP load generator nobody here wrote,
 * through `colo-blk colo` in each mode:
 *
 *   loop-modes       none / remus 25 ms / remus 100 ms / colo, at 0, 0.1 %,
 *                    1 %, 10 % and 100 % of responses nondeterministic
 *   loop-scale       1 / 16 / 64 connections, and state dirtied per second
 *                    (value sizes), colo against none
 *   loop-checkpoint  the pause with 1 MiB dirtied per epoch, in 64 MiB and
 *                    in 1 GiB of state (memory sent ∝ what was dirtied)
 *   loop-failover    the client-visible gap when the primary side is
 *                    SIGKILLed under load; acknowledged PUTs lost; resets
 *
 * Every run starts a fresh stack of processes (tools/loop/stack.ts): the
 * secondary side (secondary disk node, SVM guest) and the comparer pinned to
 * one CPU with taskset, as if they were another host, the primary side to
 * the other; wrk is not pinned.
 */
import process from 'node:process';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { controlCall } from '../src/checkpoint/control.js';
import { PHASES, type CheckpointRecord } from '../src/checkpoint/coordinator/coordinator.js';
import { HttpConn } from '../tools/loop/http-conn.js';
import { Load, longestGap } from '../tools/loop/load.js';
import { hasTaskset, startLoop, type Loop, type LoopOptions } from '../tools/loop/stack.js';
import { liveServers, liveTools } from './proc.js';
import type { BenchContext, ScenarioDef, ScenarioReport, Target } from './types.js';

const MiB = 2 ** 20;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const f1 = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
const fmtBytes = (b: number) =>
  b >= MiB
    ? `${(b / MiB).toFixed(2)} MiB`
    : b >= 1024
      ? `${(b / 1024).toFixed(1)} KiB`
      : `${Math.round(b)} B`;
const pct = (p: number) =>
  p === 0 ? '0' : p < 0.01 ? `${(p * 100).toFixed(1)} %` : `${Math.round(p * 100)} %`;

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))] : NaN;
}

const WRK_SCRIPT = `
-- PUT/GET mix over a fixed key space; prints one JSON line at the end.
local putFrac = tonumber(os.getenv("PUT_FRAC") or "0.5")
local keys = tonumber(os.getenv("KEYS") or "1000")
local body = string.rep("v", tonumber(os.getenv("VALUE") or "128"))
request = function()
  local k = math.random(keys)
  if math.random() < putFrac then
    return wrk.format("PUT", "/kv/k" .. k, nil, body)
  end
  return wrk.format("GET", "/kv/k" .. k)
end
done = function(summary, latency, requests)
  io.write(string.format('{"requests":%d,"durationUs":%d,"connectErrors":%d,"readErrors":%d,"writeErrors":%d,"statusErrors":%d,"timeouts":%d,"p50":%d,"p99":%d,"p999":%d,"max":%d}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
`;

interface WrkResult {
  requests: number;
  durationUs: number;
  connectErrors: number;
  readErrors: number;
  writeErrors: number;
  statusErrors: number;
  timeouts: number;
  p50: number;
  p99: number;
  p999: number;
  max: number;
}

async function wrk(
  ctx: BenchContext,
  port: number,
  conns: number,
  seconds: number,
  env: { putFrac: number; keys: number; value: number },
): Promise<WrkResult> {
  const script = path.join(ctx.workDir, 'kv.lua');
  if (!fs.existsSync(script)) fs.writeFileSync(script, WRK_SCRIPT);
  const threads = Math.min(2, conns);
  const args = [
    '-t',
    String(threads),
    '-c',
    String(conns),
    '-d',
    `${seconds}s`,
    '--timeout',
    '10s',
    '-s',
    script,
    `http://127.0.0.1:${port}/`,
  ];
  return new Promise((resolve, reject) => {
    const child = spawn('wrk', args, {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: {
        ...process.env,
        PUT_FRAC: String(env.putFrac),
        KEYS: String(env.keys),
        VALUE: String(env.value),
      },
    });
    liveTools.add(child);
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    child.on('error', (e) => reject(new Error(`wrk: ${e.message} (install it: apt-get install wrk)`)));
    child.on('exit', (code) => {
      liveTools.delete(child);
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (code !== 0 || !line) return reject(new Error(`wrk exited ${code}: ${err || out}`));
      resolve(JSON.parse(line) as WrkResult);
    });
  });
}

interface ColoStatus {
  state: string;
  checkpoints: number;
  byReason: Record<string, number>;
  memoryBytes: number;
  diskBytes: number;
  lastError: string | null;
}

const colo = (l: Loop) => controlCall<ColoStatus>(l.coloControl, 'GET', '/status');

async function waitState(l: Loop, state: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await colo(l);
    if (s.state === state) return;
    if (Date.now() > deadline) throw new Error(`colo did not become ${state} (${s.state}: ${s.lastError})`);
    await sleep(50);
  }
}

function pinning(): LoopOptions['pin'] {
  return hasTaskset() && os.cpus().length >= 2 ? { primary: '0', secondary: '1' } : undefined;
}

/** A fresh stack for one measurement; its processes are stopped by PID however the measurement ends. */
async function withLoop<T>(
  ctx: BenchContext,
  opts: Omit<LoopOptions, 'dir' | 'size'>,
  fn: (l: Loop) => Promise<T>,
): Promise<T> {
  const dir = fs.mkdtempSync(path.join(ctx.workDir, 'loop-'));
  const loop = await startLoop({ dir, size: '2G', pin: pinning(), ...opts });
  const procs = loop.all().map((p) => p.child);
  for (const c of procs) liveServers.add(c);
  try {
    // The disk pair's first synchronisation must be over before anything is measured (in every mode).
    const primaryControl = { host: '127.0.0.1', port: Number(loop.primary.info.controlPort) };
    const deadline = Date.now() + 180_000;
    while (
      (await controlCall<{ peerState: string }>(primaryControl, 'GET', '/status')).peerState !== 'protected'
    ) {
      if (Date.now() > deadline) throw new Error('the disk pair did not synchronise in 180 s');
      await sleep(50);
    }
    if (opts.mode !== 'none') await waitState(loop, 'protected', 180_000);
    return await fn(loop);
  } finally {
    await loop.close();
    for (const c of procs) liveServers.delete(c);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** Every key of the key space written once (so GETs find them). */
async function populate(port: number, keys: number, value: number): Promise<void> {
  const conns = await Promise.all(Array.from({ length: 8 }, () => HttpConn.connect(port)));
  const body = 'v'.repeat(value);
  await Promise.all(
    conns.map(async (c, i) => {
      for (let k = 1 + i; k <= keys; k += conns.length) await c.request('PUT', `/kv/k${k}`, body, 30_000);
    }),
  );
  for (const c of conns) c.close();
}

/** CPU seconds (user + system) a process has used so far, from /proc (0 where /proc is absent). */
function cpuSeconds(pid: number | undefined): number {
  try {
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = f.slice(f.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks (USER_HZ 100)
  } catch {
    return 0;
  }
}

/** CPU seconds by side: the primary side (primary node, PVM guest), the secondary side, the comparer. */
function cpuBySide(l: Loop): { primary: number; secondary: number; comparer: number } {
  const c = (p: { child: { pid?: number } }) => cpuSeconds(p.child.pid);
  return { primary: c(l.primary) + c(l.pvm), secondary: c(l.secondary) + c(l.svm), comparer: c(l.colo) };
}

const cpuText = (c: RunFigures['cpuUsPerRequest']) =>
  `${Math.round(c.primary)} / ${Math.round(c.secondary)} / ${Math.round(c.comparer)}`;

interface ModeSpec {
  label: string;
  mode: 'none' | 'remus' | 'colo';
  intervalMs?: number;
}

interface RunFigures {
  label: string;
  mode: string;
  nondeterminism: number;
  conns: number;
  value: number;
  rps: number;
  p50: number;
  p99: number;
  p999: number;
  errors: number;
  checkpointsPerSec: number;
  byReason: Record<string, number>;
  memoryPerCheckpoint: number;
  diskPerCheckpoint: number;
  pauseP50: number | null;
  dirtiedPerSec: number;
  /** CPU µs per request on each side (the load generator excluded). */
  cpuUsPerRequest: { primary: number; secondary: number; comparer: number };
}

async function measureRun(
  ctx: BenchContext,
  m: ModeSpec,
  nondeterminism: number,
  conns: number,
  value: number,
  seconds: number,
): Promise<RunFigures> {
  const keys = 1000;
  const putFrac = 0.5;
  ctx.log(
    `loop: ${m.label}, nondeterminism ${pct(nondeterminism)}, ${conns} connection(s), ${value} B values, ${seconds} s`,
  );
  return withLoop(ctx, { mode: m.mode, nondeterminism, intervalMs: m.intervalMs }, async (loop) => {
    await populate(loop.port, keys, value);
    const before = await colo(loop);
    const cpu0 = cpuBySide(loop);
    const t0 = Date.now();
    const w = await wrk(ctx, loop.port, conns, seconds, { putFrac, keys, value });
    const cpu1 = cpuBySide(loop);
    const after = await colo(loop);
    const recs = (
      await controlCall<{ checkpoints: CheckpointRecord[] }>(
        loop.coloControl,
        'GET',
        '/checkpoints?limit=1000',
      )
    ).checkpoints.filter((r) => r.at >= t0);
    const secs = w.durationUs / 1e6;
    const n = after.checkpoints - before.checkpoints;
    const byReason: Record<string, number> = {};
    for (const [k, v] of Object.entries(after.byReason))
      if (v - (before.byReason[k] ?? 0) > 0) byReason[k] = v - (before.byReason[k] ?? 0);
    const rps = w.requests / secs;
    return {
      label: m.label,
      mode: m.mode,
      nondeterminism,
      conns,
      value,
      rps,
      p50: w.p50 / 1000,
      p99: w.p99 / 1000,
      p999: w.p999 / 1000,
      errors: w.connectErrors + w.readErrors + w.writeErrors + w.timeouts,
      checkpointsPerSec: n / secs,
      byReason,
      memoryPerCheckpoint: n ? (after.memoryBytes - before.memoryBytes) / n : 0,
      diskPerCheckpoint: n ? (after.diskBytes - before.diskBytes) / n : 0,
      pauseP50: recs.length
        ? quantile(
            recs.map((r) => r.pauseMs),
            0.5,
          )
        : null,
      dirtiedPerSec: rps * putFrac * value,
      cpuUsPerRequest: {
        primary: ((cpu1.primary - cpu0.primary) * 1e6) / w.requests,
        secondary: ((cpu1.secondary - cpu0.secondary) * 1e6) / w.requests,
        comparer: ((cpu1.comparer - cpu0.comparer) * 1e6) / w.requests,
      },
    };
  });
}

const reasonText = (r: Record<string, number>, secs: number) =>
  Object.entries(r)
    .map(([k, v]) => `${k} ${f1(v / secs)}`)
    .join(', ') || '–';

const MODES: ModeSpec[] = [
  { label: 'none', mode: 'none' },
  { label: 'remus 25 ms', mode: 'remus', intervalMs: 25 },
  { label: 'remus 100 ms', mode: 'remus', intervalMs: 100 },
  { label: 'colo', mode: 'colo' },
];
const LEVELS = [0, 0.001, 0.01, 0.1, 1];

const secondsOf = (ctx: BenchContext) => (ctx.quick ? 3 : 10);

export const loopModesScenario: ScenarioDef = {
  id: 'loop-modes',
  title: 'The COLO loop: modes × nondeterminism (wrk, 16 connections, 50 % PUT)',
  method: (ctx) =>
    `Each row is a fresh stack (disk pair, two guests, \`colo-blk colo\`); the primary side (primary node, PVM guest) pinned to CPU 0, ` +
    `the secondary side and the comparer to CPU 1, wrk unpinned. ` +
    `1000 keys are written first; then \`wrk -t2 -c16 -d${secondsOf(ctx)}s\` with a Lua script of PUTs (128 B values) ` +
    `and GETs, half each, over those keys. Latency percentiles are wrk's; checkpoints and bytes are the colo ` +
    `process's counters over the run. "× none" compares with none at the same nondeterminism.`,
  tmpfsBytes: () => 512 * MiB,
  run: async (ctx) => {
    const seconds = secondsOf(ctx);
    const rows: RunFigures[] = [];
    for (const level of LEVELS)
      for (const m of MODES) rows.push(await measureRun(ctx, m, level, 16, 128, seconds));
    const none = (level: number) => rows.find((r) => r.mode === 'none' && r.nondeterminism === level)!;
    const table = {
      columns: [
        'mode',
        'nondeterminism',
        'req/s',
        '× none',
        'p50 ms',
        'p99 ms',
        'p99.9 ms',
        'checkpoints/s by reason',
        'memory/ckpt',
        'disk/ckpt',
        'pause p50 ms',
        'CPU µs/req (PVM side / SVM side / comparer)',
      ],
      rows: rows.map((r) => [
        r.label,
        pct(r.nondeterminism),
        r.rps.toFixed(0),
        (r.rps / none(r.nondeterminism).rps).toFixed(2),
        f1(r.p50),
        f1(r.p99),
        f1(r.p999),
        reasonText(r.byReason, seconds),
        r.memoryPerCheckpoint ? fmtBytes(r.memoryPerCheckpoint) : '–',
        r.diskPerCheckpoint ? fmtBytes(r.diskPerCheckpoint) : '–',
        r.pauseP50 === null ? '–' : f1(r.pauseP50),
        cpuText(r.cpuUsPerRequest),
      ]),
    };
    const targets: Target[] = [];
    for (const level of [0, 0.001]) {
      const c = rows.find((r) => r.mode === 'colo' && r.nondeterminism === level)!;
      const n = none(level);
      targets.push({
        what: `colo throughput at ${pct(level)} nondeterminism, × none`,
        target: '≥ 0.8×',
        measured: `${(c.rps / n.rps).toFixed(2)}× (${c.rps.toFixed(0)} vs ${n.rps.toFixed(0)} req/s)`,
        pass: c.rps / n.rps >= 0.8,
      });
      targets.push({
        what: `colo p50 latency at ${pct(level)} nondeterminism, × none`,
        target: '≤ 1.5×',
        measured: `${(c.p50 / n.p50).toFixed(2)}× (${f1(c.p50)} vs ${f1(n.p50)} ms)`,
        pass: c.p50 / n.p50 <= 1.5,
      });
    }
    for (const level of [0, 0.01]) {
      const c = rows.find((r) => r.mode === 'colo' && r.nondeterminism === level)!;
      const r100 = rows.find((r) => r.label === 'remus 100 ms' && r.nondeterminism === level)!;
      targets.push({
        what: `colo p50 latency vs remus 100 ms at ${pct(level)}`,
        target: '≥ 10× lower',
        measured: `${(r100.p50 / c.p50).toFixed(1)}× lower (${f1(c.p50)} vs ${f1(r100.p50)} ms)`,
        pass: r100.p50 / c.p50 >= 10,
      });
    }
    const colo100 = rows.find((r) => r.mode === 'colo' && r.nondeterminism === 1)!;
    const remus25 = rows.find((r) => r.label === 'remus 25 ms' && r.nondeterminism === 1)!;
    return {
      tables: [{ table }],
      targets,
      notes: [
        `At 100 % nondeterminism every response differs: colo checkpoints ${f1(colo100.checkpointsPerSec)} times a second ` +
          `(${colo100.rps.toFixed(0)} req/s, p50 ${f1(colo100.p50)} ms) against remus 25 ms at ${remus25.rps.toFixed(0)} req/s, p50 ${f1(remus25.p50)} ms.`,
      ],
      data: { rows },
    };
  },
};

export const loopScaleScenario: ScenarioDef = {
  id: 'loop-scale',
  title: 'The COLO loop: connections and state dirtied per second (colo against none, 1 % nondeterminism)',
  method: (ctx) =>
    `As loop-modes, at 1 % nondeterminism, \`-d${secondsOf(ctx)}s\`: 1, 16 and 64 connections with 128 B values; ` +
    `then 16 connections with 128 B, 4 KiB and 32 KiB values (half the requests PUT them: the state dirtied per second).`,
  tmpfsBytes: () => 512 * MiB,
  run: async (ctx) => {
    const seconds = secondsOf(ctx);
    const level = 0.01;
    const specs: [number, number][] = [
      [1, 128],
      [16, 128],
      [64, 128],
      [16, 4096],
      [16, 32768],
    ];
    const rows: RunFigures[] = [];
    for (const [conns, value] of specs)
      for (const m of [MODES[0], MODES[3]]) rows.push(await measureRun(ctx, m, level, conns, value, seconds));
    const none = (r: RunFigures) =>
      rows.find((x) => x.mode === 'none' && x.conns === r.conns && x.value === r.value)!;
    const table = {
      columns: [
        'mode',
        'connections',
        'value',
        'dirtied/s',
        'req/s',
        '× none',
        'p50 ms',
        'p99 ms',
        'checkpoints/s',
        'memory/ckpt',
        'disk/ckpt',
        'CPU µs/req (PVM side / SVM side / comparer)',
      ],
      rows: rows.map((r) => [
        r.label,
        String(r.conns),
        fmtBytes(r.value),
        `${fmtBytes(r.dirtiedPerSec)}/s`,
        r.rps.toFixed(0),
        (r.rps / none(r).rps).toFixed(2),
        f1(r.p50),
        f1(r.p99),
        f1(r.checkpointsPerSec),
        r.memoryPerCheckpoint ? fmtBytes(r.memoryPerCheckpoint) : '–',
        r.diskPerCheckpoint ? fmtBytes(r.diskPerCheckpoint) : '–',
        cpuText(r.cpuUsPerRequest),
      ]),
    };
    return { tables: [{ table }], targets: [], notes: [], data: { rows } };
  },
};

export const loopCheckpointScenario: ScenarioDef = {
  id: 'loop-checkpoint',
  title: 'The COLO loop: checkpoint pause with 1 MiB dirtied per epoch, by state size',
  method: (ctx) =>
    `Guests started with \`--preload\` (in-memory state not on the disk) of each size; after the pairing (a full ` +
    `checkpoint), each epoch PUTs 256 values of 4 KiB (1 MiB of state, 1.1 MiB of disk log) through the comparer ` +
    `on 4 connections, then asks for a manual checkpoint; ${ctx.quick ? 8 : 30} epochs. Each size twice: with early resume (the default: the PVM runs again once its state is captured and the disk epoch sealed, before the send) and with \`--no-early-resume\` (it stays paused until the cut). The pause is the PVM's, from its pause call until it runs again; the SVM's, from its pause call (just before the PVM's) until it runs again after its load (in colo the PVM's output waits for the SVM's meanwhile); the phases are the whole transaction's.`,
  tmpfsBytes: () => 1024 * MiB,
  run: async (ctx) => {
    const sizes = ctx.quick ? [64 * MiB, 256 * MiB] : [64 * MiB, 1024 * MiB];
    const epochs = ctx.quick ? 8 : 30;
    const results: {
      size: number;
      early: boolean;
      pairMs: number;
      pairBytes: number;
      recs: CheckpointRecord[];
    }[] = [];
    for (const size of sizes)
      for (const early of [true, false]) {
        ctx.log(
          `loop: checkpoints with 1 MiB dirtied per epoch in ${fmtBytes(size)} of state${early ? '' : ', --no-early-resume'}`,
        );
        await withLoop(
          ctx,
          {
            mode: 'colo',
            nondeterminism: 0,
            intervalMs: 3_600_000,
            guestArgs: ['--preload', String(size)],
            coloArgs: ['--timeout', '300000', ...(early ? [] : ['--no-early-resume'])],
          },
          async (loop) => {
            const pair = (
              await controlCall<{ checkpoints: CheckpointRecord[] }>(loop.coloControl, 'GET', '/checkpoints')
            ).checkpoints[0];
            const conns = await Promise.all(Array.from({ length: 4 }, () => HttpConn.connect(loop.port)));
            const value = 'd'.repeat(4096);
            const recs: CheckpointRecord[] = [];
            for (let e = 0; e < epochs; e++) {
              await Promise.all(
                conns.map(async (c, i) => {
                  for (let k = 0; k < 64; k++)
                    await c.request('PUT', `/kv/e${e % 4}-${i}-${k}`, value, 30_000);
                }),
              );
              recs.push(
                await controlCall<CheckpointRecord>(
                  loop.coloControl,
                  'POST',
                  '/checkpoint',
                  undefined,
                  60_000,
                ),
              );
            }
            for (const c of conns) c.close();
            results.push({ size, early, pairMs: pair.pauseMs, pairBytes: pair.memoryBytes, recs });
          },
        );
      }
    const rows = results.map((r) => {
      const pause = r.recs.map((x) => x.pauseMs);
      const svmPause = r.recs.map((x) => x.svmPauseMs ?? 0);
      return [
        fmtBytes(r.size),
        r.early ? 'early (default)' : 'after the cut',
        `${fmtBytes(r.pairBytes)} in ${f1(r.pairMs)} ms`,
        fmtBytes(
          quantile(
            r.recs.map((x) => x.memoryBytes),
            0.5,
          ),
        ),
        fmtBytes(
          quantile(
            r.recs.map((x) => x.diskBytes),
            0.5,
          ),
        ),
        f1(quantile(pause, 0.5)),
        f1(quantile(pause, 0.99)),
        f1(quantile(svmPause, 0.5)),
        PHASES.map(
          (p) =>
            `${p} ${f1(
              quantile(
                r.recs.map((x) => x.phases[p]),
                0.5,
              ),
            )}`,
        ).join(', '),
      ];
    });
    const defaults = results.filter((r) => r.early);
    const small = defaults[0];
    const large = defaults[defaults.length - 1];
    const kept = results.filter((r) => !r.early);
    const keptP50 = kept.map((r) =>
      f1(
        quantile(
          r.recs.map((x) => x.pauseMs),
          0.5,
        ),
      ),
    );
    const memRatio =
      quantile(
        large.recs.map((x) => x.memoryBytes),
        0.5,
      ) /
      quantile(
        small.recs.map((x) => x.memoryBytes),
        0.5,
      );
    const p50 = quantile(
      small.recs.map((x) => x.pauseMs),
      0.5,
    );
    const p50Large = quantile(
      large.recs.map((x) => x.pauseMs),
      0.5,
    );
    const svmP50 = (r: (typeof results)[number]) =>
      f1(
        quantile(
          r.recs.map((x) => x.svmPauseMs ?? 0),
          0.5,
        ),
      );
    const targets: Target[] = [
      {
        what: `checkpoint pause p50, 1 MiB dirtied, ${fmtBytes(small.size)} of state`,
        target: '≤ 10 ms',
        measured: `${f1(p50)} ms (kept paused until the cut: ${keptP50[0]} ms; the SVM's pause ${svmP50(small)} ms)`,
        pass: p50 <= 10,
      },
      {
        what: `checkpoint pause p50, 1 MiB dirtied, ${fmtBytes(large.size)} of state`,
        target: '≤ 10 ms',
        measured: `${f1(p50Large)} ms (kept paused until the cut: ${keptP50[keptP50.length - 1]} ms; the SVM's pause ${svmP50(large)} ms)`,
        pass: p50Large <= 10,
      },
      {
        what: `memory sent per checkpoint, ${fmtBytes(large.size)} vs ${fmtBytes(small.size)} of state`,
        target: '∝ dirtied (ratio ≈ 1)',
        measured: `${memRatio.toFixed(2)}×`,
        pass: memRatio < 1.2,
      },
    ];
    return {
      tables: [
        {
          table: {
            columns: [
              'state',
              'PVM resumes',
              'pairing (full)',
              'memory/ckpt p50',
              'disk/ckpt p50',
              'pause p50 ms',
              'pause p99 ms',
              'SVM pause p50 ms',
              'phases p50 (ms)',
            ],
            rows,
          },
        },
      ],
      targets,
      notes: [],
      data: {
        results: results.map((r) => ({
          size: r.size,
          early: r.early,
          pairMs: r.pairMs,
          pairBytes: r.pairBytes,
          records: r.recs,
        })),
      },
    };
  },
};

export const loopFailoverScenario: ScenarioDef = {
  id: 'loop-failover',
  title: 'The COLO loop: failover under load (the primary side SIGKILLed)',
  method: (ctx) =>
    `8 clients on keep-alive connections PUT and GET their own keys through the comparer (colo, 1 % nondeterminism, ` +
    `default settings: heartbeat 100 ms, a side lost after 500 ms or two refused probes); after 2 s the PVM guest and ` +
    `the primary disk node are SIGKILLed together; the load goes on for 2 s. The gap is the longest wait between two ` +
    `responses around the kill; then every acknowledged PUT is read back. ${ctx.quick ? 2 : 5} rounds, each on a fresh stack.`,
  tmpfsBytes: () => 512 * MiB,
  run: async (ctx): Promise<ScenarioReport> => {
    const rounds = ctx.quick ? 2 : 5;
    const rows: {
      gap: number;
      coordinatorMs: number;
      lost: number;
      resets: number;
      errors: number;
      acked: number;
    }[] = [];
    for (let i = 0; i < rounds; i++) {
      ctx.log(`loop: failover round ${i + 1} of ${rounds}`);
      rows.push(
        await withLoop(ctx, { mode: 'colo', nondeterminism: 0.01 }, async (loop) => {
          const load = await Load.open(loop.port, 8);
          load.start();
          await sleep(2000);
          const killedAt = Date.now();
          loop.pvm.child.kill('SIGKILL');
          loop.primary.child.kill('SIGKILL');
          await sleep(2000);
          await load.pause();
          let lost = 0;
          for (const [key, value] of load.acked) {
            const r = await load.conns[0].request('GET', `/kv/${key}`, undefined, 10_000).catch(() => null);
            if (r?.body.toString() !== value) lost++;
          }
          const st = await controlCall<{ failovers: { ms: number }[] }>(loop.coloControl, 'GET', '/status');
          for (const c of load.conns) c.close();
          return {
            gap: longestGap(load.times, killedAt - 1000, killedAt),
            coordinatorMs: st.failovers[0]?.ms ?? NaN,
            lost,
            resets: load.resets(),
            errors: load.errors.length,
            acked: load.acked.size,
          };
        }),
      );
    }
    const worst = Math.max(...rows.map((r) => r.gap));
    const lost = rows.reduce((a, r) => a + r.lost, 0);
    const resets = rows.reduce((a, r) => a + r.resets, 0);
    return {
      tables: [
        {
          table: {
            columns: [
              'round',
              'client-visible gap ms',
              'coordinator ms',
              'acknowledged PUTs',
              'lost',
              'connections reset',
              'errors',
            ],
            rows: rows.map((r, i) => [
              String(i + 1),
              f1(r.gap),
              f1(r.coordinatorMs),
              String(r.acked),
              String(r.lost),
              String(r.resets),
              String(r.errors),
            ]),
          },
        },
      ],
      targets: [
        {
          what: 'failover: kill → first response from the SVM (worst round)',
          target: '≤ 1 s',
          measured: `${f1(worst)} ms`,
          pass: worst <= 1000,
        },
        { what: 'acknowledged requests lost', target: '0', measured: String(lost), pass: lost === 0 },
        { what: 'client connections reset', target: '0', measured: String(resets), pass: resets === 0 },
      ],
      notes: [],
      data: { rows },
    };
  },
};

export const LOOP_SCENARIOS = [
  loopModesScenario,
  loopScaleScenario,
  loopCheckpointScenario,
  loopFailoverScenario,
];
