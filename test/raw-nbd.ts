/**
 * A small raw-socket NBD driver for the bad-input tests: it speaks the
 * protocol byte by byte through the codec, so tests can send exactly the
 * malformed bytes they want and observe exactly what the server answers
 * (option replies, simple/structured/extended reply chunks, or a disconnect).
 *
 * Every socket opened here is remembered; `closeAllRaw()` destroys them (call
 * it from afterEach). Every wait is bounded by a timeout.
 */
import net from 'node:net';
import tls from 'node:tls';
import { afterEach, expect } from 'vitest';
import { ByteQueue } from '../src/net/bytequeue.js';
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
  readU64,
  writeRequestHeader,
} from '../src/net/codec.js';
import { NbdClient } from '../src/net/client.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  EXTENDED_REQUEST_HEADER_BYTES,
  Info,
  Opt,
  REQUEST_HEADER_BYTES,
  Rep,
  ReplyFlag,
  ReplyType,
} from '../src/net/protocol.js';
import { prng, randomBytes, type RunningServer } from './helpers.js';

export type Mode = 'simple' | 'structured' | 'extended';
export const MODES: Mode[] = ['simple', 'structured', 'extended'];

const DEFAULT_TIMEOUT_MS = 5_000;

const openConns = new Set<RawConn>();

/** Destroy every raw socket still open (afterEach). */
/**
 * Servers closed after each test of the enclosing describe block, raw
 * connections first: `const s = track(await startServer(...))` in a test.
 */
export function serversPerTest(): (s: RunningServer) => RunningServer {
  const open: RunningServer[] = [];
  afterEach(async () => {
    closeAllRaw();
    for (const s of open.splice(0)) await s.close();
  });
  return (s) => {
    open.push(s);
    return s;
  };
}

export function closeAllRaw(): void {
  for (const c of openConns) c.destroy();
  openConns.clear();
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll `cond` every 10 ms until true; throws with `what` after timeoutMs. */
export async function waitFor(cond: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(10);
  }
}

