/**
 * The checkpoint coordinator: it runs the COLO loop around the comparer, the
 * two VMs' memory-checkpoint hooks and the disk pair.
 *
 * One checkpoint transaction, in QEMU's order with this project's disk steps:
 *   1. a request (mismatch, timeout, queue, reset, interval, pending, manual);
 *      requests that arrive until the cut are folded into it;
 *   2. pause the SVM, then the PVM, each with its in-flight I/O drained;
 *   3. seal the disk epoch on the primary ∥
 *   4. the PVM sends its state straight to the SVM (only what it dirtied;
 *      all of it at a pairing);
 *   5. the SVM has received it ∥ the secondary holds the epoch durably;
 *      and the comparer has every byte the VMs wrote before the pause;
 *   6. the cut: the PVM's held output is released, the SVM's unmatched
 *      output discarded (the checkpoint is now *decided*);
 *   7. the SVM loads the state ∥ the disk epoch commits ∥ the PVM's dirty
 *      set restarts and the PVM runs again (the cut decided the epoch; its
 *      new output waits in the comparer for the SVM's);
 *   8. the SVM resumes (in remus mode it stays paused). With `verify`, the
 *      SVM stays paused until the hashes are compared (and so does the PVM
 *      without early resume; with it, the PVM hashes what it captured).
 * Early resume (a PVM whose state can be captured, unless turned off): the
 * PVM is paused for 2, the seal ∥ its capture and the comparer's freeze
 * only, and runs during 4-8; its output meanwhile waits in the comparer.
 * A phase that fails before the cut releases nothing: the SVM discards what
 * it received, both resume, and the request stands.
 *
 * Notes on the design:
 * - Everything that changes the pair runs one at a time (`exec`): a
 *   checkpoint, a pairing, a failover, an unprotect. A failover or an
 *   unprotect first aborts the checkpoint in flight (its calls to the lost
 *   side may never answer), then waits for its calls to the surviving side.
 * - The decision point is the cut. A failover after it commits that epoch on
 *   the secondary and loads that state into the SVM: the clients saw its
 *   output. A failover before it drops the epoch and the received state: the
 *   SVM carries on from its own state, whose output matched what the clients
 *   saw.
 * - Liveness: a probe of each VM and disk node every `heartbeatMs`, and at
 *   once when the comparer sees a connection end or fail. A side is lost
 *   after two refused connections in a row or `failoverAfterMs` without an
 *   answer. The primary side lost → failover; the secondary side lost →
 *   unprotected (the PVM's output passes through), and a pairing is tried
 *   again when it answers.
 */
import { performance } from 'node:perf_hooks';
import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { ColoError, toColoError } from '../../errors.js';
import type { Comparer, CheckpointReason, Mode, Positions } from '../../net/comparer/comparer.js';
import type { Logger } from '../../net/server.js';
import type { Endpoint } from '../../util/address.js';
import { quantile } from '../../util/stats.js';
import type { DiskHook, VmHook } from './hooks.js';

/**
 * Durations and deadlines (health, back-off, failure detection) on the monotonic clock: a step of
 * the wall clock (NTP, a resumed host) must neither make every side look lost nor blind the
 * detection, nor stall checkpoints behind a back-off that moved an hour away. `at` fields are
 * wall-clock times, for people.
 */
const mono = (): number => performance.now();
const noop = (): void => {};

export type CoordinatorState = 'unprotected' | 'pairing' | 'protected' | 'failing-over';

export interface CoordinatorOptions {
  mode: Mode;
  comparer: Comparer;
  pvm: VmHook;
  svm: VmHook | null;
  disk: DiskHook;
  /** colo: the longest time between checkpoints; remus: the checkpoint period. */
  intervalMs: number;
  /** Checkpoint when the PVM's dirty state plus the open disk epoch exceed this. */
  maxPendingBytes: number;
  heartbeatMs: number;
  failoverAfterMs: number;
  phaseTimeoutMs: number;
  /**
   * After each checkpoint, check that SVM = PVM (state hash and disk hash): the SVM while paused, the
   * PVM as the checkpoint captured it (paused too unless it resumed early).
   */
  verify: boolean;
  /**
   * Resume a PVM that can be captured (its probe says `earlyResume`) once its state is taken,
   * before the send and the commit (default true); false keeps it paused until the cut.
   */
  earlyResume?: boolean;
  logger: Logger;
}

export const PHASES = [
  'pause',
  'seal',
  'capture',
  'send',
  'durable',
  'drain',
  'release',
  'load',
  'resume',
] as const;
export type Phase = (typeof PHASES)[number];

