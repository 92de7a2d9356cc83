/**
 * The servers under test. Each serves ctx.image as export ctx.exportName on
 * 127.0.0.1:port; run.ts starts them one at a time and verifies each with
 * nbdinfo before measuring.
 */
import process from 'node:process';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  isAlive,
  lastLine,
  liveServers,
  runCommand,
  shellQuote,
  stopProcess,
  TailBuffer,
  waitForPort,
} from './proc.js';
import {
  checkpoint,
  cpuSecondsOrNaN,
  nodeArgs,
  pairArgs,
  startPair,
  status,
  type PairOptions,
} from './pair.js';
import type { BenchContext, RunningServer, ServerDef } from './types.js';
import { percentile } from '../src/util/stats.js';

const HOST = '127.0.0.1';
const round2 = (x: number) => Math.round(x * 100) / 100;
const START_TIMEOUT_MS = 15_000;

/** First line of `cmd args` output (stdout, else stderr), or why it could not be run. */
export async function versionOf(
  cmd: string,
  args: string[],
  clean?: (line: string) => string,
): Promise<string> {
  try {
    const r = await runCommand(cmd, args, { timeoutMs: 10_000, allowFailure: true });
    const line = (r.stdout.trim() || r.stderr.trim()).split('\n')[0].trim();
    return clean ? clean(line) : line;
  } catch (err) {
    return `unavailable (${(err as Error).message})`;
  }
}

function uriOf(ctx: BenchContext, port: number): string {
  return `nbd://${HOST}:${port}/${ctx.exportName}`;
}

function describeExit(name: string, child: ChildProcess, stderr: TailBuffer): string | null {
  if (child.exitCode === null && child.signalCode === null) return null;
  const why = lastLine(stderr.toString());
  return `${name} exited (${child.exitCode ?? child.signalCode})${why ? `: ${why}` : ''}`;
}

/** Spawn `cmd args` as a foreground server and wait until the port answers (or `ready` resolves). */
async function startForeground(
  name: string,
  cmd: string,
  args: string[],
  ctx: BenchContext,
  port: number,
  ready?: (child: ChildProcess, stdout: TailBuffer) => Promise<void>,
): Promise<RunningServer> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: ctx.root });
  liveServers.add(child);
  const stdout = new TailBuffer();
  const stderr = new TailBuffer();
  child.stdout!.on('data', (d: Buffer) => stdout.push(d));
  child.stderr!.on('data', (d: Buffer) => stderr.push(d));
  const spawnError = new Promise<never>((_, reject) =>
    child.once('error', (err: NodeJS.ErrnoException) =>
      reject(new Error(err.code === 'ENOENT' ? `${cmd}: command not found` : `${cmd}: ${err.message}`)),
    ),
  );
  spawnError.catch(() => {});
  const exited = () => describeExit(name, child, stderr);
  try {
    await Promise.race([
      spawnError,
      (async () => {
        if (ready) await ready(child, stdout);
        await waitForPort(HOST, port, START_TIMEOUT_MS, exited);
      })(),
    ]);
  } catch (err) {
    await stopProcess(child, 2000);
    liveServers.delete(child);
    throw err;
  }
  return {
    host: HOST,
    port,
    uri: uriOf(ctx, port),
    pid: child.pid!,
    exited,
    tally: () => cpuTally({ server: child.pid! }),
    stop: async () => {
      const how = await stopProcess(child, 5000);
      liveServers.delete(child);
      if (how === 'killed') ctx.log(`  ${name} ignored SIGTERM for 5 s; killed`);
    },
  };
}

/** Start counting the CPU time of some processes; the function returned reports seconds used since. */
function cpuTally(pids: Record<string, number>): () => Promise<Record<string, unknown>> {
  const t0 = performance.now();
  const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuSecondsOrNaN(pid)]));
  return async () => {
    const wall = (performance.now() - t0) / 1000;
    const out: Record<string, unknown> = { wallS: round2(wall) };
    for (const [k, pid] of Object.entries(pids)) {
      const used = cpuSecondsOrNaN(pid) - before[k];
      if (Number.isFinite(used)) out[`${k}CpuS`] = round2(used);
    }
    return out;
  };
}

