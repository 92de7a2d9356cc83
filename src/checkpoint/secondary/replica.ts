/**
 * A secondary replica: receives the PVM's epochs into its buffer, commits
 * them when the primary says so, and offers the SVM its own disk (the last
 * checkpoint plus the SVM's overlay). On failover it becomes a primary of a
 * new generation; when it re-protects, a PrimaryReplica wraps its SVM disk.
 * No servers: the process shell (secondary-node.ts) serves `exportDevice`
 * over NBD and the control API; the simulator runs it on simulated storage,
 * time and network.
 */
import { ColoError } from '../../errors.js';
import { tunables, type Tunables } from '../../limits.js';
import { SwitchDevice } from '../../block/switch.js';
import { ActivityLog } from '../../failover/activity.js';
import { History } from '../../failover/history.js';
import type { Logger } from '../../net/server.js';
import type { Env } from '../../sys/env.js';
import { parseHostPort } from '../../util/address.js';
import { EPOCH, inspectQuery, numberParam, type Route } from '../control.js';
import { finishPromotedStore } from '../../failover/finish-promoted.js';
import { inspectJournal } from '../format/inspect.js';
import { epochJournal } from '../format/records.js';
import { SecondaryLink } from '../link/secondary-link.js';
import type { HeartbeatOptions } from '../primary/core.js';
import { renderPrometheus } from '../metrics.js';
import { PrimaryReplica, primaryRoutes } from '../primary/replica.js';
import { SecondaryStore, type StoreImage } from './store.js';
import type { MetaIndex, StateDir } from '../state-dir.js';

export interface SecondaryReplicaOptions {
  exportName: string;
  /** The image's path (for status). */
  image: string;
  heartbeat?: HeartbeatOptions;
  /** 'auto': promote when the primary stays lost for `failoverGraceMs`; 'manual': only on request. */
  failover?: 'auto' | 'manual';
  failoverGraceMs?: number;
  /** Forget this node's generation history: it will be fully resynchronised (split-brain recovery). */
  discardMyData?: boolean;
  /**
   * This state directory served as a primary after a promotion: rejoin as a
   * plain secondary (its image takes everything it wrote; the resync rolls
   * back what the new primary does not have, from its activity log).
   */
  rejoin?: boolean;
  tunables?: Partial<Tunables>;
  /** The metadata index (opened from the state directory by default). */
  meta?: MetaIndex;
  /** Open NBD connections (for status). */
  connections?: () => number;
  logger: Logger;
}

/**
 * A state directory that last served a primary (an old primary coming back
 * as a secondary): its epoch journals are the old primary's log, not
 * anything received, so they go. What it wrote that the new primary lacks is
 * in its activity log, which the resync rolls back.
 */
function dropFormerPrimaryLog(state: StateDir, logger: Logger): void {
  if (state.readNodeFile()?.role !== 'primary') return;
  for (const name of state.storage.list(state.epochsDir)) state.storage.remove(`${state.epochsDir}/${name}`);
  logger.info(`${state.root} last served a primary: starting as a secondary, to be resynchronised`);
}

export class SecondaryReplica {
  applyError: string | null = null;
  private closing = false;
  /** Time from the decision to promote until the SVM disk serves as primary. */
  lastPromotionMs: number | null = null;
  /** Set once this promoted node re-protects a secondary: it is then a replicating primary. */
  primary: PrimaryReplica | null = null;
  /** What the SVM is served: the SVM view, or a replicating primary over it once re-protecting. */
  readonly exportDevice: SwitchDevice;
  readonly link: SecondaryLink;

  private constructor(
    readonly opts: SecondaryReplicaOptions,
    readonly env: Env,
    readonly state: StateDir,
    readonly store: SecondaryStore,
    readonly history: History,
    readonly activity: ActivityLog,
  ) {
    this.exportDevice = new SwitchDevice(store.svmDevice);
    this.link = new SecondaryLink(store, {
      heartbeat: opts.heartbeat,
      failover: opts.failover ?? 'auto',
      failoverGraceMs: opts.failoverGraceMs ?? 1000,
      clock: env.clock,
      net: env.net,
      log: (m, level) => (level === 'warn' ? opts.logger.warn(`link: ${m}`) : opts.logger.info(`link: ${m}`)),
    });
    // The core decided (secondary/core.ts): the primary stayed lost past the grace period.
    this.link.on('promote', (reason: string) => {
      if (this.closing) return;
      this.promote(reason).catch((err: Error) =>
        this.opts.logger.warn(`automatic failover failed: ${err.message}`),
      );
    });
  }

