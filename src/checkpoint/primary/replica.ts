/**
 * A primary replica: the PVM's disk with its epoch log, the link to the
 * secondary, and the checkpoint protocol. No servers: the process shell
 * (primary-node.ts) puts an NBD server and the control API in front of it, a
 * promoted secondary wraps its SVM disk in one when it re-protects, and the
 * simulator runs it on simulated storage, time and network.
 *
 * Checkpoint sequence (each step a control call, so a coordinator can put the
 * memory checkpoint between them):
 *   1. seal     — drain in-flight writes, close epoch N, open N+1
 *   2. durable  — wait until the secondary has fsync'd all of N
 *   3. commit   — (after the memory state of N arrived) the secondary commits N
 * `checkpoint` runs all three. A failed step fails the checkpoint with the
 * reason; no data is lost: epoch N stays in the log and is resent.
 */
import { deviceZeroRanges } from '../../failover/reprotect/hash.js';
import { commonHashAlg } from '../../failover/reprotect/hash-pool.js';
import { ColoError, toColoError } from '../../errors.js';
import { GiB, tunables, type Tunables } from '../../limits.js';
import type { BlockDevice } from '../../block/device.js';
import { ActivityLog, mergeRanges, type Range } from '../../failover/activity.js';
import { History, type SyncMode } from '../../failover/history.js';
import { Resync, type ResyncProgress } from '../../failover/reprotect/resync.js';
import type { Logger } from '../../net/server.js';
import { sleep, type Clock, type TimerHandle } from '../../sys/clock.js';
import type { Env } from '../../sys/env.js';
import { parseHostPort, type Endpoint } from '../../util/address.js';
import { EPOCH, inspectQuery, MAX_TIMEOUT_MS, numberParam, type Route } from '../control.js';
import { inspectJournal } from '../format/inspect.js';
import { PrimaryLink, type HeartbeatOptions } from '../link/primary-link.js';
import { resyncPlan, type PeerState } from './core.js';
import { renderPrometheus, Summary } from '../metrics.js';
import { PrimaryLog } from './log.js';
import { ReplicatingDevice } from './replicating-device.js';
import { finishPromotedStore } from '../../failover/finish-promoted.js';
import type { StoreImage } from '../secondary/store.js';
import { openMeta, type MetaIndex, type StateDir } from '../state-dir.js';

/** Epoch numbers reserved per synced index write (a restart skips what was left unused). */
const EPOCH_RESERVE = 256;

export interface PrimaryReplicaOptions {
  exportName: string;
  /** The image's path (for status). */
  image: string;
  peer: Endpoint;
  /** First epoch of the log (the next number after anything this node or its peer may hold). */
  firstEpoch: number;
  /** Inside a promoted secondary (re-protection): the log lives beside the store's epochs. */
  attached?: boolean;
  /** Bytes the log may hold for a lagging secondary before it is marked out of sync. */
  budgetBytes?: number;
  heartbeat?: HeartbeatOptions;
  /**
   * After the secondary has been unreachable this long, the primary goes on
   * alone: it mints a new generation (its writes are now unprotected and
   * real), stops keeping the epoch log, and resynchronises the secondary
   * from its activity log when it returns.
   */
  loneAfterMs?: number;
  /** Open NBD connections (for status). */
  connections?: () => number;
  tunables?: Partial<Tunables>;
  logger: Logger;
}

export type { PeerState } from './core.js';

export interface CheckpointResult {
  epoch: number;
  writes: number;
  bytes: number;
  sealMs: number;
  durableMs: number;
  commitMs: number;
  totalMs: number;
}

/** Hot extents may cool this many epochs after their last write is committed. */
const COOL_LAG_EPOCHS = 4;
/**
 * Of those, only as many as keep the hot set within this many bytes (the least
 * recently written first; DRBD's default activity log covers ~4.8 GiB), so a
 * working set rewritten more slowly than COOL_LAG_EPOCHS stays hot and costs
 * no bitmap syncs; extents not written for IDLE_COOL_EPOCHS cool regardless.
 */
