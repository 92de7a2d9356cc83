/**
 * The secondary's replication core: a deterministic state machine, the
 * counterpart of primary/core.ts. It owns the decisions of the secondary's
 * side of the link: which connection is the primary's (the newest), the
 * heartbeat and loss detection, the handshake (carry on, resynchronise, or
 * refuse a stale primary or a split brain), and the failover decision (a
 * primary lost for longer than the grace period is taken over, in automatic
 * mode). It does no I/O: `step(event)` returns actions for the driver
 * (link.ts SecondaryLink, secondary-replica.ts), which starts sessions in the
 * store and persists before it answers. It reads the node's durable state
 * through a `SecondaryView` (as etcd-raft's core reads its Storage).
 */
import { decide, type Decision, type Generation, type SyncMode } from '../../failover/history.js';
import type { ErrorCode } from '../../errors.js';
import { LINK_PROTOCOL, type PrimaryHello, type ToPrimary } from '../link/messages.js';
import type { HeartbeatOptions } from '../primary/core.js';

/** What the core reads of the node's durable state. */
export interface SecondaryView {
  readonly size: number;
  history(): readonly Generation[];
  /** A resync into this node is part-way (its image matches no checkpoint). */
  syncing(): { target: string; mode: SyncMode } | null;
  /** This node was promoted (it serves its own writes). */
  promoted(): { generation: number } | null;
}

export interface SecondaryCoreConfig {
  heartbeat: HeartbeatOptions;
  /** 'auto': promote when the primary stays lost for `failoverGraceMs`; 'manual': only on request. */
  failover: 'auto' | 'manual';
  failoverGraceMs: number;
}

export type SecondaryEvent =
  | { t: 'tick'; now: number }
  | { t: 'accepted'; now: number; conn: number; peer: string }
  | { t: 'rx'; now: number; conn: number }
  /** The driver is handling a frame of this connection (its socket paused): silence is ours. */
  | { t: 'busy'; conn: number; busy: boolean }
  | { t: 'hello'; now: number; conn: number; msg: PrimaryHello }
  | { t: 'badFrame'; now: number; conn: number; error: string; code: ErrorCode }
  /** The store started (or refused) the session the core asked for. */
  | { t: 'sessionStarted'; now: number; conn: number; error: { code: ErrorCode; message: string } | null }
  | { t: 'closed'; now: number; conn: number; error: string | null }
  /** An operator's failover is running: no timer of ours must race it. */
  | { t: 'cancelFailover'; now: number }
  | { t: 'close'; now: number };

export type SecondaryAction =
  | { t: 'send'; conn: number; msg: ToPrimary }
  /** Close a connection; `graceful` lets what was sent (an error, say) reach the primary first. */
  | { t: 'close'; conn: number; reason: string; graceful: boolean }
  /**
   * Start the primary's session in the store: after a rollback and rebase
   * when `decision` is a resync; then answer `sessionStarted`.
   */
  | { t: 'startSession'; conn: number; hello: PrimaryHello; decision: Decision }
  /** Answer the hello with this node's state and the decision (the driver reads the store). */
  | { t: 'welcome'; conn: number; decision: Decision }
  /** Take over: this node becomes the primary of a new generation. */
  | { t: 'promote'; reason: string }
  | { t: 'primaryLost'; at: number; reason: string }
  | { t: 'primaryConnected' }
  | { t: 'log'; level: 'info' | 'warn'; msg: string };

interface Connection {
  id: number;
  peer: string;
  accepted: boolean;
  /** A hello is being handled (the store is starting the session). */
  starting: boolean;
  busy: boolean;
  lastRx: number;
  lastTx: number;
  lastTick: number;
}

export class SecondaryCore {
  connectedSince: number | null = null;
  lastError: string | null = null;
  /** Set when the primary went silent (heartbeat timeout) or its link dropped, until it is back. */
  primaryLost: { at: number; reason: string } | null = null;
  /** The last primary this node refused (stale, split brain), until one is accepted. */
  refusal: { at: number; code: ErrorCode; message: string } | null = null;
  /** What was decided at the last accepted hello. */
  decision: Decision | null = null;
  /** Where the current primary connects from. */
  peer: string | null = null;
  private conn: Connection | null = null;
  private failoverAt: number | null = null;
  private stopped = false;

  constructor(
    private readonly cfg: SecondaryCoreConfig,
    private readonly view: SecondaryView,
  ) {}

