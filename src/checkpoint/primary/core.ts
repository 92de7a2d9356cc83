/**
 * The primary's replication core: a deterministic state machine, in the shape
 * of etcd-raft's. It owns the decisions of the primary's side of the link:
 * when to connect and back off, heartbeats and loss detection, what the
 * secondary's hello means (carry on, resynchronise, deposed, refused), the
 * waits for "durable" and "committed" and their timeouts, going on alone, and
 * the resync plan. It does no I/O: `step(event)` returns actions, which a
 * driver (link.ts PrimaryLink, primary/replica.ts) carries out, persisting
 * before it sends or acknowledges; time comes in with every event, and
 * `nextDeadline()` says when the core next needs a tick.
 */
import { ColoError } from '../../errors.js';
import { mergeRanges, type Range } from '../../failover/activity.js';
import type { Decision, Generation, SyncMode } from '../../failover/history.js';
import type { ResyncPlan } from '../../failover/reprotect/resync.js';
import type { SyncMark, ToPrimary } from '../link/messages.js';

export interface HeartbeatOptions {
  /** How often each side sends a beat when it has nothing else to send. */
  intervalMs: number;
  /** Silence after which the peer is declared lost. */
  timeoutMs: number;
}

/** Defaults that detect a dead peer within a second. */
export const DEFAULT_HEARTBEAT: HeartbeatOptions = { intervalMs: 200, timeoutMs: 800 };

export interface PrimaryCoreConfig {
  size: number;
  host: string;
  port: number;
  heartbeat: HeartbeatOptions;
  reconnectMinMs: number;
  reconnectMaxMs: number;
  /** After the secondary has been unreachable this long, go on alone (a new generation). */
  loneAfterMs: number;
}

/** How this primary stands with its secondary. */
export type PeerState = 'connecting' | 'syncing' | 'protected' | 'down' | 'lone' | 'refused' | 'deposed';
export type LinkState = 'connecting' | 'connected' | 'down';

/** What the secondary decided at the hello (see failover/history.ts decide()). */
export interface PeerHello {
  decision: Decision;
  /** Regions the secondary itself may have written (an old primary's unfinished epochs): to roll back. */
  hot: Range[];
  history: Generation[];
}

export type WaitKind = 'durable' | 'commit';

export type PrimaryEvent =
  | { t: 'start'; now: number }
  | { t: 'tick'; now: number }
  | { t: 'connected'; now: number; conn: number }
  | { t: 'closed'; now: number; conn: number; error: string | null }
  /** Bytes arrived on the connection (any bytes are a sign of life, even mid-frame). */
  | { t: 'rx'; now: number; conn: number }
  | { t: 'received'; now: number; conn: number; msg: ToPrimary }
  /** A frame from the peer failed validation. */
  | { t: 'badFrame'; now: number; conn: number; error: string }
  /** A wait for an epoch to be durable or committed on the secondary. */
  | {
      t: 'wait';
      now: number;
      id: number;
      kind: WaitKind;
      epoch: number;
      timeoutMs: number;
      resync: boolean;
      /** A commit of a resync carries its mark. */
      sync?: SyncMark;
    }
  /** The log cannot carry the secondary any more: everything waiting fails; a new hello asks for a resync. */
  | { t: 'outOfSync'; now: number; reason: string }
  /** Point the link at another secondary (re-protection). */
  | { t: 'retarget'; now: number; host: string; port: number }
  /** Drop the connection and connect again (a new hello, so the secondary decides afresh). */
  | { t: 'reconnect'; now: number; reason: string }
  | { t: 'resyncDone'; now: number }
  | { t: 'resyncFailed'; now: number; error: string }
  | { t: 'close'; now: number };