const HOT_WORKING_SET_BYTES = 1024 * 1024 * 1024;
const IDLE_COOL_EPOCHS = 600;

/** How often a primary that could not record going on alone tries again. */
const LONE_RETRY_MS = 500;

export class PrimaryReplica {
  /** The next try to record going on alone, while it cannot be (goLone). */
  private loneRetry: TimerHandle | null = null;
  readonly metrics = {
    checkpoints: 0,
    checkpointFailures: 0,
    seal: new Summary(),
    durable: new Summary(),
    commit: new Summary(),
    total: new Summary(),
  };
  private lastCheckpoint: (CheckpointResult & { at: number }) | null = null;
  private lastFailure: { at: number; message: string } | null = null;
  private checkpointing = false;
  private resync: Resync | null = null;
  lastResync: ResyncProgress | null = null;
  /** Ranges of an interrupted resync, compared again on the next attempt. */
  private resyncPending: Range[] = [];
  /** The activity log held hot regions at start: the secondary may lack them. */
  private dirtyRestart: boolean;
  private syncWaiters: (() => void)[] = [];
  private closing = false;

  readonly plog: PrimaryLog;
  readonly device: ReplicatingDevice;
  readonly link: PrimaryLink;
  private readonly clock: Clock;
  private readonly tunables: Tunables;

  /**
   * `local` is the disk (a file image, or a promoted secondary's SVM view);
   * `meta`, `history` and `activity` belong to the caller, who closes them.
   */
  constructor(
    readonly opts: PrimaryReplicaOptions,
    readonly env: Env,
    readonly state: StateDir,
    readonly db: MetaIndex,
    readonly image: BlockDevice,
    readonly history: History,
    readonly activity: ActivityLog,
  ) {
    this.clock = env.clock;
    this.tunables = tunables(opts.tunables);
    this.dirtyRestart = activity.hotBytes > 0;
    // Inside a promoted secondary, epochs/ holds the store's received epochs: the log lives beside it.
    const plog = new PrimaryLog(
      env.storage,
      state.primaryLogDir(opts.attached ?? false),
      opts.firstEpoch,
      opts.budgetBytes ?? 1 * GiB,
      env.random,
      this.tunables.resendMemoryBytes,
    );
    plog.now = () => env.clock.now();
    this.plog = plog;
    const device = new ReplicatingDevice(image, plog, activity);
    this.device = device;
    const link = new PrimaryLink(plog, {
      host: opts.peer.host,
      port: opts.peer.port,
      size: image.size,
      heartbeat: opts.heartbeat,
      loneAfterMs: opts.loneAfterMs ?? 10_000,
      highWaterBytes: this.tunables.replicationHighWaterBytes,
      lowWaterBytes: this.tunables.replicationLowWaterBytes,
      windowBytes: this.tunables.replicationWindowBytes,
      clock: env.clock,
      net: env.net,
      log: (m, level) => (level === 'warn' ? opts.logger.warn(`link: ${m}`) : opts.logger.info(`link: ${m}`)),
      handshake: () => ({ history: [...history.generations], needsResync: this.needsResync }),
    });
    this.link = link;
    device.throttle = (admitted) => link.waitForRoom(admitted);
    device.hasRoom = (admitted) => link.hasRoom(admitted);
    device.roomChanged = () => link.releaseRoom();
    // The core decides (primary/core.ts); this replica carries out what needs the disk.
    link.on('deposed', (why: string) => {
      device.deposed = why;
      opts.logger.warn(`this primary is deposed; refusing all writes from now on: ${why}`);
    });
    link.on('protected', () => {
      try {
        this.history.markProtected();
      } catch (err) {
        // Only a note for later decisions; the next protection tries again.
        opts.logger.warn(
          `could not record that generation ${this.history.last?.n} is protected: ${(err as Error).message}`,
        );
      }
    });
    link.on('resync', (mode: SyncMode, peerHot: Range[]) => this.onResync(mode, peerHot));
    link.on('lone', (reason: string, committed: number) => this.goLone(reason, committed));
    link.on('peerState', () => this.peerStateChanged());
  }

  /** How this primary stands with its secondary (the core's view). */
  get peerState(): PeerState {
    return this.link.core.peerState;
  }

