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
import { ColoError, toColoError, type ErrorCode } from '../errors.js';
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
import type { Decision, Generation } from '../failover/history.js';
import { realClock, type Clock, type TimerHandle } from '../sys/clock.js';
import { SecondaryCore, type SecondaryAction, type SecondaryEvent } from './secondary/core.js';
import {
  DEFAULT_HEARTBEAT,
  PrimaryCore,
  type HeartbeatOptions,
  type LinkState,
  type PeerHello,
  type PrimaryAction,
  type PrimaryEvent,
} from './primary/core.js';
import { tcpNet, type Conn, type Listener, type Net } from '../sys/net.js';

export { LINK_PROTOCOL } from './messages.js';

export { DEFAULT_HEARTBEAT, type HeartbeatOptions } from './primary/core.js';

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
        const frame = this.queue.take(total);
        const f = decodeFrame<unknown>(frame)!;
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

function send(socket: Conn, meta: object): void {
  if (!socket.destroyed) socket.write(encodeFrameBuffer(meta));
}

// -----------------------------------------------------------------------------
// Primary side: the driver of primary/core.ts

export type { LinkState, PeerHello, PeerState } from './primary/core.js';

export interface PrimaryLinkOptions {
  clock?: Clock;
  net?: Net;
  host: string;
  port: number;
  size: number;
  reconnectMinMs?: number;
  reconnectMaxMs?: number;
  heartbeat?: HeartbeatOptions;
  /** Go on alone after the secondary has been unreachable this long. */
  loneAfterMs?: number;
  log?: (msg: string, level?: 'info' | 'warn') => void;
  /** Flow control: PVM writes wait while this much log is unsent, until it is down to the low mark. */
  highWaterBytes?: number;
  lowWaterBytes?: number;
  /** This primary's generation history and whether it can resend what the secondary lacks. */
  handshake?: () => { history: Generation[]; needsResync: boolean };
}

/**
 * The primary's side of the link: the sockets, the frames and the sender
 * (the log's journals streamed in order, live or from the files); every
 * decision is the core's (primary/core.ts). Events for the replica: 'fence'
 * (deposed), 'lone', 'resync' (mode, peer's hot ranges), 'protected', 'peer'
 * (the secondary's hello), 'down'.
 */
export class PrimaryLink extends EventEmitter {
  readonly core: PrimaryCore;
  bytesSent = 0;
  private socket: Conn | null = null;
  private conn: number | null = null;
  private reader: FrameReader<ToPrimary> | null = null;
  private blocked = false;
  private corked = false;
  private streaming = false;
  private cursor = { epoch: 0, offset: 0 };
  private waiters = new Map<
    number,
    {
      resolve: (r: { epoch: number; overlayDiscarded?: { records: number; bytes: number } }) => void;
      reject: (err: Error) => void;
    }
  >();
  private nextWait = 1;
  private timer: TimerHandle | null = null;
  private timerAt = Infinity;
  /** PVM writes waiting for the backlog to shrink (flow control). */
  private roomWaiters: (() => void)[] = [];
  /** Times flow control made PVM writes wait. */
  throttled = 0;
  private hashWaiters = new Map<number, { resolve: (h: Buffer) => void; reject: (e: Error) => void }>();
  /**
   * Hash requests made while records logged before them were still unsent: each waits until
   * `bytesSent` reaches `at`, where the log ended when it was made (cleared with the connection).
   */
  private parkedHashes: { at: number; frame: HashRequest }[] = [];
  private nextHashId = 1;

  private readonly clock: Clock;
  private readonly net: Net;