  /** The primary's connection is up and its session started. */
  get connected(): boolean {
    return this.conn?.accepted === true;
  }

  /** Frames other than a hello are taken only on an accepted connection. */
  accepting(conn: number): boolean {
    return this.conn?.id === conn && this.conn.accepted;
  }

  get failoverPending(): boolean {
    return this.failoverAt !== null;
  }

  nextDeadline(): number | null {
    const ds: number[] = [];
    if (this.failoverAt !== null) ds.push(this.failoverAt);
    if (this.conn) ds.push(this.conn.lastTick + Math.min(this.cfg.heartbeat.intervalMs, 50));
    return ds.length ? Math.min(...ds) : null;
  }

  step(ev: SecondaryEvent): SecondaryAction[] {
    const out: SecondaryAction[] = [];
    switch (ev.t) {
      case 'tick':
        this.tick(ev.now, out);
        break;
      case 'accepted':
        if (this.stopped) {
          out.push({ t: 'close', conn: ev.conn, reason: 'shutting down', graceful: false });
          break;
        }
        // The newest connection from the primary wins: an old one is a half-dead leftover.
        if (this.conn) {
          out.push({ t: 'log', level: 'info', msg: 'a new replication connection replaces the old one' });
          out.push({ t: 'close', conn: this.conn.id, reason: 'replaced', graceful: false });
          this.lost(ev.now, 'replaced by a new connection', out);
        }
        this.conn = {
          id: ev.conn,
          peer: ev.peer,
          accepted: false,
          starting: false,
          busy: false,
          lastRx: ev.now,
          lastTx: ev.now,
          lastTick: ev.now,
        };
        this.peer = ev.peer;
        break;
      case 'rx':
        if (this.conn?.id === ev.conn) this.conn.lastRx = ev.now;
        break;
      case 'busy':
        if (this.conn?.id === ev.conn) this.conn.busy = ev.busy;
        break;
      case 'hello':
        if (this.conn?.id === ev.conn) this.hello(ev.now, this.conn, ev.msg, out);
        break;
      case 'badFrame':
        if (this.conn?.id !== ev.conn) break;
        this.lastError = ev.error;
        out.push({ t: 'log', level: 'info', msg: ev.error });
        // Say why before closing: a message that fails validation is the primary's bug to see.
        out.push({ t: 'send', conn: ev.conn, msg: { t: 'error', code: ev.code, message: ev.error } });
        out.push({ t: 'close', conn: ev.conn, reason: ev.error, graceful: true });
        break;
      case 'sessionStarted': {
        const c = this.conn;
        if (c?.id !== ev.conn || !c.starting) break;
        c.starting = false;
        if (ev.error) {
          this.refuse(ev.now, c, ev.error.code, ev.error.message, out);
          break;
        }
        const decision = this.decision!;
        c.accepted = true;
        this.connectedSince = ev.now;
        this.lastError = null;
        this.refusal = null;
        this.primaryLost = null;
        out.push({ t: 'welcome', conn: c.id, decision });
        out.push({
          t: 'log',
          level: 'info',
          msg: `primary connected from ${c.peer}: ${decision.action}${'mode' in decision ? ` (${decision.mode})` : ''}: ${decision.reason}`,
        });
        if (this.failoverAt !== null) {
          this.failoverAt = null;
          out.push({ t: 'log', level: 'info', msg: 'the primary is back: failover cancelled' });
        }
        out.push({ t: 'primaryConnected' });
        break;
      }
      case 'closed':
        if (this.conn?.id === ev.conn) {
          if (ev.error && !this.lastError) this.lastError = ev.error;
          this.lost(ev.now, this.lastError ?? 'connection closed', out);
        }
        break;
      case 'cancelFailover':
        this.failoverAt = null;
        break;
      case 'close':
        this.stopped = true;
        this.failoverAt = null;
        if (this.conn) out.push({ t: 'close', conn: this.conn.id, reason: 'shutting down', graceful: false });
        this.conn = null;
        break;
    }
    return out;
  }