  /**
   * Open a primary on a state directory (a plain primary, restarted or new,
   * or a promoted secondary's directory, whose store is folded into the
   * image first). The replica owns what it opened here and closes it.
   */
  static async open(
    env: Env,
    state: StateDir,
    image: BlockDevice & StoreImage,
    opts: Omit<PrimaryReplicaOptions, 'firstEpoch' | 'attached'> & { meta?: MetaIndex },
  ): Promise<PrimaryReplica> {
    env.storage.mkdirp(state.root);
    const history = History.load(env.storage, state.history, env);
    const activity = ActivityLog.open(
      env.storage,
      state.activity,
      image.size,
      tunables(opts.tunables).activityExtentBytes,
    );
    let db: MetaIndex | undefined;
    try {
      const finished = await finishPromotedStore(state, image, {
        history,
        activity,
        log: (m) => opts.logger.info(m),
        meta: opts.meta,
        clock: env.clock,
        random: env.random,
      });
      db = opts.meta ?? (await openMeta(state.root));
      const epoch = Math.max(Number((await db.get('epoch')) ?? 1), finished + 1);
      if (history.empty) history.mint('new disk', 0);
      await db.batch(
        [
          { type: 'put', key: 'role', value: 'primary' },
          { type: 'put', key: 'size', value: String(image.size) },
        ],
        { sync: true },
      );
      state.writeNodeFile({ role: 'primary', export: opts.exportName, image: opts.image, size: image.size });
      const replica = new PrimaryReplica(
        { ...opts, firstEpoch: epoch },
        env,
        state,
        db,
        image,
        history,
        activity,
      );
      replica.owned = { db: opts.meta === undefined ? db : null, activity };
      return replica;
    } catch (err) {
      await activity.close();
      if (db && !opts.meta) await db.close();
      throw err;
    }
  }

  /** What `open` opened (closed with the replica). */
  private owned: { db: MetaIndex | null; activity: ActivityLog } | null = null;

  /** Connect to the secondary. */
  start(): void {
    this.link.start();
  }

  /**
   * Pair this primary with a secondary at `peer` (the same one coming back,
   * or another): connect now; the secondary's answer decides the resync.
   */
  reprotect(peerText: string) {
    if (this.link.deposed) throw new ColoError('ESTALE', `this primary was deposed: ${this.link.deposed}`);
    if (!peerText)
      throw new ColoError(
        'EUSAGE',
        "reprotect needs 'peer' (HOST:PORT of the secondary's --replication-listen)",
      );
    const peer = parseHostPort(peerText, 'peer');
    this.opts.peer = peer;
    this.link.retarget(peer.host, peer.port);
    this.opts.logger.info(`re-protecting with the secondary at ${peerText}`);
    return this.status();
  }

  /** The secondary needs more than the log can resend. */
  get needsResync(): boolean {
    return this.plog.outOfSync !== null || this.dirtyRestart || this.resyncPending.length > 0;
  }

  /** Checkpoints waiting for a resync to end go on once the peer is anything but syncing. */
  private peerStateChanged(): void {
    if (this.peerState === 'syncing') return;
    const w = this.syncWaiters;
    this.syncWaiters = [];
    for (const f of w) f();
  }

  /** The core decided to resynchronise the secondary. */
  private onResync(mode: SyncMode, peerHot: Range[]): void {
    this.resyncs++;
    void this.runResync(mode, peerHot).then(
      () => this.link.resyncDone(),
      (err: Error) => {
        this.opts.logger.warn(`resync interrupted: ${err.message} (it resumes when the secondary is back)`);
        this.link.resyncFailed(err.message);
      },
    );
  }

