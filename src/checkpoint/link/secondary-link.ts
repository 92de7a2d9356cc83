/**
 * The secondary's side of the replication link (the driver of
 * secondary/core.ts). The secondary handles frames strictly in order; a seal
 * makes the epoch durable before 'durable' is answered, a commit answers
 * 'committed' after the commit record is durable. Every failure is answered
 * with an 'error' frame naming the epoch, never swallowed (invariant 6).
 */
import { EventEmitter } from 'node:events';
import { toColoError, type ErrorCode } from '../../errors.js';
import { ReplyBuffers } from '../../net/reply-buffers.js';
import type { Decision } from '../../failover/history.js';
import type { Range } from '../../failover/activity.js';
import { realClock, type Clock } from '../../sys/clock.js';
import { DeadlineTimer } from './deadline-timer.js';
import { tcpNet, type Conn, type Listener, type Net } from '../../sys/net.js';
import { encodeFrameBuffer, FrameError } from '../format/frame.js';
import { isMutation, mutationLength } from '../format/records.js';
import { DEFAULT_HEARTBEAT, type HeartbeatOptions } from '../primary/core.js';
import { SecondaryCore, type SecondaryAction, type SecondaryEvent } from '../secondary/core.js';
import type { SecondaryStore } from '../secondary/store.js';
import {
  LINK_PROTOCOL,
  parseToSecondary,
  type HashRequest,
  type PrimaryHello,
  type ToSecondary,
} from './messages.js';
import { FrameReader, send, writable } from './transport.js';

/** How often a secondary says what it took, when the primary's hello names no window. */
const DEFAULT_GOT_EVERY = 256 * 1024;

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

/** Hash requests a connection may have running at once (SecondaryLink.onData). */
const MAX_PARALLEL_HASHES = 8;

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
  /** Large frames are read into these, reused once stored (FrameReader). */
  private readonly frameBuffers = new ReplyBuffers();
  private sockets = new Map<number, { socket: Conn; reader: FrameReader<ToSecondary> }>();
  /** Hash requests running, per connection, and the range each reads (onData). */
  private hashing = new Map<number, Map<Promise<void>, Range>>();
  private nextConn = 1;
  bytesReceived = 0;
  records = 0;
  duplicates = 0;
  /** One timer, at the core's next deadline. */
  private readonly timer: DeadlineTimer;

  private readonly clock: Clock;
  private readonly net: Net;

  constructor(
    private readonly store: SecondaryStore,
    private readonly opts: SecondaryLinkOptions = {},
  ) {
    super();
    this.clock = opts.clock ?? realClock;
    this.timer = new DeadlineTimer(this.clock, (now) => this.dispatch({ t: 'tick', now }));
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
    this.timer.arm(this.core.nextDeadline());
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
          hashes: [...this.store.hashAlgs],
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
      if (decision.action === 'resync')
        await this.store.startResync(hello.epoch, {
          target: hello.history.at(-1)?.id ?? '',
          mode: decision.mode,
        });
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
    // Flow control: the log's bytes taken from this connection, and the last count told to the primary.
    const flow = { taken: 0, told: 0, every: DEFAULT_GOT_EVERY };
    const reader = new FrameReader<ToSecondary>(
      socket,
      parseToSecondary,
      (msg, frame, data) => {
        if (msg.t === 'hello') {
          if (msg.window) flow.every = Math.max(1, Math.floor(msg.window / 4));
          return this.dispatch({ t: 'hello', now: now(), conn, msg });
        }
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
        const r = this.onData(conn, socket, msg, frame, data);
        if (msg.t === 'seal' || isMutation(msg)) {
          for (const p of frame) flow.taken += p.length;
          if (flow.taken - flow.told >= flow.every) {
            flow.told = flow.taken;
            send(socket, { t: 'got', n: flow.taken });
          }
        }
        return r;
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
      this.frameBuffers,
    );
    this.sockets.set(conn, { socket, reader });
    let error: string | null = null;
    socket.on('error', (err) => (error = err.message));
    socket.on('close', () => {
      reader.stop();
      this.sockets.delete(conn);
      this.hashing.delete(conn);
      this.dispatch({ t: 'closed', now: now(), conn, error });
    });
    this.dispatch({ t: 'accepted', now: now(), conn, peer: `${socket.remoteAddress}:${socket.remotePort}` });
  }

  /**
   * A frame of the stream: stored in order; the answer goes out only once it is true.
   *
   * Hash requests run at once (up to MAX_PARALLEL_HASHES): a resync's closer look at a chunk's
   * few differing blocks otherwise waited behind the 4 MiB chunks it had asked for ahead, 3 ms a
   * look. A later mutation waits for those whose range it overlaps (it would change what they
   * read; one elsewhere cannot), any other frame for all of them.
   */
  private onData(
    conn: number,
    socket: Conn,
    meta: Exclude<ToSecondary, PrimaryHello | { t: 'beat' }>,
    frame: Buffer[],
    data: Buffer[],
  ): void | Promise<void> {
    if (meta.t === 'hash?') return this.startHashes(conn, socket, meta);
    let dataLength = 0;
    for (const p of data) dataLength += p.length;
    const running = this.hashing.get(conn);
    if (running?.size) {
      const waits: Promise<void>[] = [];
      for (const [p, r] of running)
        if (
          !isMutation(meta) ||
          (r.offset < meta.o + mutationLength(meta, dataLength) && meta.o < r.offset + r.length)
        )
          waits.push(p);
      if (waits.length) return Promise.all(waits).then(() => this.onData(conn, socket, meta, frame, data));
    }
    const drop = () => this.apply({ t: 'close', conn, reason: 'store error', graceful: true });
    if (isMutation(meta)) {
      try {
        if (this.store.receive(meta, frame, dataLength)) this.records++;
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
    return this.reply(socket, meta, () => this.store.commit(meta.e, meta.sync), 'committed');
  }

  /** Start answering a hash request; the frame reader waits for it only when MAX_PARALLEL_HASHES run. */
  private startHashes(conn: number, socket: Conn, meta: HashRequest): Promise<void> | undefined {
    let running = this.hashing.get(conn);
    if (!running) this.hashing.set(conn, (running = new Map()));
    const all = running;
    const p: Promise<void> = this.hashes(conn, socket, meta).finally(() => all.delete(p));
    all.set(p, { offset: meta.o, length: meta.l });
    return all.size >= MAX_PARALLEL_HASHES ? p : undefined;
  }

  /** Hashes of the PVM's disk as held here, at this point of the stream (onData holds back any later frame but hash requests). */
  private async hashes(conn: number, socket: Conn, meta: HashRequest): Promise<void> {
    try {
      const h = await this.store.pvmHashes(meta.o, meta.l, meta.bs, meta.alg ?? 'sha256');
      if (writable(socket)) socket.write(encodeFrameBuffer({ t: 'hash', id: meta.id }, h));
    } catch (err) {
      const e = toColoError(err);
      send(socket, { t: 'error', code: e.code, message: `hashing ${meta.o}+${meta.l}: ${e.message}` });
      // Ended, not destroyed: a reset right behind the error frame could lose it (see send()).
      void this.apply({ t: 'close', conn, reason: 'hashing failed', graceful: true });
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
    this.timer.clear();
    for (const { socket } of this.sockets.values()) socket.destroy();
    await this.server?.close();
  }
}
