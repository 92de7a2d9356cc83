/**
 * colo-blk's own NBD client, on the same codec as the server. Used by the demo,
 * the tests, the benchmark, the CLI and the replication tools.
 *
 * Notes on the design:
 * - `NbdClient.connect()` performs the fixed-newstyle handshake and negotiates
 *   the richest reply mode the server offers: extended headers, else structured
 *   replies, else simple replies (each can be turned off for testing).
 * - Requests are pipelined: each gets a cookie and a promise; replies may
 *   arrive in any order. Structured READ replies are reassembled from their
 *   OFFSET_DATA / OFFSET_HOLE chunks and checked to cover the whole request.
 * - A server error becomes an NbdRequestError carrying the NBD errno and its
 *   name, plus the server's message when it sent one.
 */
import { Buffer } from 'node:buffer';
import net from 'node:net';
import tls from 'node:tls';
import { ColoError, nbdErrnoName } from '../errors.js';
import { ByteQueue } from './bytequeue.js';
import { clientTlsOptions, type TlsCredentials } from './tls/credentials.js';
import {
  decodeGreeting,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  GREETING_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  ProtocolError,
  readU64,
  requestHeaderBytes,
  writeRequestHeader,
  type ReplyHeader,
} from './codec.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  HandshakeFlag,
  Info,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  TxFlag,
} from './protocol.js';

export class NbdRequestError extends Error {
  readonly errno: number;
  readonly code: string;
  constructor(errno: number, message?: string) {
    super(message ? `${nbdErrnoName(errno)}: ${message}` : nbdErrnoName(errno));
    this.name = 'NbdRequestError';
    this.errno = errno;
    this.code = nbdErrnoName(errno);
  }
}

/** An option refused during negotiation. */
export class NbdOptionError extends Error {
  constructor(
    readonly option: number,
    readonly reply: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdOptionError';
  }
}

export interface ConnectOptions {
  host?: string;
  port: number;
  exportName?: string;
  /** Try NBD_OPT_EXTENDED_HEADERS (default true). */
  extended?: boolean;
  /** Try NBD_OPT_STRUCTURED_REPLY (default true). */
  structured?: boolean;
  /** Metadata contexts to select (default ['base:allocation'] when structured). */
  metaContexts?: string[];
  /** Use the old NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO. */
  useExportName?: boolean;
  timeoutMs?: number;
  /** Speak TLS (STARTTLS before any other option); the server's certificate is checked against the CA. */
  tls?: TlsCredentials;
}

export interface ExportInfo {
  name: string;
  size: number;
  flags: number;
  description?: string;
  minBlock?: number;
  preferredBlock?: number;
  maxBlock?: number;
}

export interface ClientExtent {
  length: number;
  flags: number;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  /** READ: the destination; BLOCK_STATUS: collected extents. */
  data?: Buffer;
  covered?: number;
  extents?: Map<number, ClientExtent[]>;
  error?: NbdRequestError;
}

/** Promise-based reading of exact byte counts during the handshake. */
class HandshakeReader {
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;
  constructor(readonly queue: ByteQueue) {}
  feed(): void {
    if (this.waiter && this.queue.length >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(this.queue.take(w.n));
    }
  }
  fail(err: Error): void {
    this.failure = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err);
    }
  }
  read(n: number): Promise<Buffer> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }
}

export class NbdClient {
  info!: ExportInfo;
  mode: 'simple' | 'structured' | 'extended' = 'simple';
  /** Context ids the server assigned, by name. */
  readonly contexts = new Map<string, number>();
  private readonly queue = new ByteQueue();
  private readonly reader: HandshakeReader;
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private transmission = false;
  private closed = false;
  private closeError: Error | null = null;
  private currentReply: { hdr: ReplyHeader; pending: Pending | undefined } | null = null;
  private idleWaiters: (() => void)[] = [];

