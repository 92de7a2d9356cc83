/**
 * One client connection through the comparer, with its connection to the
 * PVM and (when protected) its connection to the SVM.
 *
 * Notes on the design:
 * - Positions are absolute per stream. The PVM's output is compared with the
 *   SVM's from two bases set at the last checkpoint (`pvmBase`, `svmBase`):
 *   PVM byte `pvmBase + i` must equal SVM byte `svmBase + i`. `matched` bytes
 *   have; the PVM's are released (`released = pvmBase + matched` in colo
 *   mode), the SVM's dropped. Nothing else of the PVM's output leaves before
 *   a checkpoint releases it.
 * - Comparison is by byte stream, never by read or segment: the two sides
 *   deliver the same bytes in different chunks.
 * - FIN is a stream event at a position and compares like a byte; an RST (a
 *   reset, an error) is reported to the comparer, which decides (a dead PVM
 *   means failover).
 * - Client input goes to both sides. It is also kept since the last
 *   checkpoint (bounded), so that an SVM paired later can be given this
 *   connection from the PVM's position at the pairing checkpoint.
 * - Flow control: a client that does not read pauses this session's reads
 *   from both sides (never another session's); a side whose unmatched bytes
 *   reach the queue bound is paused and a checkpoint is asked for. Data is
 *   never dropped. While a checkpoint drains, every side is read.
 */
import type net from 'node:net';
import { firstDifference, StreamBuffer } from './stream.js';

export type Mode = 'colo' | 'remus' | 'none';
export type CheckpointReason =
  'mismatch' | 'timeout' | 'queue' | 'reset' | 'interval' | 'pending' | 'manual' | 'pair';
export const CHECKPOINT_REASONS: readonly CheckpointReason[] = [
  'mismatch',
  'timeout',
  'queue',
  'reset',
  'interval',
  'pending',
  'manual',
  'pair',
];

/** Where a VM stands on one connection (bytes of the client's stream it took, bytes it answered). */
export interface StreamPosition {
  consumed: number;
  written: number;
}
/** By the VM's name for the connection: the comparer's local port. */
export type Positions = Record<string, StreamPosition>;

export interface SessionLimits {
  /** Unmatched (colo) or held (remus) bytes per side before a checkpoint is asked for and reading pauses. */
  queueBytes: number;
  /** Bytes waiting for a slow client before this session stops reading from the VMs. */
  clientHighWater: number;
  /** Client input kept for a later pairing. */
  keepBytes: number;
}

export interface SessionHost {
  readonly mode: Mode;
  /** Paired with a standby SVM (remus): output is held though this session has no SVM connection. */
  readonly standby: boolean;
  readonly draining: boolean;
  readonly limits: SessionLimits;
  now(): number;
  requestCheckpoint(reason: CheckpointReason, s: Session, detail: string): void;
  /** A side's connection ended or failed: the comparer checks whether that VM lives. */
  sideEvent(which: 'pvm' | 'svm', s: Session, detail: string): void;
  sessionClosed(s: Session): void;
  dataArrived(): void;
  released(bytes: number): void;
  /** This session goes on without its SVM connection (why): a failover resets it. */
  unprotected(s: Session, why: string): void;
}

export class Side {
  readonly buf = new StreamBuffer();
  ended = false;
  failed: string | null = null;
  /** When the oldest output not yet matched (bytes or FIN) arrived; 0: none. */
  unmatchedSince = 0;
  overQueue = false;
  paused = false;
  /** Set when the comparer closes this side on purpose. */
  dropped = false;

  constructor(
    readonly socket: net.Socket,
    /** Position in the client's stream where this side's input begins. */
    readonly inputStart: number,
  ) {}

  /** The VM's name for this connection. */
  get port(): number {
    return this.socket.localPort ?? -1;
  }

  setPaused(p: boolean): void {
    if (p === this.paused) return;
    this.paused = p;
    if (p) this.socket.pause();
    else this.socket.resume();
  }

