/**
 * A queue of received socket chunks.
 *
 * Notes on the design: socket chunks are fresh Buffers that Node never reuses,
 * so views into them may be kept. `take(n)` returns a zero-copy view when the
 * n bytes lie in one chunk and copies exactly once otherwise; a payload that
 * arrives in many chunks is therefore assembled with one copy, never by
 * repeated concatenation.
 */
import { Buffer } from 'node:buffer';

export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0; // read position in chunks[0]
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** View of the first n bytes without consuming them (copies only if split). */
  peek(n: number): Buffer {
    if (n > this.total) throw new RangeError(`peek(${n}) with ${this.total} bytes queued`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    this.copyOut(out, n);
    return out;
  }

  /** Remove and return the first n bytes. */
  take(n: number): Buffer {
    const out = this.peek(n);
    this.skip(n);
    return out;
  }

  /** Remove the first n bytes as views of the chunks they lie in (never a copy). */
  takePieces(n: number): Buffer[] {
    if (n > this.total) throw new RangeError(`takePieces(${n}) with ${this.total} bytes queued`);
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const first = this.chunks[0];
      const m = Math.min(first.length - this.head, left);
      out.push(first.subarray(this.head, this.head + m));
      left -= m;
      this.skip(m);
    }
    return out;
  }

  /** Drop up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    const want = Math.min(n, this.total);
    let left = want;
    while (left > 0) {
      const first = this.chunks[0];
      const avail = first.length - this.head;
      if (avail > left) {
        this.head += left;
        break;
      }
      left -= avail;
      this.chunks.shift();
      this.head = 0;
    }
    this.total -= want;
    return want;
  }

  clear(): void {
    this.chunks = [];
    this.head = 0;
    this.total = 0;
  }

  private copyOut(out: Buffer, n: number): void {
    let copied = 0;
    let pos = this.head;
    for (const chunk of this.chunks) {
      const m = Math.min(chunk.length - pos, n - copied);
      chunk.copy(out, copied, pos, pos + m);
      copied += m;
      pos = 0;
      if (copied === n) break;
    }
  }
}