  /** The current connection is gone; if it was the primary's, the primary is lost. */
  private lost(now: number, reason: string, out: SecondaryAction[]): void {
    const c = this.conn!;
    this.conn = null;
    if (!c.accepted) return;
    this.connectedSince = null;
    this.primaryLost = { at: now, reason };
    out.push({ t: 'log', level: 'info', msg: `primary lost: ${reason}` });
    out.push({ t: 'primaryLost', at: now, reason });
    if (this.cfg.failover === 'auto' && !this.view.promoted() && this.failoverAt === null && !this.stopped) {
      this.failoverAt = now + this.cfg.failoverGraceMs;
      out.push({
        t: 'log',
        level: 'warn',
        msg: `primary lost (${reason}); promoting in ${this.cfg.failoverGraceMs} ms unless it comes back`,
      });
    }
  }

  private tick(now: number, out: SecondaryAction[]): void {
    const c = this.conn;
    if (c) {
      const hb = this.cfg.heartbeat;
      // Frozen, or not reading because a frame is being handled: the silence is ours.
      if (now - c.lastTick > hb.timeoutMs || c.busy || c.starting) c.lastRx = now;
      c.lastTick = now;
      const silent = now - c.lastRx;
      if (silent > hb.timeoutMs) {
        this.lastError = `heartbeat timeout: nothing from the primary for ${Math.round(silent)} ms`;
        out.push({ t: 'close', conn: c.id, reason: this.lastError, graceful: false });
        this.lost(now, this.lastError, out);
      } else if (now - c.lastTx >= hb.intervalMs) {
        c.lastTx = now;
        out.push({ t: 'send', conn: c.id, msg: { t: 'beat' } });
      }
    }
    if (this.failoverAt !== null && now >= this.failoverAt) {
      this.failoverAt = null;
      if (!this.view.promoted() && !this.connected)
        out.push({ t: 'promote', reason: `automatic failover: primary lost (${this.primaryLost?.reason})` });
    }
  }

  /**
   * The primary introduced itself: compare generation histories and decide
   * (failover/history.ts): carry on, resynchronise (after dropping everything
   * uncommitted), or refuse — a stale primary (ESTALE: it fences itself) or
   * split brain (ESPLIT: both sides report it, neither is touched).
   */
  private hello(now: number, c: Connection, msg: PrimaryHello, out: SecondaryAction[]): void {
    if (c.accepted || c.starting) {
      this.refuse(now, c, 'EPROTO', 'a second hello on the same connection', out);
      return;
    }
    if (msg.proto !== LINK_PROTOCOL) {
      out.push({
        t: 'send',
        conn: c.id,
        msg: {
          t: 'error',
          code: 'EPROTO',
          message:
            `link protocol ${msg.proto} is not ${LINK_PROTOCOL} (this secondary's): ` +
            `run the same colo-blk version on both nodes`,
        },
      });
      out.push({ t: 'close', conn: c.id, reason: 'protocol version', graceful: true });
      return;
    }
    if (msg.size !== this.view.size)
      return this.refuse(
        now,
        c,
        'EUSAGE',
        `the primary's disk is ${msg.size} bytes but this secondary's image is ${this.view.size}: ` +
          `both images must have the same size`,
        out,
      );
    let decision: Decision;
    try {
      decision = decide(msg.history, this.view.history(), {
        syncing: this.view.syncing(),
        primaryNeedsResync: msg.needsResync,
      });
    } catch (err) {
      return this.refuse(now, c, 'EPROTO', (err as Error).message, out);
    }
    if (decision.action === 'refuse')
      return this.refuse(now, c, decision.kind === 'split-brain' ? 'ESPLIT' : 'ESTALE', decision.reason, out);
    const promoted = this.view.promoted();
    if (promoted)
      return this.refuse(
        now,
        c,
        'ESTALE',
        `this node was promoted to primary (generation ${promoted.generation}) and serves its own writes; ` +
          `stop it and start it as a secondary to re-protect it from this primary`,
        out,
      );
    this.decision = decision;
    c.starting = true;
    out.push({ t: 'startSession', conn: c.id, hello: msg, decision });
  }

  /** A bare hello (so the primary reads the size), the error, then the end of the stream. */
  private refuse(now: number, c: Connection, code: ErrorCode, message: string, out: SecondaryAction[]): void {
    this.lastError = message;
    this.refusal = { at: now, code, message };
    out.push({ t: 'log', level: 'info', msg: `refused the primary at ${c.peer}: ${message}` });
    out.push({ t: 'send', conn: c.id, msg: { t: 'hello', proto: LINK_PROTOCOL, size: this.view.size } });
    out.push({ t: 'send', conn: c.id, msg: { t: 'error', code, message } });
    out.push({ t: 'close', conn: c.id, reason: message, graceful: true });
  }
}