  private socket: net.Socket;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.reader = new HandshakeReader(this.queue);
    socket.setNoDelay(true);
    this.listen(socket);
  }

  private listen(socket: net.Socket): void {
    socket.on('data', (chunk: Buffer) => {
      this.queue.push(chunk);
      if (this.transmission) this.pump();
      else this.reader.feed();
    });
    const onEnd = (err?: Error) => {
      if (this.closed) return;
      this.closed = true;
      const e = err ?? this.closeError ?? new ColoError('ECONNECT', 'connection closed by the server');
      this.reader.fail(e);
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
      this.notifyIdle();
    };
    socket.on('error', (err) => onEnd(new ColoError('ECONNECT', err.message, { cause: err })));
    socket.on('close', () => onEnd());
  }

  static async connect(opts: ConnectOptions): Promise<NbdClient> {
    const socket = await openSocket(opts.host ?? '127.0.0.1', opts.port, opts.timeoutMs ?? 10_000);
    const client = new NbdClient(socket);
    try {
      await client.handshake(opts);
    } catch (err) {
      socket.destroy();
      throw err;
    }
    return client;
  }

  /** NBD_OPT_LIST: the exports a server offers. */
  static async list(opts: { host?: string; port: number }): Promise<{ name: string; description: string }[]> {
    const socket = await openSocket(opts.host ?? '127.0.0.1', opts.port, 10_000);
    const client = new NbdClient(socket);
    try {
      await client.greet();
      client.socket.write(encodeOption(Opt.LIST));
      const out: { name: string; description: string }[] = [];
      for (;;) {
        const { type, data } = await client.optionReply(Opt.LIST);
        if (type === Rep.ACK) break;
        if (type !== Rep.SERVER) throw new ProtocolError(`unexpected LIST reply ${type}`);
        const len = data.readUInt32BE(0);
        out.push({ name: data.toString('utf8', 4, 4 + len), description: data.toString('utf8', 4 + len) });
      }
      client.socket.write(encodeOption(Opt.ABORT));
      return out;
    } finally {
      socket.destroy();
    }
  }

  private async greet(): Promise<void> {
    const greeting = decodeGreeting(await this.reader.read(GREETING_BYTES))!;
    if (!(greeting.handshakeFlags & HandshakeFlag.FIXED_NEWSTYLE))
      throw new ProtocolError('server does not support fixed newstyle negotiation');
    this.socket.write(encodeClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES));
  }

  /** Read one option reply; error replies are thrown. */
  private async optionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const hdr = decodeOptionReplyHeader(await this.reader.read(OPTION_REPLY_HEADER_BYTES))!;
    if (hdr.length > 16 * 1024 * 1024) throw new ProtocolError(`option reply of ${hdr.length} bytes`);
    const data = hdr.length ? await this.reader.read(hdr.length) : Buffer.alloc(0);
    if (hdr.option !== option)
      throw new ProtocolError(`reply for option ${hdr.option} while waiting for ${option}`);
    if (hdr.type & 0x80000000)
      throw new NbdOptionError(
        option,
        hdr.type,
        data.toString('utf8') || `option ${option} refused (${hdr.type})`,
      );
    return { type: hdr.type, data };
  }

  /** Send an option that is answered by a single ACK; false if the server does not support it. */
  private async simpleOption(option: number): Promise<boolean> {
    this.socket.write(encodeOption(option));
    try {
      await this.optionReply(option);
      return true;
    } catch (err) {
      if (err instanceof NbdOptionError) return false;
      throw err;
    }
  }

  /** STARTTLS, then the TLS handshake on the same socket; nothing else has been negotiated yet. */
  private async startTls(creds: TlsCredentials, host: string): Promise<void> {
    this.socket.write(encodeOption(Opt.STARTTLS));
    await this.optionReply(Opt.STARTTLS);
    if (this.queue.length > 0) throw new ProtocolError('the server sent data after its STARTTLS reply');
    const raw = this.socket;
    raw.removeAllListeners('data');
    // The certificate is checked against the address we dialled (an IP SAN, or the name).
    const secure = tls.connect({
      ...clientTlsOptions(creds),
      socket: raw,
      host,
      servername: net.isIP(host) ? undefined : host,
    });
    this.socket = secure;
    this.listen(secure);
    await new Promise<void>((resolve, reject) => {
      secure.once('secureConnect', resolve);
      secure.once('error', (err) => reject(new ColoError('ECONNECT', `TLS: ${err.message}`, { cause: err })));
    });
  }

  private async handshake(opts: ConnectOptions): Promise<void> {
    await this.greet();
    if (opts.tls) await this.startTls(opts.tls, opts.host ?? '127.0.0.1');
    const name = opts.exportName ?? '';
    if (opts.extended !== false && (await this.simpleOption(Opt.EXTENDED_HEADERS))) this.mode = 'extended';
    else if (opts.structured !== false && (await this.simpleOption(Opt.STRUCTURED_REPLY)))
      this.mode = 'structured';
    const wanted = opts.metaContexts ?? (this.mode === 'simple' ? [] : [BASE_ALLOCATION]);
    if (wanted.length > 0 && this.mode !== 'simple') {
      this.socket.write(encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest(name, wanted)));
      for (;;) {
        const { type, data } = await this.optionReply(Opt.SET_META_CONTEXT);
        if (type === Rep.ACK) break;
        this.contexts.set(data.toString('utf8', 4), data.readUInt32BE(0));
      }
    }
    if (opts.useExportName) {
      this.socket.write(encodeOption(Opt.EXPORT_NAME, Buffer.from(name, 'utf8')));
      const buf = await this.reader.read(10);
      this.info = { name, size: readU64(buf, 0), flags: buf.readUInt16BE(8) };
    } else {
      this.socket.write(
        encodeOption(Opt.GO, encodeInfoRequest(name, [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])),
      );
      const info: Partial<ExportInfo> = { name };
      for (;;) {
        const { type, data } = await this.optionReply(Opt.GO);
        if (type === Rep.ACK) break;
        if (type !== Rep.INFO || data.length < 2) continue;
        const kind = data.readUInt16BE(0);
        if (kind === Info.EXPORT) {
          info.size = readU64(data, 2);
          info.flags = data.readUInt16BE(10);
        } else if (kind === Info.NAME) info.name = data.toString('utf8', 2);
        else if (kind === Info.DESCRIPTION) info.description = data.toString('utf8', 2);
        else if (kind === Info.BLOCK_SIZE) {
          info.minBlock = data.readUInt32BE(2);
          info.preferredBlock = data.readUInt32BE(6);
          info.maxBlock = data.readUInt32BE(10);
        }
      }
      if (info.size === undefined) throw new ProtocolError('server sent no NBD_INFO_EXPORT');
      this.info = info as ExportInfo;
    }
    this.transmission = true;
    this.pump();
  }

  get size(): number {
    return this.info.size;
  }

  get readOnly(): boolean {
    return (this.info.flags & TxFlag.READ_ONLY) !== 0;
  }

  hasFlag(flag: number): boolean {
    return (this.info.flags & flag) !== 0;
  }

  get inflight(): number {
    return this.pending.size;
  }

  // -------------------------------------------------------------------------
  // Requests

  private request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Buffer | null,
    extra: Partial<Pending> = {},
  ): Promise<unknown> {
    if (this.closed)
      return Promise.reject(this.closeError ?? new ColoError('ECONNECT', 'connection is closed'));
    const cookie = this.nextCookie;
    this.nextCookie = (this.nextCookie + 1) >>> 0 || 1;
    const extended = this.mode === 'extended';
    if (extended && payload) flags |= CmdFlag.PAYLOAD_LEN;
    const hdrBytes = requestHeaderBytes(extended);
    const header = Buffer.allocUnsafe(hdrBytes);
    writeRequestHeader(header, 0, { flags, type, cookieHi: 0, cookieLo: cookie, offset, length }, extended);
    return new Promise((resolve, reject) => {
      if (type !== Cmd.DISC) this.pending.set(cookie, { type, offset, length, resolve, reject, ...extra });
      if (payload && payload.length > 0) {
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(payload);
        this.socket.uncork();
      } else this.socket.write(header);
      if (type === Cmd.DISC) resolve(undefined);
    });
  }

  async read(offset: number, length: number, opts: { df?: boolean; into?: Buffer } = {}): Promise<Buffer> {
    const data = opts.into ?? Buffer.allocUnsafe(length);
    await this.request(Cmd.READ, opts.df ? CmdFlag.DF : 0, offset, length, null, { data, covered: 0 });
    return data;
  }

  async write(data: Buffer, offset: number, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(Cmd.WRITE, opts.fua ? CmdFlag.FUA : 0, offset, data.length, data);
  }

  /** Send a raw request (tests use this for deliberately odd flags or lengths). */
  async raw(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Buffer | null = null,
  ): Promise<void> {
    await this.request(type, flags, offset, length, payload);
  }

  async flush(): Promise<void> {
    await this.request(Cmd.FLUSH, 0, 0, 0, null);
  }

  async trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(Cmd.TRIM, opts.fua ? CmdFlag.FUA : 0, offset, length, null);
  }

  async zero(
    offset: number,
    length: number,
    opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {},
  ): Promise<void> {
    let flags = 0;
    if (opts.fua) flags |= CmdFlag.FUA;
    if (opts.noHole) flags |= CmdFlag.NO_HOLE;
    if (opts.fastZero) flags |= CmdFlag.FAST_ZERO;
    await this.request(Cmd.WRITE_ZEROES, flags, offset, length, null);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.request(Cmd.CACHE, 0, offset, length, null);
  }

  /** Extents of the base:allocation context (the first selected context if none named). */
  async blockStatus(
    offset: number,
    length: number,
    opts: { reqOne?: boolean; context?: string } = {},
  ): Promise<ClientExtent[]> {
    const id = this.contexts.get(opts.context ?? BASE_ALLOCATION);
    if (id === undefined)
      throw new ColoError('EINVAL', `metadata context ${opts.context ?? BASE_ALLOCATION} not negotiated`);
    const all = (await this.request(
      Cmd.BLOCK_STATUS,
      opts.reqOne ? CmdFlag.REQ_ONE : 0,
      offset,
      length,
      null,
      {
        extents: new Map(),
      },
    )) as Map<number, ClientExtent[]>;
    return all.get(id) ?? [];
  }

  /** Soft disconnect: waits for in-flight requests, sends NBD_CMD_DISC, closes. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.pending.size > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    if (!this.closed) {
      await this.request(Cmd.DISC, 0, 0, 0, null).catch(() => {});
      this.socket.end();
      await new Promise<void>((resolve) => {
        if (this.socket.destroyed) resolve();
        else this.socket.once('close', () => resolve());
      });
    }
  }

  destroy(): void {
    this.socket.destroy();
  }

  // -------------------------------------------------------------------------
  // Replies

  private pump(): void {
    try {
      while (this.pumpOne());
    } catch (err) {
      this.closeError = err as Error;
      this.socket.destroy();
    }
  }

  private pumpOne(): boolean {
    if (!this.currentReply) {
      const peekBytes = Math.min(this.queue.length, this.mode === 'extended' ? 32 : 20);
      if (peekBytes < 4) return false;
      const hdr = decodeReplyHeader(this.queue.peek(peekBytes), 0, this.mode === 'extended');
      if (!hdr) return false;
      this.queue.skip(hdr.headerBytes);
      const pending = this.pending.get(hdr.cookieLo);
      if (!pending) throw new ProtocolError(`reply for unknown cookie ${hdr.cookieLo}`);
      if (hdr.kind === 'simple' && pending.type === Cmd.READ && hdr.error === 0) hdr.length = pending.length;
      this.currentReply = { hdr, pending };
    }
    const { hdr, pending } = this.currentReply;
    if (this.queue.length < hdr.length) return false;
    const payload = this.queue.take(hdr.length);
    this.currentReply = null;
    this.handleReply(hdr, pending!, payload);
    return true;
  }

  private notifyIdle(): void {
    if (this.pending.size > 0) return;
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  private handleReply(hdr: ReplyHeader, p: Pending, payload: Buffer): void {
    this.settle(hdr, p, payload);
    this.notifyIdle();
  }

  private settle(hdr: ReplyHeader, p: Pending, payload: Buffer): void {
    const cookie = hdr.cookieLo;
    if (hdr.kind === 'simple') {
      this.pending.delete(cookie);
      if (hdr.error) return p.reject(new NbdRequestError(hdr.error));
      if (p.type === Cmd.READ) payload.copy(p.data!, 0);
      return p.resolve(p.data);
    }
    switch (hdr.type) {
      case ReplyType.NONE:
        break;
      case ReplyType.OFFSET_DATA: {
        const off = readU64(payload, 0) - p.offset;
        const len = payload.length - 8;
        if (p.type !== Cmd.READ || off < 0 || off + len > p.length)
          throw new ProtocolError('bad OFFSET_DATA chunk');
        payload.copy(p.data!, off, 8);
        p.covered! += len;
        break;
      }
      case ReplyType.OFFSET_HOLE: {
        const off = readU64(payload, 0) - p.offset;
        const len = payload.readUInt32BE(8);
        if (p.type !== Cmd.READ || off < 0 || off + len > p.length)
          throw new ProtocolError('bad OFFSET_HOLE chunk');
        p.data!.fill(0, off, off + len);
        p.covered! += len;
        break;
      }
      case ReplyType.BLOCK_STATUS:
      case ReplyType.BLOCK_STATUS_EXT: {
        const id = payload.readUInt32BE(0);
        const ext = hdr.type === ReplyType.BLOCK_STATUS_EXT;
        const list: ClientExtent[] = [];
        for (let pos = ext ? 8 : 4; pos < payload.length; pos += ext ? 16 : 8)
          list.push(
            ext
              ? { length: readU64(payload, pos), flags: readU64(payload, pos + 8) }
              : { length: payload.readUInt32BE(pos), flags: payload.readUInt32BE(pos + 4) },
          );
        p.extents?.set(id, list);
        break;
      }
      case ReplyType.ERROR:
      case ReplyType.ERROR_OFFSET: {
        const errno = payload.readUInt32BE(0);
        const msgLen = payload.readUInt16BE(4);
        p.error ??= new NbdRequestError(errno, payload.toString('utf8', 6, 6 + msgLen));
        break;
      }
      default:
        if (!(hdr.type & 0x8000)) throw new ProtocolError(`unknown reply chunk type ${hdr.type}`);
        p.error ??= new NbdRequestError(payload.length >= 4 ? payload.readUInt32BE(0) : 5);
    }
    if (!(hdr.flags & ReplyFlag.DONE)) return;
    this.pending.delete(cookie);
    if (p.error) return p.reject(p.error);
    if (p.type === Cmd.READ) {
      if (p.covered !== p.length)
        return p.reject(new ProtocolError(`read reply covered ${p.covered} of ${p.length} bytes`));
      return p.resolve(p.data);
    }
    p.resolve(p.type === Cmd.BLOCK_STATUS ? p.extents : undefined);
  }
}

function openSocket(host: string, port: number, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new ColoError('ECONNECT', `timed out connecting to ${host}:${port}`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(new ColoError('ECONNECT', `cannot connect to ${host}:${port}: ${err.message}`, { cause: err }));
    });
  });
}