  drop(): void {
    this.dropped = true;
    this.socket.destroy();
  }
}

/**
 * What a checkpoint covers of a PVM that runs again before the cut: its output
 * up to `to`, and its FIN or reset only if it had arrived when it resumed
 * (one that arrives later may come from the PVM's run past the checkpoint).
 */
export interface Frozen {
  to: number;
  ended: boolean;
  failed: boolean;
}

export class Session {
  pvm: Side;
  svm: Side | null = null;
  pvmBase = 0;
  svmBase = 0;
  matched = 0;
  released = 0;
  /** Why the two outputs parted since the last checkpoint (null: they have not). */
  diverged: string | null = null;
  /** A checkpoint was asked for on this session's behalf since the last cut. */
  requested = false;
  finReleased = false;
  clientEnded = false;
  clientSlow = false;
  clientIn = 0;
  closed = false;
  /**
   * A checkpoint's PVM runs again before its cut (Comparer.freeze): what of
   * its output that checkpoint covers. Null: no such checkpoint under way.
   */
  frozen: Frozen | null = null;
  readonly kept = new StreamBuffer();
  readonly openedAt: number;

  constructor(
    readonly id: number,
    readonly client: net.Socket,
    pvm: net.Socket,
    svm: net.Socket | null,
    private readonly host: SessionHost,
  ) {
    this.openedAt = host.now();
    this.pvm = this.wire(new Side(pvm, 0));
    if (svm) this.svm = this.wire(new Side(svm, 0));
    client.on('data', (d: Buffer) => this.fromClient(d));
    client.on('end', () => {
      this.clientEnded = true;
      for (const s of this.sides()) if (!s.socket.destroyed) s.socket.end();
    });
    client.on('drain', () => {
      this.clientSlow = false;
      const now = host.now();
      for (const s of this.sides()) if (s.unmatchedSince) s.unmatchedSince = now;
      this.updateFlow();
    });
    client.on('error', () => {});
    client.on('close', () => this.close());
  }

  sides(): Side[] {
    return this.svm ? [this.pvm, this.svm] : [this.pvm];
  }

  private wire(side: Side): Side {
    const s = side.socket;
    s.on('data', (d: Buffer) => {
      side.buf.push(d);
      this.step();
      this.host.dataArrived();
    });
    s.on('end', () => {
      side.ended = true;
      this.step();
      this.host.dataArrived();
      if (!side.dropped) this.host.sideEvent(this.which(side), this, 'FIN');
    });
    s.on('drain', () => this.updateClientFlow());
    s.on('error', (err: Error) => {
      side.failed ??= err.message;
    });
    s.on('close', (hadError: boolean) => {
      if (side.dropped || this.closed) return;
      if (hadError || !side.ended) {
        side.failed ??= 'closed';
        this.host.dataArrived();
        this.host.sideEvent(this.which(side), this, side.failed);
      }
    });
    return side;
  }

  private which(side: Side): 'pvm' | 'svm' {
    return side === this.pvm ? 'pvm' : 'svm';
  }

  private fromClient(d: Buffer): void {
    this.clientIn += d.length;
    this.kept.push(d);
    if (this.kept.held > this.host.limits.keepBytes)
      this.kept.dropTo(this.kept.end - this.host.limits.keepBytes);
    for (const s of this.sides()) if (!s.socket.destroyed) s.socket.write(d);
    this.updateClientFlow();
  }

  /** Stop reading the client while a side cannot take its bytes. */
  private updateClientFlow(): void {
    const hw = this.host.limits.clientHighWater;
    const full = this.sides().some((s) => !s.socket.destroyed && s.socket.writableLength > hw);
    if (full) this.client.pause();
    else this.client.resume();
  }

  /** Read a side unless its client is slow or its queue is full (always while a checkpoint drains). */
  updateFlow(): void {
    for (const s of this.sides()) s.setPaused(!this.host.draining && (this.clientSlow || s.overQueue));
  }

