/**
 * The NBD server: listens, owns the exports, admits connections and shuts down
 * gracefully. The per-connection protocol lives in connection.ts.
 *
 * Notes on the design:
 * - One BlockDevice per export, shared by every connection to it; that is what
 *   makes CAN_MULTI_CONN honest (a FLUSH on one connection flushes the shared
 *   device, covering writes completed on any connection).
 * - Admission is bounded: past `maxConnections` a new socket is closed at once,
 *   and a client that does not finish the handshake within
 *   `handshakeTimeoutMs` is dropped, so idle or slow clients cannot starve
 *   real ones (see the tests shaped after NBD server CVEs).
 * - `close()` stops accepting, lets in-flight requests finish (answering new
 *   ones with ESHUTDOWN), then drops what is left after a grace period.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import { ColoError } from '../errors.js';
import { limits } from '../limits.js';
import type { BlockDevice } from '../block/device.js';
import { Connection } from './connection.js';
import { listenOn } from '../util/listen.js';
import { serverTlsOptions, type TlsCredentials, type TlsMode } from './tls/credentials.js';

export interface ExportConfig {
  name: string;
  device: BlockDevice;
  readOnly?: boolean;
  description?: string;
}

export interface Logger {
  info(msg: string): void;
  warn(msg: string): void;
  debug(msg: string): void;
}

export const silentLogger: Logger = { info() {}, warn() {}, debug() {} };

/** TLS for the NBD port: STARTTLS during negotiation (`on`: offered; `require`: nothing else is served). */
export interface NbdTlsConfig {
  mode: TlsMode;
  creds: TlsCredentials | null;
  /** X.509: demand a client certificate signed by the CA. */
  verifyPeer?: boolean;
}

/** What a connection needs to upgrade itself, built once per server. */
export interface ServerTls {
  mode: 'on' | 'require';
  kind: 'x509' | 'psk';
  verifyPeer: boolean;
  /** For the one-connection tls.Server each STARTTLS hands its socket to. */
  serverOptions: tls.TlsOptions;
}

export interface ServerOptions {
  tls?: NbdTlsConfig;
  maxConnections?: number;
  handshakeTimeoutMs?: number;
  maxInflightRequests?: number;
  maxInflightBytes?: number;
  shutdownGraceMs?: number;
  logger?: Logger;
}

/** Counters per export, for the demo, status and metrics. */
export interface ExportStats {
  reads: number;
  writes: number;
  flushes: number;
  trims: number;
  zeroes: number;
  blockStatus: number;
  caches: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export function newExportStats(): ExportStats {
  return {
    reads: 0,
    writes: 0,
    flushes: 0,
    trims: 0,
    zeroes: 0,
    blockStatus: 0,
    caches: 0,
    errors: 0,
    bytesRead: 0,
    bytesWritten: 0,
  };
}

export interface ServedExport extends Required<Omit<ExportConfig, 'description'>> {
  description: string;
  stats: ExportStats;
}

export interface ResolvedServerOptions {
  tls: ServerTls | null;
  maxConnections: number;
  handshakeTimeoutMs: number;
  maxInflightRequests: number;
  maxInflightBytes: number;
  shutdownGraceMs: number;
  logger: Logger;
}

export class NbdServer extends EventEmitter {
  readonly exports = new Map<string, ServedExport>();
  readonly options: ResolvedServerOptions;
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();
  private nextConnId = 1;
  private closing = false;
  /** Connections refused because of the connection cap. */
  rejectedConnections = 0;

  constructor(exports: ExportConfig[], opts: ServerOptions = {}) {
    super();
    if (exports.length === 0) throw new ColoError('EUSAGE', 'a server needs at least one export');
    for (const e of exports) {
      if (this.exports.has(e.name)) throw new ColoError('EUSAGE', `export name '${e.name}' is used twice`);
      if (Buffer.byteLength(e.name) > limits.maxStringBytes)
        throw new ColoError('EUSAGE', `export name longer than ${limits.maxStringBytes} bytes`);
      const readOnly = e.readOnly === true || !e.device.caps.write;
      this.exports.set(e.name, {
        name: e.name,
        device: e.device,
        readOnly,
        description: e.description ?? '',
        stats: newExportStats(),
      });
    }
    this.options = {
      tls: resolveTls(opts.tls),
      maxConnections: opts.maxConnections ?? limits.maxConnections,
      handshakeTimeoutMs: opts.handshakeTimeoutMs ?? limits.handshakeTimeoutMs,
      maxInflightRequests: opts.maxInflightRequests ?? limits.maxInflightRequests,
      maxInflightBytes: opts.maxInflightBytes ?? limits.maxInflightBytes,
      shutdownGraceMs: opts.shutdownGraceMs ?? limits.shutdownGraceMs,
      logger: opts.logger ?? silentLogger,
    };
    this.server = net.createServer({ noDelay: true }, (socket) => this.admit(socket));
    // Listen errors are returned by listen(); later ones go to 'error' listeners, if any.
    this.server.on('error', (err) => {
      if (this.listenerCount('error') > 0) this.emit('error', err);
      else this.options.logger.warn(`server socket error: ${err.message}`);
    });
  }

  /** The export a client gets when it asks for the empty name. */
  get defaultExport(): ServedExport {
    return this.exports.values().next().value as ServedExport;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  async listen(port: number, host = '127.0.0.1'): Promise<net.AddressInfo> {
    return listenOn(this.server, port, host);
  }

  address(): net.AddressInfo {
    return this.server.address() as net.AddressInfo;
  }

  private admit(socket: net.Socket): void {
    if (this.closing || this.connections.size >= this.options.maxConnections) {
      this.rejectedConnections++;
      this.options.logger.warn(
        `refusing connection from ${socket.remoteAddress}:${socket.remotePort}: ` +
          (this.closing ? 'server is shutting down' : `${this.connections.size} connections (the limit)`),
      );
      socket.destroy();
      return;
    }
    const conn: Connection = new Connection(this, socket, this.nextConnId++, () => {
      this.connections.delete(conn);
      this.emit('disconnect', conn.id);
    });
    this.connections.add(conn);
    this.emit('connect', conn.id);
  }

  /** Stop accepting, finish in-flight requests, then close every connection. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const conn of this.connections) conn.shutdown();
    const deadline = Date.now() + this.options.shutdownGraceMs;
    while (this.connections.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    for (const conn of this.connections) conn.destroy();
    await stopped;
  }
}

function resolveTls(cfg: NbdTlsConfig | undefined): ServerTls | null {
  if (!cfg || cfg.mode === 'off') return null;
  if (!cfg.creds)
    throw new ColoError('EUSAGE', `--tls ${cfg.mode} needs credentials: --tls-certs DIR or --tls-psk FILE`);
  const verifyPeer = cfg.creds.kind === 'x509' && cfg.verifyPeer === true;
  const options = serverTlsOptions(cfg.creds, verifyPeer);
  // Fail now, at startup, on a key that does not match its certificate.
  tls.createSecureContext(options);
  // The verdict on a client certificate is ours to act on (the connection logs why it refuses).
  return {
    mode: cfg.mode,
    kind: cfg.creds.kind,
    verifyPeer,
    serverOptions: { ...options, rejectUnauthorized: false },
  };
}
