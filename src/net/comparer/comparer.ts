/**
 * The network comparer: a TCP proxy in front of the PVM and the SVM.
 *
 * Each client connection gets one connection to the PVM and, while an SVM is
 * paired, one to the SVM; the client's bytes go to both. Output is compared
 * per connection as byte streams (session.ts). The comparer never runs a
 * checkpoint itself: it asks the coordinator for one (mismatch, timeout,
 * queue bound, reset) and the coordinator drives it through `drain` →
 * `cut` (or `abort`), `attach` (pairing an SVM), `detach` (the SVM side is
 * lost) and `failover` (the PVM side is lost).
 *
 * Modes: `colo` compares and releases matched output at once; `remus` holds
 * all of the PVM's output until the next checkpoint; `none` passes the
 * PVM's output through (the baseline, on the same code path).
 */
import { performance } from 'node:perf_hooks';
import net from 'node:net';
import { ColoError } from '../../errors.js';
import type { Logger } from '../server.js';
import type { Endpoint } from '../../util/address.js';
import { listenOn } from '../../util/listen.js';
import {
  CHECKPOINT_REASONS,
  Session,
  type CheckpointReason,
  type Mode,
  type Positions,
  type SessionHost,
  type SessionLimits,
} from './session.js';

export type { CheckpointReason, Mode, Positions, StreamPosition } from './session.js';

export interface ComparerOptions {
  mode: Mode;
  pvm: Endpoint;
  /** Compare timeout: unmatched output older than this asks for a checkpoint. */
  compareTimeoutMs: number;
  limits?: Partial<SessionLimits>;
  maxSessions?: number;
  logger: Logger;
  now?: () => number;
}

export interface ComparerEvents {
  /** A checkpoint is needed. */
  request(reason: CheckpointReason, detail: string): void;
  /** A VM's connection ended or failed: is that VM alive? */
  suspect(which: 'pvm' | 'svm', detail: string): void;
}

export const DEFAULT_LIMITS: SessionLimits = {
  queueBytes: 16 * 1024 * 1024,
  clientHighWater: 1024 * 1024,
  keepBytes: 16 * 1024 * 1024,
};

export class Comparer implements SessionHost {
  readonly mode: Mode;
  readonly limits: SessionLimits;
  draining = false;
  /** The SVM's data address while one is paired. */
  svm: Endpoint | null = null;
  pvm: Endpoint;
  private readonly server: net.Server;
  private readonly sessions = new Map<number, Session>();
  private nextId = 1;
  private drainWaiter: (() => void) | null = null;
  private sweep: NodeJS.Timeout | null = null;
  handlers: ComparerEvents = { request() {}, suspect() {} };
  readonly stats = {
    sessionsOpened: 0,
    sessionsLost: 0,
    bytesIn: 0,
    bytesReleased: 0,
    requests: Object.fromEntries(CHECKPOINT_REASONS.map((r) => [r, 0])) as Record<CheckpointReason, number>,
    lastMismatch: null as null | { session: number; detail: string; at: number },
  };

  constructor(private readonly opts: ComparerOptions) {
    this.mode = opts.mode;
    this.pvm = opts.pvm;
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    this.server = net.createServer({ noDelay: true, allowHalfOpen: true }, (c) => this.accept(c));
  }

  now(): number {
    return this.opts.now?.() ?? performance.now();
  }

  async listen(port: number, host: string): Promise<net.AddressInfo> {
    const a = await listenOn(this.server, port, host);
    const every = Math.max(5, Math.min(50, Math.floor(this.opts.compareTimeoutMs / 4)));
    this.sweep = setInterval(() => this.checkTimeouts(), every);
    this.sweep.unref();
    return a;
  }

  /**
   * Paired with an SVM that does not run until failover (a QEMU standby in
   * remus mode): output is held until each checkpoint, and no connection is
   * made to the SVM (there is nothing to connect to).
   */
  standby = false;

  get protected(): boolean {
    return this.svm !== null || this.standby;
  }

  private connect(to: Endpoint): net.Socket {
    const s = net.connect({ host: to.host, port: to.port, noDelay: true, allowHalfOpen: true });
    s.setKeepAlive(true, 10_000);
    return s;
  }

