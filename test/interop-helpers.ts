/**
 * Helpers for the interop and differential tests: running qemu-io, nbdinfo and
 * fio with their outputs parsed, hashing files, and starting nbdkit as a
 * reference server (tracked by PID, killed by killAll()).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { NbdClient } from '../src/net/client.js';
import { freePort, run, runOk, track, type RunResult } from './helpers.js';

/** Run `qemu-io -f raw [-r] -c CMD ... URI`; never throws on a non-zero exit. */
export function qemuIo(uri: string, cmds: string[], opts: { readOnly?: boolean } = {}): Promise<RunResult> {
  const args = ['-f', 'raw'];
  if (opts.readOnly) args.push('-r');
  for (const c of cmds) args.push('-c', c);
  args.push(uri);
  return run('qemu-io', args, { timeoutMs: 30_000 });
}

/**
 * qemu-io, requiring success: exit code 0 and no failure message on either
 * stream. qemu-io keeps going after a failed command, so the text matters too.
 */
export async function qemuIoOk(
  uri: string,
  cmds: string[],
  opts: { readOnly?: boolean } = {},
): Promise<RunResult> {
  const r = await qemuIo(uri, cmds, opts);
  const all = r.stdout + r.stderr;
  if (r.code !== 0 || /Pattern verification failed|failed:|error/i.test(all))
    throw new Error(`qemu-io ${cmds.map((c) => `-c '${c}'`).join(' ')} ${uri} exited ${r.code}\n${all}`);
  return r;
}

export function sha256File(path: string): string {
  return crypto.createHash('sha256').update(fs.readFileSync(path)).digest('hex');
}

export function sha256(buf: Buffer): string {
  return crypto.createHash('sha256').update(buf).digest('hex');
}

/** nbdinfo --json output for one export. */
export async function nbdinfoJson(uri: string): Promise<Record<string, unknown>> {
  const r = await runOk('nbdinfo', ['--json', uri], { timeoutMs: 20_000 });
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

export interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

/** nbdinfo --map --json (base:allocation). */
export async function nbdinfoMap(uri: string): Promise<MapEntry[]> {
  const r = await runOk('nbdinfo', ['--map', '--json', uri], { timeoutMs: 20_000 });
  return JSON.parse(r.stdout) as MapEntry[];
}

/** The map of [offset, offset+length) as (offset, length, type) runs, merging equal neighbours. */
export function mapSlice(
  map: MapEntry[],
  offset: number,
  length: number,
): { offset: number; length: number; type: number }[] {
  const out: { offset: number; length: number; type: number }[] = [];
  const end = offset + length;
  for (const e of map) {
    const s = Math.max(e.offset, offset);
    const t = Math.min(e.offset + e.length, end);
    if (s >= t) continue;
    const last = out[out.length - 1];
    if (last && last.type === e.type && last.offset + last.length === s) last.length += t - s;
    else out.push({ offset: s, length: t - s, type: e.type });
  }
  return out;
}

export interface FioResult {
  code: number | null;
  error: number;
  writeBytes: number;
  readBytes: number;
  raw: RunResult;
}

/** Run fio with --output-format=json and pick out the fields the tests check (engine options must follow --ioengine). */
export async function fio(args: string[], cwd: string): Promise<FioResult> {
  const r = await run('fio', [...args, '--output-format=json'], { timeoutMs: 45_000, cwd });
  // The nbd engine prints "fio: connected to NBD server" before the JSON document.
  const start = r.stdout.indexOf('{');
  if (start < 0)
    throw new Error(`fio printed no JSON (exit ${r.code})\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  let doc: { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] };
  try {
    doc = JSON.parse(r.stdout.slice(start));
  } catch (err) {
    throw new Error(
      `fio JSON did not parse: ${(err as Error).message}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`,
    );
  }
  const job = doc.jobs[0];
  return {
    code: r.code,
    error: job.error,
    writeBytes: job.write.io_bytes,
    readBytes: job.read.io_bytes,
    raw: r,
  };
}

export interface Nbdkit {
  child: ChildProcess;
  port: number;
  stderr: () => string;
  stop: () => Promise<void>;
}

/**
 * Start `nbdkit memory SIZE` on 127.0.0.1 and wait until it answers an NBD
 * handshake. nbdkit cannot take port 0, so the port comes from freePort(); if
 * another process takes it first, nbdkit exits and we try another port.
 */
export async function startNbdkitMemory(size: number, attempts = 4): Promise<Nbdkit> {
  let lastError = '';
  for (let attempt = 0; attempt < attempts; attempt++) {
    const port = await freePort();
    const child = track(
      spawn(
        'nbdkit',
        [
          '--foreground',
          '--exit-with-parent',
          '--ipaddr',
          '127.0.0.1',
          '--port',
          String(port),
          'memory',
          String(size),
        ],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      ),
    );
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    let exited = false;
    const exitedP = new Promise<void>((resolve) => child.once('exit', () => ((exited = true), resolve())));
    const deadline = Date.now() + 15_000;
    while (!exited && Date.now() < deadline) {
      try {
        const c = await NbdClient.connect({ port, timeoutMs: 2_000 });
        await c.close();
        return {
          child,
          port,
          stderr: () => stderr,
          stop: async () => {
            if (child.exitCode !== null || child.signalCode !== null) return;
            if (child.pid) process.kill(child.pid, 'SIGTERM');
            await exitedP;
          },
        };
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    lastError = stderr;
    if (!exited && child.pid) {
      process.kill(child.pid, 'SIGKILL');
      await exitedP;
    }
  }
  throw new Error(`nbdkit did not start: ${lastError}`);
}
