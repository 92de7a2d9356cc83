/**
 * The small Linux guest under QEMU (TCG) for the VM tests, the VM demo and
 * the VM benchmark: built once from Debian packages by
 * tools/vm/build-guest.mjs into a cache directory, booted with its RAM in a
 * shared file (as a protected VM runs) and a QMP socket. Callers track the
 * QEMU process by PID (`track`) and kill it.
 */
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ChildProcess } from 'node:child_process';

/** The repository root, from tools/vm/ or dist/tools/vm/. */
const ROOT = (() => {
  let d = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(d, 'package.json'))) d = path.dirname(d);
  return d;
})();

export const GUEST_DIR =
  process.env.COLO_BLK_GUEST_DIR ?? path.join(os.homedir(), '.cache', 'colo-blk', 'guest');

/** The kit version this code needs (tools/vm/build-guest.mjs KIT_VERSION). */
const KIT_VERSION = 5;

/** Build the guest kit unless it is there already, at this version. */
export function ensureGuest(): { vmlinuz: string; initramfs: string } {
  const vmlinuz = path.join(GUEST_DIR, 'vmlinuz');
  const initramfs = path.join(GUEST_DIR, 'initramfs.cpio.gz');
  const info = path.join(GUEST_DIR, 'guest.json');
  const version = fs.existsSync(info)
    ? (JSON.parse(fs.readFileSync(info, 'utf8')) as { version?: number }).version
    : 0;
  if (!fs.existsSync(vmlinuz) || !fs.existsSync(initramfs) || version !== KIT_VERSION)
    execFileSync(
      process.execPath,
      [path.join(ROOT, 'tools', 'vm', 'build-guest.mjs'), '--out', GUEST_DIR, '--json'],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
        timeout: 300_000,
      },
    );
  return { vmlinuz, initramfs };
}

/**
 * The test guest's QEMU command line without QMP: RAM in `ramPath` (shared),
 * serial on stdio, the workload on the kernel command line, `disk` (an NBD
 * URI) as a virtio disk. This is the command line a protected VM is given.
 */
export function guestQemuArgs(opts: {
  workload?: Workload;
  disk?: string;
  ramMiB?: number;
  ramPath: string;
  /** The guest's port 80 on this host's 127.0.0.1:httpPort (QEMU user networking, virtio-net). */
  httpPort?: number;
}): string[] {
  const { vmlinuz, initramfs } = ensureGuest();
  const ramMiB = opts.ramMiB ?? 256;
  return [
    '-machine',
    'q35,accel=tcg,memory-backend=mem',
    '-object',
    `memory-backend-file,id=mem,size=${ramMiB}M,mem-path=${opts.ramPath},share=on`,
    '-m',
    `${ramMiB}M`,
    '-display',
    'none',
    '-serial',
    'stdio',
    '-monitor',
    'none',
    '-no-reboot',
    '-kernel',
    vmlinuz,
    '-initrd',
    initramfs,
    '-append',
    // no_timer_check: under TCG on a loaded machine the kernel's check that the timer reaches
    // the IO-APIC can time out, and the boot panics ("IO-APIC + timer doesn't work!").
    `console=ttyS0 quiet panic=-1 no_timer_check colo.work=${opts.workload ?? 'idle'}`,
    ...(opts.disk ? ['-drive', `file=${opts.disk},format=raw,if=virtio,cache=none,aio=threads`] : []),
    ...(opts.httpPort
      ? [
          '-netdev',
          `user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:${opts.httpPort}-:80`,
          '-device',
          'virtio-net-pci,netdev=net0',
        ]
      : ['-nic', 'none']),
  ];
}

/**
 * QEMU at the lowest CPU priority: a guest under TCG keeps a core busy, and
 * the timing-sensitive test suites that run beside it (failover, crash
 * points) must not starve. `nice` execs QEMU (same PID).
 */
export const QEMU_COMMAND = ['nice', '-n', '19', 'qemu-system-x86_64'];

export type Workload = 'idle' | 'counter' | 'dirty' | 'fsync-loop' | 'web';