/** colo-blk prints {"event":"listening","port":N} on stdout once it accepts connections. */
function coloReady(port: number, ctx: BenchContext) {
  return async (child: ChildProcess, stdout: TailBuffer): Promise<void> => {
    const deadline = performance.now() + START_TIMEOUT_MS;
    while (performance.now() < deadline) {
      for (const line of stdout.toString().split('\n')) {
        if (!line.startsWith('{')) continue;
        try {
          const msg = JSON.parse(line) as { event?: string; port?: number };
          if (msg.event === 'listening') {
            if (msg.port !== port) throw new Error(`colo-blk listens on port ${msg.port}, expected ${port}`);
            return;
          }
        } catch (err) {
          if (!(err instanceof SyntaxError)) throw err;
        }
      }
      if (child.exitCode !== null || child.signalCode !== null) return; // waitForPort reports why
      await sleep(20);
    }
    ctx.log('  colo-blk did not print its listening line; waiting for the port instead');
  };
}

async function coloVersion(ctx: BenchContext): Promise<string> {
  const pkg = JSON.parse(fs.readFileSync(path.join(ctx.root, 'package.json'), 'utf8')) as {
    version: string;
  };
  let rev = '';
  try {
    const r = await runCommand('git', ['describe', '--always', '--dirty'], {
      timeoutMs: 5000,
      cwd: ctx.root,
    });
    rev = ` (git ${r.stdout.trim()})`;
  } catch {
    // not a git checkout; the package version alone will do
  }
  return `colo-blk ${pkg.version}${rev}, Node ${process.version}`;
}

const IO_SUMMARY = {
  auto: "the default I/O mode, auto: small requests with pread/pwrite on the event loop, large ones in libuv's thread pool",
  sync: '--io sync (pread/pwrite on the event loop)',
  async: "--io async (libuv's thread pool)",
};

/** `colo-blk serve`; io undefined = the default mode (no --io option). */
/** The CPUs of the pinned variants: the node under test and its clients on one, the secondary on the other. */
export const PIN = { primary: '0', secondary: '1' } as const;

function coloBlk(io: 'sync' | 'async' | undefined, name: string, pinned = false): ServerDef {
  const args = (ctx: BenchContext, port: number | string) => [
    path.join(ctx.root, 'bin/colo-blk.js'),
    'serve',
    '--listen',
    `${HOST}:${port}`,
    '--export',
    `${ctx.exportName}=${ctx.image}`,
    ...(io ? ['--io', io] : []),
    '--json',
    '--quiet',
  ];
  const pin = pinned ? ['taskset', '-c', PIN.primary] : [];
  return {
    name,
    role: 'subject',
    summary:
      `colo-blk serve, ${IO_SUMMARY[io ?? 'auto']}` +
      (pinned ? `; the server and fio pinned to CPU ${PIN.primary} (the baseline of the pinned pair)` : ''),
    ...(pinned ? { workloads: REPLICATED_WORKLOADS } : {}),
    version: coloVersion,
    commandLine: (ctx, port) => shellQuote([...pin, 'node', ...args(ctx, port)]).replace(ctx.root + '/', ''),
    start: async (ctx, port) => {
      const server = await (pinned
        ? startForeground(
            name,
            'taskset',
            ['-c', PIN.primary, process.execPath, ...args(ctx, port)],
            ctx,
            port,
            coloReady(port, ctx),
          )
        : startForeground(name, process.execPath, args(ctx, port), ctx, port, coloReady(port, ctx)));
      return pinned ? { ...server, clientCpus: PIN.primary } : server;
    },
  };
}

