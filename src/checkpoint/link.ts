/**
 * The replication link between primary and secondary.
 *
 * Notes on the design:
 * - The primary connects (and reconnects, with backoff) to the secondary.
 *   Both sides speak frames (frame.ts). After a hello exchange in which the
 *   two check that their disks have the same size, the primary streams the
 *   bytes of its epoch journals in order: that byte stream *is* a sequence
 *   of frames, so nothing is re-encoded, and a resend after a reconnect is a
 *   replay of the files from the oldest epoch the secondary has not yet made
 *   durable. The secondary drops records it already holds (by sequence).
 * - Live fast path: when the sender has caught up, a new record's frame goes
 *   straight to the socket as it is appended; otherwise the sender reads the
 *   journals from disk at its own pace (socket backpressure via 'drain'), so
 *   memory stays bounded however far behind the secondary is.
 * - The secondary handles frames strictly in order; a seal makes the epoch
 *   durable before 'durable' is answered, a commit answers 'committed' after
 *   the commit record is durable. Every failure is answered with an 'error'
 *   frame naming the epoch, never swallowed (invariant 6).
 */
import { EventEmitter } from 'node:events';
import { ColoError, toColoError } from '../errors.js';
import { defaultTunables } from '../limits.js';
import { ByteQueue } from '../net/bytequeue.js';
import { decodeFrame, encodeFrameBuffer, FRAME_HEADER_BYTES, FrameError, peekFrameBytes } from './frame.js';
import type { JournalWriter } from './journal.js';
import type { PrimaryLog } from './primary-log.js';
import { isMutation } from './records.js';
import type { SecondaryStore } from './secondary-store.js';
import {
  LINK_PROTOCOL,
  parseToPrimary,
  parseToSecondary,
  type CommittedReply,
  type CommitRequest,
  type DurableReply,
  type HashRequest,
  type PrimaryHello,
  type SyncMark,
  type ToPrimary,
  type ToSecondary,
} from './messages.js';
import type { Range } from '../failover/activity.js';
import { decide, type Decision, type Generation } from '../failover/history.js';
import { realClock, type Clock, type TimerHandle } from '../sys/clock.js';
import { tcpNet, type Conn, type Listener, type Net } from '../sys/net.js';

export { LINK_PROTOCOL } from './messages.js';

export interface HeartbeatOptions {
  /** How often each side sends a beat when it has nothing else to send. */
  intervalMs: number;
  /** Silence after which the peer is declared lost. */
  timeoutMs: number;
}

/** Defaults that detect a dead peer within a second. */
export const DEFAULT_HEARTBEAT: HeartbeatOptions = { intervalMs: 200, timeoutMs: 800 };

/**
 * Liveness of a link: each side sends a small 'beat' frame every interval, and
 * any bytes received count as a sign of life (so a long resend is never
 * mistaken for silence). Silence longer than the timeout, measured on the
 * monotonic clock, ends the connection with the reason.
 */
class Heartbeat {
  private lastRx: number;
  private lastTick: number;
  private readonly timer: TimerHandle;

  constructor(
    clock: Clock,
    socket: Conn,
    opts: HeartbeatOptions,
    beat: () => void,
    onTimeout: (silentMs: number) => void,
    /** True while this side holds the socket paused to handle a frame (a long hash, say). */
    busy: () => boolean = () => false,
  ) {
    this.lastRx = this.lastTick = clock.mono();
    socket.on('data', () => (this.lastRx = clock.mono()));
    this.timer = clock.setInterval(() => {
      const now = clock.mono();
      // This process was frozen (stopped, swapped out), or is not reading because it is busy
      // with a frame: the silence is ours, not the peer's.
      if (now - this.lastTick > opts.timeoutMs || busy()) this.lastRx = now;
      this.lastTick = now;
      const silentMs = now - this.lastRx;
      if (silentMs > opts.timeoutMs) {
        this.timer.clear();
        onTimeout(Math.round(silentMs));
        return;
      }
      beat();
    }, opts.intervalMs);
    socket.once('close', () => this.timer.clear());
  }
}
const READ_CHUNK = 1024 * 1024;

/**
 * Parses frames from a socket, validates each message (`parse`: the link's
 * edge, messages.ts) and hands them, in order, to an async handler.
 */
