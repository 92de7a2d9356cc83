/**
 * `colo-blk secondary`: the process around a SecondaryReplica. It opens the
 * image, serves the SVM's disk over NBD, listens for the primary, serves the
 * control API, and closes everything in order.
 */
import { FileDevice, type IoMode } from '../../block/file.js';
import type { Tunables } from '../../limits.js';
import { NbdServer, type Logger, type NbdTlsConfig } from '../../net/server.js';
import type { TlsCredentials } from '../../net/tls/credentials.js';
import { nodeEnv } from '../../sys/env.js';
import type { Endpoint } from '../../util/address.js';
import { ControlServer } from '../control.js';
import type { HeartbeatOptions } from '../primary/core.js';
import { SecondaryReplica, secondaryRoutes } from './replica.js';
import { StateDir } from '../state-dir.js';

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
  /** See SecondaryReplicaOptions. */
  failover?: 'auto' | 'manual';
  failoverGraceMs?: number;
  discardMyData?: boolean;
  rejoin?: boolean;
  tunables?: Partial<Tunables>;
  /** TLS on the NBD port (STARTTLS). */
  nbdTls?: NbdTlsConfig;
  /** Mutual TLS on the replication link; without it the link is plain TCP. */
  linkTls?: TlsCredentials | null;
  logger: Logger;
}

export class SecondaryNode {
  addresses!: { nbd: Endpoint; replication: Endpoint; control: Endpoint };

  private constructor(
    readonly opts: SecondaryNodeOptions,
    readonly replica: SecondaryReplica,
    readonly image: FileDevice,
    readonly nbd: NbdServer,
    readonly control: ControlServer,
  ) {}

  static async start(opts: SecondaryNodeOptions): Promise<SecondaryNode> {
    const env = nodeEnv(opts.linkTls, (msg) => opts.logger.warn(msg));
    const image = await FileDevice.open(opts.image, { size: opts.size, io: opts.io, log: opts.logger });
    const holder: { nbd?: NbdServer } = {};
    let replica: SecondaryReplica;
    try {
      replica = await SecondaryReplica.open(env, new StateDir(opts.stateDir, env.storage), image, {
        exportName: opts.exportName,
        image: opts.image,
        heartbeat: opts.heartbeat,
        failover: opts.failover,
        failoverGraceMs: opts.failoverGraceMs,
        discardMyData: opts.discardMyData,
        rejoin: opts.rejoin,
        tunables: opts.tunables,
        connections: () => holder.nbd?.connectionCount ?? 0,
        logger: opts.logger,
      });
    } catch (err) {
      await image.close();
      throw err;
    }
    const nbd = new NbdServer(
      [{ name: opts.exportName, device: replica.exportDevice, description: `SVM disk ${opts.image}` }],
      { logger: opts.logger, tls: opts.nbdTls },
    );
    holder.nbd = nbd;
    const control = new ControlServer(secondaryRoutes(replica));
    const node = new SecondaryNode(opts, replica, image, nbd, control);
    try {
      const nbdAddr = await nbd.listen(opts.listen.port, opts.listen.host);
      const repl = await replica.listen(opts.replicationListen.port, opts.replicationListen.host);
      const ctlAddr = await control.listen(opts.control.port, opts.control.host);
      node.addresses = {
        nbd: { host: nbdAddr.address, port: nbdAddr.port },
        replication: { host: repl.address, port: repl.port },
        control: { host: ctlAddr.address, port: ctlAddr.port },
      };
    } catch (err) {
      await node.close();
      throw err;
    }
    return node;
  }

  async close(): Promise<void> {
    await this.nbd.close();
    await this.control.close();
    await this.replica.close();
    await this.image.close();
  }
}
