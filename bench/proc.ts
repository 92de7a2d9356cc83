/**
 * Process helpers for the benchmark: run a tool to completion with a timeout,
 * start a long-running server, stop a process by PID (SIGTERM, then SIGKILL),
 * find a free loopback port and wait for a port to accept connections.
 *
 * Every process is addressed by its own PID; nothing here signals by name or
 * process group.
 */
import { Buffer } from 'node:buffer';
import process from 'node:process';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Server processes started by this run and not yet stopped (a ChildProcess, or the PID of a daemon).
 * On SIGINT/SIGTERM run.ts stops exactly these.
 */
export const liveServers = new Set<ChildProcess | number>();

/** Client tools (fio, nbdcopy, …) running right now; stopped on SIGINT/SIGTERM as well. */
export const liveTools = new Set<ChildProcess>();

/** Keeps the last `limit` characters written to it (a child's stderr, say). */
export class TailBuffer {
  private text = '';
  constructor(private readonly limit = 16 * 1024) {}
  push(chunk: Buffer | string): void {
    this.text += chunk.toString();
    if (this.text.length > this.limit) this.text = this.text.slice(-this.limit);
  }
  toString(): string {
    return this.text;
  }
}

/** The last non-empty line of some output, trimmed; the usual place for a tool's error message. */
export function lastLine(text: string, max = 200): string {
  const lines = text
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);
  const line = lines.length ? lines[lines.length - 1] : '';
  return line.length > max ? line.slice(0, max - 1) + '…' : line;
}

/** Shell-style quoting, for showing the exact commands in the report. */
export function shellQuote(args: readonly string[]): string {
  return args.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(' ');
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** Wall-clock time from spawn to exit, in milliseconds. */
  ms: number;
}

export class CommandError extends Error {}

export interface RunOptions {
  timeoutMs: number;
  /** Resolve even when the exit code is not 0 (default: reject with the tool's last stderr line). */
  allowFailure?: boolean;
  cwd?: string;
}

/** Run `cmd args` to completion; reject on spawn failure, timeout or (unless allowed) a non-zero exit. */
export function runCommand(cmd: string, args: readonly string[], opts: RunOptions): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    let child: ChildProcess;
    try {
      child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: opts.cwd });
    } catch (err) {
      reject(new CommandError(`${cmd}: ${(err as Error).message}`));
      return;
    }
    liveTools.add(child);
    const stdout: Buffer[] = [];
    const stderr = new TailBuffer(64 * 1024);
    child.stdout!.on('data', (d: Buffer) => stdout.push(d));
    child.stderr!.on('data', (d: Buffer) => stderr.push(d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      if (child.pid !== undefined) void stopProcess(child, 2000);
    }, opts.timeoutMs);
    child.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      liveTools.delete(child);
      reject(
        new CommandError(err.code === 'ENOENT' ? `${cmd}: command not found` : `${cmd}: ${err.message}`),
      );
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      liveTools.delete(child);
      const result: RunResult = {
        code,
        signal,
        stdout: Buffer.concat(stdout).toString(),
        stderr: stderr.toString(),
        ms: performance.now() - started,
      };
      if (timedOut) reject(new CommandError(`${cmd} timed out after ${Math.round(opts.timeoutMs / 1000)} s`));
      else if (code !== 0 && !opts.allowFailure) {
        const why = lastLine(result.stderr) || lastLine(result.stdout) || 'no output';
        reject(new CommandError(`${cmd} exited with ${code ?? signal}: ${why}`));
      } else resolve(result);
    });
  });
}

/** True while the process exists and is not a zombie (a reparented daemon may linger as one). */
export function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 3, after the parenthesised command name (which may itself contain spaces or parens).
    const state = stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3);
    return state !== 'Z' && state !== 'X';
  } catch {
    return false;
  }
}

async function waitGone(pid: number, child: ChildProcess | undefined, ms: number): Promise<boolean> {
  const deadline = performance.now() + ms;
  while (performance.now() < deadline) {
    if (child ? child.exitCode !== null || child.signalCode !== null : !isAlive(pid)) return true;
    await sleep(25);
  }
  return child ? child.exitCode !== null || child.signalCode !== null : !isAlive(pid);
}

/**
 * Stop one process by PID: SIGTERM, wait up to `graceMs`, then SIGKILL.
 * Pass the ChildProcess when we spawned it, so that its exit is observed (and reaped) by Node.
 * Returns how it ended: 'exited' (after SIGTERM or on its own) or 'killed'.
 */
export async function stopProcess(
  target: ChildProcess | number,
  graceMs = 5000,
): Promise<'exited' | 'killed'> {
  const child = typeof target === 'number' ? undefined : target;
  const pid = typeof target === 'number' ? target : target.pid;
  if (pid === undefined) return 'exited';
  if (await waitGone(pid, child, 0)) return 'exited';
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return 'exited';
  }
  if (await waitGone(pid, child, graceMs)) return 'exited';
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    return 'exited';
  }
  await waitGone(pid, child, 2000);
  return 'killed';
}

/** A port on 127.0.0.1 that nothing listens on right now (the OS picks it). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => (port ? resolve(port) : reject(new Error('could not get a free port'))));
    });
  });
}

function tryConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const sock = net.connect({ host, port });
    const done = (ok: boolean) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.once('connect', () => done(true));
    sock.once('error', () => done(false));
  });
}

/**
 * Wait until host:port accepts a TCP connection. `alive` is polled too, so a
 * server that exits during start-up fails fast instead of waiting out the timeout.
 * Note: the probe connection is closed at once; NBD servers log it as a failed handshake.
 */
export async function waitForPort(
  host: string,
  port: number,
  timeoutMs: number,
  alive: () => string | null,
): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    const dead = alive();
    if (dead) throw new Error(dead);
    if (await tryConnect(host, port)) return;
    await sleep(50);
  }
  throw new Error(`did not accept connections on ${host}:${port} within ${Math.round(timeoutMs / 1000)} s`);
}
