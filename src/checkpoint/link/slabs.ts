/**
 * Send buffers for the replication link: the frames of live writes are
 * copied into a few long-lived slabs before they are queued on the socket.
 *
 * Why copy: a PVM write's payload would otherwise stay referenced by the
 * socket's queue until the kernel takes it, long enough to outlive V8's young
 * generation. Megabytes of buffers promoted per second are only freed by
 * full (mark-compact) collections, which the profile showed taking a fifth
 * of the primary's CPU under sequential writes. One memcpy into a slab that
 * lives for the whole run costs less, and the payload dies young.
 *
 * A slab is reused once every write queued from it has been handed to the
 * kernel (the socket's write callbacks come in order). When none is free, or
 * a frame is larger than a slab, the caller sends the frame's own buffers.
 */
export const SLAB_BYTES = 1024 * 1024;
const SLABS = 16;

interface Slab {
  buf: Buffer;
  used: number;
  /** Writes queued from this slab and not yet handed to the kernel. */
  refs: number;
}

export class SlabPool {
  private readonly free: Slab[] = [];
  private current: Slab | null = null;
  private created = 0;

  constructor(private readonly max = SLABS) {}

  /**
   * Copy `parts` (one frame) into a slab; returns the copy and the callback
   * to run when the socket has written it, or null if there is no room.
   */
  copy(parts: Buffer[], bytes: number): { view: Buffer; done: () => void } | null {
    if (bytes > SLAB_BYTES) return null;
    let slab = this.current;
    if (!slab || slab.used + bytes > SLAB_BYTES) {
      slab = this.take();
      if (!slab) return null;
    }
    const start = slab.used;
    for (const p of parts) slab.used += p.copy(slab.buf, slab.used);
    slab.refs++;
    const s = slab;
    return {
      view: s.buf.subarray(start, s.used),
      done: () => {
        s.refs--;
        this.release(s);
      },
    };
  }

  private take(): Slab | null {
    const old = this.current;
    this.current = null;
    if (old) this.release(old);
    let slab = this.free.pop();
    if (!slab && this.created < this.max) {
      this.created++;
      slab = { buf: Buffer.allocUnsafeSlow(SLAB_BYTES), used: 0, refs: 0 };
    }
    if (!slab) return null;
    slab.used = 0;
    this.current = slab;
    return slab;
  }

  private release(s: Slab): void {
    if (s.refs === 0 && s !== this.current && !this.free.includes(s)) this.free.push(s);
  }
}