export interface CheckpointRecord {
  n: number;
  at: number;
  reasons: CheckpointReason[];
  full: boolean;
  epoch: number;
  memoryBytes: number;
  diskBytes: number;
  diskWrites: number;
  releasedBytes: number;
  /** From the first request folded in until the checkpoint started. */
  waitMs: number;
  phases: Record<Phase, number>;
  /** How long the PVM was paused, from its pause call until it runs again (without verification). */
  pauseMs: number;
  /**
   * colo: how long the SVM was paused, from its pause call until it runs again (without
   * verification); the PVM's output waits for the SVM's meanwhile. Null in remus mode.
   */
  svmPauseMs: number | null;
  /** The whole transaction, from pausing the SVM until both run again. */
  totalMs: number;
  /** null: that VM cannot give a hash of it (a QEMU VM's disk is the disk pair's to compare). */
  verified?: { state: boolean | null; disk: boolean | null; ms: number };
}

export interface FailoverRecord {
  at: number;
  reason: string;
  /** The checkpoint the SVM resumed from: the one decided before the loss, or its own last one. */
  committedEpoch: number;
  loadedDecided: boolean;
  generation: number;
  survived: number;
  lost: number;
  /** From the first sign of trouble until the SVM serves the connections. */
  ms: number;
  phases: { detect: number; promote: number; load: number; switch: number };
}

type Target = 'pvm' | 'primary' | 'svm' | 'secondary';

interface Health {
  lastOk: number;
  refusedInARow: number;
  lastError: string | null;
}

const KEEP_RECORDS = 1000;

export const verdict = (v: boolean | null) => (v === null ? 'not checked' : v ? 'equal' : 'DIFFERS');

class Aborted extends Error {}

export class Coordinator extends EventEmitter {
  state: CoordinatorState = 'unprotected';
  pvm: VmHook;
  svm: VmHook | null;
  disk: DiskHook;
  readonly mode: Mode;
  private chain: Promise<unknown> = Promise.resolve();
  private requested = new Map<CheckpointReason, number>();
  private firstRequestAt = 0;
  private running = false;
  private abortWith: ((e: Error) => void) | null = null;
  private abortP: Promise<never> | null = null;
  private svmCalls: Promise<unknown> | null = null;
  /** The checkpoint whose output was released but not yet loaded and committed everywhere. */
  private decided: { epoch: number; id: string; targets: Record<string, number>; loaded: boolean } | null =
    null;
  private kickTimer: NodeJS.Timeout | null = null;
  private intervalTimer: NodeJS.Timeout | null = null;
  private heartbeat: NodeJS.Timeout | null = null;
  private probing = false;
  private probeAgain = false;
  private retryAt = 0;
  private failuresInARow = 0;
  private suspectSince = 0;
  private closed = false;
  private peerState = 'unknown';
  private health: Record<Target, Health>;
  readonly records: CheckpointRecord[] = [];
  readonly failovers: FailoverRecord[] = [];
  readonly counts = {
    checkpoints: 0,
    failures: 0,
    verifyFailures: 0,
    byReason: {} as Record<string, number>,
    memoryBytes: 0,
    diskBytes: 0,
  };
  lastError: string | null = null;

  constructor(private readonly opts: CoordinatorOptions) {
    super();
    this.mode = opts.mode;
    this.pvm = opts.pvm;
    this.svm = opts.mode === 'none' ? null : opts.svm;
    this.disk = opts.disk;
    const now = mono();
    const h = (): Health => ({ lastOk: now, refusedInARow: 0, lastError: null });
    this.health = { pvm: h(), primary: h(), svm: h(), secondary: h() };
    opts.comparer.handlers = {
      request: (reason) => this.request(reason),
      suspect: () => {
        this.suspectSince ||= mono();
        this.probeSoon();
      },
    };
  }

  private get log(): Logger {
    return this.opts.logger;
  }

  start(): void {
    this.heartbeat = setInterval(() => this.probeSoon(), this.opts.heartbeatMs);
    this.probeSoon();
    if (this.svm) void this.exec(() => this.pair());
  }

  // Requests ---------------------------------------------------------------

  /** Ask for a checkpoint; requests are coalesced. */
  request(reason: CheckpointReason): void {
    if (this.mode === 'none' || this.state !== 'protected') return;
    if (this.requested.size === 0) this.firstRequestAt = mono();
    this.requested.set(reason, (this.requested.get(reason) ?? 0) + 1);
    this.kick();
  }

