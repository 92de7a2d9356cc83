/**
 * A colo-blk replicated pair for the benchmark: a secondary and a primary as
 * real processes (the CLI, `--json`), each stopped by its own PID. Used by the
 * `colo-blk-replicated` server and by the checkpoint and memory scenarios.
 */
import process from 'node:process';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { controlCall } from '../src/checkpoint/control.js';
import type { CheckpointResult } from '../src/checkpoint/primary/node.js';
import { lastLine, liveServers, stopProcess, TailBuffer } from './proc.js';
import type { BenchContext } from './types.js';

export const HOST = '127.0.0.1';
const START_TIMEOUT_MS = 20_000;

export interface Endpoint {
  host: string;
  port: number;
}

/** One colo-blk node process. */
export interface NodeHandle {
  role: 'primary' | 'secondary';
  child: ChildProcess;
  pid: number;
  /** Its `{"event":"listening",...}` line. */
  info: Record<string, unknown>;
  nbdPort: number;
  control: Endpoint;
  /** null while it runs; otherwise why it is gone. */
  exited(): string | null;
  /** The last lines it wrote on stderr (its log: link events, warnings, errors). */
  stderr(): string;
  /** Its log lines so far (the first 1000), with the time they arrived (Date.now()). */
  logLines: { at: number; line: string }[];
  stop(): Promise<void>;
}

/** The CLI's arguments after `node bin/colo-blk.js`, for the report. */
export function nodeArgs(
  ctx: BenchContext,
  role: 'primary' | 'secondary',
  args: readonly string[],
): string[] {
  // Not --quiet: the info level logs link events (up, down, why), a few lines per run.
  return [path.join(ctx.root, 'bin/colo-blk.js'), role, ...args, '--json'];
}

/** Start `colo-blk ROLE ARGS --json` and wait for its listening line. */
export async function startNode(
  ctx: BenchContext,
  role: 'primary' | 'secondary',
  args: readonly string[],
  env?: Record<string, string>,
  cpus?: string,
): Promise<NodeHandle> {
  // taskset execs the node, so the child's pid is the node's.
  const [program, argv] = cpus
    ? ['taskset', ['-c', cpus, process.execPath, ...nodeArgs(ctx, role, args)]]
    : [process.execPath, nodeArgs(ctx, role, args)];
  const child = spawn(program, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    cwd: ctx.root,
    ...(env ? { env: { ...process.env, ...env } } : {}),
  });
  liveServers.add(child);
  const stderr = new TailBuffer();
  const logLines: { at: number; line: string }[] = [];
  let partial = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr.push(d);
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop()!;
    for (const line of lines)
      if (line.trim() && logLines.length < 1000) logLines.push({ at: Date.now(), line: line.trim() });
  });
  const exited = (): string | null => {
    if (child.exitCode === null && child.signalCode === null) return null;
    const why = lastLine(stderr.toString());
    return `colo-blk ${role} exited (${child.exitCode ?? child.signalCode})${why ? `: ${why}` : ''}`;
  };
  const stop = async () => {
    const how = await stopProcess(child, 5000);
    liveServers.delete(child);
    if (how === 'killed') ctx.log(`  colo-blk ${role} (pid ${child.pid}) ignored SIGTERM for 5 s; killed`);
  };
  try {
    const info = await new Promise<Record<string, unknown>>((resolve, reject) => {
      let out = '';
      const timer = setTimeout(
        () =>
          reject(new Error(`colo-blk ${role} printed no listening line within ${START_TIMEOUT_MS / 1000} s`)),
        START_TIMEOUT_MS,
      );
      const done = (err: Error | null, v?: Record<string, unknown>) => {
        clearTimeout(timer);
        child.stdout!.removeAllListeners('data');
        child.off('exit', onExit);
        child.off('error', onError);
        // Keep draining stdout so the child never blocks on a full pipe.
        child.stdout!.resume();
        if (err) reject(err);
        else resolve(v!);
      };
      const onExit = () => setImmediate(() => done(new Error(exited() ?? `colo-blk ${role} exited`)));
      const onError = (err: Error) => done(new Error(`colo-blk ${role}: ${err.message}`));
      child.once('exit', onExit);
      child.once('error', onError);
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        for (const line of out.split('\n')) {
          if (!line.startsWith('{')) continue;
          try {
            const msg = JSON.parse(line) as Record<string, unknown>;
            if (msg.event === 'listening') return done(null, msg);
          } catch {
            // a partial line; wait for the rest
          }
        }
      });
    });
    child.stdout!.on('data', () => {});
    return {
      role,
      child,
      pid: child.pid!,
      info,
      nbdPort: Number(info.port),
      control: { host: HOST, port: Number(info.controlPort) },
      exited,
      stderr: () => stderr.toString(),
      logLines,
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}

