/**
 * A device whose backend can be replaced while clients stay connected: the
 * SVM's export on a promoted secondary becomes a replicating primary's export
 * when it is re-protected, and the SVM keeps running across the switch.
 *
 * `swap()` holds new requests, waits for the ones in flight to finish on the
 * old backend, then lets everything continue on the new one; so no request
 * straddles the switch. Both backends must offer the same capabilities (the
 * client negotiated them at its handshake).
 */
import { internal } from '../errors.js';
import {
  writePieces,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type FileRange,
  type WriteOptions,
  type ZeroOptions,
} from './device.js';

export class SwitchDevice implements BlockDevice {
  private inflight = 0;
  private drained: (() => void) | null = null;
  private hold: Promise<void> | null = null;

  constructor(private current: BlockDevice) {}

  get size(): number {
    return this.current.size;
  }

  get caps(): Capabilities {
    return this.current.caps;
  }

  private async run<T>(op: (d: BlockDevice) => Promise<T>): Promise<T> {
    while (this.hold) await this.hold;
    this.inflight++;
    try {
      return await op(this.current);
    } finally {
      if (--this.inflight === 0) this.drained?.();
    }
  }

  /** Replace the backend once the requests in flight are done. */
  async swap(next: BlockDevice): Promise<void> {
    if (next.size !== this.current.size) throw internal('a switched device must keep its size');
    for (const k of ['write', 'flush', 'trim', 'zero', 'fua'] as const)
      if (next.caps[k] !== this.current.caps[k])
        throw internal(`the new backend differs in capability '${k}'`);
    while (this.hold) await this.hold;
    let release!: () => void;
    this.hold = new Promise<void>((r) => (release = r));
    try {
      if (this.inflight > 0) await new Promise<void>((r) => (this.drained = r));
      this.drained = null;
      this.current = next;
    } finally {
      this.hold = null;
      release();
    }
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.run((d) => d.pread(buf, offset));
  }
  pwrite(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    return this.run((d) => d.pwrite(buf, offset, opts));
  }
  pwritev(bufs: readonly Buffer[], offset: number, opts?: WriteOptions): Promise<void> {
    return this.run((d) => writePieces(d, bufs, offset, opts));
  }
  flush(): Promise<void> {
    return this.run((d) => d.flush());
  }
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.run((d) => d.trim(offset, length, opts));
  }
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.run((d) => d.zero(offset, length, opts));
  }
  /** None while a switch is under way: the reader takes the path that waits for it. */
  fileRange(offset: number, length: number): FileRange | null {
    return this.hold ? null : (this.current.fileRange?.(offset, length) ?? null);
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.run((d) => d.extents(offset, length));
  }
  cache(offset: number, length: number): Promise<void> {
    return this.run((d) => d.cache(offset, length));
  }
  close(): Promise<void> {
    return this.current.close();
  }
}
