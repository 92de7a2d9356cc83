/**
 * The primary's side of the replication link (the driver of primary/core.ts).
 *
 * Notes on the design:
 * - The primary connects (and reconnects, with backoff) to the secondary.
 *   Both sides speak frames (format/frame.ts). After a hello exchange in
 *   which the two check that their disks have the same size, the primary
 *   streams the bytes of its epoch journals in order: that byte stream *is* a
 *   sequence of frames, so nothing is re-encoded, and a resend after a
 *   reconnect is a replay of the files from the oldest epoch the secondary
 *   has not yet made durable. The secondary drops records it already holds
 *   (by sequence).
 * - Live fast path: when the sender has caught up, a new record's frame goes
 *   straight to the socket as it is appended; otherwise the sender reads the
 *   journals from disk at its own pace (socket backpressure via 'drain'), so
 *   memory stays bounded however far behind the secondary is.
 * - Every decision (when to connect, beats and loss, what a hello or an
 *   error means, waits and their timeouts) is the core's.
 */
import { Buffer } from 'node:buffer';
import { EventEmitter } from 'node:events';
import { ColoError } from '../../errors.js';
import type { Generation } from '../../failover/history.js';
import type { HashAlg } from '../../failover/reprotect/hash-pool.js';
import { defaultTunables } from '../../limits.js';
import { realClock, type Clock } from '../../sys/clock.js';
import { DeadlineTimer } from './deadline-timer.js';
import { tcpNet, type Conn, type Net } from '../../sys/net.js';
import { FRAME_HEADER_BYTES, peekFrameBytes } from '../format/frame.js';
import type { ResendAppend, ResendJournal } from '../format/resend-journal.js';
import type { PrimaryLog } from '../primary/log.js';
import {
  DEFAULT_HEARTBEAT,
  PrimaryCore,
  type HeartbeatOptions,
  type LinkState,
  type PeerHello,
  type PrimaryAction,
  type PrimaryEvent,
} from '../primary/core.js';
import {
  LINK_PROTOCOL,
  parseToPrimary,
  type CommittedReply,
  type CommitRequest,
  type DurableReply,
  type HashRequest,
  type SyncMark,
  type ToPrimary,
} from './messages.js';
import { FrameReader, send, writable } from './transport.js';

export { LINK_PROTOCOL } from './messages.js';
export { DEFAULT_HEARTBEAT, type HeartbeatOptions } from '../primary/core.js';

/** The sender reads whole frames of the journals in chunks of at most this (at least one frame). */
const READ_CHUNK = 1024 * 1024;

// -----------------------------------------------------------------------------
// Primary side: the driver of primary/core.ts