  private async runResync(mode: 'incremental' | 'full', peerHot: Range[]): Promise<void> {
    if (this.plog.outOfSync) {
      // The log holds data again from a fresh epoch on; the resync covers everything before it.
      this.device.seal();
      this.plog.resumeLogging(); // in the same turn: no mutation has logged into the new epoch yet
    }
    const plan = resyncPlan(mode, this.image.size, {
      exact: this.activity.exactRanges(),
      hot: this.activity.hotRanges(),
      unknown: this.activity.unknownRanges(),
      peerHot,
      pending: this.resyncPending,
    });
    const resync = new Resync(
      {
        size: this.image.size,
        readLocal: (buf, off) => this.device.local.pread(buf, off),
        zeroLocal: (off, len) => deviceZeroRanges(this.device.local, off, len),
        fileLocal: (off, len) => this.device.local.fileRange?.(off, len) ?? null,
        sendRange: (off, len) => this.device.resyncRange(off, len),
        requestHashes: (off, len, bs, alg) => this.link.requestHashes(off, len, bs, alg),
        checkpoint: (state) => this.syncCheckpoint(state, mode),
        commitBytes: this.tunables.resyncCommitBytes,
        now: () => this.clock.now(),
        hashing: this.env.hashing,
        hashAlg: commonHashAlg(this.env.hashing.algs, this.link.peerHashAlgs),
      },
      plan,
    );
    this.resync = resync;
    this.plog.budgetSuspended = true;
    const abort = () => resync.abort(new ColoError('ECONNECT', 'the replication link went down'));
    this.link.once('down', abort);
    try {
      const p = await resync.run();
      this.lastResync = p;
      this.resyncPending = [];
      this.dirtyRestart = false;
      this.opts.logger.info(
        `resync done in ${((p.finishedAt! - p.startedAt) / 1000).toFixed(1)} s: sent ${p.sentBytes} bytes, ` +
          `${p.equalBytes} bytes found equal by ${p.hashBytes} bytes of ${p.hashAlg} hashes`,
      );
    } catch (err) {
      this.lastResync = resync.progress;
      this.resyncPending = mergeRanges([...this.resyncPending, ...resync.allRanges()]);
      throw err;
    } finally {
      this.link.off('down', abort);
      this.resync = null;
      this.plog.budgetSuspended = false;
    }
  }

  /** A checkpoint inside a resync: seal, durable, commit with the sync mark. */
  private async syncCheckpoint(state: 'partial' | 'done', mode: 'incremental' | 'full'): Promise<void> {
    while (this.checkpointing) await sleep(this.clock, 5);
    this.checkpointing = true;
    try {
      const s = await this.sealEpoch();
      await Promise.all([this.link.waitDurable(s.epoch, 60_000, true), this.flushLocal(s.epoch)]);
      const last = this.history.last!;
      await this.link.commit(s.epoch, 60_000, {
        state,
        target: last.id,
        mode,
        history: state === 'done' ? [...this.history.generations] : undefined,
      });
      if (state === 'done') this.activity.cool(s.epoch);
    } finally {
      this.checkpointing = false;
    }
  }

  /**
   * The core decided to carry on without a secondary: a new generation,
   * durable before any further write is acknowledged, and the log stops
   * holding data (the activity log records what a later resync must send).
   */
  private goLone(reason: string, committed: number): void {
    let g;
    try {
      g = this.history.mint(`lone: ${reason}`, committed);
    } catch (err) {
      // No write may be acknowledged before the new generation is durable: refuse them, and
      // try again every LONE_RETRY_MS until the state directory takes it.
      const why = `going on alone needs a new generation on disk, and ${this.history.file} could not be written: ${(err as Error).message}`;
      if (!this.device.refusal) this.opts.logger.warn(`${why}; PVM writes are refused until it can be`);
      this.device.refusal = new ColoError(toColoError(err).code, why);
      if (!this.closing)
        this.loneRetry = this.clock.setTimeout(() => this.goLone(reason, committed), LONE_RETRY_MS);
      return;
    }
    this.device.refusal = null;
    this.plog.markOutOfSync(`went on alone (${reason})`);
    this.opts.logger.warn(
      `going on alone as generation ${g.n} (${g.id}): ${reason}; writes are recorded in the activity log for a later resync`,
    );
  }

  /**
   * Phase 1: close the current epoch. Like a whole checkpoint, it needs a
   * synchronised secondary: during a resync it waits (up to the timeout) for
   * it to end; without a usable secondary it fails at once with the reason.
   */
  async seal(timeoutMs = 10_000): Promise<{ epoch: number; writes: number; bytes: number; ms: number }> {
    await this.waitProtected(timeoutMs);
    return this.sealEpoch();
  }

