/**
 * A protected QEMU VM as real processes, started as the README's "Protect a
 * QEMU VM" walkthrough tells a user to, for the VM demo, the VM benchmark
 * and the tests:
 *   1. a disk pair: an ext4 image on the primary (synced to the secondary);
 *   2. the VM: QEMU with its RAM in a shared file, a QMP socket, its disk on
 *      the primary's export, its port 80 on a host port;
 *   3. `colo-blk vm` beside it;
 *   4. `colo-blk vm-standby` with the same QEMU command line, its disk the
 *      secondary's export, its port 80 on another host port;
 *   5. `colo-blk colo --mode remus` in front of the VM's port, driving both.
 * Everything is stopped by PID (`close`, or `kill` for the primary side).
 */
import { execFileSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { controlCall } from '../../src/checkpoint/control.js';
import { spawnRole, startPrimary, startSecondary, stop, type Proc } from '../loop/stack.js';
import { bootGuest, guestQemuArgs, QEMU_COMMAND, type BootedGuest, type Workload } from './guest.js';

export interface VmStackOptions {
  dir: string;
  workload: Workload;
  ramMiB?: number;
  /** The VM's disk (an ext4 file system is made on it). */
  diskMiB?: number;
  coloArgs?: string[];
  /** QEMU at nice 19 (default true: tests share the machine). */
  nice?: boolean;
  /** Each process as it starts (for cleanup by PID). */
  track?: (child: ChildProcess) => void;
  log?: (line: string) => void;
}

export interface VmStack {
  secondary: Proc;
  primary: Proc;
  guest: BootedGuest;
  vm: Proc;
  standby: Proc;
  colo: Proc;
  /** Where clients reach the VM's port 80 (through the comparer). */
  port: number;
  /** The standby's QEMU, once a failover started it. */
  standbyQemuPid: () => number | null;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  status: () => Promise<any>;
  /** Every JSON event colo printed (checkpoints, failovers, states). */
  events: Record<string, unknown>[];
  waitState: (state: string, timeoutMs?: number) => Promise<void>;
  /** SIGKILL the primary side at once: the VM's QEMU, its agent and the primary disk node. */
  killPrimarySide: () => void;
  close: () => Promise<void>;
}

/** The VM's disk by default. */
export const DISK_SIZE = '64M';

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

export async function startVmStack(opts: VmStackOptions): Promise<VmStack> {
  const say = opts.log ?? (() => {});
  const started: Proc[] = [];
  const keep = async (p: Promise<Proc>) => {
    const x = await p;
    opts.track?.(x.child);
    started.push(x);
    return x;
  };
  const diskMiB = opts.diskMiB ?? 64;
  const size = diskMiB === 64 ? DISK_SIZE : `${diskMiB}M`;
  const img = path.join(opts.dir, 'pvm.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, diskMiB * 1024 * 1024);
  execFileSync('mkfs.ext4', ['-q', '-F', img], { stdio: 'ignore' });
  let guest: BootedGuest | null = null;
  const events: Record<string, unknown>[] = [];
  try {
    const secondary = await keep(startSecondary(opts.dir, 'svm', size));
    const primary = await keep(startPrimary(opts.dir, 'pvm', size, secondary));
    say(
      `disk pair: primary NBD 127.0.0.1:${primary.info.port}, secondary NBD 127.0.0.1:${secondary.info.port}`,
    );
    for (let i = 0; ; i++) {
      const s = await controlCall<{ peerState: string }>(
        { host: '127.0.0.1', port: Number(primary.info.controlPort) },
        'GET',
        '/status',
      );
      if (s.peerState === 'protected') break;
      if (i > 1200) throw new Error(`the disk pair did not sync in 60 s (peer ${s.peerState})`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const [pvmHttp, svmHttp] = [await freePort(), await freePort()];
    guest = await bootGuest(opts.dir, {
      workload: opts.workload,
      ramMiB: opts.ramMiB,
      disk: `nbd://127.0.0.1:${primary.info.port}/disk0`,
      httpPort: pvmHttp,
      nice: opts.nice,
      track: opts.track,
    });
    say(
      `VM: QEMU ${guest.child.pid}, ${opts.ramMiB ?? 256} MiB of RAM in ${guest.ramPath}, port 80 on 127.0.0.1:${pvmHttp}`,
    );
    const vm = await keep(
      spawnRole('vm', ['--qmp', guest.qmpPath, '--ram', guest.ramPath, '--control', '127.0.0.1:0']),
    );
    const standby = await keep(
      spawnRole('vm-standby', [
        '--dir', path.join(opts.dir, 'standby'),
        '--control', '127.0.0.1:0',
        '--',
        ...(opts.nice === false ? ['qemu-system-x86_64'] : QEMU_COMMAND),
        ...guestQemuArgs({
          workload: opts.workload,
          ramMiB: opts.ramMiB,
          disk: `nbd://127.0.0.1:${secondary.info.port}/disk0`,
          ramPath: '/dev/shm/replaced-by-colo-blk',
          httpPort: svmHttp,
        }),
      ]), // prettier-ignore
    );
    let standbyPid: number | null = null;
    standby.onEvent = (e) => {
      if (e.event === 'vm-started') standbyPid = e.pid as number;
    };
    const colo = await keep(
      spawnRole('colo', [
        '--listen', '127.0.0.1:0',
        '--control', '127.0.0.1:0',
        '--mode', 'remus',
        '--pvm', `127.0.0.1:${pvmHttp}`,
        '--pvm-control', `127.0.0.1:${vm.info.controlPort}`,
        '--svm', `127.0.0.1:${svmHttp}`,
        '--svm-control', `127.0.0.1:${standby.info.controlPort}`,
        '--primary-control', `127.0.0.1:${primary.info.controlPort}`,
        '--secondary-control', `127.0.0.1:${secondary.info.controlPort}`,
        ...(opts.coloArgs ?? []),
      ]), // prettier-ignore
    );
    colo.onEvent = (e) => events.push(e);
    const coloControl = { host: '127.0.0.1', port: Number(colo.info.controlPort) };
    const g = guest;
    const stack: VmStack = {
      secondary,
      primary,
      guest: g,
      vm,
      standby,
      colo,
      port: Number(colo.info.port),
      standbyQemuPid: () => standbyPid,
      status: () => controlCall(coloControl, 'GET', '/status'),
      events,
      waitState: async (state, timeoutMs = 60_000) => {
        const deadline = Date.now() + timeoutMs;
        for (;;) {
          const s = await controlCall<{ state: string; lastError: string | null }>(
            coloControl,
            'GET',
            '/status',
          );
          if (s.state === state) return;
          if (Date.now() > deadline)
            throw new Error(`colo never reached '${state}' in ${timeoutMs} ms (${s.state}: ${s.lastError})`);
          await new Promise((r) => setTimeout(r, 20));
        }
      },
      killPrimarySide: () => {
        for (const c of [g.child, vm.child, primary.child]) c.kill('SIGKILL');
      },
      close: async () => {
        const pid = standbyPid;
        for (const p of [...started].reverse()) await stop(p);
        if (pid)
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // gone
          }
        await g.kill();
      },
    };
    return stack;
  } catch (err) {
    for (const p of started.reverse()) await stop(p, 'SIGKILL');
    await guest?.kill();
    throw err;
  }
}
