/**
 * `colo-blk guest`: the stand-in VM as a process. Its disk is a colo-blk
 * export reached through our NBD client; its control API is the
 * memory-checkpoint hook the COLO coordinator drives (`pause`, `save`,
 * `receive`, `load`, `resume`), plus `GET /hash` and `GET /status`.
 */
import { ColoError, toColoError } from '../errors.js';
import { ControlServer, controlRaw, type Route } from '../checkpoint/control.js';
import { NbdClient } from '../net/client.js';
import type { Logger } from '../net/server.js';
import type { TlsCredentials } from '../net/tls/credentials.js';
import { parseHostPort, type Endpoint } from '../util/address.js';
import { GuestServer } from './server.js';
import { DeltaSender, deltaBytes, GuestState } from './state.js';

export interface GuestNodeOptions {
  listen: Endpoint;
  control: Endpoint;
  /** nbd://HOST:PORT/EXPORT, or nbds:// for TLS */
  disk: string;
  /** TLS credentials for the disk (a CA to check the node with, or a PSK). */
  diskTls?: TlsCredentials | null;
  seed: number;
  nondeterminism: number;
  interleave?: boolean;
  jitterMs?: number;
  /** Bytes of in-memory state to start with (not on the disk), like a VM's RAM in use. */
  preloadBytes?: number;
  logger: Logger;
}

export function parseNbdUri(uri: string): { host: string; port: number; exportName: string; tls: boolean } {
  const m = /^nbd(s?):\/\/([^/:]+|\[[^\]]+\]):(\d+)\/(.+)$/.exec(uri);
  if (!m)
    throw new ColoError(
      'EUSAGE',
      `bad NBD address '${uri}': expected nbd://HOST:PORT/EXPORT (nbds:// for TLS), e.g. nbd://127.0.0.1:10809/disk0`,
    );
  return { host: m[2].replace(/^\[|\]$/g, ''), port: Number(m[3]), exportName: m[4], tls: m[1] === 's' };
}

export class GuestNode {
  addresses!: { http: Endpoint; control: Endpoint };

  private constructor(
    readonly state: GuestState,
    readonly server: GuestServer,
    readonly control: ControlServer,
    readonly disk: NbdClient,
  ) {}

  static async start(opts: GuestNodeOptions): Promise<GuestNode> {
    if (!(opts.nondeterminism >= 0 && opts.nondeterminism <= 1))
      throw new ColoError(
        'EUSAGE',
        `--nondeterminism must be a fraction from 0 to 1, not ${opts.nondeterminism}`,
      );
    const where = parseNbdUri(opts.disk);
    if (where.tls && !opts.diskTls)
      throw new ColoError(
        'EUSAGE',
        `${opts.disk} asks for TLS: give --tls-certs DIR (with ca-cert.pem) or --tls-psk FILE`,
      );
    if (!where.tls && opts.diskTls)
      throw new ColoError('EUSAGE', `TLS credentials were given but ${opts.disk} is plain: write nbds://`);
    const disk = await NbdClient.connect({ ...where, tls: opts.diskTls ?? undefined });
    const state = new GuestState(disk, { seed: opts.seed, nondeterminism: opts.nondeterminism });
    const recovered = await state.recover();
    if (recovered) opts.logger.info(`recovered ${recovered} records (${state.keys} keys) from the disk`);
    if (opts.preloadBytes) state.preload(opts.preloadBytes);
    const server = new GuestServer(state, {
      interleave: opts.interleave,
      jitterMs: opts.jitterMs,
      logger: opts.logger,
    });
    const control = new ControlServer(guestRoutes(state, server));
    const node = new GuestNode(state, server, control, disk);
    const http = await server.listen(opts.listen.port, opts.listen.host);
    const ctl = await control.listen(opts.control.port, opts.control.host);
    node.addresses = {
      http: { host: http.address, port: http.port },
      control: { host: ctl.address, port: ctl.port },
    };
    return node;
  }

  async close(): Promise<void> {
    await this.server.close();
    await this.control.close();
    await this.disk.close();
  }
}

/** The memory-checkpoint hook of the guest, as control routes. */
export function guestRoutes(state: GuestState, server: GuestServer): Route[] {
  const sender = new DeltaSender();
  return [
    {
      method: 'GET',
      path: '/status',
      handler: async () => ({
        role: 'guest',
        // What must be the same on both sides of a pair (the VM's configuration).
        identity: `guest nondeterminism=${state.nondeterminism} interleave=${server.interleave}`,
        ...state.status(),
        requests: server.requests,
        conns: server.positions(),
        // Its state can be captured while paused and sent once it runs again.
        earlyResume: true,
      }),
    },
    {
      method: 'GET',
      path: '/hash',
      handler: async (q) => ({ hash: state.hash(q.get('captured') === '1') }),
    },
    {
      method: 'GET',
      path: '/disk-hash',
      handler: async (q) => state.diskHash(q.get('whole') === '1', q.get('captured') === '1'),
    },
    { method: 'POST', path: '/mem/pause', handler: async () => ({ conns: await server.pause() }) },
    {
      method: 'POST',
      path: '/mem/resume',
      handler: async () => {
        server.resume();
        return {};
      },
    },
    { method: 'POST', path: '/mem/save', raw: async (q) => state.save(q.get('full') === '1') },
    {
      method: 'POST',
      path: '/mem/capture',
      handler: async (_q, body) => state.capture(body.full === true),
    },
    {
      method: 'POST',
      path: '/mem/checkpointed',
      handler: async () => {
        state.checkpointed();
        server.checkpointed();
        return {};
      },
    },
    {
      method: 'POST',
      path: '/mem/receive',
      raw: async (_q, body) => {
        try {
          return state.receive(body);
        } catch (err) {
          // Bytes that are not a memory checkpoint are the caller's mistake (400), not this guest's.
          const e = toColoError(err);
          throw e.code === 'EPROTO' ? new ColoError('EINVAL', e.message) : e;
        }
      },
    },
    {
      method: 'POST',
      path: '/mem/send',
      // The state goes straight to the other guest's /mem/receive, not through the coordinator.
      handler: async (_q, body) => {
        const to = parseHostPort(String(body.to ?? ''), "'to'");
        const full = body.full === true;
        const parts = body.captured === true ? state.takeCaptured(full) : state.save(full);
        await sender.send(parts, (pieces) => controlRaw(to, '/mem/receive', pieces));
        return { bytes: deltaBytes(parts) };
      },
    },
    {
      method: 'POST',
      path: '/mem/load',
      handler: async (_q, body) => {
        const checkpoint = typeof body.checkpoint === 'string' ? body.checkpoint : undefined;
        // The same load again (its first answer was lost): done already, connections included.
        if (state.loadedAlready(checkpoint)) return { entries: 0, again: true };
        const r = state.load(checkpoint);
        server.align((body.targets as Record<string, number> | undefined) ?? {});
        return r;
      },
    },
    {
      method: 'POST',
      path: '/mem/discard',
      handler: async () => {
        state.discard();
        return {};
      },
    },
  ];
}
