/**
 * A primary node: serves the PVM's disk over NBD, logs every mutation per
 * epoch, mirrors it to the secondary, and runs the checkpoint protocol.
 *
 * Checkpoint sequence (each step a control call, so a coordinator can put the
 * memory checkpoint between them):
 *   1. seal     — drain in-flight writes, close epoch N, open N+1
 *   2. durable  — wait until the secondary has fsync'd all of N
 *   3. commit   — (after the memory state of N arrived) the secondary commits N
 * `checkpoint` runs all three. A failed step fails the checkpoint with the
 * reason; no data is lost: epoch N stays in the log and is resent.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { ClassicLevel } from 'classic-level';
import { ColoError } from '../errors.js';
import { GiB } from '../limits.js';
import { FileDevice, type IoMode } from '../block/file.js';
import { NbdServer, type Logger } from '../net/server.js';
import { ControlServer } from './control.js';
import { inspectJournal } from './inspect.js';
import { PrimaryLink, type HeartbeatOptions } from './link.js';
import { renderPrometheus, Summary } from './metrics.js';
import { PrimaryLog } from './primary-log.js';
import { ReplicatingDevice } from './replicating-device.js';
import { openMeta, writeNodeFile } from './state-dir.js';

export interface Endpoint {
  host: string;
  port: number;
}

export interface PrimaryNodeOptions {
  listen: Endpoint;
  exportName: string;
  image: string;
  size?: number;
  stateDir: string;
  peer: Endpoint;
  control: Endpoint;
  io?: IoMode;
  /** Bytes the log may hold for a lagging secondary before it is marked out of sync. */
  budgetBytes?: number;
  heartbeat?: HeartbeatOptions;
  logger: Logger;
}

export interface CheckpointResult {
  epoch: number;
  writes: number;
  bytes: number;
  sealMs: number;
  durableMs: number;
  commitMs: number;
  totalMs: number;
}

const ms = (start: bigint) => Number(process.hrtime.bigint() - start) / 1e6;

export class PrimaryNode {
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
  addresses!: { nbd: Endpoint; control: Endpoint };

  private constructor(
    readonly opts: PrimaryNodeOptions,
    readonly db: ClassicLevel<string, string>,
    readonly image: FileDevice,
    readonly plog: PrimaryLog,
    readonly device: ReplicatingDevice,
    readonly link: PrimaryLink,
    readonly nbd: NbdServer,
    readonly control: ControlServer,
  ) {}

  static async start(opts: PrimaryNodeOptions): Promise<PrimaryNode> {
    fs.mkdirSync(opts.stateDir, { recursive: true });
    const db = await openMeta(opts.stateDir);
    const image = await FileDevice.open(opts.image, { size: opts.size, io: opts.io });
    const epoch = Number((await db.get('epoch')) ?? 1);
    await db.batch(
      [
        { type: 'put', key: 'role', value: 'primary' },
        { type: 'put', key: 'size', value: String(image.size) },
      ],
      { sync: true },
    );
    writeNodeFile(opts.stateDir, {
      role: 'primary',
      export: opts.exportName,
      image: opts.image,
      size: image.size,
    });
    const plog = new PrimaryLog(path.join(opts.stateDir, 'epochs'), epoch, opts.budgetBytes ?? 1 * GiB);
    const device = new ReplicatingDevice(image, plog);
    const link = new PrimaryLink(plog, {
      host: opts.peer.host,
      port: opts.peer.port,
      size: image.size,
      heartbeat: opts.heartbeat,
      log: (m) => opts.logger.info(`link: ${m}`),
    });
    device.throttle = () => link.waitForRoom();
    link.on('deposed', (why: string) => {
      device.deposed = why;
      opts.logger.warn(`this primary is deposed; refusing all writes from now on: ${why}`);
    });
    const nbd = new NbdServer([{ name: opts.exportName, device, description: `PVM disk ${opts.image}` }], {
      logger: opts.logger,
    });
    const control = new ControlServer();
    const node = new PrimaryNode(opts, db, image, plog, device, link, nbd, control);
    control.add(node.routes());
    const nbdAddr = await nbd.listen(opts.listen.port, opts.listen.host);
    const ctlAddr = await control.listen(opts.control.port, opts.control.host);
    node.addresses = {
      nbd: { host: nbdAddr.address, port: nbdAddr.port },
      control: { host: ctlAddr.address, port: ctlAddr.port },
    };
    link.start();
    return node;
  }