export type PrimaryAction =
  | { t: 'connect'; conn: number; host: string; port: number }
  | { t: 'close'; conn: number; reason: string }
  /** Send the hello (the driver knows the log's epoch and session, and the history). */
  | { t: 'hello'; conn: number }
  | { t: 'beat'; conn: number }
  /** Ask the secondary to commit through `epoch`. */
  | { t: 'commit'; conn: number; epoch: number; sync?: SyncMark }
  /**
   * The link is up: forget what the secondary holds durably (through
   * `release`), and stream the log again from the oldest epoch still held.
   */
  | { t: 'linkUp'; conn: number; release: number; resync: boolean }
  /**
   * The secondary holds `epoch` (and older) durably: their resend buffers can
   * go; with `keepSpilled`, those that spilled into a file stay until the
   * commit (removing a large file costs milliseconds of kernel time, which
   * must not fall inside a checkpoint's phases).
   */
  | { t: 'release'; epoch: number; keepSpilled?: boolean }
  | { t: 'resolve'; id: number; epoch: number; overlayDiscarded?: { records: number; bytes: number } }
  | { t: 'reject'; id: number; error: ColoError }
  /** A deposed primary never writes again (one writer per generation). */
  | { t: 'fence'; reason: string }
  /** Split brain: the secondary refused this primary; it serves on alone until an operator decides. */
  | { t: 'refused'; reason: string }
  /** Carry on alone: mint a generation and stop holding the log (the driver persists both). */
  | { t: 'lone'; reason: string; committed: number }
  /** Resynchronise the secondary (the decision's mode; the regions it may have written itself). */
  | { t: 'resync'; mode: SyncMode; peerHot: Range[] }
  /** The current generation has a synchronised secondary (recorded in the history). */
  | { t: 'protected' }
  /** The link is down: everything waiting for room must go on (a lost secondary never stalls the PVM). */
  | { t: 'down'; reason: string | null }
  | { t: 'log'; level: 'info' | 'warn'; msg: string };

interface Wait {
  id: number;
  kind: WaitKind;
  epoch: number;
  deadline: number;
  timeoutMs: number;
}

export class PrimaryCore {
  // Link
  linkState: LinkState = 'connecting';
  peerState: PeerState = 'connecting';
  lastError: string | null = null;
  connectedSince: number | null = null;
  downSince: number | null = null;
  reconnects = 0;
  /** Highest epoch the secondary reported durable / committed. */
  durableEpoch = 0;
  committedEpoch = 0;
  /** The secondary's answer at the last hello. */
  peer: PeerHello | null = null;
  /** Set when the secondary was promoted and refused this primary. */
  deposed: string | null = null;
  /** Set when the secondary refused this primary for split brain (no reconnects until re-protected). */
  refused: string | null = null;
  private conn: number | null = null;
  private nextConn = 1;
  private ready = false;
  /** The TCP connection is established (the hello may still be unanswered). */
  private tcpUp = false;
  private lastRx = 0;
  private lastTx = 0;
  private lastTick = 0;
  private retryMs: number;
  private retryAt: number | null = null;
  private loneAt: number | null = null;
  private stopped = false;
  /** The last 'error' frame of the current connection (it says more than the reset that follows). */
  private peerError: string | null = null;
  private outOfSync: string | null = null;
  private waits: Wait[] = [];

  constructor(private readonly cfg: PrimaryCoreConfig) {
    this.retryMs = cfg.reconnectMinMs;
  }

  get connected(): boolean {
    return this.ready;
  }

  get target(): { host: string; port: number } {
    return { host: this.cfg.host, port: this.cfg.port };
  }

  /** When the core next needs a tick (null: nothing pending). */
  nextDeadline(): number | null {
    const ds: number[] = [];
    if (this.retryAt !== null) ds.push(this.retryAt);
    if (this.loneAt !== null) ds.push(this.loneAt);
    for (const w of this.waits) ds.push(w.deadline);
    if (this.tcpUp) ds.push(this.lastTick + Math.min(this.cfg.heartbeat.intervalMs, 50));
    return ds.length ? Math.min(...ds) : null;
  }