  /** Send the PVM's output up to `to` to the client. */
  private releaseTo(to: number): void {
    if (to <= this.released) return;
    let n = 0;
    for (const v of this.pvm.buf.views(this.released, to)) {
      if (!this.client.destroyed) this.client.write(v);
      n += v.length;
    }
    this.released = to;
    this.pvm.buf.dropTo(to);
    this.host.released(n);
    if (this.client.writableLength > this.host.limits.clientHighWater && !this.clientSlow) {
      this.clientSlow = true;
      this.updateFlow();
    }
  }

  private releaseFin(): void {
    if (this.finReleased) return;
    this.finReleased = true;
    if (!this.client.destroyed) this.client.end();
  }

  private diverge(why: string): void {
    this.diverged = why;
    this.ask('mismatch', why);
  }

  private ask(reason: CheckpointReason, detail: string): void {
    if (this.requested) return;
    this.requested = true;
    this.host.requestCheckpoint(reason, this, detail);
  }

  /** React to new bytes, FINs or resets. */
  step(): void {
    if (this.closed) return;
    const svm = this.svm;
    if ((!svm && !this.host.standby) || this.host.mode === 'none') {
      // Unprotected: pass the PVM's output through.
      this.releaseTo(this.pvm.buf.end);
      if (this.pvm.ended) this.releaseFin();
      else if (this.pvm.failed && !this.pvm.dropped) this.client.destroy();
      return;
    }
    if (this.host.mode === 'remus' || !svm) {
      // Everything is held until the next checkpoint.
      this.checkQueue(this.pvm, this.pvm.buf.end - this.released);
      return;
    }
    if (!this.diverged && !this.pvm.failed && !svm.failed) this.compare(svm);
    const p = this.pvmBase + this.matched;
    const s = this.svmBase + this.matched;
    const now = this.host.now();
    const pvmOpen = this.pvm.buf.end > p || (this.pvm.ended && !this.finReleased);
    const svmOpen = svm.buf.end > s || (svm.ended && !this.finReleased);
    this.pvm.unmatchedSince = pvmOpen ? this.pvm.unmatchedSince || now : 0;
    svm.unmatchedSince = svmOpen ? svm.unmatchedSince || now : 0;
    this.checkQueue(this.pvm, this.pvm.buf.end - p);
    this.checkQueue(svm, svm.buf.end - s);
  }

  private compare(svm: Side): void {
    const p = this.pvmBase + this.matched;
    const s = this.svmBase + this.matched;
    // While a checkpoint's PVM runs ahead of its cut, its output past the pause is the next
    // epoch's: it waits for the SVM's output from the checkpoint's state.
    const fz = this.frozen;
    const pvmEnd = fz ? Math.min(this.pvm.buf.end, fz.to) : this.pvm.buf.end;
    const n = Math.min(pvmEnd - p, svm.buf.end - s);
    if (n > 0) {
      const d = firstDifference(this.pvm.buf, p, svm.buf, s, n);
      const ok = d < 0 ? n : d;
      this.matched += ok;
      svm.buf.dropTo(this.svmBase + this.matched);
      this.releaseTo(this.pvmBase + this.matched);
      if (d >= 0) return this.diverge(`byte ${p + d} of the output differs`);
    }
    const pAt = this.pvmBase + this.matched;
    const sAt = this.svmBase + this.matched;
    const pDone = (fz ? fz.ended : this.pvm.ended) && this.pvm.buf.end === pAt;
    const sDone = svm.ended && svm.buf.end === sAt;
    if (pDone && sDone) this.releaseFin();
    else if (pDone && svm.buf.end > sAt) this.diverge(`the PVM closed at byte ${pAt}, the SVM sent more`);
    else if (sDone && this.pvm.buf.end > pAt)
      this.diverge(`the SVM closed at byte ${sAt}, the PVM sent more`);
  }