// ---------------------------------------------------------------- colo-blk-replicated

/** Checkpoint period of the replicated server's coordinator loop (start to start). */
export const CHECKPOINT_INTERVAL_MS = 100;
const CHECKPOINT_TIMEOUT_MS = 10_000;
/** The write workloads: the only ones the replicated server runs. */
export const REPLICATED_WORKLOADS = ['fio-rand-write', 'fio-seq-write'];

const replicatedDir = (ctx: BenchContext) => path.join(ctx.workDir, 'replicated');
const replicatedOpts = (ctx: BenchContext, port: number | string): PairOptions => ({
  dir: replicatedDir(ctx),
  primaryImage: ctx.image,
  size: ctx.imageSize,
  exportName: ctx.exportName,
  port,
});

/**
 * A COLO pair under steady divergence: a primary serving the bench image, mirroring every write
 * to a live secondary (its own fresh sparse image of the same size), and a checkpoint coordinator
 * in this process that runs POST /checkpoint every 100 ms for as long as the server is up.
 */
const coloBlkReplicated = replicatedServer('colo-blk-replicated', false);
const coloBlkReplicatedPinned = replicatedServer('colo-blk-replicated-pinned', true);

function replicatedServer(name: string, pinned: boolean): ServerDef {
  return {
    name,
    role: 'subject',
    summary:
      'colo-blk primary (default I/O mode) replicating every write to a live colo-blk secondary on the same ' +
      `machine, with a checkpoint (seal → durable → commit) every ${CHECKPOINT_INTERVAL_MS} ms run by the ` +
      'benchmark; the secondary has its own fresh sparse image of the same size, and both state directories ' +
      'are on tmpfs. A fresh pair (new state, new secondary image) for each workload' +
      (pinned
        ? `. Pinned as if the secondary were on its own host: the primary and fio on CPU ${PIN.primary} ` +
          `(taskset -c), the secondary on CPU ${PIN.secondary}`
        : '. Unpinned'),
    workloads: REPLICATED_WORKLOADS,
    // A fresh pair per workload: a pair that fell out of sync in one workload would make the
    // next one measure an unreplicated primary.
    freshPerWorkload: true,
    version: coloVersion,
    commandLine(ctx, port) {
      const a = pairArgs(replicatedOpts(ctx, port), 'REPL_PORT');
      const show = (role: 'primary' | 'secondary', args: string[]) =>
        shellQuote([
          ...(pinned ? ['taskset', '-c', PIN[role]] : []),
          'node',
          ...nodeArgs(ctx, role, args),
        ]).replaceAll(ctx.root + '/', '');
      return [
        show('secondary', a.secondary) + '   # prints its replicationPort and controlPort',
        show('primary', a.primary),
        `# then, in the benchmark process, every ${CHECKPOINT_INTERVAL_MS} ms (start to start) while the server is up:`,
        `#   POST http://127.0.0.1:CONTROL_PORT/checkpoint {"timeoutMs":${CHECKPOINT_TIMEOUT_MS}}`,
      ].join('\n');
    },
    async start(ctx, port) {
      const pair = await startPair(ctx, { ...replicatedOpts(ctx, port), ...(pinned ? { pin: PIN } : {}) });
      const totals: number[] = [];
      const failures: { at: number; message: string }[] = [];
      let bytes = 0;
      let stopping = false;
      let wake: () => void = () => {};
      const loop = (async () => {
        let next = performance.now();
        while (!stopping) {
          const wait = next - performance.now();
          if (wait > 0)
            await new Promise<void>((resolve) => {
              const t = setTimeout(resolve, wait);
              wake = () => {
                clearTimeout(t);
                resolve();
              };
            });
          if (stopping) break;
          next = performance.now() + CHECKPOINT_INTERVAL_MS;
          try {
            const r = await checkpoint(pair.primary, CHECKPOINT_TIMEOUT_MS);
            totals.push(r.totalMs);
            bytes += r.bytes;
          } catch (err) {
            failures.push({ at: totals.length + failures.length, message: (err as Error).message });
            // A node that is gone fails every checkpoint at once; do not spin.
            if (pair.exited()) break;
          }
        }
      })();
      const stats = (from: number, failFrom: number) => {
        const t = totals.slice(from).sort((a, b) => a - b);
        const f = failures.slice(failFrom);
        return {
          checkpoints: t.length,
          checkpointFailures: f.length,
          ...(t.length
            ? {
                checkpointP50Ms: round2(percentile(t, 0.5)),
                checkpointP99Ms: round2(percentile(t, 0.99)),
                checkpointMaxMs: round2(t[t.length - 1]),
              }
            : {}),
          ...(f.length ? { firstFailure: f[0].message } : {}),
        };
      };
      return {
        host: HOST,
        port: pair.primary.nbdPort,
        uri: uriOf(ctx, pair.primary.nbdPort),
        pid: pair.primary.pid,
        ...(pinned ? { clientCpus: PIN.primary } : {}),
        exited: () => pair.exited(),
        tally() {
          const from = totals.length;
          const failFrom = failures.length;
          const bytesFrom = bytes;
          const cpu = cpuTally({ primary: pair.primary.pid, secondary: pair.secondary.pid });
          const logFrom = {
            primary: pair.primary.logLines.length,
            secondary: pair.secondary.logLines.length,
          };
          return async () => {
            const out: Record<string, unknown> = {
              ...stats(from, failFrom),
              checkpointedBytes: bytes - bytesFrom,
              ...(await cpu()),
            };
            try {
              const s = await status(pair.primary);
              out.lagUnsentBytes = s.lag.unsentBytes;
              out.lagHeldBytes = s.lag.heldBytes;
              out.linkState = s.link.state;
              out.linkReconnects = s.link.reconnects;
              if (s.outOfSync) out.outOfSync = s.outOfSync;
            } catch (err) {
              out.statusError = (err as Error).message;
            }
            // What the nodes logged meanwhile (link down/up and why, warnings).
            const logged = (['primary', 'secondary'] as const).flatMap((role) =>
              pair[role].logLines.slice(logFrom[role]).map((l) => ({ ...l, role })),
            );
            if (logged.length)
              out.nodeLog = logged
                .sort((a, b) => a.at - b.at)
                .slice(0, 20)
                .map((l) => `${l.role}: ${l.line}`);
            return out;
          };
        },
        stop: async () => {
          stopping = true;
          wake();
          await loop;
          const s = stats(0, 0);
          ctx.log(
            `  ${name}: ${s.checkpoints} checkpoints, ${s.checkpointFailures} failed` +
              (s.firstFailure ? ` (first: ${s.firstFailure})` : ''),
          );
          await pair.stop();
          fs.rmSync(replicatedDir(ctx), { recursive: true, force: true });
        },
      };
    },
  };
}