  /** Resyncs started so far: an epoch sealed before one cannot be committed as that checkpoint any more. */
  private resyncs = 0;
  /** Epoch numbers up to this one are on record as used (see sealEpoch). */
  private reservedEpoch = 0;
  private resyncsAtSeal = new Map<number, number>();

  private async sealEpoch(): Promise<{ epoch: number; writes: number; bytes: number; ms: number }> {
    const t = this.clock.mono();
    // A resync that starts while this seal runs makes the epoch no checkpoint: it counts as started before.
    const resyncsBefore = this.resyncs;
    // Persist the next epoch number first: after a crash this node never reuses
    // an epoch number the secondary may already hold. Numbers are reserved in
    // blocks, so a seal syncs the index once in EPOCH_RESERVE (a synced write
    // queues behind the PVM's writes in the thread pool: milliseconds under load).
    if (this.plog.current + 1 > this.reservedEpoch) {
      const reserve = this.plog.current + EPOCH_RESERVE;
      await this.db.put('epoch', String(reserve), { sync: true });
      this.reservedEpoch = Math.max(this.reservedEpoch, reserve);
    }
    const seal = this.device.seal();
    this.resyncsAtSeal.set(seal.e, resyncsBefore);
    for (const e of this.resyncsAtSeal.keys()) if (e < seal.e - 64) this.resyncsAtSeal.delete(e);
    const took = this.clock.mono() - t;
    this.metrics.seal.observe(took / 1000);
    return { epoch: seal.e, writes: seal.n, bytes: seal.b, ms: took };
  }

  /** Phase 2: the secondary holds epoch N durably. */
  async waitDurable(epoch: number, timeoutMs = 10_000): Promise<{ epoch: number; ms: number }> {
    if (epoch >= this.plog.current)
      throw new ColoError('EINVAL', `epoch ${epoch} is not sealed yet (current ${this.plog.current})`);
    const t = this.clock.mono();
    await Promise.all([this.link.waitDurable(epoch, timeoutMs), this.flushLocal(epoch)]);
    // Durable must mean "a checkpoint the secondary holds": a COLO coordinator releases output on it,
    // and a failover commits it on the secondary's word alone (SecondaryStore.promote).
    const at = this.resyncsAtSeal.get(epoch);
    if (this.peerState === 'syncing' || (at !== undefined && at !== this.resyncs))
      throw new ColoError(
        this.peerState === 'syncing' ? 'EBUSY' : 'EIO',
        `epoch ${epoch} is no checkpoint: the secondary ${this.peerState === 'syncing' ? 'is being' : 'was'} ` +
          `resynchronised since it was sealed; start a new checkpoint`,
      );
    const took = this.clock.mono() - t;
    this.metrics.durable.observe(took / 1000);
    return { epoch, ms: took };
  }

  /** Epochs up to this one are durable on this node's own disk. */
  private flushedThrough = 0;

  /**
   * A commit is a flush barrier on both sides (invariant 10): before the
   * secondary is told to commit N, every write of epochs ≤ N is durable here
   * too. Otherwise a power cut could take from this disk writes the
   * secondary has committed, in extents the activity log has since cooled,
   * and a restarted primary would pair as "equal" with a disk it differs from.
   */
  private async flushLocal(epoch: number): Promise<void> {
    if (this.flushedThrough >= epoch) return;
    await this.device.local.flush();
    this.flushedThrough = Math.max(this.flushedThrough, epoch);
  }