  step(ev: PrimaryEvent): PrimaryAction[] {
    const out: PrimaryAction[] = [];
    switch (ev.t) {
      case 'start':
        this.downSince = ev.now;
        this.lastTick = ev.now;
        this.connect(out);
        break;
      case 'tick':
        this.tick(ev.now, out);
        break;
      case 'connected':
        if (ev.conn !== this.conn) break;
        this.tcpUp = true;
        this.lastRx = this.lastTx = this.lastTick = ev.now;
        out.push({ t: 'hello', conn: ev.conn });
        break;
      case 'rx':
        if (ev.conn === this.conn) this.lastRx = ev.now;
        break;
      case 'received':
        if (ev.conn !== this.conn) break;
        this.lastRx = ev.now;
        this.receive(ev.now, ev.conn, ev.msg, out);
        break;
      case 'badFrame':
        if (ev.conn !== this.conn) break;
        this.lastError = `bad frame from the secondary: ${ev.error}`;
        out.push({ t: 'log', level: 'info', msg: this.lastError });
        out.push({ t: 'close', conn: ev.conn, reason: this.lastError });
        break;
      case 'closed':
        if (ev.conn === this.conn) this.onClosed(ev.now, ev.error, out);
        break;
      case 'wait':
        this.wait(ev, out);
        break;
      case 'outOfSync':
        this.outOfSync = ev.reason;
        this.rejectAll(
          new ColoError('EIO', `the secondary is out of sync (${ev.reason}); a resync is required`),
          out,
        );
        break;
      case 'retarget':
        this.cfg.host = ev.host;
        this.cfg.port = ev.port;
        this.refused = null;
        this.stopped = false;
        this.retryMs = this.cfg.reconnectMinMs;
        if (this.peerState === 'refused') this.peerState = 'connecting';
        if (this.conn !== null)
          out.push({ t: 'close', conn: this.conn, reason: 're-protecting another secondary' });
        else {
          this.retryAt = null;
          this.connect(out);
        }
        break;
      case 'reconnect':
        if (this.conn === null) break;
        this.lastError = ev.reason;
        out.push({ t: 'close', conn: this.conn, reason: ev.reason });
        break;
      case 'resyncDone':
        this.outOfSync = null;
        this.peerState = 'protected';
        out.push({ t: 'protected' });
        break;
      case 'resyncFailed':
        if (this.peerState === 'syncing') this.peerState = this.ready ? 'connecting' : 'down';
        // A failure with the link still up (a refused commit, say) restarts through a new hello.
        if (this.ready && this.conn !== null)
          out.push({ t: 'close', conn: this.conn, reason: `resync failed: ${ev.error}` });
        break;
      case 'close':
        this.stopped = true;
        this.retryAt = null;
        this.loneAt = null;
        this.rejectAll(new ColoError('ESHUTDOWN', 'the primary is shutting down'), out);
        if (this.conn !== null) out.push({ t: 'close', conn: this.conn, reason: 'shutting down' });
        break;
    }
    return out;
  }

  private connect(out: PrimaryAction[]): void {
    if (this.stopped) return;
    this.linkState = 'connecting';
    this.peerError = null;
    this.conn = this.nextConn++;
    out.push({ t: 'connect', conn: this.conn, host: this.cfg.host, port: this.cfg.port });
  }

  private tick(now: number, out: PrimaryAction[]): void {
    if (this.conn !== null && this.tcpUp) {
      const hb = this.cfg.heartbeat;
      // This process was frozen (stopped, swapped out): the silence is ours, not the peer's.
      if (now - this.lastTick > hb.timeoutMs) this.lastRx = now;
      const silent = now - this.lastRx;
      if (silent > hb.timeoutMs) {
        this.lastError = `heartbeat timeout: nothing from the secondary for ${Math.round(silent)} ms`;
        out.push({ t: 'close', conn: this.conn, reason: this.lastError });
      } else if (this.ready && now - this.lastTx >= hb.intervalMs) {
        this.lastTx = now;
        out.push({ t: 'beat', conn: this.conn });
      }
    }
    this.lastTick = now;
    if (this.retryAt !== null && now >= this.retryAt) {
      this.retryAt = null;
      this.reconnects++;
      this.connect(out);
    }
    if (this.loneAt !== null && now >= this.loneAt) {
      this.loneAt = null;
      if (!this.ready && !this.deposed && this.peerState !== 'lone') {
        const reason = `the secondary has been unreachable for ${this.cfg.loneAfterMs} ms (${this.lastError ?? 'down'})`;
        this.peerState = 'lone';
        out.push({ t: 'lone', reason, committed: this.committedEpoch });
      }
    }
    for (const w of [...this.waits])
      if (now >= w.deadline) {
        this.waits.splice(this.waits.indexOf(w), 1);
        const what = w.kind === 'durable' ? 'make durable' : 'commit';
        out.push({
          t: 'reject',
          id: w.id,
          error: new ColoError(
            'EIO',
            `timed out after ${w.timeoutMs} ms waiting for the secondary to ${what} epoch ${w.epoch}`,
          ),
        });
      }
  }