export type { LinkState, PeerHello, PeerState } from '../primary/core.js';

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
  /** Flow control on the wire: at most this many bytes of the log sent and not yet taken by the secondary. */
  windowBytes?: number;
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
  /** Live frames queued this turn, one after another in one resend chunk (queueRun). */
  private run: { socket: Conn; journal: ResendJournal; chunk: Buffer; start: number; end: number } | null =
    null;
  private streaming = false;
  private cursor = { epoch: 0, offset: 0 };
  /**
   * Log bytes sent on this connection, and taken by the secondary (its 'got'
   * frames). What is in between sits in socket buffers, where nothing can
   * overtake it: a seal's durable answer and a commit wait behind all of it.
   */
  private sentOnConn = 0;
  private takenOnConn = 0;
  /**
   * A checkpoint in progress with the PVM running: frames of epochs after
   * this one wait (in the log; flow control counts them) until its commit
   * request is on the wire, which would otherwise queue behind a window of
   * them (holdAfter).
   */
  private holdAfterEpoch: number | null = null;
  private waiters = new Map<
    number,
    {
      resolve: (r: { epoch: number; overlayDiscarded?: { records: number; bytes: number } }) => void;
      reject: (err: Error) => void;
    }
  >();
  private nextWait = 1;
  /** One timer, at the core's next deadline. */
  private readonly timer: DeadlineTimer;
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
  /** The block digests the connected secondary said it hashes with (its hello). */
  peerHashAlgs: readonly HashAlg[] = ['sha256'];

  private readonly clock: Clock;
  private readonly net: Net;

  constructor(
    private readonly plog: PrimaryLog,
    private readonly opts: PrimaryLinkOptions,
  ) {
    super();
    this.clock = opts.clock ?? realClock;
    this.timer = new DeadlineTimer(this.clock, (now) => this.dispatch({ t: 'tick', now }));
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
    plog.onAppend = (epoch, r) => this.onAppend(epoch, r);
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

  private arm(): void {
    this.timer.arm(this.core.nextDeadline());
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
          this.sendControl({
            t: 'hello',
            proto: LINK_PROTOCOL,
            size: this.opts.size,
            epoch: this.plog.current,
            session: this.plog.session,
            window: this.windowBytes,
            ...(this.opts.handshake?.() ?? { history: [], needsResync: false }),
          });
        return;
      case 'beat':
        // Beats go between frames only; while a resend streams, the data itself shows life.
        if (a.conn === this.conn && this.socket && !this.blocked && this.atFrameBoundary())
          this.sendControl({ t: 'beat' });
        return;
      case 'linkUp': {
        if (a.conn !== this.conn) return;
        this.plog.releaseThrough(a.resync ? this.plog.current - 1 : a.release);
        // Replay from the oldest epoch still held.
        const oldest = this.plog.heldEpochs()[0];
        this.cursor = { epoch: oldest?.epoch ?? this.plog.current, offset: 0 };
        this.streaming = true;
        this.sentOnConn = this.takenOnConn = 0;
        this.log(`resending from epoch ${this.cursor.epoch}`);
        this.emit('peer', this.core.peer);
        this.pump();
        return;
      }
      case 'release':
        this.plog.releaseThrough(a.epoch, { keepSpilled: a.keepSpilled });
        return;
      case 'commit':
        if (a.conn === this.conn && this.socket) {
          const req: CommitRequest = { t: 'commit', e: a.epoch, sync: a.sync };
          this.sendControl(req);
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
        if (msg.t === 'got') {
          if (this.conn !== conn) return;
          const full = this.windowFull();
          this.takenOnConn = Math.max(this.takenOnConn, msg.n);
          if (full && !this.windowFull()) this.pump();
          return;
        }
        if (msg.t === 'hello' && this.conn === conn) this.peerHashAlgs = msg.hashes ?? ['sha256'];
        if (msg.t === 'hash') {
          const w = this.hashWaiters.get(msg.id);
          this.hashWaiters.delete(msg.id);
          w?.resolve(Buffer.concat(data));
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

  /**
   * Send nothing of the epochs after `epoch` until releaseHold(): a
   * checkpoint of `epoch` holds the next epoch's frames from its seal until
   * its commit is answered. With the PVM paused (the COLO coordinator) there
   * are none; with it writing (a checkpoint by the control API) there are.
   * Released as soon as the commit request went out instead, they followed
   * it on the wire and its answer waited behind them and the writes that
   * piled up meanwhile: at a 2 MiB window the commit took 1.9-2.4 ms that
   * way, 0.55-0.6 ms held until the answer. The cost: PVM writes past the
   * high-water mark wait out the commit too (the secondary's commit record
   * is synced before it answers).
   */
  holdAfter(epoch: number): void {
    this.holdAfterEpoch = epoch;
  }

  /** Stop holding (holdAfter) and send what waited; nothing if there is no hold. */
  releaseHold(): void {
    if (this.holdAfterEpoch === null) return;
    this.holdAfterEpoch = null;
    this.pump();
  }

  private holding(epoch: number): boolean {
    return this.holdAfterEpoch !== null && epoch > this.holdAfterEpoch;
  }

  private onAppend(epoch: number, r: ResendAppend): void {
    if (!this.streaming || this.blocked || !this.socket || this.windowFull() || this.holding(epoch)) return;
    const journal = this.plog.epochs.get(epoch)!.journal!;
    const bytes = r.bytes;
    // Live fast path: the sender is exactly at the end of this epoch's journal.
    if (this.cursor.epoch === epoch && this.cursor.offset + bytes === journal.size) {
      // The resend buffer's own bytes: one chunk's view (the usual frame), views across
      // chunks, or, past its memory, the copy it made for its file (never the PVM's buffers).
      if (r.chunk) this.queueRun(journal, r.chunk, r.at, bytes);
      else if (r.inMemory) this.writeHeld(journal.viewsAt(this.cursor.offset, bytes)!);
      else for (const p of r.parts) this.write(p);
      this.cursor.offset += bytes;
      this.bytesSent += bytes;
      this.sentOnConn += bytes;
      this.releaseHashes();
      this.releaseRoom();
    } else this.pump();
  }

  /** The secondary has not yet taken a window's worth of what was sent: send nothing more for now. */
  private windowFull(): boolean {
    return this.sentOnConn - this.takenOnConn >= this.windowBytes;
  }

  private get windowBytes(): number {
    return this.opts.windowBytes ?? defaultTunables.replicationWindowBytes;
  }

  /** The resend buffer's own bytes, its chunks held until the socket has written the last of them. */
  private writeHeld(held: { views: Buffer[]; release: () => void }): void {
    held.views.forEach((v, i) => this.write(v, i === held.views.length - 1 ? held.release : undefined));
  }

  /** True when the sender is between two frames of the stream. */
  private atFrameBoundary(): boolean {
    if (this.plog.outOfSync || this.cursor.offset === 0) return true;
    const e = this.plog.epochs.get(this.cursor.epoch);
    return !e?.journal || this.cursor.offset === e.journal.size;
  }

  /**
   * A live frame that lies whole in a resend chunk. Frames appended one after
   * another in the same chunk are one run of its bytes, written as one view
   * when something else is written, or at the end of the turn: one socket
   * write, one iovec and one hold on the chunk for the turn's frames, where
   * each frame had its own. The window is counted per frame as before.
   */
  private queueRun(journal: ResendJournal, chunk: Buffer, at: number, bytes: number): void {
    const socket = this.socket!;
    if (this.run && this.run.chunk === chunk && this.run.end === at && this.run.socket === socket) {
      this.run.end += bytes;
      return;
    }
    this.flushRun();
    this.cork(socket);
    journal.hold(chunk);
    this.run = { socket, journal, chunk, start: at, end: at + bytes };
  }

  /** Write the pending run (queueRun), before anything else goes on the socket. */
  private flushRun(): void {
    const run = this.run;
    if (!run) return;
    this.run = null;
    const release = run.journal.releaserOf(run.chunk);
    // The connection it was meant for is gone: its frames are resent from the log on the next.
    if (run.socket !== this.socket || !writable(run.socket)) return release();
    if (!run.socket.write(run.chunk.subarray(run.start, run.end), release)) this.blocked = true;
  }

  /** Frames produced in one turn of the event loop leave in one writev. */
  private cork(socket: Conn): void {
    if (this.corked) return;
    this.corked = true;
    socket.cork();
    setImmediate(() => {
      this.flushRun();
      this.corked = false;
      socket.uncork();
    });
  }

  private write(buf: Buffer, done?: () => void): void {
    const socket = this.socket!;
    this.flushRun();
    this.cork(socket);
    if (!socket.write(buf, done)) this.blocked = true;
  }

  /** A control frame: after the frames queued before it. */
  private sendControl(meta: object): void {
    this.flushRun();
    send(this.socket!, meta);
  }

  /**
   * Flow control for the PVM's writes: resolves at once unless a connected
   * secondary is more than the high-water mark behind, then once the backlog
   * is back under the low-water mark (or the link is lost). This keeps a slow
   * secondary from falling behind until the log budget runs out.
   */
  waitForRoom(admitted = 0): Promise<void> | null {
    if (this.hasRoom(admitted)) return null;
    this.throttled++;
    return new Promise((resolve) => this.roomWaiters.push(resolve));
  }

  /** Whether a PVM write may go now (waitForRoom would not make it wait); no side effect. */
  hasRoom(admitted = 0): boolean {
    if (!this.core.connected || this.plog.outOfSync) return true;
    // `admitted`: bytes of writes already let through and not yet logged (they wake the
    // waiters as they finish: releaseRoom).
    const high = this.opts.highWaterBytes ?? defaultTunables.replicationHighWaterBytes;
    return this.unsentBytes + admitted < high;
  }

  /** Wake the PVM writes waiting for room if the backlog is under the low mark (they ask again). */
  releaseRoom(): void {
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
    } catch (err) {
      // The log's file part could not be read back (or written out first: a full disk). The
      // secondary cannot be brought up to date from it: mark it out of sync (a resync follows).
      // Thrown from a 'drain' event, this error ended the process.
      this.plog.markOutOfSync(`the epoch log could not be sent: ${(err as Error).message}`);
    } finally {
      this.releaseHashes();
      this.releaseRoom();
    }
  }

  /** Send the parked hash requests whose preceding records have all been sent, in order. */
  private releaseHashes(): void {
    while (this.parkedHashes.length && this.socket && this.bytesSent >= this.parkedHashes[0].at)
      this.sendControl(this.parkedHashes.shift()!.frame);
  }

  private pumpFrames(): void {
    while (this.streaming && !this.blocked && this.socket && !this.plog.outOfSync && !this.windowFull()) {
      if (this.holding(this.cursor.epoch)) return;
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
        const room = this.windowBytes - (this.sentOnConn - this.takenOnConn);
        const n = this.sendWholeFrames(journal, this.cursor.offset, size, Math.min(READ_CHUNK, room));
        this.cursor.offset += n;
        this.bytesSent += n;
        this.sentOnConn += n;
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
   * Send up to `limit` bytes of whole frames from `offset` (at least one
   * frame, however large). Every write of the sender therefore ends on a frame
   * boundary, so control frames (commit, beat) can always go in between. The
   * limit is what the window has room for (at most READ_CHUNK), so the wire
   * never holds more than the window plus one frame, as on the live path.
   */
  private sendWholeFrames(journal: ResendJournal, offset: number, size: number, limit: number): number {
    const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
    let end = offset;
    while (end < size) {
      journal.read(head, end);
      const frame = peekFrameBytes(head)!;
      if (end > offset && end + frame - offset > limit) break;
      end += frame;
    }
    // Bytes still in memory go as they are (held until written), the file's are read.
    const held = journal.viewsAt(offset, end - offset);
    if (held) this.writeHeld(held);
    else {
      const buf = Buffer.allocUnsafe(end - offset);
      journal.read(buf, offset);
      this.write(buf);
    }
    return end - offset;
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

  /** Bytes of log sent on this connection that the secondary has not said it took (at most about a window). */
  get inFlightBytes(): number {
    return this.socket && this.streaming ? this.sentOnConn - this.takenOnConn : 0;
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
  requestHashes(offset: number, length: number, block: number, alg: HashAlg = 'sha256'): Promise<Buffer> {
    if (!this.core.connected || !this.socket)
      return Promise.reject(new ColoError('ECONNECT', 'the secondary is not connected'));
    const id = this.nextHashId++;
    const p = new Promise<Buffer>((resolve, reject) => this.hashWaiters.set(id, { resolve, reject }));
    const frame: HashRequest = { t: 'hash?', id, o: offset, l: length, bs: block };
    // SHA-256 goes unnamed: what a secondary from before BLAKE3 hashes with.
    if (alg !== 'sha256') frame.alg = alg;
    // The secondary hashes its disk as of this point of the stream, so the request must follow
    // every record logged before it; while some of those are unsent (the socket pushed back,
    // or a resend is under way), it waits for them instead of overtaking them.
    const at = this.bytesSent + this.unsentBytes;
    if (this.parkedHashes.length === 0 && this.bytesSent >= at) this.sendControl(frame);
    else this.parkedHashes.push({ at, frame });
    return p;
  }

  close(): void {
    this.dispatch({ t: 'close', now: this.clock.mono() });
    this.timer.clear();
    this.socket?.destroy();
  }
}