class FrameReader<M> {
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
    private readonly handle: (msg: M, frame: Buffer, data: Buffer) => void | Promise<void>,
    private readonly fail: (err: Error) => void,
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
        const frame = this.queue.take(total);
        const f = decodeFrame<unknown>(frame)!;
        const r = this.handle(this.parse(f.meta), frame, f.data);
        if (r) {
          this.socket.pause();
          await r;
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

function send(socket: Conn, meta: object): void {
  if (!socket.destroyed) socket.write(encodeFrameBuffer(meta));
}

// -----------------------------------------------------------------------------
// Primary side

export type LinkState = 'connecting' | 'connected' | 'down';

interface Waiter {
  epoch: number;
  resolve: (reply: DurableReply | CommittedReply) => void;
  reject: (err: Error) => void;
}

export interface PrimaryLinkOptions {
  clock?: Clock;
  net?: Net;
  host: string;
  port: number;
  size: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  heartbeat?: HeartbeatOptions;
  log?: (msg: string) => void;
  /** Flow control: PVM writes wait while this much log is unsent, until it is down to the low mark. */
  highWaterBytes?: number;
  lowWaterBytes?: number;
  /** This primary's generation history and whether it can resend what the secondary lacks. */
  handshake?: () => { history: Generation[]; needsResync: boolean };
}

/** What the secondary decided at the hello (see failover/history.ts decide()). */
export interface PeerHello {
  decision: Decision;
  /** Regions the secondary itself may have written (an old primary's unfinished epochs): to roll back. */
  hot: Range[];
  history: Generation[];
}

export class PrimaryLink extends EventEmitter {
  state: LinkState = 'connecting';
  lastError: string | null = null;
  connectedSince: number | null = null;
  downSince: number | null;
  /** Highest epoch the secondary reported durable / committed. */
  durableEpoch = 0;
  committedEpoch = 0;
  bytesSent = 0;
  reconnects = 0;
  private socket: Conn | null = null;
  private reader: FrameReader<ToPrimary> | null = null;
  private ready = false;
  private blocked = false;
  private corked = false;
  private cursor = { epoch: 0, offset: 0 };
  private durableWaiters: Waiter[] = [];
  private commitWaiters: Waiter[] = [];
  private retryTimer: TimerHandle | null = null;
  /** PVM writes waiting for the backlog to shrink (flow control). */
  private roomWaiters: (() => void)[] = [];
  /** Times flow control made PVM writes wait. */
  throttled = 0;
  /** Set when the secondary was promoted and refused this primary. */
  deposed: string | null = null;
  /** Set when the secondary refused this primary for split brain (no reconnects until restarted). */
  refused: string | null = null;
  /** The secondary's answer at the last hello. */
  peer: PeerHello | null = null;
  private hashWaiters = new Map<number, { resolve: (h: Buffer) => void; reject: (e: Error) => void }>();
  /**
   * Hash requests made while records logged before them were still unsent: each waits until
   * `bytesSent` reaches `at`, where the log ended when it was made (cleared with the connection).
   */
  private parkedHashes: { at: number; frame: object }[] = [];
  private nextHashId = 1;
  private retryMs: number;
  private closed = false;
  /** The last 'error' frame of the current connection. */
  private peerError: string | null = null;

  private readonly clock: Clock;
  private readonly net: Net;

  constructor(
    private readonly plog: PrimaryLog,
    private readonly opts: PrimaryLinkOptions,
  ) {
    super();
    this.clock = opts.clock ?? realClock;
    this.net = opts.net ?? tcpNet;
    this.downSince = this.clock.now();
    this.retryMs = opts.reconnectMinMs ?? 100;
    plog.onAppend = (epoch, parts, bytes) => this.onAppend(epoch, parts, bytes);
    plog.onOutOfSync = (reason) => {
      this.rejectAll(new ColoError('EIO', `the secondary is out of sync (${reason}); a resync is required`));
      this.releaseRoom(); // nothing is held for it any more: the PVM must not wait
    };
  }

  start(): void {
    this.connect();
  }

  private log(msg: string): void {
    this.opts.log?.(msg);
  }

  private connect(): void {
    if (this.closed) return;
    this.state = 'connecting';
    this.peerError = null;
    const socket = this.net.connect(this.opts.host, this.opts.port);
    this.socket = socket;
    socket.once('connect', () => {
      new Heartbeat(
        this.clock,
        socket,
        this.opts.heartbeat ?? DEFAULT_HEARTBEAT,
        () => {
          // Beats go between frames only; while a resend streams, the data itself shows life.
          if (this.ready && !this.blocked && this.atFrameBoundary()) send(socket, { t: 'beat' });
        },
        (silentMs) => {
          this.lastError = `heartbeat timeout: nothing from the secondary for ${silentMs} ms`;
          socket.destroy();
        },
      );
      send(socket, {
        t: 'hello',
        proto: LINK_PROTOCOL,
        size: this.opts.size,
        epoch: this.plog.current,
        session: this.plog.session,
        ...this.opts.handshake?.(),
      });
    });
    this.reader = new FrameReader<ToPrimary>(
      socket,
      parseToPrimary,
      (meta, _frame, data) => this.onFrame(meta, data),
      (err) => {
        this.lastError = `bad frame from the secondary: ${err.message}`;
        this.log(this.lastError);
        socket.destroy();
      },
    );
    socket.on('drain', () => {
      this.blocked = false;
      this.pump();
    });
    socket.on('error', (err) => {
      // The secondary's own reason (an 'error' frame) says more than the reset that follows it.
      if (!this.peerError) this.lastError = err.message;
    });
    socket.on('close', () => this.onClose(socket));
  }

  private onClose(socket: Conn): void {
    if (this.socket !== socket) return;
    this.reader?.stop();
    this.socket = null;
    const wasReady = this.ready;
    this.ready = false;
    this.blocked = false;
    if (this.state === 'connected' || wasReady)
      this.log(`link down: ${this.lastError ?? 'connection closed'}`);
    this.state = 'down';
    this.connectedSince = null;
    this.downSince ??= this.clock.now();
    const err = new ColoError('ECONNECT', `replication link lost: ${this.lastError ?? 'connection closed'}`);
    this.rejectAll(err);
    this.emit('down', this.lastError);
    this.releaseRoom(); // a lost secondary must not stall the PVM
    if (this.closed) return;
    this.retryTimer = this.clock.setTimeout(() => {
      this.reconnects++;
      this.connect();
    }, this.retryMs);
    this.retryMs = Math.min(this.retryMs * 2, this.opts.reconnectMaxMs ?? 2000);
  }

  private rejectAll(err: Error): void {
    for (const w of [...this.durableWaiters, ...this.commitWaiters]) w.reject(err);
    this.durableWaiters = [];
    this.commitWaiters = [];
    for (const w of this.hashWaiters.values()) w.reject(err);
    this.hashWaiters.clear();
    this.parkedHashes = [];
  }

  private onFrame(meta: ToPrimary, data: Buffer): void {
    switch (meta.t) {
      case 'beat':
        return;
      case 'hash': {
        const w = this.hashWaiters.get(meta.id);
        this.hashWaiters.delete(meta.id);
        w?.resolve(Buffer.from(data));
        return;
      }
      case 'hello': {
        if (meta.size !== this.opts.size) {
          this.lastError =
            `the secondary's disk is ${meta.size} bytes but the primary's is ${this.opts.size}: ` +
            `both images must have the same size`;
          this.log(this.lastError);
          this.socket?.destroy();
          return;
        }
        this.ready = true;
        this.state = 'connected';
        this.connectedSince = this.clock.now();
        this.downSince = null;
        this.lastError = null;
        this.retryMs = this.opts.reconnectMinMs ?? 100;
        const decision = meta.decision;
        this.peer = decision ? { decision, hot: meta.hot ?? [], history: meta.history ?? [] } : null;
        if (decision?.action === 'resync') {
          // The secondary dropped everything uncommitted and restarted its numbering just
          // below our open epoch: sealed epochs are not resent (the resync covers them).
          this.durableEpoch = this.committedEpoch = this.plog.current - 1;
          this.plog.releaseThrough(this.plog.current - 1);
        } else {
          this.durableEpoch = Math.max(this.durableEpoch, meta.durable ?? 0);
          this.committedEpoch = Math.max(this.committedEpoch, meta.committed ?? 0);
          this.plog.releaseThrough(this.durableEpoch);
        }
        // Replay from the oldest epoch still held.
        const oldest = this.plog.heldEpochs()[0];
        this.cursor = { epoch: oldest?.epoch ?? this.plog.current, offset: 0 };
        this.log(
          `link up: secondary at seq ${meta.seq}, durable epoch ${meta.durable}, resending from epoch ${this.cursor.epoch}`,
        );
        if (this.peer) this.emit('peer', this.peer);
        this.pump();
        return;
      }
      case 'durable': {
        const e = meta.e;
        this.durableEpoch = Math.max(this.durableEpoch, e);
        this.settle(this.durableWaiters, e, meta);
        return;
      }
      case 'committed': {
        const e = meta.e;
        this.committedEpoch = Math.max(this.committedEpoch, e);
        this.settle(this.commitWaiters, e, meta);
        // Only now drop the journals: freeing their pages costs milliseconds of
        // kernel time, which must not fall inside the checkpoint's phases.
        this.plog.releaseThrough(e);
        return;
      }
      case 'error': {
        if (meta.code === 'ESTALE') {
          // The secondary was promoted: this node's generation is over. Fence it.
          this.deposed = meta.message;
          this.lastError = `deposed: ${this.deposed}`;
          this.log(this.lastError);
          this.emit('deposed', this.deposed);
          this.rejectAll(new ColoError('ESTALE', `the secondary refused this primary: ${this.deposed}`));
          this.closed = true; // no point reconnecting
          this.socket?.destroy();
          return;
        }
        if (meta.code === 'ESPLIT') {
          this.refused = meta.message;
          this.lastError = this.refused;
          this.log(`the secondary refused this primary: ${this.refused}`);
          this.emit('refused', this.refused);
          this.rejectAll(new ColoError('ESPLIT', this.refused));
          this.closed = true; // an operator must decide; reconnecting would only repeat the refusal
          this.socket?.destroy();
          return;
        }
        const err = new ColoError(
          meta.code,
          `secondary: ${meta.message}${meta.e !== undefined ? ` (epoch ${meta.e})` : ''}`,
        );
        this.lastError = err.message;
        this.peerError = err.message;
        this.log(err.message);
        const e = meta.e ?? Infinity;
        for (const list of [this.durableWaiters, this.commitWaiters])
          for (const w of [...list])
            if (w.epoch >= e || e === Infinity) {
              list.splice(list.indexOf(w), 1);
              w.reject(err);
            }
        return;
      }
    }
  }

  private settle(list: Waiter[], epoch: number, meta: DurableReply | CommittedReply): void {
    for (const w of [...list])
      if (w.epoch <= epoch) {
        list.splice(list.indexOf(w), 1);
        w.resolve(meta);
      }
  }

  private onAppend(epoch: number, parts: [Buffer, Buffer], bytes: number): void {
    if (!this.ready || this.blocked || !this.socket) return;
    const journal = this.plog.epochs.get(epoch)!.journal!;
    // Live fast path: the sender is exactly at the end of this epoch's journal.
    if (this.cursor.epoch === epoch && this.cursor.offset + bytes === journal.size) {
      this.write(parts[0]);
      if (parts[1].length) this.write(parts[1]);
      this.cursor.offset += bytes;
      this.bytesSent += bytes;
      this.releaseHashes();
    } else this.pump();
  }

  /** True when the sender is between two frames of the stream. */
  private atFrameBoundary(): boolean {
    if (this.plog.outOfSync || this.cursor.offset === 0) return true;
    const e = this.plog.epochs.get(this.cursor.epoch);
    return !e?.journal || this.cursor.offset === e.journal.size;
  }

  /** Frames produced in one turn of the event loop leave in one writev. */
  private write(buf: Buffer): void {
    const socket = this.socket!;
    if (!this.corked) {
      this.corked = true;
      socket.cork();
      setImmediate(() => {
        this.corked = false;
        socket.uncork();
      });
    }
    if (!socket.write(buf)) this.blocked = true;
  }

  /**
   * Flow control for the PVM's writes: resolves at once unless a connected
   * secondary is more than the high-water mark behind, then once the backlog
   * is back under the low-water mark (or the link is lost). This keeps a slow
   * secondary from falling behind until the log budget runs out.
   */
  waitForRoom(): Promise<void> | null {
    if (
      !this.ready ||
      this.plog.outOfSync ||
      this.unsentBytes < (this.opts.highWaterBytes ?? defaultTunables.replicationHighWaterBytes)
    )
      return null;
    this.throttled++;
    return new Promise((resolve) => this.roomWaiters.push(resolve));
  }

  private releaseRoom(): void {
    if (this.roomWaiters.length === 0) return;
    if (
      this.ready &&
      !this.plog.outOfSync &&
      this.unsentBytes > (this.opts.lowWaterBytes ?? defaultTunables.replicationLowWaterBytes)
    )
      return;
    const waiters = this.roomWaiters;
    this.roomWaiters = [];
    for (const w of waiters) w();
  }

  /** Stream journal bytes from the cursor until caught up or the socket pushes back. */
  private pump(): void {
    try {
      this.pumpFrames();
    } finally {
      this.releaseHashes();
      this.releaseRoom();
    }
  }

  /** Send the parked hash requests whose preceding records have all been sent, in order. */
  private releaseHashes(): void {
    while (this.parkedHashes.length && this.socket && this.bytesSent >= this.parkedHashes[0].at)
      send(this.socket, this.parkedHashes.shift()!.frame);
  }

  private pumpFrames(): void {
    while (this.ready && !this.blocked && this.socket && !this.plog.outOfSync) {
      const e = this.plog.epochs.get(this.cursor.epoch);
      if (!e) {
        const next = this.plog.heldEpochs().find((h) => h.epoch > this.cursor.epoch);
        if (!next) return;
        this.cursor = { epoch: next.epoch, offset: 0 };
        continue;
      }
      const journal = e.journal!; // held while in sync
      const size = journal.size;
      if (this.cursor.offset < size) {
        const buf = this.readWholeFrames(journal, this.cursor.offset, size);
        this.write(buf);
        this.cursor.offset += buf.length;
        this.bytesSent += buf.length;
        continue;
      }
      if (e.sealed) {
        this.cursor = { epoch: e.epoch + 1, offset: 0 };
        continue;
      }
      return; // caught up: live from here
    }
  }

  /**
   * Read up to READ_CHUNK bytes of whole frames from `offset` (at least one
   * frame, however large). Every write of the sender therefore ends on a frame
   * boundary, so control frames (commit, beat) can always go in between.
   */
  private readWholeFrames(journal: JournalWriter, offset: number, size: number): Buffer {
    const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
    let end = offset;
    while (end < size) {
      journal.read(head, end);
      const frame = peekFrameBytes(head)!;
      if (end > offset && end + frame - offset > READ_CHUNK) break;
      end += frame;
    }
    const buf = Buffer.allocUnsafe(end - offset);
    journal.read(buf, offset);
    return buf;
  }

  get connected(): boolean {
    return this.ready;
  }

  /** Point the link at another secondary (re-protection) and connect to it now. */
  retarget(host: string, port: number): void {
    this.opts.host = host;
    this.opts.port = port;
    this.refused = null;
    this.closed = false;
    this.retryMs = this.opts.reconnectMinMs ?? 100;
    if (this.socket) this.socket.destroy();
    else {
      this.retryTimer?.clear();
      this.connect();
    }
  }

  /** Drop the connection and connect again (a new hello, so the secondary decides afresh). */
  reconnect(reason: string): void {
    if (!this.socket) return;
    this.lastError = reason;
    this.socket.destroy();
  }

  /** Bytes appended to the log that have not been sent yet. */
  get unsentBytes(): number {
    if (this.plog.outOfSync) return 0; // nothing is held, nothing will be sent
    // Called on every PVM write (flow control): walk the few held epochs, no copy, no sort.
    let n = 0;
    for (const e of this.plog.epochs.values()) {
      if (e.epoch < this.cursor.epoch || !e.journal) continue;
      n += e.journal.size - (e.epoch === this.cursor.epoch ? this.cursor.offset : 0);
    }
    return Math.max(0, n);
  }

  private wait<R extends DurableReply | CommittedReply>(
    list: Waiter[],
    epoch: number,
    timeoutMs: number,
    what: string,
  ): Promise<R> {
    return new Promise((resolve, reject) => {
      const timer = this.clock.setTimeout(() => {
        const i = list.indexOf(w);
        if (i >= 0) list.splice(i, 1);
        reject(
          new ColoError(
            'EIO',
            `timed out after ${timeoutMs} ms waiting for the secondary to ${what} epoch ${epoch}`,
          ),
        );
      }, timeoutMs);
      const w: Waiter = {
        epoch,
        resolve: (m) => {
          timer.clear();
          resolve(m as R);
        },
        reject: (e) => {
          timer.clear();
          reject(e);
        },
      };
      list.push(w);
    });
  }

  private requireUsable(resync = false): void {
    if (this.plog.outOfSync && !resync)
      throw new ColoError(
        'EIO',
        `the secondary is out of sync since ${new Date(this.plog.outOfSync.since).toISOString()} ` +
          `(${this.plog.outOfSync.reason}); a resync is required`,
      );
    if (!this.ready)
      throw new ColoError(
        'ECONNECT',
        `the secondary is not connected (${this.lastError ?? this.state}); epoch data is kept and resent on reconnect`,
      );
  }

  /** Resolve once the secondary holds epoch N durably. */
  async waitDurable(epoch: number, timeoutMs: number, resync = false): Promise<DurableReply> {
    if (this.durableEpoch >= epoch) return { t: 'durable', e: epoch };
    this.requireUsable(resync);
    return this.wait<DurableReply>(this.durableWaiters, epoch, timeoutMs, 'make durable');
  }

  /** Ask the secondary to commit through epoch N; resolve when the commit record is durable. */
  async commit(epoch: number, timeoutMs: number, sync?: SyncMark): Promise<CommittedReply> {
    if (this.committedEpoch >= epoch) return { t: 'committed', e: epoch };
    this.requireUsable(sync !== undefined);
    const p = this.wait<CommittedReply>(this.commitWaiters, epoch, timeoutMs, 'commit');
    const req: CommitRequest = { t: 'commit', e: epoch, sync };
    send(this.socket!, req);
    return p;
  }

  /**
   * Hashes of the secondary's disk (as of this point in the stream) for
   * [offset, offset+length) in blocks of `block` bytes.
   */
  requestHashes(offset: number, length: number, block: number): Promise<Buffer> {
    if (!this.ready || !this.socket)
      return Promise.reject(new ColoError('ECONNECT', 'the secondary is not connected'));
    const id = this.nextHashId++;
    const p = new Promise<Buffer>((resolve, reject) => this.hashWaiters.set(id, { resolve, reject }));
    const frame: HashRequest = { t: 'hash?', id, o: offset, l: length, bs: block };
    // The secondary hashes its disk as of this point of the stream, so the request must follow
    // every record logged before it; while some of those are unsent (the socket pushed back,
    // or a resend is under way), it waits for them instead of overtaking them.
    const at = this.bytesSent + this.unsentBytes;
    if (this.parkedHashes.length === 0 && this.bytesSent >= at) send(this.socket, frame);
    else this.parkedHashes.push({ at, frame });
    return p;
  }

  close(): void {
    this.closed = true;
    this.retryTimer?.clear();
    this.rejectAll(new ColoError('ESHUTDOWN', 'the primary is shutting down'));
    this.socket?.destroy();
  }
}

// -----------------------------------------------------------------------------
// Secondary side

export interface SecondaryLinkOptions {
  clock?: Clock;
  net?: Net;
  heartbeat?: HeartbeatOptions;
  log?: (msg: string) => void;
}

export class SecondaryLink extends EventEmitter {
  private server: Listener | null = null;
  private current: Conn | null = null;
  connectedSince: number | null = null;
  lastError: string | null = null;
  bytesReceived = 0;
  records = 0;
  duplicates = 0;
  peer: string | null = null;
  /** Set when the primary went silent (heartbeat timeout) or its link dropped, until it is back. */
  primaryLost: { at: number; reason: string } | null = null;
  /** The last primary this node refused (stale, split brain), until one is accepted. */
  refusal: { at: number; code: string; message: string } | null = null;
  /** What was decided at the last accepted hello. */
  decision: Decision | null = null;

  private readonly clock: Clock;
  private readonly net: Net;

  constructor(
    private readonly store: SecondaryStore,
    private readonly opts: SecondaryLinkOptions = {},
  ) {
    super();
    this.clock = opts.clock ?? realClock;
    this.net = opts.net ?? tcpNet;
  }

  private log(msg: string): void {
    this.opts.log?.(msg);
  }

  async listen(port: number, host: string): Promise<Listener> {
    this.server = await this.net.listen(host, port, (s) => this.accept(s));
    return this.server;
  }

  get connected(): boolean {
    return this.current !== null && this.connectedSince !== null;
  }

  private accept(socket: Conn): void {
    // The newest connection from the primary wins: an old one is a half-dead leftover.
    if (this.current) {
      this.log('a new replication connection replaces the old one');
      this.current.destroy();
    }
    this.current = socket;
    this.peer = `${socket.remoteAddress}:${socket.remotePort}`;
    socket.on('data', (d: Buffer) => (this.bytesReceived += d.length));
    const holder: { reader?: FrameReader<ToSecondary> } = {};
    new Heartbeat(
      this.clock,
      socket,
      this.opts.heartbeat ?? DEFAULT_HEARTBEAT,
      () => send(socket, { t: 'beat' }),
      (silentMs) => {
        this.lastError = `heartbeat timeout: nothing from the primary for ${silentMs} ms`;
        socket.destroy();
      },
      () => holder.reader?.working ?? false,
    );
    const reader: FrameReader<ToSecondary> = new FrameReader<ToSecondary>(
      socket,
      parseToSecondary,
      (meta, frame, data) => this.onFrame(socket, meta, frame, data, () => this.drop(socket, reader)),
      (err) => {
        const message =
          err instanceof FrameError ? `bad frame from the primary: ${err.message}` : err.message;
        this.lastError = message;
        this.log(message);
        // Say why before closing: a message that fails validation is the primary's bug to see.
        const code = toColoError(err).code;
        send(socket, { t: 'error', code: code === 'EIO' ? 'EPROTO' : code, message });
        socket.end();
        this.clock.setTimeout(() => socket.destroy(), 2000, { unref: true });
      },
    );
    holder.reader = reader;
    socket.on('error', (err) => (this.lastError = err.message));
    socket.on('close', () => {
      reader.stop();
      if (this.current === socket) {
        const wasUp = this.connectedSince !== null;
        this.current = null;
        this.connectedSince = null;
        if (wasUp) {
          this.primaryLost = { at: this.clock.now(), reason: this.lastError ?? 'connection closed' };
          this.log(`primary lost: ${this.primaryLost.reason}`);
          this.emit('primary-lost', this.primaryLost);
        }
      }
    });
  }

  /**
   * The primary introduced itself: compare generation histories and decide
   * (failover/history.ts): carry on, resynchronise (after dropping everything
   * uncommitted), or refuse — a stale primary (ESTALE: it fences itself) or
   * split brain (ESPLIT: both sides report it, neither is touched).
   */
  private async handshake(socket: Conn, meta: PrimaryHello): Promise<void> {
    const history = this.store.history;
    const primaryHistory = meta.history;
    const refuse = (code: string, message: string) => {
      this.lastError = message;
      this.refusal = { at: this.clock.now(), code, message };
      this.log(`refused the primary at ${this.peer}: ${message}`);
      send(socket, { t: 'hello', proto: LINK_PROTOCOL, size: this.store.size });
      send(socket, { t: 'error', code, message });
      socket.end();
    };
    let decision: Decision;
    try {
      decision = decide(primaryHistory, history?.generations ?? [], {
        syncing: this.store.syncing,
        primaryNeedsResync: meta.needsResync,
      });
    } catch (err) {
      return refuse('EPROTO', (err as Error).message);
    }
    if (decision.action === 'refuse')
      return refuse(decision.kind === 'split-brain' ? 'ESPLIT' : 'ESTALE', decision.reason);
    if (this.store.promoted)
      return refuse(
        'ESTALE',
        `this node was promoted to primary (generation ${this.store.generation}) and serves its own writes; ` +
          `stop it and start it as a secondary to re-protect it from this primary`,
      );
    try {
      if (decision.action === 'resync') {
        await this.store.startResync(meta.epoch);
        this.store.startSession(meta.session, meta.epoch);
      } else this.store.startSession(meta.session, meta.epoch);
    } catch (err) {
      const e = toColoError(err);
      return refuse(e.code, e.message);
    }
    if (socket.destroyed) return;
    this.connectedSince = this.clock.now();
    this.lastError = null;
    this.refusal = null;
    this.primaryLost = null;
    this.decision = decision;
    const durable = Math.max(
      this.store.lastCommitted,
      ...this.store
        .pendingEpochs()
        .filter((e) => e.state !== 'receiving' && e.state !== 'sealed')
        .map((e) => e.epoch),
    );
    send(socket, {
      t: 'hello',
      proto: LINK_PROTOCOL,
      size: this.store.size,
      seq: this.store.highestSeq,
      durable,
      committed: this.store.lastCommitted,
      history: history?.generations ?? [],
      decision,
      hot: decision.action === 'resync' ? (this.store.activity?.hotRanges() ?? []) : [],
    });
    this.log(
      `primary connected from ${this.peer}: ${decision.action}${'mode' in decision ? ` (${decision.mode})` : ''}: ${decision.reason}`,
    );
    this.emit('primary-connected');
  }

  /**
   * After an error frame: stop taking frames and close gracefully, so the error
   * reaches the primary before the end of the stream (a destroy with unread
   * data would reset the connection and could lose it). The primary reconnects
   * and resends from its journals.
   */
  private drop(socket: Conn, reader: FrameReader<ToSecondary>): void {
    reader.stop();
    socket.end();
    this.clock.setTimeout(() => socket.destroy(), 2000, { unref: true });
  }

  private onFrame(
    socket: Conn,
    meta: ToSecondary,
    frame: Buffer,
    data: Buffer,
    drop: () => void,
  ): void | Promise<void> {
    const dataLength = data.length;
    if (meta.t === 'hello') {
      if (meta.proto !== LINK_PROTOCOL) {
        send(socket, {
          t: 'error',
          code: 'EPROTO',
          message: `link protocol ${meta.proto} is not ${LINK_PROTOCOL}`,
        });
        socket.end();
        return;
      }
      if (meta.size !== this.store.size) {
        const message =
          `the primary's disk is ${meta.size} bytes but this secondary's image is ${this.store.size}: ` +
          `both images must have the same size`;
        this.lastError = message;
        this.log(message);
        send(socket, { t: 'hello', proto: LINK_PROTOCOL, size: this.store.size });
        send(socket, { t: 'error', code: 'EUSAGE', message });
        socket.end();
        return;
      }
      return this.handshake(socket, meta);
    }
    if (isMutation(meta)) {
      try {
        if (this.store.receive(meta, frame, dataLength)) this.records++;
        else this.duplicates++;
      } catch (err) {
        const e = toColoError(err);
        this.lastError = e.message;
        this.log(`could not store a record of epoch ${meta.e}: ${e.message}`);
        send(socket, { t: 'error', code: e.code, message: e.message, e: meta.e });
        // A record we could not store makes the rest of the epoch useless: drop the link,
        // the primary will resend from its journal once the cause is fixed.
        drop();
      }
      return;
    }
    if (meta.t === 'seal')
      // A seal that fails leaves the epoch to be resent whole (the store rewound it): drop the link.
      return this.reply(socket, meta, () => this.store.seal(meta), 'durable', drop);
    if (meta.t === 'commit')
      return this.reply(socket, meta, () => this.store.commit(meta.e, meta.sync), 'committed');
    if (meta.t === 'hash?') return this.hashes(socket, meta);
  }

  /** Hashes of the PVM's disk as held here, at this point of the stream (frames are handled in order). */
  private async hashes(socket: Conn, meta: HashRequest): Promise<void> {
    try {
      const h = await this.store.pvmHashes(meta.o, meta.l, meta.bs);
      if (!socket.destroyed) socket.write(encodeFrameBuffer({ t: 'hash', id: meta.id }, h));
    } catch (err) {
      const e = toColoError(err);
      this.lastError = e.message;
      send(socket, { t: 'error', code: e.code, message: `hashing ${meta.o}+${meta.l}: ${e.message}` });
      socket.destroy();
    }
  }

  private async reply(
    socket: Conn,
    meta: { t: string; e: number },
    run: () => Promise<object>,
    t: string,
    onError?: () => void,
  ): Promise<void> {
    const started = this.clock.mono();
    try {
      const result = await run();
      const ms = this.clock.mono() - started;
      send(socket, { ...result, t, e: meta.e, ms });
    } catch (err) {
      const e = toColoError(err);
      this.lastError = e.message;
      this.log(`${meta.t} of epoch ${meta.e} failed: ${e.message}`);
      send(socket, { t: 'error', code: e.code, message: e.message, e: meta.e });
      onError?.();
    }
  }

  /** Drop the primary's connection (after a promotion it gets refused on reconnect). */
  dropPrimary(): void {
    this.current?.destroy();
  }

  async close(): Promise<void> {
    this.current?.destroy();
    await this.server?.close();
  }
}