  private receive(now: number, conn: number, msg: ToPrimary, out: PrimaryAction[]): void {
    switch (msg.t) {
      case 'beat':
      case 'hash':
        return;
      case 'hello': {
        if (msg.size !== this.cfg.size) {
          this.lastError =
            `the secondary's disk is ${msg.size} bytes but the primary's is ${this.cfg.size}: ` +
            `both images must have the same size`;
          out.push({ t: 'log', level: 'info', msg: this.lastError });
          out.push({ t: 'close', conn, reason: this.lastError });
          return;
        }
        // A bare hello is the prelude of a refusal (the error frame follows).
        if (!msg.decision) return;
        this.ready = true;
        this.linkState = 'connected';
        this.connectedSince = now;
        this.downSince = null;
        this.lastError = null;
        this.retryMs = this.cfg.reconnectMinMs;
        this.loneAt = null;
        const decision = msg.decision;
        this.peer = { decision, hot: msg.hot ?? [], history: msg.history ?? [] };
        let release: number;
        if (decision.action === 'resync') {
          // The secondary dropped everything uncommitted and restarted its numbering just
          // below our open epoch: sealed epochs are not resent (the resync covers them).
          release = Infinity;
          this.outOfSync = null;
        } else {
          this.durableEpoch = Math.max(this.durableEpoch, msg.durable ?? 0);
          this.committedEpoch = Math.max(this.committedEpoch, msg.committed ?? 0);
          release = this.durableEpoch;
        }
        out.push({ t: 'linkUp', conn, release, resync: decision.action === 'resync' });
        out.push({
          t: 'log',
          level: 'info',
          msg: `link up: secondary at seq ${msg.seq}, durable epoch ${msg.durable}: ${decision.action}`,
        });
        if (decision.action === 'none') {
          this.peerState = 'protected';
          out.push({ t: 'protected' });
        } else if (decision.action === 'resync') {
          this.peerState = 'syncing';
          out.push({
            t: 'log',
            level: 'info',
            msg: `resynchronising the secondary (${decision.mode}): ${decision.reason}`,
          });
          out.push({ t: 'resync', mode: decision.mode, peerHot: this.peer.hot });
        }
        return;
      }
      case 'durable':
        this.durableEpoch = Math.max(this.durableEpoch, msg.e);
        this.settle('durable', msg.e, out);
        // What a reconnect would do (it releases through the durable epoch the
        // secondary reports): nothing resends an epoch the secondary holds
        // durably. Releasing now rather than at commit halves the memory the
        // resend buffer needs under load (the next epoch fills while this one
        // commits).
        out.push({ t: 'release', epoch: msg.e, keepSpilled: true });
        return;
      case 'committed':
        this.committedEpoch = Math.max(this.committedEpoch, msg.e);
        this.settle('commit', msg.e, out, msg.overlayDiscarded);
        out.push({ t: 'release', epoch: msg.e });
        return;
      case 'error': {
        if (msg.code === 'ESTALE') {
          // The secondary was promoted: this node's generation is over. Fence it.
          this.deposed = msg.message;
          this.lastError = `deposed: ${msg.message}`;
          this.peerState = 'deposed';
          this.stopped = true; // no point reconnecting
          this.loneAt = null;
          out.push({ t: 'log', level: 'info', msg: this.lastError });
          out.push({ t: 'fence', reason: msg.message });
          this.rejectAll(new ColoError('ESTALE', `the secondary refused this primary: ${msg.message}`), out);
          out.push({ t: 'close', conn, reason: this.lastError });
          return;
        }
        if (msg.code === 'ESPLIT') {
          this.refused = msg.message;
          this.lastError = msg.message;
          this.peerState = 'refused';
          this.stopped = true; // an operator must decide; reconnecting would only repeat the refusal
          this.loneAt = null;
          out.push({ t: 'log', level: 'warn', msg: `the secondary refused this primary: ${msg.message}` });
          out.push({ t: 'refused', reason: msg.message });
          this.rejectAll(new ColoError('ESPLIT', msg.message), out);
          out.push({ t: 'close', conn, reason: msg.message });
          return;
        }
        const err = new ColoError(
          msg.code,
          `secondary: ${msg.message}${msg.e !== undefined ? ` (epoch ${msg.e})` : ''}`,
        );
        this.lastError = this.peerError = err.message;
        out.push({ t: 'log', level: 'info', msg: err.message });
        const from = msg.e ?? -Infinity;
        for (const w of [...this.waits])
          if (w.epoch >= from) {
            this.waits.splice(this.waits.indexOf(w), 1);
            out.push({ t: 'reject', id: w.id, error: err });
          }
        return;
      }
    }
  }