  private checkQueue(side: Side, n: number): void {
    const over = n > this.host.limits.queueBytes;
    if (over === side.overQueue) return;
    side.overQueue = over;
    this.updateFlow();
    if (over) this.ask('queue', `${n} bytes held on one side`);
  }

  /** The oldest unmatched output's age, for the comparer's timeout (0: nothing waits). */
  unmatchedAge(now: number): number {
    if (!this.svm || this.diverged || this.requested || this.clientSlow || this.host.mode !== 'colo')
      return 0;
    const t = [this.pvm.unmatchedSince, this.svm.unmatchedSince].filter((x) => x > 0);
    return t.length ? now - Math.min(...t) : 0;
  }

  askTimeout(detail: string): void {
    this.ask('timeout', detail);
  }

  /** Held PVM bytes (not released) and unmatched SVM bytes. */
  held(): { pvm: number; svm: number } {
    return {
      pvm: this.pvm.buf.end - this.released,
      svm: this.svm ? this.svm.buf.end - (this.svmBase + this.matched) : 0,
    };
  }

  /** Has every byte each VM reported written arrived (or will it never)? */
  arrived(pvmRep: Positions | null, svmRep: Positions | null): boolean {
    if (this.closed) return true;
    const ok = (side: Side | null, rep: Positions | null) => {
      if (!side || !rep || side.failed || side.ended) return true;
      const r = rep[side.port];
      return !r || side.buf.end >= r.written;
    };
    return ok(this.pvm, pvmRep) && ok(this.svm, svmRep);
  }

  /**
   * The checkpoint is decided: release the PVM's output up to what it had
   * written at the pause, discard the SVM's up to its pause, and compare
   * from there. Returns the SVM connection's new position in its own input
   * (for the load), if there is an SVM.
   */
  cut(pvmRep: Positions | null, svmRep: Positions | null): { port: number; target: number } | null {
    const pr = pvmRep?.[this.pvm.port];
    const fz = this.frozen;
    this.frozen = null;
    const pvmTo = Math.min(pvmRep ? (pr?.written ?? 0) : (fz?.to ?? this.pvm.buf.end), this.pvm.buf.end);
    this.releaseTo(Math.max(pvmTo, this.released));
    this.pvmBase = this.released;
    this.matched = 0;
    this.diverged = null;
    this.requested = false;
    this.pvm.unmatchedSince = 0;
    this.pvm.overQueue = false;
    const consumedAt = this.pvm.inputStart + (pr?.consumed ?? 0);
    if (pvmRep) this.kept.dropTo(Math.min(consumedAt, this.kept.end));
    let out: { port: number; target: number } | null = null;
    const svm = this.svm;
    if (svm) {
      const sr = svmRep?.[svm.port];
      const svmTo = svmRep ? Math.min(sr?.written ?? 0, svm.buf.end) : svm.buf.end;
      svm.buf.dropTo(svmTo);
      this.svmBase = Math.max(svmTo, svm.buf.start);
      svm.unmatchedSince = 0;
      svm.overQueue = false;
      if (pvmRep) out = { port: svm.port, target: consumedAt - svm.inputStart };
    }
    // A FIN or reset that came after a PVM that runs ahead resumed is not this checkpoint's.
    const pvmEnded = fz ? fz.ended : this.pvm.ended;
    const pvmFailed = fz ? fz.failed : this.pvm.failed !== null;
    if (pvmEnded && this.pvm.buf.end === this.released) {
      this.releaseFin();
      if (svm) {
        svm.drop();
        this.svm = null;
      }
    } else if (pvmFailed && !this.pvm.dropped && this.pvm.buf.end === this.released) {
      // The PVM reset this connection (and lives: a dead one fails over instead).
      this.client.resetAndDestroy();
    } else if (svm?.ended) {
      // The SVM closed this connection before the pause and the PVM has not: the checkpoint gives
      // the SVM the PVM's state, where it is open, but its TCP connection here cannot be opened
      // again. So it goes on unprotected, and a failover resets it. (Kept, it would hand the
      // client a FIN at a failover that no side's state had sent: a close-delimited response
      // would look complete.)
      // (Its target still goes to the SVM's load, which aligns what it holds of the connection.)
      svm.drop();
      this.svm = null;
      this.host.unprotected(this, 'the SVM closed it before the checkpoint, the PVM did not');
    }
    this.updateFlow();
    this.step();
    return out;
  }

