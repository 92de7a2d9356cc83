/**
 * A running QEMU VM as a checkpoint source, and a checkpoint as a VM again.
 *
 * `QemuVm.checkpoint()` (the PVM's side of a memory checkpoint):
 *   1. `stop`, and wait for QEMU's STOP event (vCPUs halted);
 *   2. device state by migration with `x-ignore-shared` to a TCP socket of
 *      this process (the RAM, in the shared file, does not travel);
 *   3. the RAM pages changed since the last checkpoint (RamImage.diff), and
 *      their contents;
 *   4. `cont` (unless the caller wants the VM kept paused).
 * What it returns is what StandbyRam.receive takes.
 *
 * `resumeFromCheckpoint()` (failover): a QEMU started with the committed RAM
 * image as its memory-backend-file and `-incoming defer` is given the device
 * state by `migrate-incoming` and continued.
 */
import { Buffer } from 'node:buffer';
import { performance } from 'node:perf_hooks';
import fs from 'node:fs';
import net from 'node:net';
import { ColoError } from '../../errors.js';
import type { QmpClient } from './qmp.js';
import { RamImage } from './ram.js';

export interface VmCheckpoint {
  /** Pages changed since the last committed checkpoint (all non-zero pages the first time), ascending. */
  pages: Uint32Array;
  /** Their contents, in the same order. */
  data: Buffer;
  /** QEMU's device state (x-ignore-shared migration stream). */
  device: Buffer;
  /** Milliseconds per phase, and the whole pause (stop to cont). */
  timings: { stop: number; device: number; ram: number; cont: number; pause: number };
}

const MIGRATION_TIMEOUT_MS = 30_000;

/**
 * Where QEMU sends the device state: one listening socket for the VM's life
 * (a migration connects, sends, closes), so that a checkpoint does not set
 * one up while the VM is paused.
 */
export class DeviceSink {
  private waiter: ((s: net.Socket) => void) | null = null;
  /** Ends the wait in progress, if any (a new wait, or close). */
  private abort: ((err: Error) => void) | null = null;

  private constructor(
    private readonly server: net.Server,
    readonly uri: string,
  ) {
    server.on('connection', (s) => {
      const w = this.waiter;
      this.waiter = null;
      if (w) w(s);
      else s.destroy(); // nobody asked: not a migration of ours
    });
  }

  static async open(): Promise<DeviceSink> {
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    server.unref();
    return new DeviceSink(server, `tcp:127.0.0.1:${(server.address() as net.AddressInfo).port}`);
  }

  /** Everything the next connection sends, until it ends. */
  next(): Promise<Buffer> {
    // One wait at a time: one left over (its migrate command failed) ends here, so that
    // settling it later cannot clear this one's state.
    this.abort?.(new ColoError('ECONNECT', 'a new checkpoint started before QEMU sent its device state'));
    return new Promise<Buffer>((resolve, reject) => {
      let socket: net.Socket | null = null;
      let settled = false;
      // The one way a wait ends: data, a socket error, the timeout, or close.
      const settle = (err: Error | null, data?: Buffer) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this.waiter = null;
        this.abort = null;
        if (err) {
          socket?.destroy();
          reject(err);
        } else resolve(data!);
      };
      const timer = setTimeout(
        () => settle(new ColoError('ECONNECT', 'QEMU sent no device state')),
        MIGRATION_TIMEOUT_MS,
      );
      this.abort = (err) => settle(err);
      this.waiter = (s) => {
        socket = s;
        const parts: Buffer[] = [];
        s.on('data', (d: Buffer) => parts.push(d));
        s.on('error', (err) => settle(err));
        s.on('end', () => settle(null, Buffer.concat(parts)));
      };
    });
  }

  /**
   * Stop listening, and end a wait in progress: a QEMU that died mid-checkpoint never connects,
   * and the wait's timer would otherwise keep an agent whose VM is gone alive until it fires.
   */
  close(): void {
    this.abort?.(new ColoError('ECONNECT', 'the VM is gone: no device state will come'));
    this.server.close();
  }
}

/** Migrations leave the RAM out: it is in the shared file (the checkpoint's pages travel on their own). */
function ignoreShared(qmp: QmpClient): Promise<unknown> {
  return qmp.execute('migrate-set-capabilities', {
    capabilities: [{ capability: 'x-ignore-shared', state: true }],
  });
}

