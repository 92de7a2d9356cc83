/**
 * The NBD server: listens, owns the exports, admits connections and shuts down
 * gracefully. The per-connection protocol lives in connection.ts.
 *
 * Notes on the design:
 * - One BlockDevice per export, shared by every connection to it; that is what
 *   makes CAN_MULTI_CONN honest (a FLUSH on one connection flushes the shared
 *   device, covering writes completed on any connection).
 * - Admission is bounded, so idle or slow clients cannot starve real ones
 *   (see the tests shaped after NBD server CVEs and test/load.test.ts):
 *   - one address holds at most `maxConnectionsPerAddress`; past that its new
 *     sockets are closed at once;
 *   - at `maxConnections`, the oldest connection still negotiating makes room
 *     for the new one (a real client negotiates in milliseconds; a slowloris
 *     never finishes); only when every slot is a negotiated client is the new
 *     socket refused;
 *   - a client that does not finish the handshake within `handshakeTimeoutMs`
 *     is dropped.
 *   Refusals and evictions are counted, and logged at most once per second
 *   with a count, so a flood cannot flood the log too.
 * - `close()` stops accepting, lets in-flight requests finish (answering new
 *   ones with ESHUTDOWN), then drops what is left after a grace period.
 */
import { Buffer } from 'node:buffer';
import { performance } from 'node:perf_hooks';
import { EventEmitter } from 'node:events';
import net from 'node:net';
import tls from 'node:tls';
import { ColoError } from '../errors.js';
import { limits } from '../limits.js';
import type { BlockDevice } from '../block/device.js';
import { Connection } from './connection.js';
import { ReplyBuffers } from './reply-buffers.js';
import { listenOn } from '../util/listen.js';
import { readIntoSlabs } from '../sys/slab-reads.js';
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
  verifyPeer: boolean;
  /** For the one-connection tls.Server each STARTTLS hands its socket to. */
  serverOptions: tls.TlsOptions;
}

export interface ServerOptions {
  tls?: NbdTlsConfig;
  maxConnections?: number;
  maxConnectionsPerAddress?: number;
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
  /** Reads answered straight from the image file (sendfile), of `reads`. */
  readsSentFromFile: number;
  /** Writes whose payload the socket read straight into a reused buffer (of `writes`). */
  writesReceivedDirect: number;
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
    readsSentFromFile: 0,
    writesReceivedDirect: 0,
  };
}

export interface ServedExport extends Required<Omit<ExportConfig, 'description'>> {
  description: string;
  stats: ExportStats;
}

export interface ResolvedServerOptions {
  tls: ServerTls | null;
  maxConnections: number;
  maxConnectionsPerAddress: number;
  handshakeTimeoutMs: number;
  maxInflightRequests: number;
  maxInflightBytes: number;
  shutdownGraceMs: number;
  logger: Logger;
}

