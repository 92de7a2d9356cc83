/**
 * The servers under test. Each serves ctx.image as export ctx.exportName on
 * 127.0.0.1:port; run.ts starts them one at a time and verifies each with
 * nbdinfo before measuring.
 */
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
import type { BenchContext, RunningServer, ServerDef } from './types.js';

const HOST = '127.0.0.1';
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
    stop: async () => {
      const how = await stopProcess(child, 5000);
      liveServers.delete(child);
      if (how === 'killed') ctx.log(`  ${name} ignored SIGTERM for 5 s; killed`);
    },
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

function coloBlk(io: 'sync' | 'async', name: string): ServerDef {
  const args = (ctx: BenchContext, port: number | string) => [
    path.join(ctx.root, 'bin/colo-blk.js'),
    'serve',
    '--listen',
    `${HOST}:${port}`,
    '--export',
    `${ctx.exportName}=${ctx.image}`,
    '--io',
    io,
    '--json',
    '--quiet',
  ];
  return {
    name,
    role: 'subject',
    summary: `colo-blk serve, --io ${io} (${io === 'sync' ? 'pread/pwrite on the event loop' : "libuv's thread pool"})`,
    async version(ctx) {
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
    },
    commandLine: (ctx, port) => shellQuote(['node', ...args(ctx, port)]).replace(ctx.root + '/', ''),
    start: (ctx, port) =>
      startForeground(name, process.execPath, args(ctx, port), ctx, port, coloReady(port, ctx)),
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
  coloBlk('sync', 'colo-blk'),
  coloBlk('async', 'colo-blk-async'),
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
