/**
 * A sparse in-memory block device.
 *
 * Notes on the design: the device is a map of fixed-size pages; a page that
 * was never written (or was trimmed whole) is absent and reads as zeroes, so a
 * 1 TiB memory device costs nothing until written. Extents report absent pages
 * as holes. Everything is synchronous underneath, so flush and FUA are no-ops:
 * a memory device has no durability to offer, and says so by being 'native'
 * (the operation completes with its full meaning, which is "nothing to do").
 */
import { Buffer } from 'node:buffer';
import { ColoError } from '../errors.js';
import { limits } from '../limits.js';
import {
  assertRange,
  ExtentFlag,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type ZeroOptions,
} from './device.js';

export class MemoryDevice implements BlockDevice {
  readonly caps: Capabilities = {
    write: true,
    flush: true,
    fua: 'native',
    trim: 'native',
    zero: 'native',
    fastZero: true,
    extents: true,
    cache: 'native',
    multiConn: true,
  };
  private readonly pages = new Map<number, Buffer>();
  private readonly pageBytes: number;

  constructor(
    readonly size: number,
    opts: { pageBytes?: number } = {},
  ) {
    this.pageBytes = opts.pageBytes ?? limits.memoryPageBytes;
  }

  /** Bytes actually held (allocated pages). */
  get allocatedBytes(): number {
    return this.pages.size * this.pageBytes;
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    this.readSync(buf, offset);
  }

  preadNow(buf: Buffer, offset: number): boolean {
    this.readSync(buf, offset);
    return true;
  }

  readSync(buf: Buffer, offset: number): void {
    assertRange(this, offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.pageBytes);
      const inPage = pos - index * this.pageBytes;
      const n = Math.min(this.pageBytes - inPage, buf.length - done);
      const page = this.pages.get(index);
      if (page) page.copy(buf, done, inPage, inPage + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
  }

  async pwrite(buf: Buffer, offset: number): Promise<void> {
    this.writeAt(buf, offset);
  }

  /** Memory is written at once, whatever the size. */
  pwritevNow(bufs: readonly Buffer[], offset: number): boolean {
    let length = 0;
    for (const b of bufs) length += b.length;
    assertRange(this, offset, length);
    for (const b of bufs) {
      this.writeAt(b, offset);
      offset += b.length;
    }
    return true;
  }

  private writeAt(buf: Buffer, offset: number): void {
    assertRange(this, offset, buf.length);
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.pageBytes);
      const inPage = pos - index * this.pageBytes;
      const n = Math.min(this.pageBytes - inPage, buf.length - done);
      let page = this.pages.get(index);
      if (!page) {
        page = Buffer.alloc(this.pageBytes);
        this.pages.set(index, page);
      }
      buf.copy(page, inPage, done, done + n);
      done += n;
    }
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    this.zeroRange(offset, length, true);
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    // Provisioning (NO_HOLE) allocates RAM for every page: refuse requests too big
    // to be worth that, as the NBD spec allows, instead of exhausting memory.
    if (opts.mayTrim === false && length > limits.maxPayloadBytes)
      throw new ColoError(
        'EOVERFLOW',
        `write-zeroes without holes of ${length} bytes on a memory disk (the limit is ${limits.maxPayloadBytes})`,
      );
    this.zeroRange(offset, length, opts.mayTrim !== false);
  }

  private zeroRange(offset: number, length: number, mayFree: boolean): void {
    assertRange(this, offset, length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.pageBytes);
      const inPage = pos - index * this.pageBytes;
      const n = Math.min(this.pageBytes - inPage, length - done);
      const page = this.pages.get(index);
      if (n === this.pageBytes && mayFree) this.pages.delete(index);
      else if (page) page.fill(0, inPage, inPage + n);
      else if (!mayFree) this.pages.set(index, Buffer.alloc(this.pageBytes)); // NO_HOLE: provision
      done += n;
    }
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    assertRange(this, offset, length);
    // Merge while walking, so the limit counts extents (not pages) and a large
    // sparse range comes back in one answer.
    const out: Extent[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.pageBytes);
      const n = Math.min(this.pageBytes - (pos - index * this.pageBytes), length - done);
      const flags = this.pages.has(index) ? 0 : ExtentFlag.HOLE | ExtentFlag.ZERO;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += n;
      else if (out.length === limits.maxExtentsPerReply) break;
      else out.push({ offset: pos, length: n, flags });
      done += n;
    }
    return out;
  }

  async cache(offset: number, length: number): Promise<void> {
    assertRange(this, offset, length);
  }

  async close(): Promise<void> {}
}