  /**
   * The checkpoint's PVM is about to run again before the cut: it covers the
   * PVM's output up to where it stood at the pause (`pvmRep`), or, when the
   * PVM cannot say, what has arrived (a session opened from now on: nothing).
   */
  freeze(pvmRep: Positions | null, opened = false): void {
    const to = opened ? 0 : pvmRep ? (pvmRep[this.pvm.port]?.written ?? 0) : this.pvm.buf.end;
    this.frozen = {
      to,
      ended: !opened && this.pvm.ended && this.pvm.buf.end <= to,
      failed: !opened && this.pvm.failed !== null,
    };
  }

  /**
   * The checkpoint failed before its cut: the next one covers this output.
   * What arrived meanwhile is looked at again (a FIN that came after the
   * freeze and differs from the SVM's output asks for a checkpoint now).
   */
  thaw(): void {
    if (!this.frozen) return;
    this.frozen = null;
    this.step();
  }

  /**
   * Pairing: connect this session to a new SVM, starting from where the PVM
   * stands in the client's input. False if that input is no longer kept.
   */
  attach(socket: net.Socket, pvmRep: Positions | null): boolean {
    const from = this.pvm.inputStart + (pvmRep?.[this.pvm.port]?.consumed ?? 0);
    if (this.closed || !pvmRep || from < this.kept.start || from > this.kept.end) {
      socket.destroy();
      return false;
    }
    this.svm = this.wire(new Side(socket, from));
    for (const v of this.kept.views(from, this.kept.end)) socket.write(v);
    if (this.clientEnded) socket.end();
    this.svmBase = 0;
    this.matched = 0;
    this.diverged = null;
    return true;
  }

  /** The SVM is gone (for this session or for all): the PVM's output passes through. */
  detachSecondary(): void {
    if (!this.svm) return;
    this.svm.drop();
    this.svm = null;
    this.diverged = null;
    this.requested = false;
    this.updateFlow();
    this.step();
  }

  /**
   * Failover: the SVM's connection carries on. The client has had the PVM's
   * output up to `released`; the SVM's equivalent is `svmBase + (released -
   * pvmBase)`, and what the SVM wrote beyond it goes out now. False if this
   * session had no SVM (it cannot survive).
   */
  failover(): boolean {
    const svm = this.svm;
    this.pvm.drop();
    if (!svm || svm.failed) {
      this.client.resetAndDestroy();
      return false;
    }
    const at = this.svmBase + (this.released - this.pvmBase);
    svm.buf.dropTo(at);
    this.pvm = svm;
    this.svm = null;
    this.frozen = null; // the dead PVM's checkpoint ended with it
    this.pvmBase = at;
    this.released = at;
    this.matched = 0;
    this.diverged = null;
    this.requested = false;
    svm.overQueue = false;
    this.updateFlow();
    this.step();
    return true;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.sides()) s.drop();
    this.client.destroy();
    this.host.sessionClosed(this);
  }

  info() {
    const h = this.held();
    return {
      id: this.id,
      client: `${this.client.remoteAddress}:${this.client.remotePort}`,
      pvmPort: this.pvm.port,
      svmPort: this.svm?.port ?? null,
      in: this.clientIn,
      released: this.released,
      heldPvm: h.pvm,
      unmatchedSvm: h.svm,
      diverged: this.diverged,
    };
  }
}