  /** Open a secondary on a state directory (new, restarted, promoted, or an old primary returning). */
  static async open(env: Env, state: StateDir, image: StoreImage, opts: SecondaryReplicaOptions) {
    env.storage.mkdirp(state.root);
    const history = History.load(env.storage, state.history, env);
    const activity = ActivityLog.open(
      env.storage,
      state.activity,
      image.size,
      tunables(opts.tunables).activityExtentBytes,
    );
    const holder: { replica?: SecondaryReplica } = {};
    let store: SecondaryStore;
    try {
      dropFormerPrimaryLog(state, opts.logger);
      // A node that served as a primary after a promotion becomes a plain secondary again: asked
      // for (--rejoin), or implied by --discard-my-data (its data is to be overwritten whole).
      if (opts.rejoin || opts.discardMyData) {
        const was = env.storage.exists(state.commits)
          ? await finishPromotedStore(state, image, {
              history,
              activity,
              log: (m) => opts.logger.info(m),
              onlyIfPromoted: true,
              meta: opts.meta,
              clock: env.clock,
              random: env.random,
            })
          : -1;
        if (was >= 0)
          opts.logger.warn(
            `${opts.rejoin ? '--rejoin' : '--discard-my-data'}: this node's promoted state is folded into its ` +
              `image; it rejoins as a secondary and will be resynchronised (its writes since the fork are rolled back)`,
          );
      }
      // After the fold above: finishing a promoted store records its generation in the history.
      if (opts.discardMyData) {
        history.discard();
        opts.logger.warn(`--discard-my-data: forgot this node's history; it will be fully resynchronised`);
      }
      store = await SecondaryStore.open(state, image, {
        history,
        activity,
        discardData: opts.discardMyData,
        foldBytes: tunables(opts.tunables).promotedFoldBytes,
        spareJournalBytes: tunables(opts.tunables).spareJournalBytes,
        meta: opts.meta,
        clock: env.clock,
        random: env.random,
        hashing: env.hashing,
        log: (m) => opts.logger.info(m),
        onApplyError: (err) => {
          opts.logger.warn(`applying a committed epoch to ${opts.image} failed: ${err.message}`);
          if (holder.replica) holder.replica.applyError = err.message;
        },
      });
    } catch (err) {
      await activity.close();
      throw err;
    }
    state.writeNodeFile({
      role: store.promoted ? 'promoted' : 'secondary',
      export: opts.exportName,
      image: opts.image,
      size: image.size,
    });
    const replica = new SecondaryReplica(opts, env, state, store, history, activity);
    holder.replica = replica;
    return replica;
  }

  /** Listen for the primary. */
  listen(port: number, host: string) {
    return this.link.listen(port, host);
  }

  /**
   * Re-protection: this promoted node becomes a replicating primary for a
   * secondary at `peer` (a returning node or a new one), without interrupting
   * the SVM's connections: the export switches to a replicating device over
   * the same disk between two requests. The resync starts at the hello.
   */
  async reprotect(peerText: string) {
    if (!this.store.promoted)
      throw new ColoError(
        'EINVAL',
        `this node is a secondary, not a primary: run reprotect on the primary (here: colo-blk failover first, if the primary is gone)`,
      );
    if (!peerText)
      throw new ColoError(
        'EUSAGE',
        "reprotect needs 'peer' (HOST:PORT of the secondary's --replication-listen)",
      );
    const peer = parseHostPort(peerText, 'peer');
    if (this.primary) {
      const cur = this.primary.opts.peer;
      if (cur.host === peer.host && cur.port === peer.port) return this.primary.status();
      // Another secondary (or the same one back on another address): the link moves to it.
      return this.primary.reprotect(peerText);
    }
    const db = this.store.db;
    const firstEpoch = Math.max(Number((await db.get('epoch')) ?? 1), this.store.lastCommitted + 1);
    const primary = new PrimaryReplica(
      {
        exportName: this.opts.exportName,
        image: this.opts.image,
        peer,
        firstEpoch,
        attached: true,
        heartbeat: this.opts.heartbeat,
        connections: this.opts.connections,
        tunables: this.opts.tunables,
        logger: this.opts.logger,
      },
      this.env,
      this.state,
      db,
      this.store.svmDevice,
      this.history,
      this.activity,
    );
    await this.exportDevice.swap(primary.device);
    this.primary = primary;
    primary.start();
    this.opts.logger.warn(`re-protecting: this node is now a replicating primary for ${peerText}`);
    return primary.status();
  }