  private accept(client: net.Socket): void {
    if (this.sessions.size >= (this.opts.maxSessions ?? 10_000)) {
      this.opts.logger.warn(`refusing a connection from ${client.remoteAddress}: ${this.sessions.size} open`);
      client.destroy();
      return;
    }
    client.setNoDelay(true);
    const id = this.nextId++;
    const pvm = this.connect(this.pvm);
    const svm = this.svm && this.mode !== 'none' ? this.connect(this.svm) : null;
    const s = new Session(id, client, pvm, svm, this);
    // Opened while the PVM runs ahead of a checkpoint: none of its output is that checkpoint's.
    if (this.frozen) s.freeze(null, true);
    client.on('data', (d: Buffer) => (this.stats.bytesIn += d.length));
    this.sessions.set(id, s);
    this.stats.sessionsOpened++;
  }

  // SessionHost -------------------------------------------------------------

  requestCheckpoint(reason: CheckpointReason, s: Session, detail: string): void {
    this.stats.requests[reason]++;
    if (reason === 'mismatch') this.stats.lastMismatch = { session: s.id, detail, at: Date.now() };
    this.opts.logger.debug(`connection ${s.id}: checkpoint asked for (${reason}: ${detail})`);
    this.handlers.request(reason, `connection ${s.id}: ${detail}`);
  }

  sideEvent(which: 'pvm' | 'svm', s: Session, detail: string): void {
    this.handlers.suspect(which, `connection ${s.id}: ${which.toUpperCase()} ${detail}`);
  }

  sessionClosed(s: Session): void {
    this.sessions.delete(s.id);
    this.dataArrived();
  }

  dataArrived(): void {
    this.drainWaiter?.();
  }

  released(bytes: number): void {
    this.stats.bytesReleased += bytes;
  }

  unprotected(s: Session, why: string): void {
    this.opts.logger.warn(`connection ${s.id} goes on unprotected: ${why}; a failover resets it`);
  }

  private checkTimeouts(): void {
    if (this.mode !== 'colo' || !this.svm) return;
    const now = this.now();
    for (const s of this.sessions.values()) {
      const age = s.unmatchedAge(now);
      if (age > this.opts.compareTimeoutMs)
        s.askTimeout(`output unmatched for ${age} ms (compare timeout ${this.opts.compareTimeoutMs} ms)`);
    }
  }

  // The coordinator's side --------------------------------------------------

