/**
 * The link's transport: frames over a connection (sys/net.ts Conn). A reader
 * that parses whole frames, validates each message at the edge
 * (messages.ts) and hands them in order to an async handler (the socket is
 * paused while one is handled), and a writer for small control frames.
 */
import { ByteQueue } from '../../net/bytequeue.js';
import type { Conn } from '../../sys/net.js';
import { decodeFramePieces, encodeFrameBuffer, FRAME_HEADER_BYTES, peekFrameBytes } from '../format/frame.js';

/**
 * Parses frames from a socket, validates each message (`parse`: the link's
 * edge, messages.ts) and hands them, in order, to an async handler.
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
  ) {
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      void this.pump();
    });
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
        if (this.queue.length < total) break;
        const frame = this.queue.takePieces(total);
        const f = decodeFramePieces<unknown>(frame);
        const r = this.handle(this.parse(f.meta), frame, f.data);
        if (r) {
          this.socket.pause();
          this.onBusy(true);
          await r;
          this.onBusy(false);
          this.socket.resume();
        }
      }
    } catch (err) {
      this.stopped = true;
      this.fail(err as Error);
    } finally {
      this.busy = false;
    }
  }
}

export function send(socket: Conn, meta: object): void {
  if (!socket.destroyed) socket.write(encodeFrameBuffer(meta));
}