export interface PairOptions {
  /** Directory for the secondary's image and both state directories (created; emptied first). */
  dir: string;
  /** The primary's image; created sparse with `size` when absent. */
  primaryImage: string;
  size: number;
  exportName: string;
  /** NBD port of the primary (0: any; a string for showing the command). */
  port?: number | string;
  /** --budget of the primary. */
  budget?: string;
  /** --io of both nodes (default: the CLI's default). */
  io?: 'sync' | 'async' | 'auto';
  /** The secondary's failover mode (default manual: stopping a pair must not promote). */
  failover?: 'auto' | 'manual';
  failoverGraceMs?: number;
  /** Extra environment of the secondary process (e.g. COLO_BLK_CRASH_AT). */
  secondaryEnv?: Record<string, string>;
  /** Called once `dir` exists (emptied) and before either node starts: e.g. to put images in place. */
  prepare?(dir: string): void;
  /** How long the first synchronisation of the two disks may take (default 120 s). */
  syncTimeoutMs?: number;
  /** CPUs each node runs on (`taskset -c`), as if the secondary were on its own host. */
  pin?: { primary: string; secondary: string };
}

export interface Pair {
  primary: NodeHandle;
  secondary: NodeHandle;
  /**
   * The pair's first synchronisation (every new pair compares both disks by hash before its first
   * checkpoint): the primary's \`status.resync\` once it reported the secondary protected, and how long
   * the benchmark waited for that after the primary printed its listening line.
   */
  initialSync: { resync: Status; waitedMs: number };
  /** Why a node is gone, or null while both run. */
  exited(): string | null;
  /** Stop the primary, then the secondary (each by PID; SIGTERM, then SIGKILL). */
  stop(): Promise<void>;
}

/** The primary's and the secondary's argument lists (replication port filled in later). */
export function pairArgs(opts: PairOptions, replicationPort: number | string) {
  const io = opts.io ? ['--io', opts.io] : [];
  const secondary = [
    '--listen',
    `${HOST}:0`,
    '--export',
    `${opts.exportName}=${path.join(opts.dir, 'svm.img')},size=${opts.size}`,
    '--state',
    path.join(opts.dir, 'svm-state'),
    '--replication-listen',
    `${HOST}:0`,
    '--control',
    `${HOST}:0`,
    '--failover',
    opts.failover ?? 'manual',
    ...(opts.failoverGraceMs !== undefined ? ['--failover-grace', String(opts.failoverGraceMs)] : []),
    ...io,
  ];
  const primary = [
    '--listen',
    `${HOST}:${opts.port ?? 0}`,
    '--export',
    fs.existsSync(opts.primaryImage)
      ? `${opts.exportName}=${opts.primaryImage}`
      : `${opts.exportName}=${opts.primaryImage},size=${opts.size}`,
    '--state',
    path.join(opts.dir, 'pvm-state'),
    '--peer',
    `${HOST}:${replicationPort}`,
    '--control',
    `${HOST}:0`,
    ...(opts.budget ? ['--budget', opts.budget] : []),
    ...io,
  ];
  return { primary, secondary };
}

/**
 * Start a secondary, then a primary replicating to it, and wait until the secondary is protected:
 * the link is up and the first synchronisation (a full hash comparison of both disks) is done, so
 * that whatever the caller measures next does not include it.
 */
