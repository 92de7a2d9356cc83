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

/** Accept one connection and collect everything sent on it until it ends. */
async function receiveStream(): Promise<{ uri: string; done: Promise<Buffer>; close: () => void }> {
  const server = net.createServer();
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as net.AddressInfo).port;
  const done = new Promise<Buffer>((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new ColoError('ECONNECT', 'QEMU sent no device state')),
      MIGRATION_TIMEOUT_MS,
    );
    server.once('connection', (s) => {
      server.close();
      const parts: Buffer[] = [];
      s.on('data', (d: Buffer) => parts.push(d));
      s.on('error', (err) => reject(err));
      s.on('end', () => {
        clearTimeout(timer);
        resolve(Buffer.concat(parts));
      });
    });
  });
  return { uri: `tcp:127.0.0.1:${port}`, done, close: () => server.close() };
}

async function waitMigration(qmp: QmpClient, what: string): Promise<void> {
  const deadline = Date.now() + MIGRATION_TIMEOUT_MS;
  for (;;) {
    const m = await qmp.execute<{ status?: string; 'error-desc'?: string }>('query-migrate');
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled')
      throw new ColoError('EIO', `${what} ${m.status}: ${m['error-desc'] ?? 'QEMU gave no reason'}`);
    if (Date.now() > deadline)
      throw new ColoError('EIO', `${what} did not complete in ${MIGRATION_TIMEOUT_MS} ms`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

export class QemuVm {
  private constructor(
    readonly qmp: QmpClient,
    readonly ram: RamImage,
  ) {}

  /** Take charge of a running VM whose RAM is the shared file `ramPath`. */
  static async attach(qmp: QmpClient, ramPath: string): Promise<QemuVm> {
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'x-ignore-shared', state: true }],
    });
    return new QemuVm(qmp, RamImage.open(ramPath));
  }

  /** Stop the vCPUs (QEMU drains and flushes in-flight disk I/O before it says STOP). */
  async pause(): Promise<void> {
    const status = await this.qmp.execute<{ status: string }>('query-status');
    if (status.status !== 'running') return;
    const stopped = this.qmp.waitEvent('STOP', 10_000);
    await this.qmp.execute('stop');
    await stopped;
  }

  async resume(): Promise<void> {
    const status = await this.qmp.execute<{ status: string }>('query-status');
    if (status.status !== 'running') await this.qmp.execute('cont');
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
    const sink = await receiveStream();
    let device: Buffer;
    let pages: Uint32Array;
    let ramMs: number;
    try {
      await this.qmp.execute('migrate', { uri: sink.uri });
      // QEMU writes the device state into the socket while the pages are compared here (the
      // kernel's socket buffers hold it); it is read once the compare is done.
      const t = performance.now();
      pages = this.ram.diff().pages;
      ramMs = performance.now() - t;
      await waitMigration(this.qmp, 'saving the device state');
      device = await sink.done;
    } finally {
      sink.close();
    }
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
    if (!opts.keepPaused) await this.qmp.execute('cont');
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
    this.ram.close();
  }
}

/**
 * Failover: a QEMU started with `-incoming defer` on the committed RAM image
 * takes the committed device state and runs.
 */
export async function resumeFromCheckpoint(qmp: QmpClient, devicePath: string): Promise<void> {
  if (!fs.existsSync(devicePath)) throw new ColoError('ENOENT', `no device state at ${devicePath}`);
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [{ capability: 'x-ignore-shared', state: true }],
  });
  await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellQuote(devicePath)}` });
  await waitMigration(qmp, 'loading the device state');
  const status = await qmp.execute<{ status: string }>('query-status');
  if (status.status !== 'running') await qmp.execute('cont');
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}