const nbdkitArgs = (ctx: BenchContext, port: number | string) => [
  '--foreground',
  '--exit-with-parent',
  '--ipaddr',
  HOST,
  '--port',
  String(port),
  '--exportname',
  ctx.exportName,
  'file',
  ctx.image,
];

const qemuNbdArgs = (ctx: BenchContext, port: number | string) => [
  '-f',
  'raw',
  '-x',
  ctx.exportName,
  '-b',
  HOST,
  '-p',
  String(port),
  '--persistent',
  '--shared=16',
  '--cache=writeback',
  '--aio=threads',
  ctx.image,
];

/**
 * nbd-server has no "foreground and still fork per client" mode: -d serves a
 * single connection and exits, which rules out multi-conn clients. So it runs
 * as the daemon it is meant to be, with a PID file, and is stopped by that PID
 * (SIGTERM makes it SIGTERM its per-connection children and exit).
 */
function nbdServerConfig(ctx: BenchContext, port: number | string): string {
  return [
    '[generic]',
    `port = ${port}`,
    `listenaddr = ${HOST}`,
    `[${ctx.exportName}]`,
    `exportname = ${ctx.image}`,
    '',
  ].join('\n');
}

const nbdServer: ServerDef = {
  name: 'nbd-server',
  role: 'peer',
  summary: 'nbd-server (the reference NBD server; forks a process per connection, 4 worker threads)',
  version: () =>
    versionOf('nbd-server', ['-V'], (l) => l.replace(/^This is nbd-server version /, 'nbd-server ')),
  commandLine: (ctx, port) =>
    `nbd-server -C nbd-server.conf -p nbd-server.pid   # daemonizes; nbd-server.conf:\n` +
    nbdServerConfig(ctx, port)
      .trimEnd()
      .split('\n')
      .map((l) => `    ${l}`)
      .join('\n'),
  async start(ctx, port) {
    const conf = path.join(ctx.workDir, 'nbd-server.conf');
    const pidFile = path.join(ctx.workDir, 'nbd-server.pid');
    fs.writeFileSync(conf, nbdServerConfig(ctx, port));
    fs.rmSync(pidFile, { force: true });
    // The launcher exits once the daemon has forked; config errors show up here.
    await runCommand('nbd-server', ['-C', conf, '-p', pidFile], { timeoutMs: START_TIMEOUT_MS });
    let pid = 0;
    const deadline = performance.now() + START_TIMEOUT_MS;
    while (performance.now() < deadline) {
      const text = fs.existsSync(pidFile) ? fs.readFileSync(pidFile, 'utf8').trim() : '';
      if (/^\d+$/.test(text)) {
        pid = Number(text);
        break;
      }
      await sleep(20);
    }
    if (!pid) throw new Error(`nbd-server wrote no PID file (${pidFile})`);
    liveServers.add(pid);
    const exited = () => (isAlive(pid) ? null : `nbd-server (pid ${pid}) exited; it logs to syslog`);
    try {
      await waitForPort(HOST, port, START_TIMEOUT_MS, exited);
    } catch (err) {
      await stopProcess(pid, 2000);
      liveServers.delete(pid);
      throw err;
    }
    return {
      host: HOST,
      port,
      uri: uriOf(ctx, port),
      pid,
      exited,
      stop: async () => {
        const how = await stopProcess(pid, 5000);
        liveServers.delete(pid);
        if (how === 'killed') ctx.log('  nbd-server ignored SIGTERM for 5 s; killed');
      },
    };
  },
};