  /** Phase 3: the secondary commits through epoch N. */
  async commit(
    epoch: number,
    timeoutMs = 10_000,
  ): Promise<{ epoch: number; ms: number; overlayDiscarded?: unknown }> {
    // Checkpoint N is the disk at cut N on both sides: not once a resync has moved the
    // secondary to another cut, nor while one runs.
    const reason = this.unprotectedReason();
    if (reason) throw new ColoError(reason.code, reason.message);
    if (this.peerState === 'syncing')
      throw new ColoError('EBUSY', `cannot commit epoch ${epoch}: the secondary is being resynchronised`);
    const at = this.resyncsAtSeal.get(epoch);
    if (at !== undefined && at !== this.resyncs)
      throw new ColoError(
        'EIO',
        `cannot commit epoch ${epoch}: the secondary was resynchronised since it was sealed and holds a later ` +
          `checkpoint; start a new checkpoint`,
      );
    if (epoch > this.link.durableEpoch)
      throw new ColoError(
        'EINVAL',
        `epoch ${epoch} is not durable on the secondary yet (durable: ${this.link.durableEpoch})`,
      );
    await this.flushLocal(epoch); // done already when /durable was asked first
    const t = this.clock.mono();
    const r = await this.link.commit(epoch, timeoutMs);
    // A resync that began while the commit was under way renumbered the secondary's epochs: its answer
    // ("committed through N or later") is then the resync's state, not checkpoint N.
    if (at !== undefined && at !== this.resyncs)
      throw new ColoError(
        'EIO',
        `epoch ${epoch} is no checkpoint: the secondary was resynchronised while its commit was under way and ` +
          `holds a later state; start a new checkpoint`,
      );
    // Regions written in epochs up to N are on the (synchronised) secondary now. They
    // cool a few epochs late, and only past a working set, which stays hot and costs no syncs.
    if (this.peerState === 'protected')
      this.activity.coolLeastRecent(
        epoch - COOL_LAG_EPOCHS,
        Math.floor(HOT_WORKING_SET_BYTES / this.activity.extentBytes),
        epoch - IDLE_COOL_EPOCHS,
      );
    const took = this.clock.mono() - t;
    this.metrics.commit.observe(took / 1000);
    return { epoch, ms: took, overlayDiscarded: r.overlayDiscarded };
  }

  /** All three phases. */
  async checkpoint(timeoutMs = 10_000): Promise<CheckpointResult> {
    const t = this.clock.mono();
    await this.waitProtected(timeoutMs);
    if (this.checkpointing) throw new ColoError('EBUSY', 'a checkpoint is already running');
    this.checkpointing = true;
    try {
      const s = await this.sealEpoch();
      // The PVM may be writing: its next epoch waits to be sent until the commit is answered
      // (the finally releases the hold, whether the checkpoint succeeded or not).
      this.link.holdAfter(s.epoch);
      const d = await this.waitDurable(s.epoch, timeoutMs);
      const c = await this.commit(s.epoch, timeoutMs);
      const result: CheckpointResult = {
        epoch: s.epoch,
        writes: s.writes,
        bytes: s.bytes,
        sealMs: s.ms,
        durableMs: d.ms,
        commitMs: c.ms,
        totalMs: this.clock.mono() - t,
      };
      this.metrics.checkpoints++;
      this.metrics.total.observe(result.totalMs / 1000);
      this.lastCheckpoint = { ...result, at: this.clock.now() };
      return result;
    } catch (err) {
      this.metrics.checkpointFailures++;
      this.lastFailure = { at: this.clock.now(), message: (err as Error).message };
      throw err;
    } finally {
      this.link.releaseHold();
      this.checkpointing = false;
    }
  }

  /**
   * Checkpoints need a synchronised secondary. While a resync runs they wait
   * (up to the timeout) and then go on by themselves; without a usable
   * secondary they fail at once with the reason.
   */
  /** Why no checkpoint can run now, whatever one waits for (null: it can, or will). */
  private unprotectedReason(): { code: 'ESPLIT' | 'ESTALE'; message: string } | null {
    switch (this.peerState) {
      case 'lone':
        return {
          code: 'ESTALE',
          message: `this primary went on alone (generation ${this.history.last?.n}); re-protect a secondary first (colo-blk reprotect)`,
        };
      case 'refused':
        return { code: 'ESPLIT', message: `the secondary refused this primary: ${this.link.refused}` };
      case 'deposed':
        return { code: 'ESTALE', message: `this primary was deposed: ${this.link.deposed}` };
      default:
        return null;
    }
  }