  /** A manual checkpoint: resolves with its record. */
  async checkpointNow(): Promise<CheckpointRecord> {
    if (this.mode === 'none')
      throw new ColoError('EINVAL', 'this colo process runs in mode none: nothing is checkpointed');
    if (this.state !== 'protected')
      throw new ColoError(
        'EBUSY',
        `not protected (${this.state}${this.lastError ? `: ${this.lastError}` : ''})`,
      );
    const n = this.counts.checkpoints + this.counts.failures;
    return new Promise<CheckpointRecord>((resolve, reject) => {
      const done = (r: CheckpointRecord) => {
        if (r.n <= n) return;
        this.off('checkpoint', done);
        this.off('checkpoint-failed', failed);
        resolve(r);
      };
      const failed = (e: Error) => {
        this.off('checkpoint', done);
        this.off('checkpoint-failed', failed);
        reject(e);
      };
      this.on('checkpoint', done);
      this.on('checkpoint-failed', failed);
      this.request('manual');
    });
  }

  private kick(): void {
    if (this.running || this.closed) return;
    const wait = this.retryAt - mono();
    if (wait > 0) {
      // Backing off after a failure; never sleep inside exec (a failover must not wait behind it).
      this.kickTimer ??= setTimeout(() => {
        this.kickTimer = null;
        this.kick();
      }, wait);
      return;
    }
    this.running = true;
    void this.exec(async () => {
      try {
        while (
          this.requested.size > 0 &&
          this.state === 'protected' &&
          this.losing === 0 &&
          !this.closed &&
          mono() >= this.retryAt
        )
          await this.checkpoint(false, false).catch(() => {});
      } finally {
        this.running = false;
        if (this.requested.size > 0 && this.state === 'protected' && this.losing === 0) this.kick();
      }
    });
  }

  private armInterval(): void {
    if (this.intervalTimer) clearTimeout(this.intervalTimer);
    this.intervalTimer = null;
    if (this.state !== 'protected' || this.closed) return;
    this.intervalTimer = setTimeout(() => this.request('interval'), this.opts.intervalMs);
  }

