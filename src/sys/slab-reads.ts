/**
 * Socket reads straight into slabs: the kernel copies received bytes into a
 * long-lived 1 MiB buffer, and each read's bytes are handed on as a view of it.
 *
 * Why: by default Node allocates a new 64 KiB buffer for every read and
 * pushes it through the stream machinery before 'data' fires. For a server
 * receiving gigabytes a second (NBD write payloads, the replication link)
 * that per-read work was a tenth of its CPU: colo-blk serve under 1 MiB fio
 * writes, 0.35 -> 0.26 CPU-s/GiB and 3.2 -> 4.0 GB/s on the two shared cores.
 *
 * How: Node's `onread` socket option (a buffer the kernel reads into, and a
 * callback per read). A slab is never written twice: the next read goes into
 * the part after the last one, and a new slab is taken when less than
 * MIN_READ_BYTES is left. So every view handed on stays valid for as long as
 * its holder keeps it, like Node's own chunks (ByteQueue relies on that), and
 * a slab is freed by the garbage collector once no view of it is left. A
 * socket takes slabs only once it reads in bulk; before that (a handshake, an
 * idle connection) its reads go into one buffer all sockets share, and are
 * copied out.
 *
 * The socket still emits 'data' with each view (emitted here, not by the
 * stream), so its users do not change; pause() and resume() stop and restart
 * the kernel reads as before (TCP backpressure).
 *
 * `onread` is an option of the Socket constructor, and net.Server builds its
 * sockets without it. An accepted socket (from a server made with
 * `pauseOnConnect`, so that nothing was read yet) is re-homed: its handle
 * moves into a new Socket made with `onread`, and the server's connection
 * count moves with it. This uses two properties Node has always had but does
 * not document (`_handle`, `_server`); if they are missing the original socket
 * is resumed and read the usual way. TLS sockets are never re-homed: TLS
 * reads its own socket's handle.
 */
import { Buffer } from 'node:buffer';
import process from 'node:process';
import net from 'node:net';
import tls from 'node:tls';

export const SLAB_BYTES = 1024 * 1024;
/** The smallest read offered to the kernel; Node's own reads are 64 KiB. */
export const MIN_READ_BYTES = 64 * 1024;

/** COLO_BLK_NO_SLAB_READS=1 reads every socket the usual way (benchmarks, and a way out). */
export const slabReadsEnabled = !process.env.COLO_BLK_NO_SLAB_READS;

/** Reads done through slab sockets, and slabs allocated, process-wide (status and tests). */
export const slabReadStats = { sockets: 0, reads: 0, bytes: 0, slabs: 0 };

/**
 * Until a socket reads in bulk it reads into this one buffer, shared by every
 * socket, and each read's bytes are copied out: an idle or handshaking
 * connection holds no slab (ten thousand slowloris connections would
 * otherwise hold 10 GiB of address space, and as much V8 external memory).
 * Sharing is safe: libuv allocates, reads and calls back for one socket at a
 * time on this thread, and the bytes are copied before the callback returns.
 */
const SMALL_READ_BYTES = 64 * 1024;
let smallReads: Buffer | null = null;

/** A socket takes slabs of its own once one read brings this much, or once it has read this much in all. */
export const BULK_READ_BYTES = 16 * 1024;
export const BULK_TOTAL_BYTES = 256 * 1024;

/** Hands out the unread part of the current slab, and a new slab when little is left. */
export class Slabs {
  private slab = Buffer.alloc(0);
  private pos = 0;
  private bulk = false;
  private total = 0;

  constructor(
    private readonly slabBytes = SLAB_BYTES,
    private readonly minRead = MIN_READ_BYTES,
  ) {}

  /** A buffer the next reads fill exactly (see `direct`), and how much of it they filled. */
  private target: Buffer | null = null;
  private targetFilled = 0;

  /**
   * The next `target.length` bytes are read into `target`, then reads go on
   * into slabs. Only for a socket reading in bulk; false (nothing changes)
   * otherwise, or while an earlier target is still being filled.
   */
  direct(target: Buffer): boolean {
    if (!this.bulk || this.target || target.length === 0) return false;
    this.target = target;
    this.targetFilled = 0;
    return true;
  }