  private async waitProtected(timeoutMs: number): Promise<void> {
    const reason = this.unprotectedReason();
    if (reason) throw new ColoError(reason.code, reason.message);
    if (this.peerState !== 'syncing') return;
    const done = new Promise<void>((r) => this.syncWaiters.push(r));
    let timer: TimerHandle | undefined;
    const timeout = new Promise<'timeout'>(
      (r) => (timer = this.clock.setTimeout(() => r('timeout'), timeoutMs)),
    );
    const r = await Promise.race([done, timeout]);
    timer?.clear();
    if (r === 'timeout') {
      const p = this.resync?.progress;
      throw new ColoError(
        'EBUSY',
        `the secondary is being resynchronised (${p ? `${p.mode}, ${Math.floor((100 * p.doneBytes) / Math.max(1, p.totalBytes))}% of ${p.totalBytes} bytes` : 'starting'}); ` +
          `checkpoints resume on their own when it completes`,
      );
    }
  }

  status() {
    const held = this.plog.heldEpochs();
    return {
      role: 'primary',
      generation: this.history.last?.n ?? 0,
      generationId: this.history.last?.id ?? null,
      node: this.history.node,
      history: this.history.generations,
      peerState: this.peerState,
      resync: this.resync?.progress ?? this.lastResync,
      peerDecision: this.link.peer?.decision ?? null,
      refused: this.link.refused,
      unprotected: this.activity.summary(),
      export: this.opts.exportName,
      image: this.opts.image,
      size: this.image.size,
      epoch: this.plog.current,
      session: this.plog.session,
      seq: this.plog.seq,
      pending: held.map((e) => ({
        epoch: e.epoch,
        state: e.sealed ? (e.epoch <= this.link.durableEpoch ? 'durable' : 'sealed') : 'open',
        writes: e.records,
        bytes: e.bytes,
        journalBytes: e.journal?.size ?? 0,
      })),
      link: {
        state: this.link.state,
        peer: `${this.opts.peer.host}:${this.opts.peer.port}`,
        since: this.link.connectedSince ?? this.link.downSince,
        lastError: this.link.lastError,
        bytesSent: this.link.bytesSent,
        reconnects: this.link.reconnects,
        throttled: this.link.throttled,
        durableEpoch: this.link.durableEpoch,
        committedEpoch: this.link.committedEpoch,
      },
      lag: {
        unsentBytes: this.link.unsentBytes,
        inFlightBytes: this.link.inFlightBytes,
        heldBytes: this.plog.heldBytes,
        epochs: this.plog.current - 1 - this.link.committedEpoch,
      },
      outOfSync: this.plog.outOfSync,
      deposed: this.link.deposed,
      lastCheckpoint: this.lastCheckpoint,
      lastFailure: this.lastFailure,
      checkpoints: this.metrics.checkpoints,
      checkpointFailures: this.metrics.checkpointFailures,
      connections: this.opts.connections?.() ?? 0,
    };
  }

  inspect(epoch?: number, limit = 10_000) {
    const held = this.plog.heldEpochs().filter((e) => epoch === undefined || e.epoch === epoch);
    if (epoch !== undefined && held.length === 0)
      throw new ColoError(
        'ENOENT',
        `epoch ${epoch} is not pending on this primary (pending: ${
          this.plog
            .heldEpochs()
            .map((e) => e.epoch)
            .join(', ') || 'none'
        })`,
      );
    return {
      role: 'primary',
      epochs: held.map((e) => ({
        epoch: e.epoch,
        state: e.sealed ? (e.epoch <= this.link.durableEpoch ? 'durable' : 'sealed') : 'open',
        ...(e.journal
          ? inspectJournal(e.journal.path, { limit, storage: this.env.storage, file: e.journal.asFile() })
          : { records: e.records, bytes: e.bytes, note: 'not held: the secondary is out of sync' }),
      })),
    };
  }

