/**
 * The memory-checkpoint hook of a real QEMU VM, as a process beside it: the
 * same control routes as the stand-in guest (src/guest/node.ts), so that the
 * coordinator drives it unchanged through GuestVm.
 *
 * Two roles, one agent:
 * - active (`colo-blk vm`): beside the running VM, over its QMP socket and
 *   its shared RAM file. pause = `stop`; send = device state by
 *   x-ignore-shared migration plus the RAM pages changed since the last
 *   checkpoint, straight to the standby's /mem/receive; checkpointed = the
 *   next diff starts here; resume = `cont`.
 * - standby (`colo-blk vm-standby`): on the secondary, with no VM running.
 *   receive/load/discard keep the last committed RAM image and device state
 *   (StandbyRam: durable and atomic at the commit). resume is the failover:
 *   QEMU is started from the user's command line on the committed image,
 *   given the device state and continued; the agent is active from then on
 *   (the next pairing makes a new standby a copy of this VM).
 *
 * A standby has nothing for the comparer to connect to until it runs: it
 * says so in /status (`standby: true`), and the coordinator pairs it in
 * remus mode only, holding the PVM's output until each commit.
 */
import { Buffer } from 'node:buffer';
import { performance } from 'node:perf_hooks';
import crypto from 'node:crypto';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import type { ChildProcess } from 'node:child_process';
import { ColoError } from '../../errors.js';
import type { Logger } from '../../net/server.js';
import type { Storage } from '../../sys/storage.js';
import { parseHostPort } from '../../util/address.js';
import { controlRaw, type Route } from '../control.js';
import { takeCapture } from '../coordinator/hooks.js';
import { launchQemu, standbyArgv, type VmCommand } from './launch.js';
import type { QmpClient } from './qmp.js';
import { StandbyRam } from './standby-ram.js';
import { resumeFromCheckpoint, QemuVm } from './vm.js';
import { decodeCheckpoint, encodeCheckpoint } from './wire.js';

/** Written into a standby's directory when its RAM image becomes a running VM's memory. */
const ACTIVE_MARK = 'ACTIVE';

export interface CaptureRecord {
  pages: number;
  bytes: number;
  deviceMs: number;
  ramMs: number;
  sendMs: number;
}

export class QemuAgent extends EventEmitter {
  private vm: QemuVm | null = null;
  private standby: StandbyRam | null = null;
  private child: ChildProcess | null = null;
  private resuming: Promise<void> | null = null;
  checkpoints = 0;
  last: CaptureRecord | null = null;
  failedOverAt: number | null = null;

  private constructor(
    readonly ramBytes: number,
    private readonly logger: Logger,
    private readonly standbyOf?: {
      dir: string;
      command: VmCommand;
      storage: Storage;
      console?: (d: Buffer) => void;
    },
  ) {
    super();
  }

  /** Beside a running VM: its QMP socket and its RAM file (memory-backend-file, share=on). */
  static async active(qmp: QmpClient, ramPath: string, logger: Logger): Promise<QemuAgent> {
    const vm = await QemuVm.attach(qmp, ramPath);
    const agent = new QemuAgent(vm.ram.size, logger);
    agent.adopt(vm);
    return agent;
  }

  /**
   * On the secondary: the committed state in `dir`, and how to start the VM
   * from it. `console`: where the VM's stdout goes once it runs (default:
   * this process's stdout).
   */
  static async standbyFor(
    storage: Storage,
    dir: string,
    command: VmCommand,
    logger: Logger,
    console?: (d: Buffer) => void,
  ): Promise<QemuAgent> {
    const mark = path.join(dir, ACTIVE_MARK);
    if (fs.existsSync(mark))
      throw new ColoError(
        'EUSAGE',
        `${dir} is the memory of a VM that runs since a failover (${fs.readFileSync(mark, 'utf8').trim()}): ` +
          `give a new standby its own empty directory`,
      );
    const agent = new QemuAgent(command.ramBytes, logger, { dir, command, storage, console });
    agent.standby = await StandbyRam.open(storage, dir, command.ramBytes);
    return agent;
  }

  private adopt(vm: QemuVm): void {
    this.vm = vm;
    vm.qmp.once('close', (err: Error) => this.lost(err.message));
    this.child?.once('exit', (code, signal) => this.lost(`QEMU exited (${code ?? signal})`));
  }

  private lostWhy: string | null = null;

  private lost(why: string): void {
    if (this.lostWhy) return;
    this.lostWhy = why;
    this.logger.warn(`the VM is gone: ${why}`);
    this.emit('lost', why);
  }

