/**
 * One direction of a TCP connection as the comparer sees it: a byte stream
 * with absolute positions (bytes since the connection opened). Received
 * chunks are kept as they came (Node never reuses them) from `start` to
 * `end`; the comparer drops what it has released or discarded.
 */
import { Buffer } from 'node:buffer';

export class StreamBuffer {
  private chunks: Buffer[] = [];
  /** Read offset in chunks[0]. */
  private head = 0;
  /** Absolute position of the first byte held. */
  start = 0;
  /** Absolute position after the last byte received (the total received). */
  end = 0;

  get held(): number {
    return this.end - this.start;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.end += chunk.length;
  }

  /** Forget every byte before `pos` (clamped to what is held). */
  dropTo(pos: number): void {
    let left = Math.min(pos, this.end) - this.start;
    while (left > 0) {
      const avail = this.chunks[0].length - this.head;
      if (avail > left) {
        this.head += left;
        this.start += left;
        return;
      }
      left -= avail;
      this.start += avail;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Zero-copy views of [from, to); both must lie within what is held. */
  *views(from: number, to: number): Generator<Buffer> {
    if (from < this.start || to > this.end || from > to)
      throw new RangeError(`[${from}, ${to}) is outside the held [${this.start}, ${this.end})`);
    let pos = this.start;
    for (let i = 0; i < this.chunks.length && pos < to; i++) {
      const c = i === 0 ? this.chunks[0].subarray(this.head) : this.chunks[i];
      const cEnd = pos + c.length;
      if (cEnd > from) yield c.subarray(Math.max(0, from - pos), Math.min(c.length, to - pos));
      pos = cEnd;
    }
  }

  clear(): void {
    this.start = this.end;
    this.chunks = [];
    this.head = 0;
  }
}

/**
 * Compare n bytes of two streams from the given positions: the offset of
 * the first byte that differs, or -1 if all n are equal.
 */
export function firstDifference(
  a: StreamBuffer,
  aFrom: number,
  b: StreamBuffer,
  bFrom: number,
  n: number,
): number {
  if (n === 0) return -1;
  const ia = a.views(aFrom, aFrom + n);
  const ib = b.views(bFrom, bFrom + n);
  let va: Buffer = Buffer.alloc(0);
  let vb: Buffer = Buffer.alloc(0);
  let done = 0;
  while (done < n) {
    if (va.length === 0) va = ia.next().value as Buffer;
    if (vb.length === 0) vb = ib.next().value as Buffer;
    const m = Math.min(va.length, vb.length);
    const x = va.subarray(0, m);
    const y = vb.subarray(0, m);
    if (!x.equals(y)) {
      for (let i = 0; i < m; i++) if (x[i] !== y[i]) return done + i;
    }
    done += m;
    va = va.subarray(m);
    vb = vb.subarray(m);
  }
  return -1;
}