  /** Failover: this node becomes the primary of a new generation. */
  async promote(reason: string, commitThrough?: number, force = false) {
    const t = this.env.clock.mono();
    this.link.cancelFailover();
    const r = await this.store.promote(reason, commitThrough, force);
    this.link.dropPrimary();
    this.lastPromotionMs = this.env.clock.mono() - t;
    this.opts.logger.warn(
      `promoted to primary (generation ${r.generation}) in ${this.lastPromotionMs.toFixed(1)} ms: ${reason}`,
    );
    return { role: 'primary', ...r, ms: this.lastPromotionMs, reason };
  }

  status() {
    const pending = this.store.pendingEpochs();
    return {
      role: this.store.promoted ? 'primary' : 'secondary',
      generation: this.history.last?.n ?? this.store.generation,
      generationId: this.history.last?.id ?? null,
      node: this.history.node,
      history: this.history.generations,
      syncing: this.store.syncing,
      consistent: this.store.syncing === null && !this.store.fresh,
      /** A new node: it never received anything from a primary (nor served as one). */
      fresh: this.store.fresh,
      refusal: this.link.refusal,
      decision: this.link.decision,
      unprotected: this.store.promoted ? this.activity.summary() : null,
      promoted: this.store.promoted,
      promotionMs: this.lastPromotionMs,
      failoverPending: this.link.core.failoverPending,
      failover: this.opts.failover ?? 'auto',
      export: this.opts.exportName,
      image: this.opts.image,
      size: this.store.size,
      committedEpoch: this.store.lastCommitted,
      appliedEpoch: this.store.lastApplied,
      durableEpoch: this.store.durableEpoch,
      epoch: pending.length ? pending[pending.length - 1].epoch : this.store.lastCommitted,
      pending: pending.map((e) => ({ epoch: e.epoch, state: e.state, writes: e.records, bytes: e.bytes })),
      overlay: { writes: this.store.overlayLayer.records, bytes: this.store.overlayLayer.dataBytes },
      // Applied epoch journals kept to be written over (epochs/spare-<k>.journal).
      spareJournals: this.store.spareJournals,
      link: {
        state: this.link.connected ? 'connected' : 'down',
        peer: this.link.peer,
        since: this.link.connectedSince,
        lastError: this.link.lastError,
        bytesReceived: this.link.bytesReceived,
        records: this.link.records,
        duplicates: this.link.duplicates,
        primaryLost: this.link.primaryLost,
      },
      lag: {
        uncommittedBytes: pending.filter((e) => e.state !== 'committed').reduce((a, e) => a + e.bytes, 0),
        unappliedBytes: pending.filter((e) => e.state === 'committed').reduce((a, e) => a + e.bytes, 0),
      },
      applyError: this.applyError,
      connections: this.opts.connections?.() ?? 0,
    };
  }

  inspect(epoch?: number, limit = 10_000) {
    const pending = this.store.pendingEpochs().filter((e) => epoch === undefined || e.epoch === epoch);
    if (epoch !== undefined && pending.length === 0)
      throw new ColoError('ENOENT', `epoch ${epoch} is not pending on this secondary`);
    for (const e of pending) this.store.epochLayer(e.epoch)!.journal.flush();
    this.store.overlayLayer.journal.flush();
    return {
      role: 'secondary',
      epochs: pending.map((e) => ({
        epoch: e.epoch,
        state: e.state === 'committed' ? 'committed-not-yet-applied' : e.state,
        ...inspectJournal(this.store.epochLayer(e.epoch)!.path, {
          limit,
          storage: this.env.storage,
          bounds: epochJournal(e.epoch),
        }),
      })),
      overlay: inspectJournal(this.store.overlayLayer.path, { limit, storage: this.env.storage }),
    };
  }

