/**
 * `colo-blk primary`: the process around a PrimaryReplica. It opens the
 * image, serves the PVM's disk over NBD and the control API, and closes
 * everything in order.
 */
import { FileDevice, type IoMode } from '../../block/file.js';
import type { Tunables } from '../../limits.js';
import { NbdServer, type Logger, type NbdTlsConfig } from '../../net/server.js';
import type { TlsCredentials } from '../../net/tls/credentials.js';
import { nodeEnv } from '../../sys/env.js';
import type { Endpoint } from '../../util/address.js';
import { ControlServer } from '../control.js';
import type { HeartbeatOptions } from './core.js';
import { PrimaryReplica, primaryRoutes } from './replica.js';
import { StateDir } from '../state-dir.js';

export type { Endpoint } from '../../util/address.js';
export type { CheckpointResult, PeerState } from './replica.js';

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
  /** See PrimaryReplicaOptions.loneAfterMs. */
  loneAfterMs?: number;
  tunables?: Partial<Tunables>;
  /** TLS on the NBD port (STARTTLS). */
  nbdTls?: NbdTlsConfig;
  /** Mutual TLS on the replication link; without it the link is plain TCP. */
  linkTls?: TlsCredentials | null;
  logger: Logger;
}

export class PrimaryNode {
  addresses!: { nbd: Endpoint; control: Endpoint };

  private constructor(
    readonly opts: PrimaryNodeOptions,
    readonly replica: PrimaryReplica,
    readonly image: FileDevice,
    readonly nbd: NbdServer,
    readonly control: ControlServer,
  ) {}

  static async start(opts: PrimaryNodeOptions): Promise<PrimaryNode> {
    const env = nodeEnv(opts.linkTls, (msg) => opts.logger.warn(msg));
    const image = await FileDevice.open(opts.image, { size: opts.size, io: opts.io, log: opts.logger });
    const holder: { nbd?: NbdServer } = {};
    let replica: PrimaryReplica;
    try {
      replica = await PrimaryReplica.open(env, new StateDir(opts.stateDir, env.storage), image, {
        exportName: opts.exportName,
        image: opts.image,
        peer: opts.peer,
        budgetBytes: opts.budgetBytes,
        heartbeat: opts.heartbeat,
        loneAfterMs: opts.loneAfterMs,
        tunables: opts.tunables,
        connections: () => holder.nbd?.connectionCount ?? 0,
        logger: opts.logger,
      });
    } catch (err) {
      await image.close();
      throw err;
    }
    const nbd = new NbdServer(
      [{ name: opts.exportName, device: replica.device, description: `PVM disk ${opts.image}` }],
      { logger: opts.logger, tls: opts.nbdTls },
    );
    holder.nbd = nbd;
    const control = new ControlServer(primaryRoutes(replica));
    const node = new PrimaryNode(opts, replica, image, nbd, control);
    const nbdAddr = await nbd.listen(opts.listen.port, opts.listen.host);
    const ctlAddr = await control.listen(opts.control.port, opts.control.host);
    node.addresses = {
      nbd: { host: nbdAddr.address, port: nbdAddr.port },
      control: { host: ctlAddr.address, port: ctlAddr.port },
    };
    replica.start();
    return node;
  }

  async close(): Promise<void> {
    await this.nbd.close();
    await this.control.close();
    await this.replica.close();
    await this.image.close();
  }
}