export class NbdServer extends EventEmitter {
  readonly exports = new Map<string, ServedExport>();
  readonly options: ResolvedServerOptions;
  /** Large read replies' buffers, used again once sent (shared by this server's connections). */
  readonly replyBuffers = new ReplyBuffers();
  /**
   * Large WRITE payloads' buffers, used again once the write has settled: the
   * socket reads the rest of a payload straight into one (sys/slab-reads.ts,
   * directNextRead), so the kernel copies into memory still in cache.
   */
  readonly payloadBuffers = new ReplyBuffers();
  private readonly server: net.Server;
  private readonly connections = new Set<Connection>();
  /** Connections still negotiating, oldest first (a Set keeps insertion order). */
  private readonly negotiating = new Set<Connection>();
  private readonly perAddress = new Map<string, number>();
  private nextConnId = 1;
  private closing = false;
  /** Connections refused: the server was full of negotiated clients, or their address was at its cap. */
  rejectedConnections = 0;
  /** Negotiating connections dropped to make room for a new one. */
  evictedConnections = 0;
  private readonly quietLog = new CountingLog(() => this.options.logger);

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
      maxConnectionsPerAddress: opts.maxConnectionsPerAddress ?? limits.maxConnectionsPerAddress,
      handshakeTimeoutMs: opts.handshakeTimeoutMs ?? limits.handshakeTimeoutMs,
      maxInflightRequests: opts.maxInflightRequests ?? limits.maxInflightRequests,
      maxInflightBytes: opts.maxInflightBytes ?? limits.maxInflightBytes,
      shutdownGraceMs: opts.shutdownGraceMs ?? limits.shutdownGraceMs,
      logger: opts.logger ?? silentLogger,
    };
    // Paused until admitted: an admitted socket is read into slabs (sys/slab-reads.ts), a refused one never read.
    this.server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.admit(socket));
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
    const address = socket.remoteAddress ?? '?';
    const fromThere = this.perAddress.get(address) ?? 0;
    let refusal: string | null = null;
    if (this.closing) refusal = 'the server is shutting down';
    else if (fromThere >= this.options.maxConnectionsPerAddress)
      refusal = `${address} already has ${fromThere} connections (--max-connections-per-address)`;
    else if (this.connections.size >= this.options.maxConnections) {
      const oldest: Connection | undefined = this.negotiating.values().next().value;
      if (oldest) {
        this.evictedConnections++;
        this.quietLog.note('dropped the oldest unfinished handshake to admit a new connection (server full)');
        this.forget(oldest);
        oldest.destroy();
      } else refusal = `${this.connections.size} negotiated clients already (--max-connections)`;
    }
    if (refusal) {
      this.rejectedConnections++;
      this.quietLog.note(`refused a connection: ${refusal}`);
      socket.destroy();
      return;
    }
    this.perAddress.set(address, fromThere + 1);
    // STARTTLS reads the TCP socket's handle itself: a server that may speak TLS reads the usual way.
    if (this.options.tls) socket.resume();
    else socket = readIntoSlabs(socket);
    const conn: Connection = new Connection(this, socket, this.nextConnId++, () => {
      this.forget(conn);
      this.emit('disconnect', conn.id);
    });
    this.connections.add(conn);
    this.negotiating.add(conn);
    this.emit('connect', conn.id);
  }

  /** Take a connection out of the counts (once: an evicted one is forgotten before it closes). */
  private forget(conn: Connection): void {
    this.negotiating.delete(conn);
    if (!this.connections.delete(conn)) return;
    const left = (this.perAddress.get(conn.address) ?? 1) - 1;
    if (left > 0) this.perAddress.set(conn.address, left);
    else this.perAddress.delete(conn.address);
  }

  /** A connection finished negotiating: it is a client now, never evicted for room. */
  negotiated(conn: Connection): void {
    this.negotiating.delete(conn);
  }

  /** Stop accepting, finish in-flight requests, then close every connection. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stopped = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const conn of this.connections) conn.shutdown();
    const deadline = performance.now() + this.options.shutdownGraceMs;
    while (this.connections.size > 0 && performance.now() < deadline)
      await new Promise((r) => setTimeout(r, 10));
    for (const conn of this.connections) conn.destroy();
    await stopped;
  }
}

/**
 * Warnings that a flood could repeat thousands of times a second: the first
 * of each kind is logged at once, the rest as one line with a count per second.
 */
class CountingLog {
  private counts = new Map<string, number>();
  private timer: NodeJS.Timeout | null = null;
  constructor(private readonly logger: () => Logger) {}
  note(msg: string): void {
    const n = this.counts.get(msg);
    if (n === undefined) {
      this.logger().warn(msg);
      this.counts.set(msg, 0);
    } else this.counts.set(msg, n + 1);
    if (!this.timer) {
      this.timer = setTimeout(() => this.flush(), 1000);
      this.timer.unref();
    }
  }
  private flush(): void {
    this.timer = null;
    for (const [msg, n] of this.counts)
      if (n > 0) this.logger().warn(`${msg} (${n} more in the last second)`);
    this.counts.clear();
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
    verifyPeer,
    serverOptions: { ...options, rejectUnauthorized: false },
  };
}