export interface BootedGuest {
  child: ChildProcess;
  qmpPath: string;
  ramPath: string;
  serial: () => string;
  waitSerial: (re: RegExp, timeoutMs?: number) => Promise<RegExpMatchArray>;
  kill: () => Promise<void>;
}

export async function bootGuest(
  dir: string,
  opts: {
    workload?: Workload;
    disk?: string;
    ramMiB?: number;
    httpPort?: number;
    /** Start paused, waiting for a migration (`-incoming defer`), from this RAM file. */
    incoming?: { ramPath: string };
    /** Run QEMU at nice 19 (default: true; see QEMU_COMMAND). */
    nice?: boolean;
    /**
     * How long the boot may take (default 60 s). At nice 19 a guest that boots in 12 s alone gets
     * almost no CPU while both cores run other suites (the simulator's), and took over a minute.
     */
    bootTimeoutMs?: number;
    /** Called with the QEMU process as soon as it is spawned (the caller kills it by PID). */
    track?: (child: ChildProcess) => void;
  } = {},
): Promise<BootedGuest> {
  const qmpPath = path.join(dir, 'qmp.sock');
  const ramPath =
    opts.incoming?.ramPath ?? path.join('/dev/shm', `colo-blk-vm-ram-${process.pid}-${path.basename(dir)}`);
  const args = [
    ...guestQemuArgs({ ...opts, ramPath }),
    '-qmp',
    `unix:${qmpPath},server=on,wait=off`,
    ...(opts.incoming ? ['-incoming', 'defer'] : []),
  ];
  const command = opts.nice === false ? ['qemu-system-x86_64'] : QEMU_COMMAND;
  const child = spawn(command[0], [...command.slice(1), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  opts.track?.(child);
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString('latin1')));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString('latin1')));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const waitSerial = async (re: RegExp, timeoutMs = 60_000) => {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = out.match(re);
      if (m) return m;
      if (child.exitCode !== null || child.signalCode !== null)
        throw new Error(
          `QEMU exited (${child.exitCode ?? child.signalCode}) before ${re}:\n${out.slice(-2000)}`,
        );
      if (Date.now() > deadline)
        throw new Error(`no ${re} on the guest's console after ${timeoutMs} ms:\n${out.slice(-2000)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const guest: BootedGuest = {
    child,
    qmpPath,
    ramPath,
    serial: () => out,
    waitSerial,
    kill: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await exited;
      }
      if (!opts.incoming) fs.rmSync(ramPath, { force: true });
    },
  };
  try {
    await untilBooted(guest, opts.incoming !== undefined, opts.bootTimeoutMs);
  } catch (err) {
    // The caller never gets the guest: stop QEMU and remove its RAM file here (256 MiB or more
    // of /dev/shm each, left behind by every failed boot otherwise).
    await guest.kill();
    throw err;
  }
  return guest;
}

/** Wait until the guest has booted (or, incoming, until QEMU is up and paused); throws saying why not. */
async function untilBooted(guest: BootedGuest, incoming: boolean, timeoutMs = 60_000): Promise<void> {
  const { child, qmpPath, waitSerial } = guest;
  const out = () => guest.serial();
  if (incoming) {
    // Paused before the first instruction: the QMP socket is the sign of life.
    const deadline = Date.now() + 30_000;
    while (!fs.existsSync(qmpPath)) {
      if (child.exitCode !== null) throw new Error(`QEMU exited (${child.exitCode}):\n${out().slice(-2000)}`);
      if (Date.now() > deadline) throw new Error(`QEMU made no QMP socket in 30 s:\n${out().slice(-2000)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } else {
    await waitSerial(/colo-guest: ready/, timeoutMs);
    // A module that did not load leaves the guest without its disk or network: say so now,
    // not as a workload that never makes progress.
    const failed = [...out().matchAll(/colo-guest: insmod (\S+) failed/g)].map((m) => m[1]);
    if (failed.length)
      throw new Error(
        `the guest kit's kernel could not load ${failed.join(', ')}: rebuild the kit (node tools/vm/build-guest.mjs)`,
      );
  }
}
