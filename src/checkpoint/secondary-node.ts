/**
 * A secondary node: receives the PVM's epochs into its buffer, commits them
 * when the primary says so, and serves the SVM its own disk (the last
 * checkpoint plus the SVM's overlay) over NBD.
 */
import fs from 'node:fs';
import { ColoError } from '../errors.js';
import { FileDevice, type IoMode } from '../block/file.js';
import { NbdServer, type Logger } from '../net/server.js';
import { ControlServer } from './control.js';
import { inspectJournal } from './inspect.js';
import { SecondaryLink, type HeartbeatOptions } from './link.js';
import { renderPrometheus } from './metrics.js';
import type { Endpoint } from './primary-node.js';
import { SecondaryStore } from './secondary-store.js';
import { writeNodeFile } from './state-dir.js';

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
  logger: Logger;
}

export class SecondaryNode {
  addresses!: { nbd: Endpoint; replication: Endpoint; control: Endpoint };
  applyError: string | null = null;
  private failoverTimer: NodeJS.Timeout | null = null;
  /** Time from the decision to promote until the SVM disk serves as primary. */
  lastPromotionMs: number | null = null;

  private constructor(
    readonly opts: SecondaryNodeOptions,
    readonly image: FileDevice,
    readonly store: SecondaryStore,
    readonly link: SecondaryLink,
    readonly nbd: NbdServer,
    readonly control: ControlServer,
  ) {}

  static async start(opts: SecondaryNodeOptions): Promise<SecondaryNode> {
    fs.mkdirSync(opts.stateDir, { recursive: true });
    const image = await FileDevice.open(opts.image, { size: opts.size, io: opts.io });
    let store: SecondaryStore;
    const holder: { node?: SecondaryNode } = {};
    try {
      store = await SecondaryStore.open(opts.stateDir, image, {
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
      role: 'secondary',
      export: opts.exportName,
      image: opts.image,
      size: image.size,
    });
    const link = new SecondaryLink(store, {
      heartbeat: opts.heartbeat,
      log: (m) => opts.logger.info(`link: ${m}`),
    });
    const nbd = new NbdServer(
      [{ name: opts.exportName, device: store.svmDevice, description: `SVM disk ${opts.image}` }],
      {
        logger: opts.logger,
      },
    );
    const control = new ControlServer();
    const node = new SecondaryNode(opts, image, store, link, nbd, control);
    holder.node = node;
    control.add([
      { method: 'GET', path: '/status', handler: async () => node.status() },
      {
        method: 'GET',
        path: '/inspect',
        handler: async (q) =>
          node.inspect(q.get('epoch') ? Number(q.get('epoch')) : undefined, Number(q.get('limit') ?? 10_000)),
      },
      { method: 'GET', path: '/metrics', handler: async () => node.prometheus(), text: true },
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
    if (this.store.promoted || this.failoverTimer) return;
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
      generation: this.store.generation,
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
    await this.nbd.close();
    await this.link.close();
    await this.control.close();
    await this.store.close();
    await this.image.close();
  }
}