  /**
   * A checkpoint's VMs are paused: wait until every byte they reported
   * writing has arrived here. Every side is read meanwhile.
   */
  async drain(pvmRep: Positions | null, svmRep: Positions | null, timeoutMs: number): Promise<void> {
    this.draining = true;
    for (const s of this.sessions.values()) s.updateFlow();
    const done = () => [...this.sessions.values()].every((s) => s.arrived(pvmRep, svmRep));
    if (done()) return;
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.drainWaiter = null;
        const late = [...this.sessions.values()].filter((s) => !s.arrived(pvmRep, svmRep)).map((s) => s.id);
        reject(
          new ColoError(
            'EIO',
            `the VMs' output did not arrive in ${timeoutMs} ms (connections ${late.slice(0, 5).join(', ')})`,
          ),
        );
      }, timeoutMs);
      this.drainWaiter = () => {
        if (!done()) return;
        clearTimeout(timer);
        this.drainWaiter = null;
        resolve();
      };
    });
  }

  /**
   * The checkpoint is decided (the secondary holds it): release the PVM's
   * output up to the cut, discard the SVM's, realign. Returns each SVM
   * connection's position in its input for the load.
   */
  cut(pvmRep: Positions | null, svmRep: Positions | null): Record<string, number> {
    const targets: Record<string, number> = {};
    for (const s of [...this.sessions.values()]) {
      const t = s.cut(pvmRep, svmRep);
      if (t) targets[t.port] = t.target;
    }
    this.endDrain();
    return targets;
  }

  /**
   * The paused PVM's state is captured and it is about to run again before
   * the cut (early resume): the checkpoint covers its output up to where it
   * stood at the pause (`pvmRep`; when it cannot say, what has arrived) and a
   * FIN or reset that has arrived; anything later, on these sessions or on
   * sessions opened from now on, waits for the next checkpoint.
   */
  freeze(pvmRep: Positions | null): void {
    this.frozen = true;
    for (const s of this.sessions.values()) s.freeze(pvmRep);
  }

  private frozen = false;

  private thaw(): void {
    this.frozen = false;
    for (const s of this.sessions.values()) s.thaw();
  }

  /** The checkpoint failed: nothing is released; reading goes back to normal. */
  endDrain(): void {
    this.thaw();
    this.draining = false;
    for (const s of this.sessions.values()) s.updateFlow();
  }

  /**
   * Pair an SVM: new connections go to both; open sessions join from the
   * PVM's position. `null`: a standby SVM (remus only), which takes no
   * connections: every session's output is held from here.
   */
  async attach(
    svm: Endpoint | null,
    pvmRep: Positions | null,
  ): Promise<{ joined: number; unprotected: number }> {
    if (svm === null) {
      if (this.mode !== 'remus')
        throw new ColoError(
          'EUSAGE',
          'an SVM that runs only after failover can be paired in remus mode only',
        );
      this.standby = true;
      for (const s of this.sessions.values()) s.step();
      return { joined: this.sessions.size, unprotected: 0 };
    }
    this.svm = svm;
    let joined = 0;
    let unprotected = 0;
    const waits: Promise<void>[] = [];
    for (const s of this.sessions.values()) {
      if (s.svm) continue;
      const sock = this.connect(svm);
      if (s.attach(sock, pvmRep)) {
        joined++;
        waits.push(
          new Promise<void>((r) => {
            sock.once('connect', () => r());
            sock.once('close', () => r());
          }),
        );
      } else unprotected++;
    }
    // Their ports name them in the SVM's positions: wait until they are known.
    await Promise.all(waits);
    if (unprotected)
      this.opts.logger.warn(
        `${unprotected} open connection(s) stay unprotected: their input since the PVM's position is no longer kept`,
      );
    return { joined, unprotected };
  }

  /** The SVM side is lost: every session passes the PVM's output through. */
  detach(): void {
    this.svm = null;
    this.standby = false;
    this.endDrain();
    for (const s of [...this.sessions.values()]) s.detachSecondary();
  }

  /** One session's SVM connection failed while the SVM lives: that session goes on unprotected. */
  detachSession(id: number): void {
    this.sessions.get(id)?.detachSecondary();
  }

  /**
   * The PVM side is lost: the SVM (which has become the primary) serves every
   * connection from here. `pvm` is its data address (new connections go there).
   */
  failover(newPvm: Endpoint): { survived: number; lost: number } {
    let survived = 0;
    let lost = 0;
    this.pvm = newPvm;
    this.svm = null;
    this.standby = false;
    this.frozen = false;
    this.draining = false;
    for (const s of [...this.sessions.values()]) {
      if (s.failover()) survived++;
      else lost++;
    }
    this.stats.sessionsLost += lost;
    return { survived, lost };
  }

  /** Sessions whose given side failed (RST or closed without FIN). */
  failedSessions(which: 'pvm' | 'svm'): number[] {
    return [...this.sessions.values()]
      .filter((s) => (which === 'pvm' ? s.pvm.failed && !s.pvm.ended : s.svm?.failed))
      .map((s) => s.id);
  }

  status(limit = 20) {
    let heldPvm = 0;
    let unmatchedSvm = 0;
    let diverged = 0;
    let unprotected = 0;
    for (const s of this.sessions.values()) {
      const h = s.held();
      heldPvm += h.pvm;
      unmatchedSvm += h.svm;
      if (s.diverged) diverged++;
      if (this.svm && !s.svm) unprotected++;
    }
    return {
      mode: this.mode,
      protected: this.protected,
      connections: this.sessions.size,
      connectionsOpened: this.stats.sessionsOpened,
      connectionsLost: this.stats.sessionsLost,
      bytesIn: this.stats.bytesIn,
      bytesReleased: this.stats.bytesReleased,
      heldBytes: heldPvm,
      unmatchedSvmBytes: unmatchedSvm,
      divergedConnections: diverged,
      /** Open connections with no SVM connection while an SVM is paired (a failover resets them). */
      unprotectedConnections: unprotected,
      requests: { ...this.stats.requests },
      lastMismatch: this.stats.lastMismatch,
      sessions: [...this.sessions.values()].slice(0, limit).map((s) => s.info()),
    };
  }

  async close(): Promise<void> {
    if (this.sweep) clearInterval(this.sweep);
    for (const s of [...this.sessions.values()]) s.close();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