  get role(): 'active' | 'standby' {
    return this.vm ? 'active' : 'standby';
  }

  /** The running VM's QEMU, when this agent started it (after a failover). */
  get pid(): number | null {
    return this.child?.pid ?? null;
  }

  private activeVm(what: string): QemuVm {
    if (this.lostWhy) throw new ColoError('ECONNECT', `the VM is gone: ${this.lostWhy}`);
    if (!this.vm) throw new ColoError('EINVAL', `${what}: this is a standby, no VM runs here yet`);
    return this.vm;
  }

  private standbyRam(what: string): StandbyRam {
    if (!this.standby)
      throw new ColoError('EINVAL', `${what}: this VM runs here, it receives no checkpoints`);
    return this.standby;
  }

  status() {
    if (this.lostWhy) throw new ColoError('ECONNECT', `the VM is gone: ${this.lostWhy}`);
    return {
      role: 'vm',
      agent: this.role,
      state: this.vm ? (this.vm.running ? 'running' : 'paused') : 'standby',
      // Nothing listens until failover: the comparer must not connect to a standby.
      standby: this.role === 'standby',
      identity: `qemu ram=${this.ramBytes}`,
      ramBytes: this.ramBytes,
      qemu: this.vm?.qmp.version ?? null,
      pid: this.pid,
      committedEpoch: this.standby?.committed.epoch ?? null,
      checkpoints: this.checkpoints,
      last: this.last,
      failedOverAt: this.failedOverAt,
      dirtyBytes: null,
      // Its state can be captured while paused and sent once it runs again.
      earlyResume: this.role === 'active',
    };
  }

  async pause(): Promise<null> {
    if (this.role === 'standby') return null;
    await this.activeVm('pause').pause();
    return null;
  }

  async resume(): Promise<void> {
    if (this.role === 'standby') return this.failover();
    await this.activeVm('resume').resume();
  }

  /** The state taken at the last pause, for a send after the VM resumed (remus's early resume). */
  private captured: {
    full: boolean;
    pages: Uint32Array;
    ranges: Buffer[];
    device: Buffer;
    timings: { device: number; ram: number };
  } | null = null;

  /**
   * While paused: take D^p (or every page, `full`) and the device state into
   * this process, so that the VM can run again before they are sent. The
   * pages stay in the checkpoint copy, which only the next capture changes.
   */
  async capture(full: boolean): Promise<{ pages: number }> {
    const vm = this.activeVm('capture');
    if (vm.running) throw new ColoError('EINVAL', 'capture: the VM runs; pause it first');
    if (full) vm.ram.forgetPeer();
    this.captured = { full, ...(await vm.capture()) };
    return { pages: this.captured.pages.length };
  }

  /**
   * Send D^p (or every page, `full`) and the device state to the standby at
   * `to`: taken now (the VM must be paused), or `captured` at the last pause.
   */
  async send(to: string, full: boolean, captured = false): Promise<{ bytes: number }> {
    const vm = this.activeVm('send');
    const target = parseHostPort(to, "'to'");
    if (!captured) await this.capture(full);
    const c = takeCapture(this.captured, full);
    this.captured = null;
    const t = performance.now();
    const body = encodeCheckpoint(vm.ram.size, c.pages, c.ranges, c.device, c.full);
    const bytes = body.reduce((n, b) => n + b.length, 0);
    await controlRaw(target, '/mem/receive', body, 60_000);
    this.last = {
      pages: c.pages.length,
      bytes,
      deviceMs: c.timings.device,
      ramMs: c.timings.ram,
      sendMs: performance.now() - t,
    };
    return { bytes };
  }

  checkpointed(): void {
    if (!this.vm) return; // a standby: nothing of its own to forget
    this.vm.checkpointed();
    this.checkpoints++;
  }

  receive(body: Buffer): { epoch: number; pages: number } {
    const ram = this.standbyRam('receive');
    const c = decodeCheckpoint(body);
    if (c.ramBytes !== this.ramBytes)
      throw new ColoError(
        'EINVAL',
        `the PVM has ${c.ramBytes} bytes of RAM, this standby's VM ${this.ramBytes}: not the same VM`,
      );
    const epoch = ram.committed.epoch + 1;
    ram.receive(epoch, c.pages, c.data, c.device, c.full);
    return { epoch, pages: c.pages.length };
  }