  constructor(
    private readonly plog: PrimaryLog,
    private readonly opts: PrimaryLinkOptions,
  ) {
    super();
    this.clock = opts.clock ?? realClock;
    this.net = opts.net ?? tcpNet;
    this.core = new PrimaryCore({
      size: opts.size,
      host: opts.host,
      port: opts.port,
      heartbeat: opts.heartbeat ?? DEFAULT_HEARTBEAT,
      reconnectMinMs: opts.reconnectMinMs ?? 100,
      reconnectMaxMs: opts.reconnectMaxMs ?? 2000,
      loneAfterMs: opts.loneAfterMs ?? Infinity,
    });
    plog.onAppend = (epoch, parts, bytes) => this.onAppend(epoch, parts, bytes);
    plog.onOutOfSync = (reason) => {
      this.dispatch({ t: 'outOfSync', now: this.clock.mono(), reason });
      this.releaseRoom(); // nothing is held for it any more: the PVM must not wait
      // A new hello tells the secondary that the log cannot carry it: it resynchronises.
      setImmediate(() => this.reconnect(`the secondary is out of sync: ${reason}`));
    };
  }

  // ---------------------------------------------------------------------------
  // The core's state, for the replica and status

  get state(): LinkState {
    return this.core.linkState;
  }
  get connected(): boolean {
    return this.core.connected;
  }
  get lastError(): string | null {
    return this.core.lastError;
  }
  get connectedSince(): number | null {
    return this.core.connectedSince === null ? null : this.wall(this.core.connectedSince);
  }
  get downSince(): number | null {
    return this.core.downSince === null ? null : this.wall(this.core.downSince);
  }
  get reconnects(): number {
    return this.core.reconnects;
  }
  get durableEpoch(): number {
    return this.core.durableEpoch;
  }
  get committedEpoch(): number {
    return this.core.committedEpoch;
  }
  get deposed(): string | null {
    return this.core.deposed;
  }
  get refused(): string | null {
    return this.core.refused;
  }
  get peer(): PeerHello | null {
    return this.core.peer;
  }

  /** Wall-clock time of a monotonic instant (the core keeps monotonic time). */
  private wall(mono: number): number {
    return this.clock.now() - (this.clock.mono() - mono);
  }

  // ---------------------------------------------------------------------------
  // Events in, actions out

  start(): void {
    this.dispatch({ t: 'start', now: this.clock.mono() });
  }

  private dispatch(ev: PrimaryEvent): void {
    const before = this.core.peerState;
    for (const a of this.core.step(ev)) this.apply(a);
    if (this.core.peerState !== before) this.emit('peerState', this.core.peerState);
    this.arm();
  }

  /** One timer, at the core's next deadline. */
  private arm(): void {
    const at = this.core.nextDeadline();
    if (at === null) {
      this.timer?.clear();
      this.timer = null;
      this.timerAt = Infinity;
      return;
    }
    if (this.timer && at >= this.timerAt) return;
    this.timer?.clear();
    this.timerAt = at;
    this.timer = this.clock.setTimeout(
      () => {
        this.timer = null;
        this.timerAt = Infinity;
        this.dispatch({ t: 'tick', now: this.clock.mono() });
      },
      Math.max(0, at - this.clock.mono()),
    );
  }