  private routes() {
    const epochParam = (q: URLSearchParams, b: Record<string, unknown>) => {
      const v = b.epoch ?? q.get('epoch');
      const n = Number(v);
      if (v === undefined || v === null || !Number.isSafeInteger(n) || n < 1)
        throw new ColoError('EINVAL', `a positive integer 'epoch' is required (got ${v})`);
      return n;
    };
    const timeout = (q: URLSearchParams, b: Record<string, unknown>) =>
      Number(b.timeoutMs ?? q.get('timeoutMs') ?? 10_000);
    return [
      { method: 'POST' as const, path: '/seal', handler: async () => this.seal() },
      {
        method: 'POST' as const,
        path: '/durable',
        handler: async (q: URLSearchParams, b: Record<string, unknown>) =>
          this.waitDurable(epochParam(q, b), timeout(q, b)),
      },
      {
        method: 'POST' as const,
        path: '/commit',
        handler: async (q: URLSearchParams, b: Record<string, unknown>) =>
          this.commit(epochParam(q, b), timeout(q, b)),
      },
      {
        method: 'POST' as const,
        path: '/checkpoint',
        handler: async (q: URLSearchParams, b: Record<string, unknown>) => this.checkpoint(timeout(q, b)),
      },
      { method: 'GET' as const, path: '/status', handler: async () => this.status() },
      {
        method: 'GET' as const,
        path: '/inspect',
        handler: async (q: URLSearchParams) =>
          this.inspect(q.get('epoch') ? Number(q.get('epoch')) : undefined, Number(q.get('limit') ?? 10_000)),
      },
      { method: 'GET' as const, path: '/metrics', handler: async () => this.prometheus(), text: true },
    ];
  }

  /** Phase 1: close the current epoch. */
  async seal(): Promise<{ epoch: number; writes: number; bytes: number; ms: number }> {
    const t = process.hrtime.bigint();
    // Persist the next epoch number first: after a crash this node never reuses
    // an epoch number the secondary may already hold.
    await this.db.put('epoch', String(this.plog.current + 1), { sync: true });
    const seal = await this.device.seal();
    const took = ms(t);
    this.metrics.seal.observe(took / 1000);
    return { epoch: seal.e, writes: seal.n, bytes: seal.b, ms: took };
  }

  /** Phase 2: the secondary holds epoch N durably. */
  async waitDurable(epoch: number, timeoutMs = 10_000): Promise<{ epoch: number; ms: number }> {
    if (epoch >= this.plog.current)
      throw new ColoError('EINVAL', `epoch ${epoch} is not sealed yet (current ${this.plog.current})`);
    const t = process.hrtime.bigint();
    await this.link.waitDurable(epoch, timeoutMs);
    const took = ms(t);
    this.metrics.durable.observe(took / 1000);
    return { epoch, ms: took };
  }

  /** Phase 3: the secondary commits through epoch N. */
  async commit(
    epoch: number,
    timeoutMs = 10_000,
  ): Promise<{ epoch: number; ms: number; overlayDiscarded?: unknown }> {
    if (epoch > this.link.durableEpoch)
      throw new ColoError(
        'EINVAL',
        `epoch ${epoch} is not durable on the secondary yet (durable: ${this.link.durableEpoch})`,
      );
    const t = process.hrtime.bigint();
    const r = await this.link.commit(epoch, timeoutMs);
    const took = ms(t);
    this.metrics.commit.observe(took / 1000);
    return { epoch, ms: took, overlayDiscarded: r.overlayDiscarded };
  }

  /** All three phases. */
  async checkpoint(timeoutMs = 10_000): Promise<CheckpointResult> {
    if (this.checkpointing) throw new ColoError('EINVAL', 'a checkpoint is already running');
    this.checkpointing = true;
    const t = process.hrtime.bigint();
    try {
      const s = await this.seal();
      const d = await this.waitDurable(s.epoch, timeoutMs);
      const c = await this.commit(s.epoch, timeoutMs);
      const result: CheckpointResult = {
        epoch: s.epoch,
        writes: s.writes,
        bytes: s.bytes,
        sealMs: s.ms,
        durableMs: d.ms,
        commitMs: c.ms,
        totalMs: ms(t),
      };
      this.metrics.checkpoints++;
      this.metrics.total.observe(result.totalMs / 1000);
      this.lastCheckpoint = { ...result, at: Date.now() };
      return result;
    } catch (err) {
      this.metrics.checkpointFailures++;
      this.lastFailure = { at: Date.now(), message: (err as Error).message };
      throw err;
    } finally {
      this.checkpointing = false;
    }
  }

  status() {
    const held = this.plog.heldEpochs();
    return {
      role: 'primary',
      generation: 1,
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
        journalBytes: e.journal.size,
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
        heldBytes: this.plog.heldBytes,
        epochs: this.plog.current - 1 - this.link.committedEpoch,
      },
      outOfSync: this.plog.outOfSync,
      deposed: this.link.deposed,
      lastCheckpoint: this.lastCheckpoint,
      lastFailure: this.lastFailure,
      checkpoints: this.metrics.checkpoints,
      checkpointFailures: this.metrics.checkpointFailures,
      connections: this.nbd.connectionCount,
    };
  }

  inspect(epoch?: number, limit = 10_000) {
    const held = this.plog.heldEpochs().filter((e) => epoch === undefined || e.epoch === epoch);
    for (const e of held) e.journal.flush(); // the file must hold every append before it is read
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
        ...inspectJournal(e.journal.path, limit),
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

  async close(): Promise<void> {
    await this.nbd.close();
    this.link.close();
    await this.control.close();
    await this.db.put('epoch', String(this.plog.current + 1), { sync: true });
    this.plog.close();
    await this.image.close();
    await this.db.close();
  }
}