export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export class RawConn {
  readonly queue = new ByteQueue();
  closed = false;
  /** Date.now() when the socket closed. */
  closedAt = 0;
  /** Date.now() when the socket connected. */
  readonly openedAt = Date.now();
  /** Total bytes received over the connection's life. */
  received = 0;
  private waiters: (() => void)[] = [];

  private constructor(public socket: net.Socket) {
    openConns.add(this);
    socket.setNoDelay(true);
    this.attach(socket);
  }

  /** After a STARTTLS ACK: the TLS handshake on this socket; resolves once it is secure. */
  async upgrade(options: tls.ConnectionOptions, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    const raw = this.socket;
    raw.removeAllListeners('data');
    const secure = tls.connect({ ...options, socket: raw });
    this.socket = secure;
    this.attach(secure);
    await withTimeout(
      new Promise<void>((resolve, reject) => {
        secure.once('secureConnect', resolve);
        secure.once('error', reject);
      }),
      timeoutMs,
      'TLS handshake',
    );
  }

  private attach(socket: net.Socket): void {
    socket.on('data', (chunk: Buffer) => {
      this.received += chunk.length;
      this.queue.push(chunk);
      this.notify();
    });
    // Resets are an expected outcome of these tests; 'close' follows.
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
      this.closedAt = Date.now();
      openConns.delete(this);
      this.notify();
    });
  }

  static connect(port: number, timeoutMs = DEFAULT_TIMEOUT_MS, localAddress?: string): Promise<RawConn> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: '127.0.0.1', port, localAddress });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`raw connect to port ${port} timed out`));
      }, timeoutMs);
      socket.once('connect', () => {
        clearTimeout(timer);
        socket.removeListener('error', onError);
        resolve(new RawConn(socket));
      });
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(err);
      };
      socket.once('error', onError);
    });
  }

  private notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Resolve when something happens (data or close), or after ms. */
  private wake(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.waiters.push(done);
    });
  }

  send(buf: Buffer): void {
    if (this.closed || this.socket.destroyed) return;
    this.socket.write(buf, () => {});
  }

  /** Wait until at least n bytes are queued. Throws if the server closes first or on timeout. */
  async need(n: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.queue.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.queue.length})`);
      await this.wake(left);
    }
  }

  async read(n: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Buffer> {
    await this.need(n, timeoutMs);
    return this.queue.take(n);
  }

  /** True if the server closed the connection within timeoutMs. Received bytes stay queued. */
  async waitClosed(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await this.wake(left);
    }
    return true;
  }

  /** Read and check the server greeting; returns its handshake flags. */
  async greeting(): Promise<number> {
    const g = decodeGreeting(await this.read(GREETING_BYTES));
    expect(g).not.toBeNull();
    return g!.handshakeFlags;
  }

  flags(flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES): void {
    this.send(encodeClientFlags(flags));
  }

  option(option: number, payload: Buffer = Buffer.alloc(0)): void {
    this.send(encodeOption(option, payload));
  }

  async optionReply(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<{ option: number; type: number; data: Buffer }> {
    const hdr = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_BYTES, timeoutMs))!;
    const data = hdr.length ? await this.read(hdr.length, timeoutMs) : Buffer.alloc(0);
    return { option: hdr.option, type: hdr.type, data };
  }

  /** Read replies to `option` up to and including the first non-INFO/SERVER/META_CONTEXT one. */
  async optionReplies(option: number): Promise<{ type: number; data: Buffer }[]> {
    const out: { type: number; data: Buffer }[] = [];
    for (let i = 0; i < 1000; i++) {
      const r = await this.optionReply();
      expect(r.option).toBe(option);
      out.push(r);
      if (r.type !== Rep.INFO && r.type !== Rep.SERVER && r.type !== Rep.META_CONTEXT) return out;
    }
    throw new Error('too many option replies');
  }

  destroy(): void {
    this.socket.destroy();
    openConns.delete(this);
  }

  /** Abortive close (TCP RST). */
  reset(): void {
    this.socket.resetAndDestroy();
    openConns.delete(this);
  }
}

// ---------------------------------------------------------------------------
// Transmission

export interface RawRequest {
  type: number;
  flags?: number;
  offset?: number;
  length?: number;
  /** Sent after the header (set PAYLOAD_LEN yourself in extended mode, or use `call`). */
  payload?: Buffer;
  /** Raw 64-bit offset/length bytes, for values a JS number cannot hold (extended only for length). */
  rawOffset?: bigint;
  rawLength?: bigint;
  cookieLo?: number;
}

export interface ChunkInfo {
  kind: 'simple' | 'chunk';
  type: number;
  flags: number;
  length: number;
  /** Extended headers only: the 64-bit offset echoed by the server. */
  echoedOffset?: bigint;
}

export interface Reply {
  cookieLo: number;
  error: number;
  message: string;
  data?: Buffer;
  chunks: ChunkInfo[];
  extents?: Map<number, { length: number; flags: number }[]>;
}

/** Encode one request header (+ payload). */
export function encodeRequest(mode: Mode, req: RawRequest, cookieHi: number, cookieLo: number): Buffer {
  const extended = mode === 'extended';
  const hdrBytes = extended ? EXTENDED_REQUEST_HEADER_BYTES : REQUEST_HEADER_BYTES;
  const payload = req.payload ?? Buffer.alloc(0);
  const buf = Buffer.alloc(hdrBytes + payload.length);
  writeRequestHeader(
    buf,
    0,
    {
      flags: req.flags ?? 0,
      type: req.type,
      cookieHi,
      cookieLo,
      offset: req.rawOffset === undefined ? (req.offset ?? 0) : 0,
      length: req.rawLength === undefined ? (req.length ?? 0) : 0,
    },
    extended,
  );
  if (req.rawOffset !== undefined) buf.writeBigUInt64BE(req.rawOffset, 16);
  if (req.rawLength !== undefined) {
    if (extended) buf.writeBigUInt64BE(req.rawLength, 24);
    else buf.writeUInt32BE(Number(req.rawLength), 24);
  }
  payload.copy(buf, hdrBytes);
  return buf;
}

const COOKIE_HI = 0xc0ffee00;

export class Session {
  size = 0;
  txFlags = 0;
  private nextCookie = 1;
  private readonly sent = new Map<number, RawRequest>();
  /** Replies completed (DONE) but not yet returned. */
  private readonly done: Reply[] = [];
  private readonly partial = new Map<number, Reply>();

  constructor(
    readonly conn: RawConn,
    readonly mode: Mode,
  ) {}

  /** Send a request; returns its cookie. */
  send(req: RawRequest): number {
    const cookie = req.cookieLo ?? this.nextCookie++;
    this.sent.set(cookie, req);
    this.conn.send(encodeRequest(this.mode, req, COOKIE_HI, cookie));
    return cookie;
  }

  /** Encode without sending (for tests that batch several requests into one write). */
  encode(req: RawRequest): { cookie: number; bytes: Buffer } {
    const cookie = req.cookieLo ?? this.nextCookie++;
    this.sent.set(cookie, req);
    return { cookie, bytes: encodeRequest(this.mode, req, COOKIE_HI, cookie) };
  }

  /** Forget a request (e.g. NBD_CMD_DISC, which gets no reply). */
  forget(cookie: number): void {
    this.sent.delete(cookie);
  }

  get outstanding(): number {
    return this.sent.size;
  }

  /** Read chunks until some request's reply is complete; returns it. */
  async reply(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Reply> {
    const deadline = Date.now() + timeoutMs;
    while (this.done.length === 0) await this.readChunk(Math.max(1, deadline - Date.now()));
    return this.done.shift()!;
  }

  /** Send one request and wait for its reply. */
  async call(req: RawRequest, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Reply> {
    let r = req;
    if (this.mode === 'extended' && req.payload && req.flags === undefined)
      r = { ...req, flags: CmdFlag.PAYLOAD_LEN };
    const cookie = this.send(r);
    const reply = await this.reply(timeoutMs);
    expect(reply.cookieLo).toBe(cookie);
    return reply;
  }

  private async readChunk(timeoutMs: number): Promise<void> {
    const extended = this.mode === 'extended';
    const q = this.conn.queue;
    let hdr = null;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (q.length >= 4) {
        hdr = decodeReplyHeader(q.peek(Math.min(q.length, extended ? 32 : 20)), 0, extended);
        if (hdr) break;
      }
      await this.conn.need(q.length + 1, Math.max(1, deadline - Date.now()));
    }
    const rawHdr = q.take(hdr.headerBytes);
    expect(hdr.cookieHi, 'cookie high half echoed').toBe(COOKIE_HI);
    const req = this.sent.get(hdr.cookieLo);
    if (!req) throw new Error(`reply for unknown cookie ${hdr.cookieLo}`);
    let reply = this.partial.get(hdr.cookieLo);
    if (!reply) {
      reply = { cookieLo: hdr.cookieLo, error: 0, message: '', chunks: [] };
      this.partial.set(hdr.cookieLo, reply);
    }
    const chunk: ChunkInfo = { kind: hdr.kind, type: hdr.type, flags: hdr.flags, length: hdr.length };
    // Reply forms must match what was negotiated (proto-ext.md, "Simple reply message").
    if (this.mode === 'simple') expect(hdr.kind, 'simple replies only without negotiation').toBe('simple');
    if (this.mode === 'extended') {
      expect(hdr.headerBytes, 'extended replies only once extended headers are negotiated').toBe(32);
      chunk.echoedOffset = rawHdr.readBigUInt64BE(16);
      // "64 bits, offset (MUST match the request)"
      if (req.rawOffset === undefined)
        expect(chunk.echoedOffset, 'echoed offset').toBe(BigInt(req.offset ?? 0));
    }
    if (this.mode === 'structured') {
      if (req.type === Cmd.READ)
        expect(hdr.kind, 'no simple reply to READ with structured replies').toBe('chunk');
      if (hdr.kind === 'chunk') expect(hdr.headerBytes).toBe(20);
    }
    reply.chunks.push(chunk);
    if (hdr.kind === 'simple') {
      reply.error = hdr.error;
      if (hdr.error === 0 && req.type === Cmd.READ)
        reply.data = await this.conn.read(req.length ?? 0, timeoutMs);
      this.finish(reply);
      return;
    }
    if (hdr.length > 64 * 1024 * 1024) throw new Error(`chunk of ${hdr.length} bytes`);
    const payload = hdr.length
      ? await this.conn.read(hdr.length, Math.max(1, deadline - Date.now()))
      : Buffer.alloc(0);
    switch (hdr.type) {
      case ReplyType.NONE:
        expect(hdr.length).toBe(0);
        break;
      case ReplyType.OFFSET_DATA: {
        const off = readU64(payload, 0) - (req.offset ?? 0);
        reply.data ??= Buffer.alloc(req.length ?? 0);
        expect(off).toBeGreaterThanOrEqual(0);
        expect(off + payload.length - 8).toBeLessThanOrEqual(reply.data.length);
        payload.copy(reply.data, off, 8);
        break;
      }
      case ReplyType.OFFSET_HOLE: {
        const off = readU64(payload, 0) - (req.offset ?? 0);
        const len = payload.readUInt32BE(8);
        reply.data ??= Buffer.alloc(req.length ?? 0);
        expect(off + len).toBeLessThanOrEqual(reply.data.length);
        reply.data.fill(0, off, off + len);
        break;
      }
      case ReplyType.BLOCK_STATUS:
      case ReplyType.BLOCK_STATUS_EXT: {
        const ext = hdr.type === ReplyType.BLOCK_STATUS_EXT;
        reply.extents ??= new Map();
        const id = payload.readUInt32BE(0);
        const list: { length: number; flags: number }[] = [];
        for (let p = ext ? 8 : 4; p + (ext ? 16 : 8) <= payload.length; p += ext ? 16 : 8)
          list.push(
            ext
              ? { length: readU64(payload, p), flags: readU64(payload, p + 8) }
              : { length: payload.readUInt32BE(p), flags: payload.readUInt32BE(p + 4) },
          );
        reply.extents.set(id, list);
        break;
      }
      case ReplyType.ERROR:
      case ReplyType.ERROR_OFFSET: {
        reply.error ||= payload.readUInt32BE(0);
        const len = payload.readUInt16BE(4);
        reply.message = payload.toString('utf8', 6, 6 + len);
        break;
      }
      default:
        throw new Error(`unknown reply chunk type ${hdr.type}`);
    }
    if (hdr.flags & ReplyFlag.DONE) this.finish(reply);
  }

  private finish(reply: Reply): void {
    this.partial.delete(reply.cookieLo);
    this.sent.delete(reply.cookieLo);
    this.done.push(reply);
  }
}

export interface SessionOptions {
  mode: Mode;
  exportName?: string;
  /** SET_META_CONTEXT base:allocation (default: true unless simple). */
  meta?: boolean;
}

/** Connect and negotiate with NBD_OPT_GO, checking every reply on the way. */
export async function openSession(port: number, opts: SessionOptions): Promise<Session> {
  const conn = await RawConn.connect(port);
  await conn.greeting();
  conn.flags();
  const name = opts.exportName ?? 'disk0';
  if (opts.mode === 'extended') {
    conn.option(Opt.EXTENDED_HEADERS);
    expect((await conn.optionReply()).type).toBe(Rep.ACK);
  } else if (opts.mode === 'structured') {
    conn.option(Opt.STRUCTURED_REPLY);
    expect((await conn.optionReply()).type).toBe(Rep.ACK);
  }
  if (opts.meta ?? opts.mode !== 'simple') {
    conn.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest(name, [BASE_ALLOCATION]));
    const replies = await conn.optionReplies(Opt.SET_META_CONTEXT);
    expect(replies.map((r) => r.type)).toEqual([Rep.META_CONTEXT, Rep.ACK]);
  }
  const s = new Session(conn, opts.mode);
  conn.option(Opt.GO, encodeInfoRequest(name, [Info.NAME]));
  const replies = await conn.optionReplies(Opt.GO);
  expect(replies[replies.length - 1].type).toBe(Rep.ACK);
  for (const r of replies)
    if (r.type === Rep.INFO && r.data.readUInt16BE(0) === Info.EXPORT) {
      s.size = readU64(r.data, 2);
      s.txFlags = r.data.readUInt16BE(10);
    }
  expect(s.size).toBeGreaterThan(0);
  return s;
}

// ---------------------------------------------------------------------------
// Health check

let healthSeed = 1;

/**
 * A fresh, well-behaved client (our NbdClient, richest mode) can connect,
 * write a pattern and read it back.
 */
export async function expectHealthy(port: number, exportName = 'disk0'): Promise<void> {
  const rand = prng(0x5eed0000 + healthSeed++);
  const client = await withTimeout(
    NbdClient.connect({ port, exportName, timeoutMs: 5_000 }),
    10_000,
    'health connect',
  );
  try {
    const len = 4096;
    const offset = (rand() % Math.floor((client.size - len) / 512)) * 512;
    const data = randomBytes(len, rand);
    await withTimeout(client.write(data, offset), 5_000, 'health write');
    const back = await withTimeout(client.read(offset, len), 5_000, 'health read');
    expect(back.equals(data), 'health check read back what it wrote').toBe(true);
  } finally {
    await withTimeout(client.close(), 5_000, 'health close').catch(() => client.destroy());
  }
}