export async function startPair(ctx: BenchContext, opts: PairOptions): Promise<Pair> {
  fs.rmSync(opts.dir, { recursive: true, force: true });
  fs.mkdirSync(opts.dir, { recursive: true });
  opts.prepare?.(opts.dir);
  const secondary = await startNode(
    ctx,
    'secondary',
    pairArgs(opts, 0).secondary,
    opts.secondaryEnv,
    opts.pin?.secondary,
  );
  let primary: NodeHandle | null = null;
  const pair: Pair = {
    secondary,
    get primary() {
      return primary!;
    },
    initialSync: { resync: null, waitedMs: NaN },
    exited: () => primary?.exited() ?? secondary.exited(),
    stop: async () => {
      if (primary) await primary.stop();
      await secondary.stop();
    },
  };
  try {
    primary = await startNode(
      ctx,
      'primary',
      pairArgs(opts, Number(secondary.info.replicationPort)).primary,
      undefined,
      opts.pin?.primary,
    );
    const t = performance.now();
    const s = await waitProtected(pair, opts.syncTimeoutMs ?? 120_000);
    pair.initialSync = { resync: s.resync, waitedMs: performance.now() - t };
  } catch (err) {
    await pair.stop();
    throw err;
  }
  return pair;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Status = any;

export const status = (node: NodeHandle): Promise<Status> =>
  controlCall<Status>(node.control, 'GET', '/status');

/**
 * Wait until the primary reports the secondary protected (\`peerState\` 'protected': link up and the
 * first resync done); returns the primary's status then. A refusal fails at once.
 */
async function waitProtected(pair: Pair, timeoutMs: number): Promise<Status> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const gone = pair.exited();
    if (gone) throw new Error(gone);
    const s = await status(pair.primary);
    if (s.link.state === 'connected' && s.peerState === 'protected') return s;
    if (s.peerState === 'refused' || s.peerState === 'deposed')
      throw new Error(`the secondary did not accept the primary (${s.peerState}): ${s.refused ?? s.deposed}`);
    if (performance.now() > deadline) {
      const r = s.resync;
      throw new Error(
        `the secondary was not protected within ${timeoutMs / 1000} s: link ${s.link.state}` +
          (s.link.lastError ? ` (${s.link.lastError})` : '') +
          `, peerState ${s.peerState}` +
          (r ? `, resync ${r.mode} ${r.state}: ${r.doneBytes} of ${r.totalBytes} bytes` : ''),
      );
    }
    await sleep(25);
  }
}

/** Poll a node's /status until `done(status)`; returns the last status. */
export async function pollStatus(
  node: NodeHandle,
  done: (s: Status) => boolean,
  what: string,
  timeoutMs: number,
  intervalMs = 5,
): Promise<Status> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const gone = node.exited();
    if (gone) throw new Error(gone);
    const s = await status(node);
    if (done(s)) return s;
    if (performance.now() > deadline) throw new Error(`${what}: not reached in ${timeoutMs / 1000} s`);
    await sleep(intervalMs);
  }
}

/** What POST /checkpoint answers (the primary's own type). */
export type CheckpointTimes = CheckpointResult;

export const checkpoint = (primary: NodeHandle, timeoutMs = 10_000): Promise<CheckpointTimes> =>
  controlCall<CheckpointTimes>(primary.control, 'POST', '/checkpoint', { timeoutMs }, timeoutMs + 5000);

/** VmRSS and VmHWM of a process, in bytes. */
export function memoryOf(pid: number): { rss: number; hwm: number } {
  const text = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (field: string) => {
    const m = new RegExp(`^${field}:\\s*(\\d+)\\s*kB`, 'm').exec(text);
    if (!m) throw new Error(`/proc/${pid}/status has no ${field}`);
    return Number(m[1]) * 1024;
  };
  return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
}

/** CPU time (user + system) a process has used so far, in seconds (/proc/PID/stat counts in 1/100 s). */
export function cpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // fields[0] is field 3 (state); utime and stime are fields 14 and 15.
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** cpuSeconds, or NaN once the process is gone. */
export function cpuSecondsOrNaN(pid: number): number {
  try {
    return cpuSeconds(pid);
  } catch {
    return NaN;
  }
}