  /** The buffer the next read fills. */
  next(): Buffer {
    if (this.target) return this.target.subarray(this.targetFilled);
    if (!this.bulk) return (smallReads ??= Buffer.allocUnsafeSlow(SMALL_READ_BYTES));
    if (this.slab.length - this.pos < this.minRead) {
      this.slab = Buffer.allocUnsafeSlow(this.slabBytes); // never a view of Node's small-buffer pool
      this.pos = 0;
      slabReadStats.slabs++;
    }
    return this.slab.subarray(this.pos);
  }

  /**
   * `n` bytes were read into `buf` (the last `next()`): they are never handed
   * out again. Which buffer that was is told by `buf` itself, not by the
   * state now: Node asks for the next buffer right after each read's
   * callback, so a `direct()` made later (after a pause, from a timer or a
   * promise) takes effect one read late, and that read went to the slab.
   */
  took(buf: Buffer, n: number): Buffer {
    if (buf.buffer === smallReads?.buffer) {
      this.total += n;
      if (n >= BULK_READ_BYTES || this.total >= BULK_TOTAL_BYTES) this.bulk = true;
      return Buffer.from(buf.subarray(0, n)); // the shared buffer is read into again next time
    }
    const t = this.target;
    if (t && buf.buffer === t.buffer && buf.byteOffset === t.byteOffset + this.targetFilled) {
      if ((this.targetFilled += n) >= t.length) this.target = null;
    } else this.pos += n;
    return buf.subarray(0, n);
  }
}

const slabsOf = new WeakMap<net.Socket, Slabs>();

/**
 * Have the next `target.length` bytes a slab socket receives read straight
 * into `target` (they are emitted as views of it, as usual); false if the
 * socket does not read into slabs, or is not reading in bulk yet.
 *
 * Why: a buffer the caller uses again and again (the NBD server's write
 * payloads, given back once written) is still in the CPU's cache when the
 * kernel copies into it, where a slab is always memory not touched for a
 * while: receiving 1 MiB writes into one reused buffer cost 0.11 CPU-s/GiB
 * against 0.14 into a new one or one of 64 in turn.
 */
export function directNextRead(socket: net.Socket, target: Buffer): boolean {
  return slabsOf.get(socket)?.direct(target) ?? false;
}

/**
 * Whether the last of `pieces` (a message taken from the queue) ends where
 * `buffer` (a directed read's target) does: every byte read into it belongs
 * to this message, none to one after it still queued, so it may go back to
 * its pool once the message is handled. (The caller sizes the target so; one
 * failing this is left to the garbage collector.)
 */
export function endsAt(pieces: Buffer[], buffer: Buffer): boolean {
  const last = pieces[pieces.length - 1];
  return (
    last !== undefined &&
    last.buffer === buffer.buffer &&
    last.byteOffset + last.length === buffer.byteOffset + buffer.length
  );
}

interface SocketInternals {
  _handle?: unknown;
  _server?: net.Server | null;
  allowHalfOpen?: boolean;
}

/**
 * Start reading an accepted socket into slabs. `accepted` must come from a
 * server made with `pauseOnConnect: true`. Returns the socket to use from now
 * on: a new one that owns the connection, or `accepted` itself, resumed, when
 * re-homing is not possible. Either way it emits 'data'.
 */
export function readIntoSlabs(accepted: net.Socket): net.Socket {
  const old = accepted as unknown as SocketInternals;
  const handle = old._handle;
  if (!slabReadsEnabled || !handle || accepted instanceof tls.TLSSocket || accepted.destroyed) {
    accepted.resume();
    return accepted;
  }
  const slabs = new Slabs();
  let socket: net.Socket | null = null;
  const options = {
    handle,
    readable: true,
    writable: true,
    allowHalfOpen: old.allowHalfOpen ?? false,
    onread: {
      buffer: () => slabs.next(),
      callback: (n: number, buf: Buffer) => {
        slabReadStats.reads++;
        slabReadStats.bytes += n;
        socket!.emit('data', slabs.took(buf, n));
      },
    },
  };
  // The handle changes owner: the old Socket must never touch it again (it is never destroyed or read).
  old._handle = null;
  socket = new net.Socket(options as net.SocketConstructorOpts);
  slabsOf.set(socket, slabs);
  const fresh = socket as unknown as SocketInternals;
  fresh._server = old._server ?? null;
  old._server = null;
  slabReadStats.sockets++;
  return socket;
}
