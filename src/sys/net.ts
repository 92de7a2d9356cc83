/**
 * The replication link's transport, behind an interface: TCP in a process,
 * simulated connections in the simulator (test/sim/net.ts), which cut them at
 * any byte, delay them and partition nodes.
 *
 * A `Conn` is the part of net.Socket the link uses: a byte stream with
 * backpressure ('drain'), pausing, and 'connect' / 'data' / 'close' /
 * 'error' events.
 */
import net from 'node:net';
import tls from 'node:tls';
import { readIntoSlabs } from './slab-reads.js';
import { listenOn } from '../util/listen.js';
import { clientTlsOptions, serverTlsOptions, type TlsCredentials } from '../net/tls/credentials.js';

export interface Conn {
  /** `done` runs once the bytes are handed to the kernel (or the connection is gone); `buf` may be reused then. */
  write(buf: Buffer, done?: () => void): boolean;
  cork(): void;
  uncork(): void;
  pause(): void;
  resume(): void;
  /** Finish sending what was written, then close. */
  end(): void;
  destroy(): void;
  readonly destroyed: boolean;
  /** end() was called: a write now would fail (a socket destroys itself, and a reset loses what the peer had not read). */
  readonly writableEnded: boolean;
  readonly remoteAddress?: string;
  readonly remotePort?: number;
  on(event: 'connect' | 'drain' | 'close', fn: () => void): this;
  on(event: 'data', fn: (chunk: Buffer) => void): this;
  on(event: 'error', fn: (err: Error) => void): this;
  once(event: 'connect' | 'drain' | 'close', fn: () => void): this;
}

export interface Listener {
  readonly address: string;
  readonly port: number;
  close(): Promise<void>;
}

export interface Net {
  /** Connect; the connection emits 'connect' once established, or 'error' then 'close'. */
  connect(host: string, port: number): Conn;
  listen(host: string, port: number, onConnection: (conn: Conn) => void): Promise<Listener>;
}

/** Bytes the replication link's socket queues in memory before its sender falls back to the journal. */
export const LINK_SOCKET_QUEUE_BYTES = 8 * 1024 * 1024;

export const tcpNet: Net = {
  connect(host, port) {
    // The link's sender stops at the socket's high-water mark and later streams from the journal:
    // at Node's default (16 KiB) almost every large write was read back from the journal file.
    // A few MiB queued in memory are the frames' own buffers (no copy).
    const opts = { host, port, writableHighWaterMark: LINK_SOCKET_QUEUE_BYTES }; // a stream option @types/node omits
    const socket = net.connect(opts as net.NetConnectOpts);
    socket.setNoDelay(true);
    return socket as unknown as Conn;
  },
  async listen(host, port, onConnection) {
    // The secondary receives every replicated byte here: read into slabs (slab-reads.ts).
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (s) =>
      onConnection(readIntoSlabs(s) as unknown as Conn),
    );
    const addr = await listenOn(server, port, host);
    return {
      address: addr.address,
      port: addr.port,
      close: () => new Promise<void>((resolve) => server.close(() => resolve())),
      server,
    };
  },
};

/**
 * The link over mutually authenticated TLS: X.509 with a client certificate
 * demanded and checked on both ends (one CA), or a PSK. The listener hands a
 * connection to the link only after the handshake has verified the peer, so
 * a stranger is dropped before a single frame is read; there is no plaintext
 * fallback. `refused` hears of each peer turned away.
 */
export function tlsNet(creds: TlsCredentials, refused: (why: string) => void = () => {}): Net {
  // X.509: a client certificate is demanded (a PSK is mutual by itself).
  const server = serverTlsOptions(creds, creds.kind === 'x509');
  const client = clientTlsOptions(creds);
  if (creds.kind === 'x509' && !creds.client)
    throw new Error(`${creds.dir} has no client-cert.pem: the replication link authenticates both ends`);
  return {
    connect(host, port) {
      const opts = { ...client, host, port, writableHighWaterMark: LINK_SOCKET_QUEUE_BYTES };
      const socket = tls.connect(opts as tls.ConnectionOptions);
      socket.setNoDelay(true);
      return socket as unknown as Conn;
    },
    async listen(host, port, onConnection) {
      const srv = tls.createServer({ ...server, noDelay: true } as tls.TlsOptions, (s) => {
        // createServer has already refused an unverified certificate; this is belt and braces.
        if (creds.kind === 'x509' && !s.authorized) {
          refused(`${s.remoteAddress}: ${s.authorizationError}`);
          s.destroy();
          return;
        }
        onConnection(s as unknown as Conn);
      });
      srv.on('tlsClientError', (err, s) => refused(`${s.remoteAddress ?? 'a peer'}: ${err.message}`));
      const addr = await listenOn(srv, port, host);
      return {
        address: addr.address,
        port: addr.port,
        close: () => new Promise<void>((resolve) => srv.close(() => resolve())),
        server: srv,
      };
    },
  };
}