  private apply(a: PrimaryAction): void {
    switch (a.t) {
      case 'connect':
        return this.connect(a.conn, a.host, a.port);
      case 'close':
        if (a.conn === this.conn) this.socket?.destroy();
        return;
      case 'hello':
        if (a.conn === this.conn && this.socket)
          send(this.socket, {
            t: 'hello',
            proto: LINK_PROTOCOL,
            size: this.opts.size,
            epoch: this.plog.current,
            session: this.plog.session,
            ...(this.opts.handshake?.() ?? { history: [], needsResync: false }),
          });
        return;
      case 'beat':
        // Beats go between frames only; while a resend streams, the data itself shows life.
        if (a.conn === this.conn && this.socket && !this.blocked && this.atFrameBoundary())
          send(this.socket, { t: 'beat' });
        return;
      case 'linkUp': {
        if (a.conn !== this.conn) return;
        this.plog.releaseThrough(a.resync ? this.plog.current - 1 : a.release);
        // Replay from the oldest epoch still held.
        const oldest = this.plog.heldEpochs()[0];
        this.cursor = { epoch: oldest?.epoch ?? this.plog.current, offset: 0 };
        this.streaming = true;
        this.log(`resending from epoch ${this.cursor.epoch}`);
        this.emit('peer', this.core.peer);
        this.pump();
        return;
      }
      case 'committed':
        this.plog.releaseThrough(a.epoch);
        return;
      case 'commit':
        if (a.conn === this.conn && this.socket) {
          const req: CommitRequest = { t: 'commit', e: a.epoch, sync: a.sync };
          send(this.socket, req);
        }
        return;
      case 'resolve':
        this.waiters.get(a.id)?.resolve(a);
        this.waiters.delete(a.id);
        return;
      case 'reject':
        this.waiters.get(a.id)?.reject(a.error);
        this.waiters.delete(a.id);
        return;
      case 'fence':
        this.emit('deposed', a.reason);
        return;
      case 'refused':
        this.emit('refused', a.reason);
        return;
      case 'lone':
        this.emit('lone', a.reason, a.committed);
        return;
      case 'resync':
        this.emit('resync', a.mode, a.peerHot);
        return;
      case 'protected':
        this.emit('protected');
        return;
      case 'down':
        this.emit('down', a.reason);
        this.releaseRoom(); // a lost secondary must not stall the PVM
        return;
      case 'log':
        this.log(a.msg, a.level);
        return;
    }
  }

  private log(msg: string, level: 'info' | 'warn' = 'info'): void {
    this.opts.log?.(msg, level);
  }

  private connect(conn: number, host: string, port: number): void {
    const socket = this.net.connect(host, port);
    this.socket = socket;
    this.conn = conn;
    const now = () => this.clock.mono();
    socket.once('connect', () => this.dispatch({ t: 'connected', now: now(), conn }));
    socket.on('data', () => {
      if (this.conn === conn) this.core.step({ t: 'rx', now: now(), conn });
    });
    this.reader = new FrameReader<ToPrimary>(
      socket,
      parseToPrimary,
      (msg, _frame, data) => {
        if (msg.t === 'hash') {
          const w = this.hashWaiters.get(msg.id);
          this.hashWaiters.delete(msg.id);
          w?.resolve(Buffer.from(data));
        }
        this.dispatch({ t: 'received', now: now(), conn, msg });
      },
      (err) => this.dispatch({ t: 'badFrame', now: now(), conn, error: err.message }),
    );
    socket.on('drain', () => {
      this.blocked = false;
      this.pump();
    });
    let error: string | null = null;
    socket.on('error', (err) => (error = err.message));
    socket.on('close', () => {
      if (this.socket !== socket) return;
      this.reader?.stop();
      this.socket = null;
      this.conn = null;
      this.blocked = false;
      this.streaming = false;
      this.parkedHashes = [];
      const lost = new ColoError('ECONNECT', `replication link lost: ${error ?? 'connection closed'}`);
      for (const w of this.hashWaiters.values()) w.reject(lost);
      this.hashWaiters.clear();
      this.dispatch({ t: 'closed', now: now(), conn, error });
    });
  }

  private onAppend(epoch: number, parts: [Buffer, Buffer], bytes: number): void {
    if (!this.streaming || this.blocked || !this.socket) return;
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
    const high = this.opts.highWaterBytes ?? defaultTunables.replicationHighWaterBytes;
    if (!this.core.connected || this.plog.outOfSync || this.unsentBytes < high) return null;
    this.throttled++;
    return new Promise((resolve) => this.roomWaiters.push(resolve));
  }

