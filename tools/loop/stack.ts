/**
 * The whole COLO loop as real processes, for the demo and the benchmark: a
 * disk pair (the secondary with --failover manual: the coordinator decides),
 * a guest on each side and `colo-blk colo` in front. Each piece is started
 * from the CLI exactly as the README tells a user to, and stopped by PID.
 *
 * `pin` runs each side on its own CPUs with taskset (as if the secondary
 * were another host); the comparer runs with the secondary side, where the
 * README advises to put it.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root, from tools/loop/ (tests) or dist/tools/loop/ (the demo, the benchmark). */
const ROOT = (() => {
  let d = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(d, 'package.json'))) d = path.dirname(d);
  return d;
})();
export const CLI = path.join(ROOT, 'bin', 'colo-blk.js');

export interface Proc {
  role: string;
  child: ChildProcess;
  info: Record<string, number | string>;
  /** JSON lines printed after the listening line (colo's events). */
  onEvent: ((e: Record<string, unknown>) => void) | null;
  stderr: () => string;
  /** What it printed on stdout that is not a JSON line (a VM's console, for vm-standby's QEMU); the last 4 MiB. */
  console: () => string;
  exited: Promise<void>;
}

export function hasTaskset(): boolean {
  return spawnSync('taskset', ['--version']).status === 0;
}

/** Start `colo-blk ROLE --json ...` (on `cpus` if given) and wait for its listening line. */
export async function spawnRole(role: string, args: string[], cpus?: string): Promise<Proc> {
  const argv = [CLI, role, '--json', '--quiet', ...args];
  const child = cpus
    ? spawn('taskset', ['-c', cpus, process.execPath, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
    if (err.length > 32_768) err = err.slice(-16_384);
  });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  let text = '';
  const proc: Proc = { role, child, info: {}, onEvent: null, stderr: () => err, console: () => text, exited };
  proc.info = await new Promise<Record<string, number | string>>((resolve, reject) => {
    let out = '';
    let listening = false;
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      let nl: number;
      while ((nl = out.indexOf('\n')) >= 0) {
        const line = out.slice(0, nl);
        out = out.slice(nl + 1);
        if (!line.startsWith('{')) {
          text += line + '\n';
          if (text.length > 4 * 1024 * 1024) text = text.slice(-2 * 1024 * 1024);
          continue;
        }
        let e: Record<string, unknown>;
        try {
          e = JSON.parse(line) as Record<string, unknown>;
        } catch {
          text += line + '\n';
          continue;
        }
        if (!listening && e.event === 'listening') {
          listening = true;
          resolve(e as Record<string, number | string>);
        } else proc.onEvent?.(e);
      }
    });
    void exited.then(() => {
      if (!listening) reject(new Error(`colo-blk ${role} exited before listening: ${err.trim()}`));
    });
  });
  return proc;
}

export async function stop(p: Proc, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (p.child.exitCode !== null || p.child.signalCode !== null) return;
  p.child.kill(signal);
  const t = setTimeout(() => p.child.kill('SIGKILL'), 5000);
  await p.exited;
  clearTimeout(t);
}

export interface LoopOptions {
  dir: string;
  size: string;
  mode: 'colo' | 'remus' | 'none';
  nondeterminism: number;
  intervalMs?: number;
  compareTimeoutMs?: number;
  verify?: boolean;
  guestArgs?: string[];
  coloArgs?: string[];
  /** CPUs for each side (taskset -c); the comparer runs with the primary side. */
  pin?: { primary: string; secondary: string };
}

export interface Loop {
  secondary: Proc;
  primary: Proc;
  pvm: Proc;
  svm: Proc;
  colo: Proc;
  /** Where clients connect. */
  port: number;
  coloControl: { host: string; port: number };
  all: () => Proc[];
  close: () => Promise<void>;
}

const at = (p: Proc, key = 'port') => `127.0.0.1:${p.info[key]}`;

export async function startSecondary(dir: string, name: string, size: string, cpus?: string): Promise<Proc> {
  return spawnRole(
    'secondary',
    [
      '--listen', '127.0.0.1:0',
      '--export', `disk0=${path.join(dir, `${name}.img`)},size=${size}`,
      '--state', path.join(dir, `${name}-state`),
      '--replication-listen', '127.0.0.1:0',
      '--control', '127.0.0.1:0',
      '--failover', 'manual',
    ], // prettier-ignore
    cpus,
  );
}

export async function startPrimary(
  dir: string,
  name: string,
  size: string,
  secondary: Proc,
  cpus?: string,
): Promise<Proc> {
  return spawnRole(
    'primary',
    [
      '--listen', '127.0.0.1:0',
      '--export', `disk0=${path.join(dir, `${name}.img`)},size=${size}`,
      '--state', path.join(dir, `${name}-state`),
      '--peer', at(secondary, 'replicationPort'),
      '--control', '127.0.0.1:0',
    ], // prettier-ignore
    cpus,
  );
}

export async function startGuest(nbd: Proc, opts: LoopOptions, cpus?: string): Promise<Proc> {
  return spawnRole(
    'guest',
    [
      '--listen', '127.0.0.1:0',
      '--control', '127.0.0.1:0',
      '--disk', `nbd://127.0.0.1:${nbd.info.port}/disk0`,
      '--nondeterminism', String(opts.nondeterminism),
      ...(opts.guestArgs ?? []),
    ], // prettier-ignore
    cpus,
  );
}

export async function startLoop(opts: LoopOptions): Promise<Loop> {
  const started: Proc[] = [];
  const track = async (p: Promise<Proc>) => {
    const x = await p;
    started.push(x);
    return x;
  };
  try {
    const secondary = await track(startSecondary(opts.dir, 'svm', opts.size, opts.pin?.secondary));
    const primary = await track(startPrimary(opts.dir, 'pvm', opts.size, secondary, opts.pin?.primary));
    const [pvm, svm] = await Promise.all([
      track(startGuest(primary, opts, opts.pin?.primary)),
      track(startGuest(secondary, opts, opts.pin?.secondary)),
    ]);
    const colo = await track(
      spawnRole(
        'colo',
        [
          '--listen', '127.0.0.1:0',
          '--control', '127.0.0.1:0',
          '--mode', opts.mode,
          '--pvm', at(pvm), '--pvm-control', at(pvm, 'controlPort'),
          '--svm', at(svm), '--svm-control', at(svm, 'controlPort'),
          '--primary-control', at(primary, 'controlPort'),
          '--secondary-control', at(secondary, 'controlPort'),
          ...(opts.intervalMs ? ['--interval', String(opts.intervalMs)] : []),
          ...(opts.compareTimeoutMs ? ['--compare-timeout', String(opts.compareTimeoutMs)] : []),
          ...(opts.verify ? ['--verify'] : []),
          ...(opts.coloArgs ?? []),
        ], // prettier-ignore
        opts.pin?.secondary, // the comparer runs with the secondary side (as the README advises)
      ),
    );
    const loop: Loop = {
      secondary,
      primary,
      pvm,
      svm,
      colo,
      port: Number(colo.info.port),
      coloControl: { host: '127.0.0.1', port: Number(colo.info.controlPort) },
      all: () => started,
      close: async () => {
        for (const p of [...started].reverse()) await stop(p);
      },
    };
    return loop;
  } catch (err) {
    for (const p of started.reverse()) await stop(p, 'SIGKILL');
    throw err;
  }
}
