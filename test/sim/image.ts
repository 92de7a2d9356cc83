/**
 * A disk image for the simulator: a block device over a file of a simulated
 * disk, so the image has the same crash semantics as the journals (what a
 * flush returned for survives; the rest may be lost or torn at a sector).
 * It can fail a mutation part-way, as a real disk may (some sectors written,
 * then EIO).
 */
import type { Capabilities, Extent, WriteOptions, ZeroOptions } from '../../src/block/device.js';
import { assertRange } from '../../src/block/device.js';
import type { StoreImage } from '../../src/checkpoint/secondary/store.js';
import { ColoError } from '../../src/errors.js';
import type { Storage, StorageFile } from '../../src/sys/storage.js';
import type { Rng } from './world.js';

export class SimImage implements StoreImage {
  readonly caps: Capabilities = {
    write: true,
    flush: true,
    fua: 'emulate',
    trim: 'native',
    zero: 'native',
    fastZero: true,
    extents: true,
    cache: 'emulate',
    multiConn: true,
  };
  private readonly file: StorageFile;
  /** Probability that a mutation fails part-way (set by the scenario). */
  failRate = 0;
  /** Mutations failed so far. */
  failures = 0;

  constructor(
    storage: Storage,
    path: string,
    readonly size: number,
    private readonly rng: Rng,
  ) {
    this.file = storage.open(path);
    if (this.file.size() < size) this.file.truncate(size);
  }

  /** Synchronous read (the checks read images between steps). */
  readSync(buf: Buffer, offset: number): void {
    assertRange(this, offset, buf.length);
    const n = this.file.read(buf, offset);
    buf.fill(0, n);
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.readSync(buf, offset);
  }

  /** Write `data` at `offset`; maybe fail after writing a prefix of it. */
  private put(data: Buffer, offset: number): void {
    if (this.failRate > 0 && this.rng.chance(this.failRate)) {
      this.failures++;
      const part = this.rng.int(data.length);
      if (part) this.file.writev([data.subarray(0, part)], offset);
      throw new ColoError('EIO', `simulated disk error after ${part} of ${data.length} bytes at ${offset}`);
    }
    this.file.writev([data], offset);
  }

  async pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    assertRange(this, offset, buf.length);
    if (buf.length) this.put(buf, offset); // the disk copies what it keeps
    if (opts.fua) await this.file.datasync();
  }

  /**
   * A write without FUA to an even 4 KiB block is done at once (the
   * replicating primary's fast path, pwritevNow); the others go the general
   * way (pwrite), so both paths run in every scenario. Chosen by the offset,
   * not the rng: a seed's scenario is the same as without it.
   */
  pwritevNow(bufs: readonly Buffer[], offset: number, opts: WriteOptions = {}): boolean {
    if (opts.fua || Math.floor(offset / 4096) % 2 === 1) return false;
    const buf = bufs.length === 1 ? bufs[0] : Buffer.concat(bufs);
    assertRange(this, offset, buf.length);
    if (buf.length) this.put(buf, offset);
    return true;
  }

  preadNow(buf: Buffer, offset: number): boolean {
    this.readSync(buf, offset);
    return true;
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    if (length) this.put(Buffer.alloc(length), offset);
    if (opts.fua) await this.file.datasync();
  }

  trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    return this.zero(offset, length, { ...opts, mayTrim: true });
  }

  flush(): Promise<void> {
    return this.file.datasync();
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    assertRange(this, offset, length);
    return [{ offset, length, flags: 0 }];
  }

  async cache(offset: number, length: number): Promise<void> {
    assertRange(this, offset, length);
  }

  async close(): Promise<void> {
    this.file.close();
  }
}