  /**
   * Commit the received checkpoint. The same load again (`checkpoint` as the last one's, nothing
   * received since: its first answer was lost) is answered with that epoch.
   */
  async load(checkpoint?: string): Promise<{ epoch: number; again?: true }> {
    const ram = this.standbyRam('load');
    if (checkpoint !== undefined && checkpoint === this.loaded && !ram.hasPending)
      return { epoch: ram.committed.epoch, again: true };
    const epoch = ram.committed.epoch + 1;
    await ram.commit(epoch);
    this.checkpoints++;
    this.loaded = checkpoint ?? null;
    return { epoch };
  }
  /** The checkpoint id of the last load. */
  private loaded: string | null = null;

  discard(): void {
    this.standby?.discard();
  }

  /** A hash of the RAM as of the last checkpoint (the PVM's copy, the standby's committed image). */
  hash(): string {
    const h = crypto.createHash('sha256');
    if (this.vm) for (const part of this.vm.ram.copyParts()) h.update(part);
    else {
      const fd = fs.openSync(this.standby!.committed.ram, 'r');
      try {
        const buf = Buffer.allocUnsafe(8 * 1024 * 1024);
        for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0;) h.update(buf.subarray(0, n));
      } finally {
        fs.closeSync(fd);
      }
    }
    return h.digest('hex');
  }

  /** Failover: start the VM on the committed RAM image, give it the device state, and run it. */
  private failover(): Promise<void> {
    this.resuming ??= this.startVm().finally(() => (this.resuming = null));
    return this.resuming;
  }

  private async startVm(): Promise<void> {
    const { dir, command, console } = this.standbyOf!;
    const ram = this.standbyRam('resume');
    const committed = ram.committed;
    if (!committed.device)
      throw new ColoError('EINVAL', 'resume: no checkpoint was ever committed here; there is no VM to start');
    const t0 = performance.now();
    ram.close();
    fs.writeFileSync(
      path.join(dir, ACTIVE_MARK),
      `checkpoint ${committed.epoch}, ${new Date().toISOString()}\n`,
    );
    const qmpPath = path.join(dir, 'qmp.sock');
    const { child, qmp } = await launchQemu(standbyArgv(command, committed.ram, qmpPath), qmpPath, {
      console,
    });
    this.child = child;
    const t1 = performance.now();
    await resumeFromCheckpoint(qmp, committed.device);
    this.standby = null;
    this.adopt(await QemuVm.attach(qmp, committed.ram));
    this.failedOverAt = Date.now();
    this.logger.warn(
      `the VM runs here from checkpoint ${committed.epoch} (QEMU ${child.pid} started in ${(t1 - t0).toFixed(0)} ms, running ${(performance.now() - t0).toFixed(0)} ms after the failover's resume)`,
    );
    this.emit('started', { pid: child.pid, epoch: committed.epoch, ms: performance.now() - t0 });
  }

  routes(): Route[] {
    return [
      { method: 'GET', path: '/status', handler: async () => this.status() },
      { method: 'GET', path: '/hash', handler: async () => ({ hash: this.hash() }) },
      // The VM's disk is the disk pair's: the nodes compare it, not the VM.
      { method: 'GET', path: '/disk-hash', handler: async () => ({ hash: null, bytes: null }) },
      { method: 'POST', path: '/mem/pause', handler: async () => ({ conns: await this.pause() }) },
      {
        method: 'POST',
        path: '/mem/resume',
        handler: async () => {
          await this.resume();
          return {};
        },
      },
      {
        method: 'POST',
        path: '/mem/send',
        handler: async (_q, body) =>
          this.send(String(body.to ?? ''), body.full === true, body.captured === true),
      },
      {
        method: 'POST',
        path: '/mem/capture',
        handler: async (_q, body) => this.capture(body.full === true),
      },
      {
        method: 'POST',
        path: '/mem/checkpointed',
        handler: async () => {
          this.checkpointed();
          return {};
        },
      },
      { method: 'POST', path: '/mem/receive', raw: async (_q, body) => this.receive(Buffer.concat(body)) },
      {
        method: 'POST',
        path: '/mem/load',
        handler: async (_q, body) =>
          this.load(typeof body.checkpoint === 'string' ? body.checkpoint : undefined),
      },
      {
        method: 'POST',
        path: '/mem/discard',
        handler: async () => {
          this.discard();
          return {};
        },
      },
    ];
  }

  close(): void {
    this.lostWhy ??= 'the agent is shutting down';
    this.standby?.close();
    this.vm?.qmp.close();
    this.vm?.close();
  }
}
