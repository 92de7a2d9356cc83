/**
 * A secondary node: receives the PVM's epochs into its buffer, commits them
 * when the primary says so, and serves the SVM its own disk (the last
 * checkpoint plus the SVM's overlay) over NBD.
 */
import fs from 'node:fs';
import path from 'node:path';
import { ColoError } from '../errors.js';
import { FileDevice, type IoMode } from '../block/file.js';
import { SwitchDevice } from '../block/switch.js';
import { ActivityLog } from '../failover/activity.js';
import { History } from '../failover/history.js';
import { NbdServer, type Logger } from '../net/server.js';
import { ControlServer } from './control.js';
import { inspectJournal } from './inspect.js';
import { SecondaryLink, type HeartbeatOptions } from './link.js';
import { renderPrometheus } from './metrics.js';
import { finishPromotedStore } from './finish-promoted.js';
import { PrimaryNode, type Endpoint } from './primary-node.js';
import { SecondaryStore } from './secondary-store.js';
import { writeNodeFile } from './state-dir.js';
import { parseHostPort } from '../util/address.js';

/**
 * A state directory that last served a primary (an old primary coming back
 * as a secondary): its epoch journals are the old primary's log, not
 * anything received, so they go. What it wrote that the new primary lacks is
 * in its activity log, which the resync rolls back.
 */
function dropFormerPrimaryLog(dir: string, logger: Logger): void {
  let role: string | undefined;
  try {
    role = (JSON.parse(fs.readFileSync(path.join(dir, 'node.json'), 'utf8')) as { role?: string }).role;
  } catch {
    return; // a new state directory
  }
  if (role !== 'primary') return;
  const epochs = path.join(dir, 'epochs');
  if (fs.existsSync(epochs))
    for (const name of fs.readdirSync(epochs)) fs.rmSync(path.join(epochs, name), { force: true });
  logger.info(`${dir} last served a primary: starting as a secondary, to be resynchronised`);
}

export interface SecondaryNodeOptions {
  listen: Endpoint;
  exportName: string;
  image: string;
  size?: number;
  stateDir: string;
  replicationListen: Endpoint;
  control: Endpoint;
  io?: IoMode;
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
  /** Once promoted, the overlay is folded into the image whenever it holds this many bytes. */
  foldBytes?: number;
  logger: Logger;
}

export class SecondaryNode {
  addresses!: { nbd: Endpoint; replication: Endpoint; control: Endpoint };
  applyError: string | null = null;
  private failoverTimer: NodeJS.Timeout | null = null;
  private closing = false;
  /** Time from the decision to promote until the SVM disk serves as primary. */
  lastPromotionMs: number | null = null;
  /** Set once this promoted node re-protects a secondary: it is then a replicating primary. */
  primary: PrimaryNode | null = null;

  private constructor(
    readonly opts: SecondaryNodeOptions,
    readonly image: FileDevice,
    readonly store: SecondaryStore,
    readonly link: SecondaryLink,
    readonly nbd: NbdServer,
    readonly control: ControlServer,
    readonly exportDevice: SwitchDevice,
    readonly history: History,
    readonly activity: ActivityLog,
  ) {}

  static async start(opts: SecondaryNodeOptions): Promise<SecondaryNode> {
    fs.mkdirSync(opts.stateDir, { recursive: true });
    const image = await FileDevice.open(opts.image, { size: opts.size, io: opts.io });
    let store: SecondaryStore;
    let history: History;
    let activity: ActivityLog;
    const holder: { node?: SecondaryNode } = {};
    try {
      history = History.load(opts.stateDir);
      activity = ActivityLog.open(opts.stateDir, image.size);
      if (opts.discardMyData) {
        history.discard();
        opts.logger.warn(`--discard-my-data: forgot this node's history; it will be fully resynchronised`);
      }
      dropFormerPrimaryLog(opts.stateDir, opts.logger);
      if (opts.rejoin) {
        const was = fs.existsSync(path.join(opts.stateDir, 'commits.journal'))
          ? await finishPromotedStore(opts.stateDir, image, history, activity, opts.logger, true)
          : -1;
        if (was >= 0) {
          opts.logger.warn(
            `--rejoin: this node's promoted state is folded into its image; it rejoins as a secondary and ` +
              `will be resynchronised (its writes since the fork are rolled back)`,
          );
        }
      }
      store = await SecondaryStore.open(opts.stateDir, image, {
        history,
        activity,
        foldBytes: opts.foldBytes,
        log: (m) => opts.logger.info(m),
        onApplyError: (err) => {
          opts.logger.warn(`applying a committed epoch to ${opts.image} failed: ${err.message}`);
          if (holder.node) holder.node.applyError = err.message;
        },
      });
    } catch (err) {
      await image.close();
      throw err;
    }
    writeNodeFile(opts.stateDir, {
      role: store.promoted ? 'promoted' : 'secondary',
      export: opts.exportName,
      image: opts.image,
      size: image.size,
    });
    const link = new SecondaryLink(store, {
      heartbeat: opts.heartbeat,
      log: (m) => opts.logger.info(`link: ${m}`),
    });
    const exportDevice = new SwitchDevice(store.svmDevice);
    const nbd = new NbdServer(
      [{ name: opts.exportName, device: exportDevice, description: `SVM disk ${opts.image}` }],
      {
        logger: opts.logger,
      },
    );
    const control = new ControlServer();
    const node = new SecondaryNode(opts, image, store, link, nbd, control, exportDevice, history, activity);
    holder.node = node;
    // Once this node re-protects a secondary, the primary's routes answer instead.
    const primaryOr =
      <T>(own: () => Promise<T>, path: string) =>
      async (q: URLSearchParams, b: Record<string, unknown>) => {
        const p = node.primary;
        if (!p) return own();
        const route = p.routeTable().find((r) => r.path === path)!;
        return route.handler(q, b);
      };
    control.add([
      { method: 'GET', path: '/status', handler: primaryOr(async () => node.status(), '/status') },
      {
        method: 'GET',
        path: '/inspect',
        handler: async (q, b) =>
          primaryOr(
            async () =>
              node.inspect(
                q.get('epoch') ? Number(q.get('epoch')) : undefined,
                Number(q.get('limit') ?? 10_000),
              ),
            '/inspect',
          )(q, b),
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
        handler: async () => node.promote('operator request (colo-blk failover)'),
      },
      {
        method: 'POST',
        path: '/drain-apply',
        handler: async () => {
          await store.drainApply();
          return { applied: store.lastApplied };
        },
      },
    ]);
    if ((opts.failover ?? 'auto') === 'auto') {
      link.on('primary-lost', (lost: { reason: string }) => node.scheduleFailover(lost.reason));
      link.on('primary-connected', () => node.cancelFailover());
    }
    try {
      const nbdAddr = await nbd.listen(opts.listen.port, opts.listen.host);
      const replAddr = await link.listen(opts.replicationListen.port, opts.replicationListen.host);
      const ctlAddr = await control.listen(opts.control.port, opts.control.host);
      node.addresses = {
        nbd: { host: nbdAddr.address, port: nbdAddr.port },
        replication: { host: replAddr.address, port: replAddr.port },
        control: { host: ctlAddr.address, port: ctlAddr.port },
      };
    } catch (err) {
      await node.close();
      throw err;
    }
    return node;
  }

