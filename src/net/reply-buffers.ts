/**
 * Large READ reply buffers, used again once the socket has taken them.
 *
 * A 1 MiB read reply in a fresh buffer is 1 MiB of external memory for V8,
 * and V8 answers external memory with major garbage collections: profiled
 * under fio 1 MiB reads (QD8), concurrent marking and sweeping were about a
 * quarter of the server's CPU. A reply's buffer is free again as soon as the
 * socket's write of it has completed (the kernel holds a copy), so the
 * connection gives it back here and the next read of that size reuses it:
 * no new allocation, no external memory growth, no collection. The server
 * keeps a second pool of the same kind for large WRITE payloads, which the
 * socket reads into and the connection gives back once the write has settled
 * (Connection.directPayload).
 *
 * - Only buffers of at least `MIN_BYTES` are kept (smaller ones are cheap and
 *   come from Node's own pool); sizes are rounded up to 64 KiB classes.
 * - At most `maxIdleBytes` wait here; past that a given-back buffer is left
 *   to the garbage collector.
 * - A buffer is given back only after a write that succeeded: a failed or
 *   destroyed socket may still hold it, so it is never reused then.
 * - Only buffers this pool made are taken back, each once (a second give of
 *   the same buffer is ignored), so no two requests ever share one.
 */
import { Buffer } from 'node:buffer';
import { KiB, MiB } from '../limits.js';

const UNIT = 64 * KiB;
export const MIN_BYTES = 64 * KiB;

export class ReplyBuffers {
  private readonly idle = new Map<number, ArrayBuffer[]>();
  /** Every buffer this pool made: true while it waits here, false while a request has it. */
  private readonly isIdle = new WeakMap<ArrayBuffer, boolean>();
  private idleBytes = 0;
  /** Buffers handed out again (for tests). */
  reused = 0;

  constructor(private readonly maxIdleBytes = 32 * MiB) {}

  /** A buffer of `length` bytes (contents not cleared). */
  take = (length: number): Buffer => {
    if (length < MIN_BYTES) return Buffer.allocUnsafe(length);
    const size = Math.ceil(length / UNIT) * UNIT;
    let ab = this.idle.get(size)?.pop();
    if (ab) {
      this.idleBytes -= size;
      this.reused++;
    } else ab = new ArrayBuffer(size);
    this.isIdle.set(ab, false);
    return Buffer.from(ab, 0, length);
  };

  /** `buf` (from take) is no longer used by anyone. */
  give(buf: Buffer): void {
    const ab = buf.buffer as ArrayBuffer;
    // Not ours (undefined), or already given back (true).
    if (this.isIdle.get(ab) !== false) return;
    const size = ab.byteLength;
    if (this.idleBytes + size > this.maxIdleBytes) return;
    let list = this.idle.get(size);
    if (!list) this.idle.set(size, (list = []));
    list.push(ab);
    this.isIdle.set(ab, true);
    this.idleBytes += size;
  }

  get idleByteCount(): number {
    return this.idleBytes;
  }
}
