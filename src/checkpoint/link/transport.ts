/**
 * The link's transport: frames over a connection (sys/net.ts Conn). A reader
 * that parses whole frames, validates each message at the edge
 * (messages.ts) and hands them in order to an async handler (the socket is
 * paused while one is handled), and a writer for small control frames.
 */
import { Buffer } from 'node:buffer';
import type net from 'node:net';
import { ByteQueue } from '../../net/bytequeue.js';
import type { ReplyBuffers } from '../../net/reply-buffers.js';
import type { Conn } from '../../sys/net.js';
import { directNextRead, endsAt } from '../../sys/slab-reads.js';
import { decodeFramePieces, encodeFrameBuffer, FRAME_HEADER_BYTES, peekFrameBytes } from '../format/frame.js';

/**
 * A frame whose rest (past what has arrived) is this large is read straight
 * into a reused buffer (FrameReader `buffers`); up to a resync's 4 MiB
 * chunk with its header.
 */
const DIRECT_MIN_BYTES = 64 * 1024;
const DIRECT_MAX_BYTES = 4 * 1024 * 1024 + 64 * 1024;

/**
 * Parses frames from a socket, validates each message (`parse`: the link's
 * edge, messages.ts) and hands them, in order, to an async handler.
 *
 * With `buffers`, over a socket read into slabs (sys/slab-reads.ts), a large
 * frame's rest is read into a buffer of that pool, as the NBD server reads
 * large WRITE payloads (Connection.directPayload), and after a large frame
 * the next frame's header is read alone, so the frame behind it goes the
 * same way. Slabs would be fresh memory for every byte of the stream: on the
 * secondary under 1 MiB writes, 4.8 GB of new slabs in an 8 s run and a
 * young-generation collection every 40 ms. The buffer goes back to the pool
 * once the handler is done with the frame *and the turn has ended*: the
 * handler may keep the pieces until then, no longer (the secondary's
 * journal writes what it was given out by the end of the turn,
 * JournalWriter.appendRaw).
 */
export class FrameReader<M> {
  private readonly queue = new ByteQueue();
  private busy = false;
  private stopped = false;

  /** Handling a frame (the socket is paused meanwhile). */
  get working(): boolean {
    return this.busy;
  }

  constructor(
    private readonly socket: Conn,
    private readonly parse: (meta: unknown) => M,
    /**
     * `frame`: the whole frame's bytes and `data` its payload, as views of the socket's chunks
     * (a frame that arrived in many chunks is never assembled).
     */
    private readonly handle: (msg: M, frame: Buffer[], data: Buffer[]) => void | Promise<void>,
    private readonly fail: (err: Error) => void,
    /** Called when handling a frame starts and ends waiting (the socket is paused meanwhile). */
    private readonly onBusy: (busy: boolean) => void = () => {},
    /** Where large frames are read into (see above); null: every frame arrives in slabs. */
    private readonly buffers: ReplyBuffers | null = null,
  ) {
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      void this.pump();
    });
  }

  /** The pooled buffer the socket reads the current frame's rest into. */
  private target: Buffer | null = null;

  /** Have the socket read the rest of a `total`-byte frame into a pooled buffer, if it is large. */
  private readRestDirect(total: number): void {
    if (!this.buffers || this.target) return;
    const rest = total - this.queue.length;
    if (rest < DIRECT_MIN_BYTES || rest > DIRECT_MAX_BYTES) return;
    const buf = this.buffers.take(rest);
    if (directNextRead(this.socket as unknown as net.Socket, buf)) this.target = buf;
    else this.buffers.give(buf);
  }

  stop(): void {
    this.stopped = true;
  }

  private async pump(): Promise<void> {
    if (this.busy) return;
    this.busy = true;
    try {
      while (!this.stopped && this.queue.length >= FRAME_HEADER_BYTES) {
        const total = peekFrameBytes(this.queue.peek(FRAME_HEADER_BYTES))!;
        if (this.queue.length < total) {
          this.readRestDirect(total);
          break;
        }
        const frame = this.queue.takePieces(total);
        const pooled = this.target && endsAt(frame, this.target) ? this.target : null;
        this.target = null;
        const f = decodeFramePieces<unknown>(frame);
        const r = this.handle(this.parse(f.meta), frame, f.data);
        if (r) {
          this.socket.pause();
          this.onBusy(true);
          await r;
          this.onBusy(false);
          this.socket.resume();
        }
        if (pooled) {
          // After the turn: a journal flush the handler scheduled (setImmediate) runs first.
          const buffers = this.buffers!;
          setImmediate(() => buffers.give(pooled));
        }
        if (this.buffers && total >= DIRECT_MIN_BYTES && this.queue.length === 0)
          directNextRead(this.socket as unknown as net.Socket, Buffer.allocUnsafe(FRAME_HEADER_BYTES));
      }
    } catch (err) {
      this.stopped = true;
      this.fail(err as Error);
    } finally {
      this.busy = false;
    }
  }
}

/** Nothing once the connection is ending: an error frame sent before the end must reach the peer (see Conn.writableEnded). */
export function send(socket: Conn, meta: object): void {
  if (writable(socket)) socket.write(encodeFrameBuffer(meta));
}

/** Still open for writing: not destroyed, and not ended. */
export function writable(socket: Conn): boolean {
  return !socket.destroyed && !socket.writableEnded;
}