async function waitMigration(qmp: QmpClient, what: string): Promise<void> {
  const deadline = performance.now() + MIGRATION_TIMEOUT_MS;
  for (;;) {
    const m = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled')
      throw new ColoError('EIO', `${what} ${m.status}: ${m['error-desc'] ?? 'QEMU gave no reason'}`);
    if (performance.now() > deadline)
      throw new ColoError('EIO', `${what} did not complete in ${MIGRATION_TIMEOUT_MS} ms`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

export class QemuVm {
  /** Whether the vCPUs run, from QEMU's STOP and RESUME events. */
  private vcpus: boolean;

  get running(): boolean {
    return this.vcpus;
  }

  private constructor(
    readonly qmp: QmpClient,
    readonly ram: RamImage,
    private readonly sink: DeviceSink,
    running: boolean,
  ) {
    this.vcpus = running;
    qmp.on('STOP', () => (this.vcpus = false));
    qmp.on('RESUME', () => (this.vcpus = true));
  }

  /** Take charge of a running VM whose RAM is the shared file `ramPath`. */
  static async attach(qmp: QmpClient, ramPath: string): Promise<QemuVm> {
    await ignoreShared(qmp);
    const status = await qmp.execute<{ status: string }>('query-status');
    return new QemuVm(qmp, RamImage.open(ramPath), await DeviceSink.open(), status.status === 'running');
  }

  /** Stop the vCPUs (QEMU drains and flushes in-flight disk I/O before it says STOP). */
  async pause(): Promise<void> {
    if (!this.vcpus) return;
    const stopped = this.qmp.waitEvent('STOP', 10_000);
    await this.qmp.execute('stop');
    await stopped;
  }

  /** Run the vCPUs (`cont` also leaves the post-migration state a capture leaves them in). */
  async resume(): Promise<void> {
    if (!this.vcpus) await this.qmp.execute('cont');
  }

  /**
   * While paused: the device state, and the pages changed since the last
   * checkpointed() (or every non-zero page after forgetPeer()). The pages'
   * contents are `ranges`: views of runs of consecutive pages in the
   * checkpoint copy, valid until the next capture (no copy is made).
   */
  async capture(): Promise<{
    pages: Uint32Array;
    ranges: Buffer[];
    device: Buffer;
    timings: { device: number; ram: number };
  }> {
    const t1 = performance.now();
    const received = this.sink.next();
    received.catch(() => {}); // awaited below, unless the migrate command itself fails
    await this.qmp.execute('migrate', { uri: this.sink.uri });
    // QEMU writes the device state into the socket while the pages are compared here (the
    // kernel's socket buffers hold it); it is read once the compare is done.
    const t = performance.now();
    const pages = this.ram.diff().pages;
    const ramMs = performance.now() - t;
    await waitMigration(this.qmp, 'saving the device state');
    const device = await received;
    const t2 = performance.now();
    const ranges: Buffer[] = [];
    for (let i = 0; i < pages.length;) {
      let j = i + 1;
      while (j < pages.length && pages[j] === pages[j - 1] + 1 && j - i < 16384) j++;
      ranges.push(this.ram.pages(pages[i], j - i));
      i = j;
    }
    // device: from the migrate command until the state is here (the compare runs inside it).
    return { pages, ranges, device, timings: { device: t2 - t1 - ramMs, ram: ramMs } };
  }

  /** A whole checkpoint in this process: pause, capture (the pages copied out), resume unless `keepPaused`. */
  async checkpoint(opts: { keepPaused?: boolean } = {}): Promise<VmCheckpoint> {
    const t0 = performance.now();
    await this.pause();
    const t1 = performance.now();
    const c = await this.capture();
    const data = Buffer.concat(c.ranges);
    const t3 = performance.now();
    if (!opts.keepPaused) await this.resume();
    const t4 = performance.now();
    return {
      pages: c.pages,
      data,
      device: c.device,
      timings: {
        stop: t1 - t0,
        device: c.timings.device,
        ram: t3 - t1 - c.timings.device,
        cont: t4 - t3,
        pause: t4 - t0,
      },
    };
  }

  /** The last checkpoint is committed at the secondary: the next carries only what changes from here. */
  checkpointed(): void {
    this.ram.checkpointed();
  }

  close(): void {
    this.sink.close();
    this.ram.close();
  }
}

/**
 * Failover: a QEMU started with `-incoming defer` on the committed RAM image
 * takes the committed device state and runs.
 */
export async function resumeFromCheckpoint(qmp: QmpClient, devicePath: string): Promise<void> {
  if (!fs.existsSync(devicePath)) throw new ColoError('ENOENT', `no device state at ${devicePath}`);
  await ignoreShared(qmp);
  await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(devicePath)}` });
  await waitMigration(qmp, 'loading the device state');
  const status = await qmp.execute<{ status: string }>('query-status');
  if (status.status !== 'running') await qmp.execute('cont');
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}