  private releaseRoom(): void {
    if (this.roomWaiters.length === 0) return;
    const low = this.opts.lowWaterBytes ?? defaultTunables.replicationLowWaterBytes;
    if (this.core.connected && !this.plog.outOfSync && this.unsentBytes > low) return;
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
    while (this.streaming && !this.blocked && this.socket && !this.plog.outOfSync) {
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

  /** Point the link at another secondary (re-protection) and connect to it now. */
  retarget(host: string, port: number): void {
    this.opts.host = host;
    this.opts.port = port;
    this.dispatch({ t: 'retarget', now: this.clock.mono(), host, port });
  }

  /** Drop the connection and connect again (a new hello, so the secondary decides afresh). */
  reconnect(reason: string): void {
    this.dispatch({ t: 'reconnect', now: this.clock.mono(), reason });
  }

  /** The resync the core asked for finished (or failed). */
  resyncDone(): void {
    this.dispatch({ t: 'resyncDone', now: this.clock.mono() });
  }
  resyncFailed(error: string): void {
    this.dispatch({ t: 'resyncFailed', now: this.clock.mono(), error });
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

  private wait(
    kind: 'durable' | 'commit',
    epoch: number,
    timeoutMs: number,
    resync: boolean,
    sync?: SyncMark,
  ): Promise<{ epoch: number; overlayDiscarded?: { records: number; bytes: number } }> {
    const id = this.nextWait++;
    const p = new Promise<{ epoch: number; overlayDiscarded?: { records: number; bytes: number } }>(
      (resolve, reject) => this.waiters.set(id, { resolve, reject }),
    );
    this.dispatch({ t: 'wait', now: this.clock.mono(), id, kind, epoch, timeoutMs, resync, sync });
    return p;
  }

  /** Resolve once the secondary holds epoch N durably. */
  async waitDurable(epoch: number, timeoutMs: number, resync = false): Promise<DurableReply> {
    await this.wait('durable', epoch, timeoutMs, resync);
    return { t: 'durable', e: epoch };
  }

  /** Ask the secondary to commit through epoch N; resolve when the commit record is durable. */
  async commit(epoch: number, timeoutMs: number, sync?: SyncMark): Promise<CommittedReply> {
    const r = await this.wait('commit', epoch, timeoutMs, sync !== undefined, sync);
    return { t: 'committed', e: epoch, overlayDiscarded: r.overlayDiscarded };
  }

  /**
   * Hashes of the secondary's disk (as of this point in the stream) for
   * [offset, offset+length) in blocks of `block` bytes.
   */
  requestHashes(offset: number, length: number, block: number): Promise<Buffer> {
    if (!this.core.connected || !this.socket)
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
    this.dispatch({ t: 'close', now: this.clock.mono() });
    this.timer?.clear();
    this.timer = null;
    this.socket?.destroy();
  }
}

// -----------------------------------------------------------------------------
// Secondary side: the driver of secondary/core.ts

export interface SecondaryLinkOptions {
  clock?: Clock;
  net?: Net;
  heartbeat?: HeartbeatOptions;
  failover?: 'auto' | 'manual';
  failoverGraceMs?: number;
  log?: (msg: string, level?: 'info' | 'warn') => void;
}

/**
 * The secondary's side of the link: the listener, the sockets and the frames.
 * Data frames (records, seals, commits, hash requests) go to the store in
 * stream order, and each answer is sent only once the store has made it true
 * (durable, committed); every other decision is the core's
 * (secondary/core.ts). Events: 'primary-lost', 'primary-connected', and
 * 'promote' (the core's automatic failover).
 */
export class SecondaryLink extends EventEmitter {
  readonly core: SecondaryCore;
  private server: Listener | null = null;
  private sockets = new Map<number, { socket: Conn; reader: FrameReader<ToSecondary> }>();
  private nextConn = 1;
  bytesReceived = 0;
  records = 0;
  duplicates = 0;
  private timer: TimerHandle | null = null;
  private timerAt = Infinity;

  private readonly clock: Clock;
  private readonly net: Net;

  constructor(
    private readonly store: SecondaryStore,
    private readonly opts: SecondaryLinkOptions = {},
  ) {
    super();
    this.clock = opts.clock ?? realClock;
    this.net = opts.net ?? tcpNet;
    this.core = new SecondaryCore(
      {
        heartbeat: opts.heartbeat ?? DEFAULT_HEARTBEAT,
        failover: opts.failover ?? 'manual',
        failoverGraceMs: opts.failoverGraceMs ?? 1000,
      },
      {
        size: store.size,
        history: () => store.history?.generations ?? [],
        syncing: () => store.syncing,
        promoted: () => store.promoted,
      },
    );
  }

  // The core's state, for status.
  get connected(): boolean {
    return this.core.connected;
  }
  get connectedSince(): number | null {
    return this.core.connectedSince === null ? null : this.wall(this.core.connectedSince);
  }
  get lastError(): string | null {
    return this.core.lastError;
  }
  get peer(): string | null {
    return this.core.peer;
  }
  get primaryLost(): { at: number; reason: string } | null {
    const l = this.core.primaryLost;
    return l && { at: this.wall(l.at), reason: l.reason };
  }
  get refusal(): { at: number; code: string; message: string } | null {
    const r = this.core.refusal;
    return r && { ...r, at: this.wall(r.at) };
  }
  get decision(): Decision | null {
    return this.core.decision;
  }

  private wall(mono: number): number {
    return this.clock.now() - (this.clock.mono() - mono);
  }

  private log(msg: string, level: 'info' | 'warn' = 'info'): void {
    this.opts.log?.(msg, level);
  }

  async listen(port: number, host: string): Promise<Listener> {
    this.server = await this.net.listen(host, port, (s) => this.accept(s));
    return this.server;
  }

  private dispatch(ev: SecondaryEvent): Promise<void> | void {
    let work: Promise<void> | void = undefined;
    for (const a of this.core.step(ev)) {
      const r = this.apply(a);
      if (r) work = r;
    }
    this.arm();
    return work;
  }

  private arm(): void {
    const at = this.core.nextDeadline();
    if (at === null) {
      this.timer?.clear();
      this.timer = null;
      this.timerAt = Infinity;
      return;
    }
    if (this.timer && at >= this.timerAt) return;
    this.timer?.clear();
    this.timerAt = at;
    this.timer = this.clock.setTimeout(
      () => {
        this.timer = null;
        this.timerAt = Infinity;
        this.dispatch({ t: 'tick', now: this.clock.mono() });
      },
      Math.max(0, at - this.clock.mono()),
    );
  }

  private apply(a: SecondaryAction): Promise<void> | void {
    const s = 'conn' in a ? this.sockets.get(a.conn) : undefined;
    switch (a.t) {
      case 'send':
        if (s) send(s.socket, a.msg);
        return;
      case 'close':
        if (!s) return;
        s.reader.stop();
        if (a.graceful) {
          // Let what was sent (an error) reach the primary before the end of the stream:
          // a destroy with unread data would reset the connection and could lose it.
          s.socket.end();
          this.clock.setTimeout(() => s.socket.destroy(), 2000, { unref: true });
        } else s.socket.destroy();
        return;
      case 'startSession':
        return this.startSession(a.conn, a.hello, a.decision);
      case 'welcome': {
        if (!s) return;
        const durable = Math.max(
          this.store.lastCommitted,
          ...this.store
            .pendingEpochs()
            .filter((e) => e.state !== 'receiving' && e.state !== 'sealed')
            .map((e) => e.epoch),
        );
        send(s.socket, {
          t: 'hello',
          proto: LINK_PROTOCOL,
          size: this.store.size,
          seq: this.store.highestSeq,
          durable,
          committed: this.store.lastCommitted,
          history: [...(this.store.history?.generations ?? [])],
          decision: a.decision,
          hot: a.decision.action === 'resync' ? (this.store.activity?.hotRanges() ?? []) : [],
        });
        return;
      }
      case 'promote':
        this.emit('promote', a.reason);
        return;
      case 'primaryLost':
        this.emit('primary-lost', { at: this.wall(a.at), reason: a.reason });
        return;
      case 'primaryConnected':
        this.emit('primary-connected');
        return;
      case 'log':
        this.log(a.msg, a.level);
        return;
    }
  }

  /** The store starts the primary's session (a rollback and rebase first for a resync). */
  private async startSession(conn: number, hello: PrimaryHello, decision: Decision): Promise<void> {
    let error: { code: ErrorCode; message: string } | null = null;
    try {
      if (decision.action === 'resync') await this.store.startResync(hello.epoch);
      this.store.startSession(hello.session, hello.epoch);
    } catch (err) {
      const e = toColoError(err);
      error = { code: e.code, message: e.message };
    }
    this.dispatch({ t: 'sessionStarted', now: this.clock.mono(), conn, error });
  }

  private accept(socket: Conn): void {
    const conn = this.nextConn++;
    const now = () => this.clock.mono();
    socket.on('data', (d: Buffer) => {
      this.bytesReceived += d.length;
      this.core.step({ t: 'rx', now: now(), conn });
    });
    const reader = new FrameReader<ToSecondary>(
      socket,
      parseToSecondary,
      (msg, frame, data) => {
        if (msg.t === 'hello') return this.dispatch({ t: 'hello', now: now(), conn, msg });
        if (msg.t === 'beat') return;
        if (!this.core.accepting(conn)) {
          this.dispatch({
            t: 'badFrame',
            now: now(),
            conn,
            code: 'EPROTO',
            error: `a '${msg.t}' frame before the handshake`,
          });
          return;
        }
        return this.onData(conn, socket, msg, frame, data);
      },
      (err) => {
        const message =
          err instanceof FrameError ? `bad frame from the primary: ${err.message}` : err.message;
        const code = toColoError(err).code;
        this.dispatch({
          t: 'badFrame',
          now: now(),
          conn,
          code: code === 'EIO' ? 'EPROTO' : code,
          error: message,
        });
      },
      (busy) => this.core.step({ t: 'busy', conn, busy }),
    );
    this.sockets.set(conn, { socket, reader });
    let error: string | null = null;
    socket.on('error', (err) => (error = err.message));
    socket.on('close', () => {
      reader.stop();
      this.sockets.delete(conn);
      this.dispatch({ t: 'closed', now: now(), conn, error });
    });
    this.dispatch({ t: 'accepted', now: now(), conn, peer: `${socket.remoteAddress}:${socket.remotePort}` });
  }

  /** A frame of the stream: stored in order; the answer goes out only once it is true. */
  private onData(
    conn: number,
    socket: Conn,
    meta: Exclude<ToSecondary, PrimaryHello | { t: 'beat' }>,
    frame: Buffer,
    data: Buffer,
  ): void | Promise<void> {
    const drop = () => this.apply({ t: 'close', conn, reason: 'store error', graceful: true });
    if (isMutation(meta)) {
      try {
        if (this.store.receive(meta, frame, data.length)) this.records++;
        else this.duplicates++;
      } catch (err) {
        const e = toColoError(err);
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
    return this.hashes(socket, meta);
  }

  /** Hashes of the PVM's disk as held here, at this point of the stream (frames are handled in order). */
  private async hashes(socket: Conn, meta: HashRequest): Promise<void> {
    try {
      const h = await this.store.pvmHashes(meta.o, meta.l, meta.bs);
      if (!socket.destroyed) socket.write(encodeFrameBuffer({ t: 'hash', id: meta.id }, h));
    } catch (err) {
      const e = toColoError(err);
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
      this.log(`${meta.t} of epoch ${meta.e} failed: ${e.message}`);
      send(socket, { t: 'error', code: e.code, message: e.message, e: meta.e });
      onError?.();
    }
  }

  /** Drop the primary's connection (after a promotion it gets refused on reconnect). */
  dropPrimary(): void {
    for (const { socket } of this.sockets.values()) socket.destroy();
  }

  /** An operator's failover is running: the core's own timer must not race it. */
  cancelFailover(): void {
    this.dispatch({ t: 'cancelFailover', now: this.clock.mono() });
  }

  async close(): Promise<void> {
    this.dispatch({ t: 'close', now: this.clock.mono() });
    this.timer?.clear();
    this.timer = null;
    for (const { socket } of this.sockets.values()) socket.destroy();
    await this.server?.close();
  }
}