  prometheus(): string {
    const s = this.status();
    return renderPrometheus([
      { name: 'colo_committed_epoch', help: 'Last committed epoch', type: 'gauge', value: s.committedEpoch },
      {
        name: 'colo_applied_epoch',
        help: 'Last epoch applied to the image',
        type: 'gauge',
        value: s.appliedEpoch,
      },
      {
        name: 'colo_pending_bytes',
        help: 'Buffered PVM bytes not yet committed',
        type: 'gauge',
        value: s.lag.uncommittedBytes,
      },
      {
        name: 'colo_unapplied_bytes',
        help: 'Committed bytes not yet in the image',
        type: 'gauge',
        value: s.lag.unappliedBytes,
      },
      {
        name: 'colo_overlay_bytes',
        help: "SVM's own writes since the last checkpoint",
        type: 'gauge',
        value: s.overlay.bytes,
      },
      {
        name: 'colo_bytes_received_total',
        help: 'Bytes received on the replication link',
        type: 'counter',
        value: s.link.bytesReceived,
      },
      {
        name: 'colo_link_up',
        help: '1 if the primary is connected',
        type: 'gauge',
        value: s.link.state === 'connected' ? 1 : 0,
      },
      { name: 'colo_nbd_connections', help: 'Open NBD connections', type: 'gauge', value: s.connections },
    ]);
  }

  async close(): Promise<void> {
    this.closing = true;
    this.link.cancelFailover();
    await this.primary?.close();
    await this.link.close();
    await this.store.close();
    await this.activity.close();
  }
}

/** The control routes of a secondary; once it re-protects, the primary's routes answer instead. */
export function secondaryRoutes(node: SecondaryReplica): Route[] {
  const primaryOr =
    <T>(own: () => Promise<T>, path: string) =>
    async (q: URLSearchParams, b: Record<string, unknown>) => {
      const p = node.primary;
      if (!p) return own();
      const route = primaryRoutes(p).find((r) => r.path === path)!;
      return route.handler!(q, b);
    };
  return [
    { method: 'GET', path: '/status', handler: primaryOr(async () => node.status(), '/status') },
    {
      method: 'GET',
      path: '/inspect',
      handler: async (q, b) => primaryOr(async () => node.inspect(...inspectQuery(q)), '/inspect')(q, b),
    },
    {
      method: 'GET',
      path: '/metrics',
      handler: primaryOr(async () => node.prometheus(), '/metrics'),
      text: true,
    },
    ...(['/seal', '/durable', '/commit', '/checkpoint'] as const).map((p) => ({
      method: 'POST' as const,
      path: p,
      handler: primaryOr(async () => {
        throw new ColoError(
          'EINVAL',
          `${p}: this node is a ${node.store.promoted ? 'promoted primary without a secondary (colo-blk reprotect pairs one)' : 'secondary; checkpoints are driven on the primary'}`,
        );
      }, p),
    })),
    {
      method: 'POST',
      path: '/reprotect',
      handler: async (q, b) => node.reprotect(String(b.peer ?? q.get('peer') ?? '')),
    },
    {
      method: 'POST',
      path: '/failover',
      handler: async (q, b) => {
        const commit = numberParam(q, b, 'commit', { ...EPOCH, min: 0 });
        const force = b.force === true || q.get('force') === '1' || q.get('force') === 'true';
        return node.promote(
          String(b.reason ?? `operator request (colo-blk failover${force ? ' --force' : ''})`),
          commit,
          force,
        );
      },
    },
    {
      method: 'POST',
      path: '/drain-apply',
      handler: async () => {
        await node.store.drainApply();
        return { applied: node.store.lastApplied };
      },
    },
  ];
}
