/**
 * Starting the standby's QEMU at failover: the user's own command line (the
 * same VM as the primary's), with its memory-backend-file pointed at the
 * standby's committed RAM image, `-incoming defer` so that it waits for the
 * committed device state, and a QMP socket of ours.
 */
import { performance } from 'node:perf_hooks';
import process from 'node:process';
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { ColoError } from '../../errors.js';
import { parseSize } from '../../util/size.js';
import { QmpClient } from './qmp.js';

export interface VmCommand {
  /** The command (qemu-system-…, or a wrapper such as `nice` that execs it) and its arguments. */
  argv: string[];
  /** The guest RAM's size, from the memory-backend-file's size=. */
  ramBytes: number;
}

const HOW =
  'give the same QEMU command line as the primary VM, with its RAM in a file: ' +
  '-object memory-backend-file,id=mem,size=256M,mem-path=FILE,share=on -machine memory-backend=mem';

/** Check a VM's command line and find its RAM size. */
export function parseVmCommand(argv: string[]): VmCommand {
  if (argv.length === 0) throw new ColoError('EUSAGE', `no QEMU command line after '--': ${HOW}`);
  const objects = argv.flatMap((a, i) => (argv[i - 1] === '-object' ? [{ i, value: a }] : []));
  const backends = objects.filter((o) => o.value.startsWith('memory-backend-file,'));
  if (backends.length !== 1)
    throw new ColoError(
      'EUSAGE',
      `the QEMU command line has ${backends.length} memory-backend-file objects; it needs exactly one: ${HOW}`,
    );
  for (const bad of ['-incoming', '-loadvm'])
    if (argv.includes(bad))
      throw new ColoError(
        'EUSAGE',
        `the standby's QEMU command line must not have ${bad}: colo-blk adds what it needs`,
      );
  const props = new Map(
    backends[0].value
      .split(',')
      .slice(1)
      .map((kv) => [kv.split('=')[0], kv.slice(kv.indexOf('=') + 1)] as const),
  );
  const size = props.get('size');
  if (!size) throw new ColoError('EUSAGE', `the memory-backend-file has no size=: ${HOW}`);
  let ramBytes: number;
  try {
    ramBytes = parseSize(size);
  } catch {
    throw new ColoError('EUSAGE', `the memory-backend-file's size=${size} is not a size (e.g. 256M, 4G)`);
  }
  if (props.get('share') !== 'on')
    throw new ColoError(
      'EUSAGE',
      `the memory-backend-file needs share=on (the RAM must be in the file): ${HOW}`,
    );
  return { argv, ramBytes };
}

/** The command line that resumes the VM from `ramPath`, waiting for its device state. */
export function standbyArgv(cmd: VmCommand, ramPath: string, qmpPath: string): string[] {
  const argv = cmd.argv.map((a, i) => {
    if (cmd.argv[i - 1] !== '-object' || !a.startsWith('memory-backend-file,')) return a;
    const parts = a.split(',').filter((kv) => !kv.startsWith('mem-path='));
    return [...parts, `mem-path=${ramPath}`].join(',');
  });
  return [...argv, '-incoming', 'defer', '-qmp', `unix:${qmpPath},server=on,wait=off`];
}

/** Start QEMU and connect to its QMP socket. */
export async function launchQemu(
  argv: string[],
  qmpPath: string,
  opts: { timeoutMs?: number; console?: (d: Buffer) => void } = {},
): Promise<{ child: ChildProcess; qmp: QmpClient }> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  fs.rmSync(qmpPath, { force: true });
  // Its stdout (the serial console, often) goes to `console`, so that the caller keeps its own
  // output whole (a JSON event line never glued to half a console line).
  const child = spawn(argv[0], argv.slice(1), {
    stdio: ['ignore', opts.console ? 'pipe' : 'inherit', 'pipe'],
  });
  if (opts.console) child.stdout!.on('data', opts.console);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
    process.stderr.write(d);
  });
  const spawned = new Promise<void>((resolve, reject) => {
    child.once('spawn', () => resolve());
    child.once('error', (err) => reject(new ColoError('ENOENT', `cannot start ${argv[0]}: ${err.message}`)));
  });
  await spawned;
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    if (child.exitCode !== null || child.signalCode !== null)
      throw new ColoError(
        'EIO',
        `QEMU exited (${child.exitCode ?? child.signalCode}) before it listened for QMP: ${stderr.trim().split('\n').slice(-3).join(' | ') || 'no message'}`,
      );
    if (fs.existsSync(qmpPath)) {
      try {
        return { child, qmp: await QmpClient.connect({ path: qmpPath }, 5_000) };
      } catch {
        // not accepting yet
      }
    }
    if (performance.now() > deadline) {
      child.kill('SIGKILL');
      throw new ColoError('EIO', `QEMU made no QMP socket at ${qmpPath} in ${timeoutMs} ms`);
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}