  private onClosed(now: number, error: string | null, out: PrimaryAction[]): void {
    // The secondary's own reason (an 'error' frame) says more than the reset that follows it.
    if (error && !this.peerError && !this.lastError) this.lastError = error;
    const wasReady = this.ready;
    this.conn = null;
    this.ready = false;
    this.tcpUp = false;
    if (this.linkState === 'connected' || wasReady)
      out.push({ t: 'log', level: 'info', msg: `link down: ${this.lastError ?? 'connection closed'}` });
    this.linkState = 'down';
    this.connectedSince = null;
    this.downSince ??= now;
    this.rejectAll(
      new ColoError('ECONNECT', `replication link lost: ${this.lastError ?? 'connection closed'}`),
      out,
    );
    out.push({ t: 'down', reason: this.lastError });
    if (this.peerState === 'protected' || this.peerState === 'syncing' || this.peerState === 'connecting')
      this.peerState = 'down';
    if (
      this.loneAt === null &&
      !this.stopped &&
      Number.isFinite(this.cfg.loneAfterMs) &&
      this.peerState !== 'lone' &&
      !this.deposed &&
      !this.refused
    )
      this.loneAt = now + this.cfg.loneAfterMs;
    if (this.stopped) return;
    this.retryAt = now + this.retryMs;
    this.retryMs = Math.min(this.retryMs * 2, this.cfg.reconnectMaxMs);
  }

  private usable(resync: boolean): ColoError | null {
    if (this.outOfSync !== null && !resync)
      return new ColoError('EIO', `the secondary is out of sync (${this.outOfSync}); a resync is required`);
    if (!this.ready)
      return new ColoError(
        'ECONNECT',
        `the secondary is not connected (${this.lastError ?? this.linkState}); epoch data is kept and resent on reconnect`,
      );
    return null;
  }

  private wait(ev: Extract<PrimaryEvent, { t: 'wait' }>, out: PrimaryAction[]): void {
    const done = ev.kind === 'durable' ? this.durableEpoch : this.committedEpoch;
    if (done >= ev.epoch) {
      out.push({ t: 'resolve', id: ev.id, epoch: ev.epoch });
      return;
    }
    const err = this.usable(ev.resync);
    if (err) {
      out.push({ t: 'reject', id: ev.id, error: err });
      return;
    }
    this.waits.push({
      id: ev.id,
      kind: ev.kind,
      epoch: ev.epoch,
      deadline: ev.now + ev.timeoutMs,
      timeoutMs: ev.timeoutMs,
    });
    if (ev.kind === 'commit') out.push({ t: 'commit', conn: this.conn!, epoch: ev.epoch, sync: ev.sync });
  }

  private settle(
    kind: WaitKind,
    epoch: number,
    out: PrimaryAction[],
    overlayDiscarded?: { records: number; bytes: number },
  ): void {
    for (const w of [...this.waits])
      if (w.kind === kind && w.epoch <= epoch) {
        this.waits.splice(this.waits.indexOf(w), 1);
        out.push({ t: 'resolve', id: w.id, epoch: w.epoch, overlayDiscarded });
      }
  }

  private rejectAll(err: ColoError, out: PrimaryAction[]): void {
    for (const w of this.waits.splice(0)) out.push({ t: 'reject', id: w.id, error: err });
  }
}

/**
 * The resync plan: a full sync compares the whole disk; an incremental one
 * sends what this node knows it wrote (its exact record) and compares what
 * either side may have written that no record holds exactly: this node's
 * unknown extents (failover/activity.ts) and the peer's hot ones. After an
 * interrupted resync nothing is sent blind: its ranges and every hot extent
 * of this node are compared, which then only costs their hashes.
 */
export function resyncPlan(
  mode: SyncMode,
  size: number,
  known: { exact: Range[]; hot: Range[]; unknown: Range[]; peerHot: Range[]; pending: Range[] },
): ResyncPlan {
  if (mode === 'full') return { mode, send: [], compare: [{ offset: 0, length: size }] };
  if (known.pending.length)
    return { mode, send: [], compare: mergeRanges([...known.hot, ...known.peerHot, ...known.pending]) };
  return { mode, send: known.exact, compare: mergeRanges([...known.unknown, ...known.peerHot]) };
}
