/**
 * Shared test helpers: temporary directories, an in-process server, the CLI as
 * a real child process, and external commands with timeouts. Every process a
 * test starts is tracked by PID and killed in cleanup.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { BlockDevice } from '../src/block/device.js';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdServer, type ExportConfig, type ServerOptions } from '../src/net/server.js';
import { nodeStorage, type Storage, type StorageFile } from '../src/sys/storage.js';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const CLI = path.join(ROOT, 'bin', 'colo-blk.js');

/** Every directory tmpDir made in this process: removed at exit if a test's own cleanup did not run. */
const madeDirs = new Set<string>();
let removeAtExit = false;

/**
 * A fresh directory (on tmpfs where there is one). Removed by the caller's
 * rmDir, and at the latest when the test process exits: a file whose tests
 * are all skipped (a tool missing) runs none of its hooks, afterAll included.
 */
export function tmpDir(prefix = 'colo-blk-test-'): string {
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, prefix));
  madeDirs.add(dir);
  if (!removeAtExit) {
    removeAtExit = true;
    process.on('exit', () => {
      for (const d of madeDirs) {
        try {
          fs.rmSync(d, { recursive: true, force: true });
        } catch {
          // still mounted, or busy: nothing more can be done at exit
        }
      }
    });
  }
  return dir;
}

export function rmDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
  madeDirs.delete(dir);
}

/** A free TCP port on 127.0.0.1 (for external servers that cannot take port 0). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

export interface RunningServer {
  server: NbdServer;
  port: number;
  uri: (name?: string) => string;
  close: () => Promise<void>;
}

/** An in-process server on an ephemeral loopback port. */
export async function startServer(
  exports: ExportConfig[] | BlockDevice = new MemoryDevice(64 * 1024 * 1024),
  opts: ServerOptions = {},
): Promise<RunningServer> {
  const list = Array.isArray(exports) ? exports : [{ name: 'disk0', device: exports }];
  const server = new NbdServer(list, opts);
  const { port } = await server.listen(0, '127.0.0.1');
  return {
    server,
    port,
    uri: (name = list[0].name) => `nbd://127.0.0.1:${port}/${name}`,
    close: async () => {
      await server.close();
    },
  };
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Run a command to completion (killed after timeoutMs). */
export function run(
  cmd: string,
  args: string[],
  opts: { timeoutMs?: number; input?: string | Buffer; env?: NodeJS.ProcessEnv; cwd?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, {
      env: opts.env ?? process.env,
      cwd: opts.cwd,
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
    if (opts.input !== undefined) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Run and require exit code 0, with the output in the error message otherwise. */
export async function runOk(
  cmd: string,
  args: string[],
  opts: Parameters<typeof run>[2] = {},
): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0)
    throw new Error(
      `${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`,
    );
  return r;
}

/** Child processes started by tests; killed by killAll(). */
const children = new Set<ChildProcess>();

export function track(child: ChildProcess): ChildProcess {
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

export async function killAll(): Promise<void> {
  const waits = [...children].map(
    (c) =>
      new Promise<void>((resolve) => {
        if (c.exitCode !== null || c.signalCode !== null) return resolve();
        c.once('exit', () => resolve());
        if (c.pid) {
          try {
            process.kill(c.pid, 'SIGKILL');
          } catch {
            resolve();
          }
        }
      }),
  );
  await Promise.all(waits);
}

export interface CliServer {
  child: ChildProcess;
  port: number;
  stderr: () => string;
  stop: (signal?: NodeJS.Signals) => Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Start `colo-blk serve` as a real process on an ephemeral port and wait until it listens. */
export async function startCliServer(
  args: string[],
  timeoutMs = 20_000,
  env: NodeJS.ProcessEnv = process.env,
): Promise<CliServer> {
  const child = track(
    spawn(process.execPath, [CLI, 'serve', '--listen', '127.0.0.1:0', '--json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    }),
  );
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`server did not start: ${stderr}`)), timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line).port);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code}: ${stderr}`));
    });
  });
  return {
    child,
    port,
    stderr: () => stderr,
    stop: (signal: NodeJS.Signals = 'SIGTERM') =>
      new Promise((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null)
          return resolve({ code: child.exitCode, signal: child.signalCode });
        child.once('exit', (code, sig) => resolve({ code, signal: sig }));
        child.kill(signal);
      }),
  };
}

/** Deterministic pseudo-random bytes (xorshift32), for patterned data. */
export function prng(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

export function randomBytes(n: number, rand: () => number): Buffer {
  const buf = Buffer.allocUnsafe(n);
  let i = 0;
  for (; i + 4 <= n; i += 4) buf.writeUInt32LE(rand(), i);
  for (; i < n; i++) buf[i] = rand() & 0xff;
  return buf;
}

/** Poll `what` until `ok` holds (every `everyMs`), or throw with `label` and the last value after `ms`. */
export async function waitFor<T>(
  what: () => Promise<T>,
  ok: (v: T) => boolean,
  label: string,
  ms = 10_000,
  everyMs = 25,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await what();
    if (ok(v)) return v;
    if (Date.now() > deadline) throw new Error(`${label}: ${JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

/** `buf` cut at random points into views (some empty): a payload as a socket may deliver it. */
export function splitPieces(buf: Buffer, rand: () => number): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  while (at < buf.length) {
    const n = rand() % 7 === 0 ? 0 : 1 + (rand() % Math.max(1, buf.length >> 2));
    out.push(buf.subarray(at, Math.min(buf.length, at + n)));
    at += n;
  }
  return out;
}

/**
 * nodeStorage, but each fdatasync reaches the file `delayMs` (or `delayMs(path)`) after it was
 * asked for, as on a busy thread pool: one whose file was closed meanwhile
 * fails with EBADF, as the real call does (or worse: it syncs whatever file
 * got the descriptor number since). `closedSyncs` counts those.
 */
export function slowSyncStorage(delayMs: number | ((path: string) => number)): {
  storage: Storage;
  state: { closedSyncs: number };
} {
  const state = { closedSyncs: 0 };
  const storage: Storage = Object.create(nodeStorage) as Storage;
  storage.open = (p: string): StorageFile => {
    const f = nodeStorage.open(p);
    let closed = false;
    return Object.assign(Object.create(f) as StorageFile, {
      datasync: async (): Promise<void> => {
        await new Promise((r) => setTimeout(r, typeof delayMs === 'number' ? delayMs : delayMs(p)));
        if (closed) {
          state.closedSyncs++;
          throw Object.assign(new Error(`EBADF: fdatasync of ${p} after its close`), { code: 'EBADF' });
        }
        await f.datasync();
      },
      close: (): void => {
        closed = true;
        f.close();
      },
    });
  };
  return { storage, state };
}