export const SERVERS: ServerDef[] = [
  coloBlk(undefined, 'colo-blk'),
  coloBlk('sync', 'colo-blk-sync'),
  coloBlk('async', 'colo-blk-async'),
  coloBlkReplicated,
  coloBlk(undefined, 'colo-blk-pinned', true),
  coloBlkReplicatedPinned,
  {
    name: 'nbdkit',
    role: 'peer',
    summary: 'nbdkit file plugin (multi-threaded, 16 threads by default)',
    version: () => versionOf('nbdkit', ['--version']),
    commandLine: (ctx, port) => shellQuote(['nbdkit', ...nbdkitArgs(ctx, port)]),
    start: (ctx, port) => startForeground('nbdkit', 'nbdkit', nbdkitArgs(ctx, port), ctx, port),
  },
  {
    name: 'qemu-nbd',
    role: 'peer',
    summary: "qemu-nbd (QEMU's block layer, coroutines on one main loop thread, thread-pool AIO)",
    version: () => versionOf('qemu-nbd', ['--version']),
    commandLine: (ctx, port) => shellQuote(['qemu-nbd', ...qemuNbdArgs(ctx, port)]),
    start: (ctx, port) => startForeground('qemu-nbd', 'qemu-nbd', qemuNbdArgs(ctx, port), ctx, port),
  },
  nbdServer,
];