  prometheus(): string {
    const s = this.status();
    return renderPrometheus([
      {
        name: 'colo_checkpoints_total',
        help: 'Checkpoints completed',
        type: 'counter',
        value: s.checkpoints,
      },
      {
        name: 'colo_checkpoint_failures_total',
        help: 'Checkpoints failed',
        type: 'counter',
        value: s.checkpointFailures,
      },
      ...(['seal', 'durable', 'commit', 'total'] as const).map((phase) => ({
        name: 'colo_checkpoint_phase_seconds',
        help: 'Latency of each checkpoint phase',
        type: 'summary' as const,
        summary: this.metrics[phase],
        labels: { phase },
      })),
      {
        name: 'colo_bytes_mirrored_total',
        help: 'Bytes sent on the replication link',
        type: 'counter',
        value: s.link.bytesSent,
      },
      {
        name: 'colo_pending_bytes',
        help: 'Log bytes held for the secondary',
        type: 'gauge',
        value: s.lag.heldBytes,
      },
      { name: 'colo_unsent_bytes', help: 'Log bytes not yet sent', type: 'gauge', value: s.lag.unsentBytes },
      { name: 'colo_epoch', help: 'Current (open) epoch', type: 'gauge', value: s.epoch },
      {
        name: 'colo_link_up',
        help: '1 if the replication link is connected',
        type: 'gauge',
        value: s.link.state === 'connected' ? 1 : 0,
      },
      {
        name: 'colo_out_of_sync',
        help: '1 if the secondary needs a resync',
        type: 'gauge',
        value: s.outOfSync ? 1 : 0,
      },
      { name: 'colo_nbd_connections', help: 'Open NBD connections', type: 'gauge', value: s.connections },
    ]);
  }

  /** Stop replicating: the link closes, the next epoch number is recorded, the log's files close. */
  async close(): Promise<void> {
    this.closing = true;
    this.loneRetry?.clear();
    this.resync?.abort(new ColoError('ESHUTDOWN', 'the primary is shutting down'));
    this.link.close();
    await this.db.put('epoch', String(this.plog.current + 1), { sync: true });
    this.plog.close();
    if (this.owned) {
      await this.owned.activity.close();
      await this.owned.db?.close();
    }
  }
}

/** A wait for the secondary (`timeoutMs`). */
const TIMEOUT = { min: 1, max: MAX_TIMEOUT_MS, fallback: 10_000 };

/** The control routes of a primary (a promoted secondary that re-protects serves them too). */
export function primaryRoutes(p: PrimaryReplica): Route[] {
  const epochParam = (q: URLSearchParams, b: Record<string, unknown>) => {
    const n = numberParam(q, b, 'epoch', EPOCH);
    if (n === undefined) throw new ColoError('EINVAL', `a positive integer 'epoch' is required`);
    return n;
  };
  const timeout = (q: URLSearchParams, b: Record<string, unknown>) => numberParam(q, b, 'timeoutMs', TIMEOUT);
  return [
    {
      method: 'POST' as const,
      path: '/seal',
      handler: async (q: URLSearchParams, b: Record<string, unknown>) => p.seal(timeout(q, b)),
    },
    {
      method: 'POST' as const,
      path: '/durable',
      handler: async (q: URLSearchParams, b: Record<string, unknown>) =>
        p.waitDurable(epochParam(q, b), timeout(q, b)),
    },
    {
      method: 'POST' as const,
      path: '/commit',
      handler: async (q: URLSearchParams, b: Record<string, unknown>) =>
        p.commit(epochParam(q, b), timeout(q, b)),
    },
    {
      method: 'POST' as const,
      path: '/checkpoint',
      handler: async (q: URLSearchParams, b: Record<string, unknown>) => p.checkpoint(timeout(q, b)),
    },
    { method: 'GET' as const, path: '/status', handler: async () => p.status() },
    {
      method: 'POST' as const,
      path: '/reprotect',
      handler: async (q: URLSearchParams, b: Record<string, unknown>) =>
        p.reprotect(String(b.peer ?? q.get('peer') ?? '')),
    },
    {
      method: 'GET' as const,
      path: '/inspect',
      handler: async (q: URLSearchParams) => p.inspect(...inspectQuery(q)),
    },
    { method: 'GET' as const, path: '/metrics', handler: async () => p.prometheus(), text: true },
  ];
}