  private exec<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.chain.then(fn, fn);
    this.chain = run.catch(() => {});
    return run;
  }

  // The transaction ----------------------------------------------------------

  /** Race a call to a side that may be lost against an abort (failover, unprotect). */
  private guard<T>(p: Promise<T>): Promise<T> {
    return this.abortP ? Promise.race([p, this.abortP]) : p;
  }

  /** Calls to the SVM: a failover waits for them (the SVM lives on). */
  private svmCall<T>(p: Promise<T>): Promise<T> {
    this.svmCalls = p.catch(() => {});
    return this.guard(p);
  }

  private async checkpoint(full: boolean, attach: boolean): Promise<CheckpointRecord> {
    const svm = this.svm!;
    const pvm = this.pvm;
    const comparer = this.opts.comparer;
    const reasons = attach ? (['pair'] as CheckpointReason[]) : [...this.requested.keys()];
    const waitMs = attach ? 0 : mono() - this.firstRequestAt;
    this.inCheckpoint = true;
    this.abortP = new Promise<never>((_, reject) => (this.abortWith = reject));
    this.abortP.catch(() => {});
    const phases = Object.fromEntries(PHASES.map((p) => [p, 0])) as Record<Phase, number>;
    const t0 = performance.now();
    let last = t0;
    const lap = (p: Phase) => {
      const t = performance.now();
      phases[p] = t - last;
      last = t;
    };
    /** The state on its way to the SVM (a failure before the cut discards it there once it has landed). */
    let sending: Promise<unknown> | null = null;
    let svmPos: Positions | null = null;
    let pvmPos: Positions | null = null;
    let paused = false;
    let pvmRunsAt = 0;
    // A PVM that can be captured runs again before the send and the commit (its hash() is of the
    // state it captured, so --verify holds while it runs); its output past the pause waits in the
    // comparer (remus: for the next cut; colo: for the SVM's, once the SVM has loaded this state).
    const early = this.pvmEarlyResume && this.opts.earlyResume !== false;
    let svmRunsAt = 0;
    try {
      // 2. pause the SVM, then the PVM
      const svmPausedAt = performance.now();
      svmPos = await this.svmCall(svm.pause());
      const pvmPausedAt = performance.now();
      this.pvmHeld = true;
      const pausing = pvm.pause();
      // Held again when it answers: a pause of a checkpoint aborted meanwhile may land after the
      // unprotect's resume, and the heartbeat then resumes the PVM (see resumeHeld).
      const held = () => {
        if (pvm === this.pvm) this.pvmHeld = true;
      };
      void pausing.then(held, held);
      pvmPos = await this.guard(pausing);
      paused = true;
      if (attach) await comparer.attach(this.svmStandby ? null : svm.data, pvmPos);
      lap('pause');
      const timed = async <T>(p: Phase, call: Promise<T>) => {
        const t = performance.now();
        const r = await call;
        phases[p] = performance.now() - t;
        return r;
      };
      let seal: { epoch: number; writes: number; bytes: number };
      let sent: { bytes: number };
      if (early) {
        // Remus's speculative execution: the PVM's state is taken and the epoch sealed while it
        // is paused, then it runs again; its output from here is held until a later cut.
        const [s] = await this.guard(
          Promise.all([timed('seal', this.disk.seal()), timed('capture', pvm.capture(full))]),
        );
        seal = s;
        comparer.freeze(pvmPos);
        // It runs again as the state it captured travels (the resume is not on the SVM's path).
        [, , sent] = await this.guard(
          Promise.all([
            this.resumePvm(pvm).then(() => (pvmRunsAt = performance.now())),
            timed('durable', this.disk.durable(seal.epoch)),
            timed('send', this.svmCall((sending = pvm.sendState(full, svm, true)))),
          ]),
        );
      } else {
        // 3. seal, then 5. durable ∥ 4. the PVM's state straight to the SVM (5. received)
        [seal, sent] = await this.guard(
          Promise.all([
            timed('seal', this.disk.seal()).then(async (s) => {
              await timed('durable', this.disk.durable(s.epoch));
              return s;
            }),
            timed('send', this.svmCall((sending = pvm.sendState(full, svm)))),
          ]),
        );
      }
      // ∥ every byte the VMs wrote before the pause is here
      await this.guard(timed('drain', comparer.drain(pvmPos, svmPos, this.opts.phaseTimeoutMs)));
      last = performance.now();
      // 6. the cut: from here the checkpoint counts
      const releasedBefore = comparer.stats.bytesReleased;
      const targets = comparer.cut(pvmPos, svmPos);
      this.decided = { epoch: seal.epoch, id: randomUUID(), targets, loaded: false };
      // Requests that came in until now are answered by this checkpoint: folded in.
      for (const r of this.requested.keys()) if (!reasons.includes(r)) reasons.push(r);
      this.requested.clear();
      const releasedBytes = comparer.stats.bytesReleased - releasedBefore;
      lap('release');
      // 7. load ∥ commit ∥ the PVM runs again. Decided: D^p has reached the SVM, the PVM's
      // changes count from here, and it need not wait for the SVM's load or the commit. A failure
      // from here is handled as after any cut (unprotect, or a failover that loads this state into
      // the SVM); the PVM's output since it resumed was never released, so either way the clients
      // saw nothing that the survivor lacks. With verify, both stay paused for the hashes.
      const decided = this.decided;
      const pvmNow = !early && !this.opts.verify;
      await this.guard(
        Promise.all([
          // Loaded when the SVM answers, not when this transaction sees it: a failover's abort ends
          // the wait, the load goes on, the failover waits for it (svmCalls) and must not load again.
          this.svmCall(svm.load(targets, decided.id).then(() => (decided.loaded = true))),
          this.disk.commit(seal.epoch),
          pvmNow
            ? pvm
                .checkpointed()
                .then(() => this.resumePvm(pvm))
                .then(() => (pvmRunsAt = performance.now()))
            : pvm.checkpointed(),
        ]),
      );
      this.decided = null;
      lap('load');
      let verified: CheckpointRecord['verified'];
      let verifyMs = 0;
      if (this.opts.verify) {
        const tv = performance.now();
        const [a, b, da, db] = await this.guard(
          Promise.all([pvm.hash(early), svm.hash(early), pvm.diskHash(early), svm.diskHash(early)]),
        );
        verifyMs = performance.now() - tv;
        // What a VM cannot hash (null) is not checked: it counts as neither equal nor different.
        verified = {
          state: a === null || b === null ? null : a === b,
          disk: da === null || db === null ? null : da === db,
          ms: verifyMs,
        };
        last += verifyMs;
        if (verified.state === false || verified.disk === false) {
          this.counts.verifyFailures++;
          this.log.warn(
            `checkpoint of epoch ${seal.epoch}: SVM ≠ PVM after the checkpoint (state ${verdict(verified.state)}, disk ${verdict(verified.disk)})`,
          );
        }
      }
      // 8. resume (the SVM; the PVM too when verify held it)
      await this.guard(
        Promise.all([
          this.mode === 'colo'
            ? this.svmCall(svm.resume()).then(() => (svmRunsAt = performance.now()))
            : null,
          early || pvmNow ? null : this.resumePvm(pvm).then(() => (pvmRunsAt = performance.now())),
        ]),
      );
      lap('resume');
      const totalMs = performance.now() - t0;
      const record: CheckpointRecord = {
        n: this.counts.checkpoints + this.counts.failures + 1,
        at: Date.now(),
        reasons,
        full,
        epoch: seal.epoch,
        memoryBytes: sent.bytes,
        diskBytes: seal.bytes,
        diskWrites: seal.writes,
        releasedBytes,
        waitMs,
        phases,
        // Verification runs while the VMs are paused, after the load (with early resume: after the PVM runs again).
        pauseMs: pvmRunsAt - pvmPausedAt - (early ? 0 : verifyMs),
        svmPauseMs: this.mode === 'colo' ? svmRunsAt - svmPausedAt - verifyMs : null,
        totalMs,
        verified,
      };
      this.counts.checkpoints++;
      for (const r of reasons) this.counts.byReason[r] = (this.counts.byReason[r] ?? 0) + 1;
      this.counts.memoryBytes += record.memoryBytes;
      this.counts.diskBytes += record.diskBytes;
      this.records.push(record);
      if (this.records.length > KEEP_RECORDS) this.records.shift();
      this.failuresInARow = 0;
      this.retryAt = 0;
      // Every VM and disk node answered this checkpoint's calls: they live.
      const now = mono();
      for (const h of Object.values(this.health)) h.lastOk = Math.max(h.lastOk, now);
      this.emit('checkpoint', record);
      this.armInterval();
      return record;
    } catch (err) {
      const e = toColoError(err);
      if (err instanceof Aborted) throw err;
      const decided = this.decided !== null;
      this.counts.failures++;
      this.failuresInARow++;
      this.lastError = e.message;
      this.log.warn(`checkpoint failed${decided ? ' after the cut' : ''}: ${e.message}`);
      this.emit('checkpoint-failed', e);
      if (!decided) {
        // Nothing was released: undo what was done, and try again later.
        comparer.endDrain();
        if (sending) {
          await sending.catch(() => {});
          await svm.discard().catch(() => {});
        }
        if (paused || svmPos) {
          await Promise.allSettled([this.mode === 'colo' ? svm.resume() : null, this.resumePvm(pvm)]);
        }
        this.retryAt = mono() + Math.min(2000, 50 * 2 ** Math.min(this.failuresInARow, 6));
      }
      // Which side is gone? A lost side is handled here, in the same turn (silence counts again).
      this.inCheckpoint = false;
      await this.probe();
      let lost = this.lostSide();
      // After the cut the failure must be pinned on a side before choosing. A PVM side killed
      // mid-checkpoint fails its call at once but is lost only at its second refused probe:
      // unprotecting on the first would leave the clients with a dead PVM, and an SVM that holds
      // this very checkpoint unused (the bench's loop-failover found it, 1 round in 7).
      const until = mono() + this.opts.failoverAfterMs;
      while (decided && lost === null && !this.closed && mono() < until) {
        await new Promise((r) => setTimeout(r, this.opts.heartbeatMs));
        await this.probe();
        lost = this.lostSide();
      }
      if (lost === 'primary') await this.doFailover(`checkpoint failed: ${e.message}`);
      else if (lost === 'secondary' || decided)
        await this.doUnprotect(
          lost ? `checkpoint failed: ${e.message}` : `checkpoint failed after the cut: ${e.message}`,
        );
      throw e;
    } finally {
      this.inCheckpoint = false;
      this.abortWith = null;
      this.abortP = null;
    }
  }

  // Pairing -------------------------------------------------------------------

  /**
   * Pair the SVM: a full checkpoint makes SVM = PVM (memory, disk and each
   * open connection, which joins the SVM from the PVM's position).
   */
  private async pair(): Promise<void> {
    if (!this.svm || this.state !== 'unprotected' || this.closed) return;
    this.state = 'pairing';
    try {
      const sec = await this.disk.secondaryStatus(this.opts.phaseTimeoutMs);
      if (sec.failover !== 'manual')
        throw new ColoError(
          'EUSAGE',
          `the secondary at ${this.disk.secondary!.host}:${this.disk.secondary!.port} fails over on its own (--failover auto): ` +
            `start it with --failover manual, so that the coordinator decides (it knows which checkpoint's output the clients saw)`,
        );
      const [a, b] = await Promise.all([
        this.pvm.probe(this.opts.phaseTimeoutMs),
        this.svm.probe(this.opts.phaseTimeoutMs),
      ]);
      if (b.standby && this.mode !== 'remus')
        throw new ColoError(
          'EUSAGE',
          `the SVM at ${this.svm.control.host}:${this.svm.control.port} is a standby that runs only after failover (a QEMU VM): ` +
            `${this.mode} mode needs an SVM running in lockstep; start colo with --mode remus`,
        );
      this.svmStandby = b.standby;
      this.pvmEarlyResume = a.earlyResume;
      if (a.identity !== null && b.identity !== null && a.identity !== b.identity)
        throw new ColoError(
          'EUSAGE',
          `the PVM and the SVM are not the same VM: '${a.identity}' and '${b.identity}' (start both with the same options)`,
        );
      // Wait for the disk pair to be in sync before pausing anything.
      const until = mono() + Math.max(this.opts.phaseTimeoutMs, 60_000);
      for (;;) {
        const p = await this.disk.primaryStatus(this.opts.phaseTimeoutMs);
        if (p.peerState === 'protected') break;
        if (mono() > until)
          throw new ColoError('EBUSY', `the disk pair is not in sync (primary's peer: ${p.peerState})`);
        await new Promise((r) => setTimeout(r, 50));
      }
      await this.checkpoint(true, true);
      this.state = 'protected';
      this.lastError = null;
      this.log.info(`protected: ${this.pvm.name} → ${this.svm.name} (mode ${this.mode})`);
      this.emit('state', this.state);
      this.armInterval();
    } catch (err) {
      if (this.state === 'pairing') {
        this.state = 'unprotected';
        this.opts.comparer.detach();
      }
      const e = toColoError(err);
      this.lastError = `pairing failed: ${e.message}`;
      this.log.warn(this.lastError);
      this.emit('pair-failed', e);
      this.retryAt = mono() + 1000;
      throw e;
    }
  }

  /** Pair a new SVM (after a failover, or another one): the operator's re-protect. */
  async reprotect(svm: VmHook, secondary: Endpoint): Promise<{ state: CoordinatorState }> {
    if (this.mode === 'none') throw new ColoError('EINVAL', 'mode none: there is nothing to protect with');
    if (this.state !== 'unprotected')
      throw new ColoError('EBUSY', `already ${this.state}: re-protect pairs an SVM when unprotected`);
    return this.exec(async () => {
      this.svm = svm;
      this.disk.secondary = secondary;
      this.health.svm = { lastOk: mono(), refusedInARow: 0, lastError: null };
      this.health.secondary = { lastOk: mono(), refusedInARow: 0, lastError: null };
      await this.pair();
      return { state: this.state };
    });
  }

  // Losing a side ---------------------------------------------------------------

  private abortRunning(why: string): void {
    this.abortWith?.(new Aborted(why));
  }

  /**
   * A failover or an unprotect asked for and not yet run: no checkpoint starts meanwhile. (The
   * checkpoint it aborted leaves its calls in flight, a PVM resume among them, which would land in
   * the middle of the next one; and that one would start with the aborted one's decision still
   * standing.)
   */
  private losing = 0;
  /**
   * A checkpoint paused the PVM and no resume of it has been answered since (or its pause answered
   * after the last resume). Between checkpoints the heartbeat resumes it: a resume that failed (its
   * control call, not the VM), or a pause of an aborted checkpoint landing after the unprotect's
   * resume, would otherwise leave it stopped for good once unprotected, where no checkpoint comes.
   */
  private pvmHeld = false;
  private resumingHeld = false;

  private async resumePvm(pvm: VmHook): Promise<void> {
    await pvm.resume();
    if (pvm === this.pvm) this.pvmHeld = false;
  }

  /** The heartbeat's part: a PVM left paused by a resume that failed is resumed, between transactions. */
  private resumeHeld(): void {
    if (!this.pvmHeld || this.resumingHeld || this.inCheckpoint || this.losing > 0) return;
    if (this.state === 'failing-over' || this.closed) return;
    this.resumingHeld = true;
    void this.exec(async () => {
      if (this.pvmHeld && !this.inCheckpoint && this.state !== 'failing-over') await this.resumePvm(this.pvm);
    })
      .catch(noop)
      .finally(() => (this.resumingHeld = false));
  }

  /** The primary side is lost: the SVM takes over. */
  private requestFailover(why: string): void {
    if (this.state === 'failing-over') return;
    this.abortRunning(why);
    this.losing++;
    void this.exec(() => this.doFailover(why))
      .catch(() => {})
      .finally(() => this.lossHandled());
  }

  /** A requested failover or unprotect has run: checkpoints asked for meanwhile may go. */
  private lossHandled(): void {
    this.losing--;
    if (this.losing === 0 && this.requested.size > 0 && this.state === 'protected') this.kick();
  }

  private async doFailover(why: string): Promise<void> {
    if (this.state !== 'protected' && this.state !== 'pairing') return;
    if (this.state === 'pairing' && !this.decided) {
      // The SVM never held a checkpoint of this PVM: there is nothing to fail over to.
      this.log.warn(`the primary side is lost (${why}) before the SVM was paired: nothing to fail over to`);
      return;
    }
    const svm = this.svm!;
    this.state = 'failing-over';
    this.emit('state', this.state);
    const t0 = performance.now();
    const detect = this.suspectSince ? mono() - this.suspectSince : 0;
    this.log.warn(`the primary side is lost (${why}): failing over to ${svm.name}`);
    await this.svmCalls;
    const decided = this.decided;
    try {
      const r = await this.disk.promote(`colo failover: ${why}`, decided?.epoch);
      const tPromote = performance.now();
      if (decided && r.committed < decided.epoch)
        throw new ColoError(
          'EINTERNAL',
          `the secondary promoted with epoch ${r.committed} committed, but the output of epoch ${decided.epoch} was released`,
        );
      if (decided && !decided.loaded) await svm.load(decided.targets, decided.id);
      else if (!decided) await svm.discard().catch(() => {});
      await svm.checkpointed();
      const tLoad = performance.now();
      // A standby is started first: clients are sent to it once it runs (it listens from then on).
      if (this.svmStandby) await svm.resume();
      const { survived, lost } = this.opts.comparer.failover(svm.data);
      if (!this.svmStandby) await svm.resume();
      this.svmStandby = false;
      const tSwitch = performance.now();
      this.decided = null;
      this.pvm = svm;
      this.pvmHeld = false; // the SVM, resumed above
      this.svm = null;
      this.disk = this.disk.promoted();
      this.health.pvm = this.health.svm;
      this.health.primary = this.health.secondary;
      this.state = 'unprotected';
      this.requested.clear();
      if (this.intervalTimer) clearTimeout(this.intervalTimer);
      const rec: FailoverRecord = {
        at: Date.now(),
        reason: why,
        committedEpoch: r.committed,
        loadedDecided: decided !== null,
        generation: r.generation,
        survived,
        lost,
        ms: detect + (tSwitch - t0),
        phases: { detect, promote: tPromote - t0, load: tLoad - tPromote, switch: tSwitch - tLoad },
      };
      this.failovers.push(rec);
      this.suspectSince = 0;
      this.log.warn(
        `failed over in ${rec.ms.toFixed(0)} ms: the SVM serves ${survived} connection(s) from epoch ${r.committed} (generation ${r.generation})${lost ? `; ${lost} unprotected connection(s) lost` : ''}`,
      );
      this.emit('failover', rec);
      this.emit('state', this.state);
    } catch (err) {
      const e = toColoError(err);
      this.lastError = `failover failed: ${e.message}`;
      this.log.warn(this.lastError);
      this.state = 'protected'; // held output stays held; the next probe tries again
      this.emit('failover-failed', e);
    }
  }

  private requestUnprotect(why: string): void {
    this.abortRunning(why);
    this.losing++;
    void this.exec(() => this.doUnprotect(why))
      .catch(() => {})
      .finally(() => this.lossHandled());
  }

  /** The secondary side is lost: the PVM goes on alone, its output passes through. */
  private async doUnprotect(why: string): Promise<void> {
    if (this.state !== 'protected' && this.state !== 'pairing') return;
    this.state = 'unprotected';
    this.decided = null;
    this.requested.clear();
    if (this.intervalTimer) clearTimeout(this.intervalTimer);
    this.opts.comparer.detach();
    await this.resumePvm(this.pvm).catch(() => {});
    this.lastError = `unprotected: ${why}`;
    this.log.warn(`unprotected: ${why}; the PVM goes on alone, its output passes through`);
    this.emit('state', this.state);
    this.retryAt = mono() + 1000;
  }

  // Liveness ------------------------------------------------------------------

  private probeSoon(): void {
    if (this.closed) return;
    if (this.probing) {
      this.probeAgain = true;
      return;
    }
    this.probing = true;
    void this.probe()
      .then(() => this.decide())
      .finally(() => {
        this.probing = false;
        if (this.probeAgain) {
          this.probeAgain = false;
          this.probeSoon();
        }
      });
  }

  private async probe(): Promise<void> {
    const t = Math.max(200, this.opts.heartbeatMs * 2);
    const one = async (target: Target, call: () => Promise<unknown>) => {
      const h = this.health[target];
      try {
        await call();
        h.lastOk = mono();
        h.refusedInARow = 0;
        h.lastError = null;
      } catch (err) {
        const e = toColoError(err);
        h.lastError = e.message;
        this.suspectSince ||= mono();
        if (/ECONNREFUSED|ECONNRESET/.test(e.message)) h.refusedInARow++;
      }
    };
    let dirty = 0;
    let pending = 0;
    const calls: Promise<void>[] = [
      one('pvm', async () => (dirty = (await this.pvm.probe(t)).dirtyBytes ?? 0)),
      one('primary', async () => {
        const s = await this.disk.primaryStatus(t);
        this.peerState = s.peerState ?? 'none';
        pending = s.pending?.find((p) => p.state === 'open')?.bytes ?? 0;
      }),
    ];
    if (this.svm) {
      const svm = this.svm;
      calls.push(one('svm', () => svm.probe(t)));
    }
    if (this.disk.secondary) calls.push(one('secondary', () => this.disk.secondaryStatus(t)));
    await Promise.all(calls);
    if (this.state === 'protected' && dirty + pending > this.opts.maxPendingBytes) this.request('pending');
  }

  /**
   * Refused connections mean the process is gone. Silence means lost only
   * outside a checkpoint: during one, a VM may be busy saving or loading a
   * large state, and the transaction's own calls (with their timeouts) judge
   * it.
   */
  private isLost(target: Target): boolean {
    const h = this.health[target];
    if (h.refusedInARow >= 2) return true;
    return !this.inCheckpoint && mono() - h.lastOk > this.opts.failoverAfterMs;
  }

  private inCheckpoint = false;
  /** The SVM runs only after failover (probe's `standby`): the comparer connects nothing to it. */
  private svmStandby = false;
  /** The PVM's probe said `earlyResume` (learned at pairing). */
  private pvmEarlyResume = false;

  private lostSide(): 'primary' | 'secondary' | null {
    if (this.isLost('pvm') || this.isLost('primary')) return 'primary';
    if (this.svm && (this.isLost('svm') || this.isLost('secondary'))) return 'secondary';
    return null;
  }

  private decide(): void {
    if (this.closed || this.mode === 'none') return;
    this.resumeHeld();
    const lost = this.lostSide();
    if (this.state === 'protected' || this.state === 'pairing') {
      if (lost === 'primary') {
        const h = this.isLost('pvm') ? this.health.pvm : this.health.primary;
        this.requestFailover(
          `${this.isLost('pvm') ? this.pvm.name : 'the primary disk node'}: ${h.lastError ?? 'silent'}`,
        );
      } else if (lost === 'secondary') {
        const h = this.isLost('svm') ? this.health.svm : this.health.secondary;
        this.requestUnprotect(
          `${this.isLost('svm') ? this.svm!.name : 'the secondary disk node'}: ${h.lastError ?? 'silent'}`,
        );
      } else if (Object.values(this.health).every((h) => h.lastError === null)) this.suspectSince = 0;
      // A connection the SVM reset while it lives: that connection goes on unprotected.
      for (const id of this.opts.comparer.failedSessions('svm')) this.opts.comparer.detachSession(id);
      // A connection the PVM reset while it lives: a checkpoint makes the reset output.
      if (!lost && this.opts.comparer.failedSessions('pvm').length) this.request('reset');
    } else if (this.state === 'unprotected' && this.svm && !lost && mono() >= this.retryAt && !this.running) {
      void this.exec(() => this.pair()).catch(() => {});
    }
  }

  // Status ----------------------------------------------------------------------

  status() {
    const pct = (xs: number[], q: number) => (xs.length ? Number(quantile(xs, q).toFixed(3)) : null);
    const recent = this.records.slice(-KEEP_RECORDS);
    const svmPauses = recent.flatMap((r) => (r.svmPauseMs === null ? [] : [r.svmPauseMs]));
    const health = Object.fromEntries(
      (Object.keys(this.health) as Target[]).map((k) => [
        k,
        {
          ok: !this.isLost(k),
          lastOkMsAgo: mono() - this.health[k].lastOk,
          lastError: this.health[k].lastError,
        },
      ]),
    );
    return {
      role: 'colo',
      mode: this.mode,
      state: this.state,
      pvm: this.pvm.name,
      svm: this.svm?.name ?? null,
      primaryDisk: `${this.disk.primary.host}:${this.disk.primary.port}`,
      secondaryDisk: this.disk.secondary ? `${this.disk.secondary.host}:${this.disk.secondary.port}` : null,
      diskPeerState: this.peerState,
      checkpoints: this.counts.checkpoints,
      checkpointFailures: this.counts.failures,
      verifyFailures: this.counts.verifyFailures,
      byReason: { ...this.counts.byReason },
      memoryBytes: this.counts.memoryBytes,
      diskBytes: this.counts.diskBytes,
      pauseMs: {
        p50: pct(
          recent.map((r) => r.pauseMs),
          0.5,
        ),
        p99: pct(
          recent.map((r) => r.pauseMs),
          0.99,
        ),
      },
      svmPauseMs: { p50: pct(svmPauses, 0.5), p99: pct(svmPauses, 0.99) },
      phasesP50: Object.fromEntries(
        PHASES.map((p) => [
          p,
          pct(
            recent.map((r) => r.phases[p]),
            0.5,
          ),
        ]),
      ),
      lastCheckpoint: this.records.at(-1) ?? null,
      failovers: this.failovers,
      lastError: this.lastError,
      health,
    };
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.intervalTimer) clearTimeout(this.intervalTimer);
    if (this.kickTimer) clearTimeout(this.kickTimer);
    this.abortRunning('shutting down');
    await this.chain;
  }
}