  /** Promote unless the primary comes back within the grace period. */
  scheduleFailover(reason: string): void {
    if (this.store.promoted || this.failoverTimer || this.closing) return;
    const grace = this.opts.failoverGraceMs ?? 1000;
    this.opts.logger.warn(`primary lost (${reason}); promoting in ${grace} ms unless it comes back`);
    this.failoverTimer = setTimeout(() => {
      this.failoverTimer = null;
      this.promote(`automatic failover: primary lost (${reason})`).catch((err: Error) =>
        this.opts.logger.warn(`automatic failover failed: ${err.message}`),
      );
    }, grace);
  }

  cancelFailover(): void {
    if (!this.failoverTimer) return;
    clearTimeout(this.failoverTimer);
    this.failoverTimer = null;
    this.opts.logger.info('the primary is back: failover cancelled');
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
    const primary = PrimaryNode.attach(
      {
        listen: this.opts.listen,
        exportName: this.opts.exportName,
        image: this.opts.image,
        stateDir: this.opts.stateDir,
        peer,
        control: this.opts.control,
        io: this.opts.io,
        heartbeat: this.opts.heartbeat,
        logger: this.opts.logger,
      },
      db,
      this.store.svmDevice,
      this.history,
      this.activity,
      firstEpoch,
      this.nbd,
      this.control,
    );
    await this.exportDevice.swap(primary.device);
    this.primary = primary;
    primary.addresses = { nbd: this.addresses.nbd, control: this.addresses.control };
    primary.link.start();
    this.opts.logger.warn(`re-protecting: this node is now a replicating primary for ${peerText}`);
    return primary.status();
  }

  /** Failover: this node becomes the primary of a new generation. */
  async promote(reason: string) {
    const t = process.hrtime.bigint();
    this.cancelFailover();
    const r = await this.store.promote(reason);
    this.link.dropPrimary();
    this.lastPromotionMs = Number(process.hrtime.bigint() - t) / 1e6;
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
      consistent: this.store.syncing === null,
      refusal: this.link.refusal,
      decision: this.link.decision,
      unprotected: this.store.promoted
        ? { exactBytes: this.activity.exactBytes, hotBytes: this.activity.hotBytes }
        : null,
      promoted: this.store.promoted,
      promotionMs: this.lastPromotionMs,
      failoverPending: this.failoverTimer !== null,
      export: this.opts.exportName,
      image: this.opts.image,
      size: this.image.size,
      committedEpoch: this.store.lastCommitted,
      appliedEpoch: this.store.lastApplied,
      durableEpoch: this.store.durableEpoch,
      epoch: pending.length ? pending[pending.length - 1].epoch : this.store.lastCommitted,
      pending: pending.map((e) => ({ epoch: e.epoch, state: e.state, writes: e.records, bytes: e.bytes })),
      overlay: { writes: this.store.overlayLayer.records, bytes: this.store.overlayLayer.dataBytes },
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
      connections: this.nbd.connectionCount,
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
        ...inspectJournal(this.store.epochLayer(e.epoch)!.path, limit),
      })),
      overlay: inspectJournal(this.store.overlayLayer.path, limit),
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
    this.cancelFailover();
    await this.primary?.close();
    await this.nbd.close();
    await this.link.close();
    await this.control.close();
    await this.store.close();
    await this.activity.close();
    await this.image.close();
  }
}
