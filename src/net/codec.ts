/**
 * The NBD wire codec: pure functions over Buffers, no socket inside.
 *
 * Notes on the design:
 * - Decoders take (buf, offset) and return `null` when the bytes are not all
 *   there yet ("need more"); they throw ProtocolError only for input that can
 *   never become valid (bad magic). The socket layer decides what to do then.
 * - 64-bit wire values become JS numbers. Anything at or above 2^53 is clamped
 *   to WIRE_TOO_BIG (2^53), which lies beyond every export, so range checks
 *   reject it instead of silently losing precision.
 * - The cookie is opaque to a server: it is kept as two 32-bit halves, so the
 *   hot path never allocates a BigInt.
 * - Encoders that sit on the request path write into caller-provided buffers
 *   (`write*Header`), so a READ reply is one allocation: header + data.
 */
import { Buffer } from 'node:buffer';
import {
  EXTENDED_REPLY_HEADER_BYTES,
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_HEADER_BYTES,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  REQUEST_HEADER_BYTES,
  REQUEST_MAGIC,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_HEADER_BYTES,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_HEADER_BYTES,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

/** Stands for any 64-bit value that a JS number cannot hold exactly. */
export const WIRE_TOO_BIG = 2 ** 53;

export class ProtocolError extends Error {
  readonly code = 'EPROTO';
  constructor(message: string) {
    super(message);
    this.name = 'ProtocolError';
  }
}

/** Read an unsigned 64-bit big-endian value as a number, clamping at 2^53. */
export function readU64(buf: Buffer, off: number): number {
  const hi = buf.readUInt32BE(off);
  if (hi >= 0x200000) return WIRE_TOO_BIG;
  return hi * 0x100000000 + buf.readUInt32BE(off + 4);
}

/** Write a non-negative integer (< 2^53) as unsigned 64-bit big-endian. */
export function writeU64(buf: Buffer, value: number, off: number): void {
  buf.writeUInt32BE(Math.floor(value / 0x100000000), off);
  buf.writeUInt32BE(value >>> 0, off + 4);
}

// ---------------------------------------------------------------------------
// Handshake

export const GREETING_BYTES = 18;

export function encodeGreeting(handshakeFlags: number): Buffer {
  const buf = Buffer.allocUnsafe(GREETING_BYTES);
  buf.writeBigUInt64BE(NBDMAGIC, 0);
  buf.writeBigUInt64BE(IHAVEOPT, 8);
  buf.writeUInt16BE(handshakeFlags, 16);
  return buf;
}

export function decodeGreeting(buf: Buffer, off = 0): { handshakeFlags: number } | null {
  if (buf.length - off < GREETING_BYTES) return null;
  if (buf.readBigUInt64BE(off) !== NBDMAGIC) throw new ProtocolError('bad server magic (not an NBD server?)');
  if (buf.readBigUInt64BE(off + 8) !== IHAVEOPT)
    throw new ProtocolError('server is not fixed-newstyle (oldstyle NBD servers are not supported)');
  return { handshakeFlags: buf.readUInt16BE(off + 16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const buf = Buffer.allocUnsafe(4);
  buf.writeUInt32BE(flags >>> 0, 0);
  return buf;
}

export const OPTION_HEADER_BYTES = 16;

export interface OptionHeader {
  option: number;
  length: number;
}

export function decodeOptionHeader(buf: Buffer, off = 0): OptionHeader | null {
  if (buf.length - off < OPTION_HEADER_BYTES) return null;
  if (buf.readBigUInt64BE(off) !== IHAVEOPT) throw new ProtocolError('bad option magic');
  return { option: buf.readUInt32BE(off + 8), length: buf.readUInt32BE(off + 12) };
}

export function encodeOption(option: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.allocUnsafe(OPTION_HEADER_BYTES + payload.length);
  buf.writeBigUInt64BE(IHAVEOPT, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(payload.length, 12);
  payload.copy(buf, OPTION_HEADER_BYTES);
  return buf;
}

export const OPTION_REPLY_HEADER_BYTES = 20;

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const buf = Buffer.allocUnsafe(OPTION_REPLY_HEADER_BYTES + data.length);
  buf.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  buf.writeUInt32BE(option, 8);
  buf.writeUInt32BE(type >>> 0, 12);
  buf.writeUInt32BE(data.length, 16);
  data.copy(buf, OPTION_REPLY_HEADER_BYTES);
  return buf;
}

export function decodeOptionReplyHeader(buf: Buffer, off = 0): OptionReplyHeader | null {
  if (buf.length - off < OPTION_REPLY_HEADER_BYTES) return null;
  if (buf.readBigUInt64BE(off) !== OPTION_REPLY_MAGIC) throw new ProtocolError('bad option reply magic');
  return {
    option: buf.readUInt32BE(off + 8),
    type: buf.readUInt32BE(off + 12),
    length: buf.readUInt32BE(off + 16),
  };
}

/** Reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, txFlags: number, noZeroes: boolean): Buffer {
  const buf = Buffer.alloc(10 + (noZeroes ? 0 : 124));
  writeU64(buf, size, 0);
  buf.writeUInt16BE(txFlags, 8);
  return buf;
}

/** A length-prefixed (32-bit) UTF-8 string. */
export function encodeString32(s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  const buf = Buffer.allocUnsafe(4 + bytes.length);
  buf.writeUInt32BE(bytes.length, 0);
  bytes.copy(buf, 4);
  return buf;
}

/** Data of an NBD_REP_SERVER reply: name, then a free-form description. */
export function encodeServerReplyData(name: string, description = ''): Buffer {
  return Buffer.concat([encodeString32(name), Buffer.from(description, 'utf8')]);
}

export function encodeInfoExport(size: number, txFlags: number): Buffer {
  const buf = Buffer.allocUnsafe(12);
  buf.writeUInt16BE(Info.EXPORT, 0);
  writeU64(buf, size, 2);
  buf.writeUInt16BE(txFlags, 10);
  return buf;
}

export function encodeInfoString(type: number, s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  const buf = Buffer.allocUnsafe(2 + bytes.length);
  buf.writeUInt16BE(type, 0);
  bytes.copy(buf, 2);
  return buf;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const buf = Buffer.allocUnsafe(14);
  buf.writeUInt16BE(Info.BLOCK_SIZE, 0);
  buf.writeUInt32BE(min, 2);
  buf.writeUInt32BE(preferred, 6);
  buf.writeUInt32BE(max, 10);
  return buf;
}

export function encodeMetaContextReplyData(id: number, name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  const buf = Buffer.allocUnsafe(4 + bytes.length);
  buf.writeUInt32BE(id, 0);
  bytes.copy(buf, 4);
  return buf;
}

/** Thrown by option payload parsers; the server answers NBD_REP_ERR_INVALID with the message. */
export class OptionPayloadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'OptionPayloadError';
  }
}

/** A cursor over an option payload that checks every length against what is left. */
class PayloadReader {
  private pos = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly maxString: number,
  ) {}
  remaining(): number {
    return this.buf.length - this.pos;
  }
  u16(what: string): number {
    if (this.remaining() < 2) throw new OptionPayloadError(`option payload too short for ${what}`);
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(what: string): number {
    if (this.remaining() < 4) throw new OptionPayloadError(`option payload too short for ${what}`);
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  string32(what: string): string {
    const len = this.u32(`${what} length`);
    if (len > this.maxString)
      throw new OptionPayloadError(`${what} is ${len} bytes, longer than ${this.maxString}`);
    if (len > this.remaining())
      throw new OptionPayloadError(
        `${what} length ${len} exceeds the ${this.remaining()} bytes left in the option`,
      );
    const s = this.buf.toString('utf8', this.pos, this.pos + len);
    this.pos += len;
    return s;
  }
}

export interface InfoRequest {
  name: string;
  infos: number[];
}

/** Payload of NBD_OPT_INFO / NBD_OPT_GO. */
export function parseInfoRequest(payload: Buffer, maxString: number): InfoRequest {
  const r = new PayloadReader(payload, maxString);
  const name = r.string32('export name');
  const count = r.u16('information request count');
  if (r.remaining() !== count * 2)
    throw new OptionPayloadError(
      `information request count ${count} does not match the ${r.remaining()} bytes that follow`,
    );
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(r.u16('information request'));
  return { name, infos };
}

export function encodeInfoRequest(name: string, infos: number[]): Buffer {
  const nameBuf = encodeString32(name);
  const buf = Buffer.allocUnsafe(nameBuf.length + 2 + 2 * infos.length);
  nameBuf.copy(buf, 0);
  buf.writeUInt16BE(infos.length, nameBuf.length);
  infos.forEach((t, i) => buf.writeUInt16BE(t, nameBuf.length + 2 + 2 * i));
  return buf;
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/** Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT. */
export function parseMetaContextRequest(
  payload: Buffer,
  maxString: number,
  maxQueries: number,
): MetaContextRequest {
  const r = new PayloadReader(payload, maxString);
  const exportName = r.string32('export name');
  const count = r.u32('query count');
  if (count > maxQueries)
    throw new OptionPayloadError(`${count} queries, more than the limit of ${maxQueries}`);
  // Each query needs at least its 4-byte length: reject impossible counts before looping.
  if (count * 4 > r.remaining())
    throw new OptionPayloadError(`query count ${count} exceeds what the option payload can hold`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(r.string32('query'));
  if (r.remaining() !== 0) throw new OptionPayloadError(`${r.remaining()} trailing bytes after the queries`);
  return { exportName, queries };
}

export function encodeMetaContextRequest(exportName: string, queries: string[]): Buffer {
  const parts = [encodeString32(exportName), Buffer.alloc(4)];
  parts[1].writeUInt32BE(queries.length, 0);
  for (const q of queries) parts.push(encodeString32(q));
  return Buffer.concat(parts);
}

// ---------------------------------------------------------------------------
// Transmission: requests

export interface Request {
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  /** Effect length, or payload length for WRITE (and PAYLOAD_LEN in extended mode). */
  length: number;
  /** The wire offset's two halves, kept only when `offset` had to be clamped (extended replies echo it). */
  offsetRaw?: [number, number];
}

export function requestHeaderBytes(extended: boolean): number {
  return extended ? EXTENDED_REQUEST_HEADER_BYTES : REQUEST_HEADER_BYTES;
}

/** Decode one request header; null if fewer than a header's bytes are available. */
export function decodeRequest(buf: Buffer, off: number, extended: boolean): Request | null {
  if (extended) {
    if (buf.length - off < EXTENDED_REQUEST_HEADER_BYTES) return null;
    const magic = buf.readUInt32BE(off);
    if (magic !== EXTENDED_REQUEST_MAGIC)
      throw new ProtocolError(
        magic === REQUEST_MAGIC
          ? 'compact request header after extended headers were negotiated'
          : `bad request magic 0x${magic.toString(16)}`,
      );
    const req: Request = {
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      cookieHi: buf.readUInt32BE(off + 8),
      cookieLo: buf.readUInt32BE(off + 12),
      offset: readU64(buf, off + 16),
      length: readU64(buf, off + 24),
    };
    if (req.offset === WIRE_TOO_BIG) req.offsetRaw = [buf.readUInt32BE(off + 16), buf.readUInt32BE(off + 20)];
    return req;
  }
  if (buf.length - off < REQUEST_HEADER_BYTES) return null;
  const magic = buf.readUInt32BE(off);
  if (magic !== REQUEST_MAGIC) throw new ProtocolError(`bad request magic 0x${magic.toString(16)}`);
  return {
    flags: buf.readUInt16BE(off + 4),
    type: buf.readUInt16BE(off + 6),
    cookieHi: buf.readUInt32BE(off + 8),
    cookieLo: buf.readUInt32BE(off + 12),
    offset: readU64(buf, off + 16),
    length: buf.readUInt32BE(off + 24),
  };
}

/** Write a request header into buf at off; returns the header size. */
export function writeRequestHeader(buf: Buffer, off: number, req: Request, extended: boolean): number {
  buf.writeUInt32BE(extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, off);
  buf.writeUInt16BE(req.flags, off + 4);
  buf.writeUInt16BE(req.type, off + 6);
  buf.writeUInt32BE(req.cookieHi, off + 8);
  buf.writeUInt32BE(req.cookieLo, off + 12);
  writeU64(buf, req.offset, off + 16);
  if (extended) {
    writeU64(buf, req.length, off + 24);
    return EXTENDED_REQUEST_HEADER_BYTES;
  }
  buf.writeUInt32BE(req.length, off + 24);
  return REQUEST_HEADER_BYTES;
}

// ---------------------------------------------------------------------------
// Transmission: replies

export type ReplyMode = 'simple' | 'structured' | 'extended';

export function writeSimpleReplyHeader(
  buf: Buffer,
  off: number,
  error: number,
  cookieHi: number,
  cookieLo: number,
): number {
  buf.writeUInt32BE(SIMPLE_REPLY_MAGIC, off);
  buf.writeUInt32BE(error, off + 4);
  buf.writeUInt32BE(cookieHi, off + 8);
  buf.writeUInt32BE(cookieLo, off + 12);
  return SIMPLE_REPLY_HEADER_BYTES;
}

/**
 * Write a structured (20-byte) or extended (32-byte) chunk header.
 * `reqOffset` is the request's offset, echoed in extended headers.
 */
export function writeChunkHeader(
  buf: Buffer,
  off: number,
  extended: boolean,
  flags: number,
  type: number,
  cookieHi: number,
  cookieLo: number,
  reqOffset: number,
  payloadLength: number,
  reqOffsetRaw?: [number, number],
): number {
  if (extended) {
    buf.writeUInt32BE(EXTENDED_REPLY_MAGIC, off);
    buf.writeUInt16BE(flags, off + 4);
    buf.writeUInt16BE(type, off + 6);
    buf.writeUInt32BE(cookieHi, off + 8);
    buf.writeUInt32BE(cookieLo, off + 12);
    if (reqOffsetRaw) {
      buf.writeUInt32BE(reqOffsetRaw[0], off + 16);
      buf.writeUInt32BE(reqOffsetRaw[1], off + 20);
    } else writeU64(buf, Math.min(reqOffset, WIRE_TOO_BIG - 1), off + 16);
    writeU64(buf, payloadLength, off + 24);
    return EXTENDED_REPLY_HEADER_BYTES;
  }
  buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, off);
  buf.writeUInt16BE(flags, off + 4);
  buf.writeUInt16BE(type, off + 6);
  buf.writeUInt32BE(cookieHi, off + 8);
  buf.writeUInt32BE(cookieLo, off + 12);
  buf.writeUInt32BE(payloadLength, off + 16);
  return STRUCTURED_REPLY_HEADER_BYTES;
}

export function chunkHeaderBytes(extended: boolean): number {
  return extended ? EXTENDED_REPLY_HEADER_BYTES : STRUCTURED_REPLY_HEADER_BYTES;
}

/** A complete reply without payload: simple reply, or a final NONE / ERROR chunk. */
export function encodeStatusReply(
  mode: ReplyMode,
  req: Pick<Request, 'cookieHi' | 'cookieLo' | 'offset' | 'offsetRaw'>,
  error: number,
  message = '',
): Buffer {
  if (mode === 'simple') {
    const buf = Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_BYTES);
    writeSimpleReplyHeader(buf, 0, error, req.cookieHi, req.cookieLo);
    return buf;
  }
  const extended = mode === 'extended';
  const hdr = chunkHeaderBytes(extended);
  if (error === 0) {
    const buf = Buffer.allocUnsafe(hdr);
    writeChunkHeader(
      buf,
      0,
      extended,
      ReplyFlag.DONE,
      ReplyType.NONE,
      req.cookieHi,
      req.cookieLo,
      req.offset,
      0,
    );
    return buf;
  }
  const msg = Buffer.from(message, 'utf8').subarray(0, 4096);
  const buf = Buffer.allocUnsafe(hdr + 6 + msg.length);
  writeChunkHeader(
    buf,
    0,
    extended,
    ReplyFlag.DONE,
    ReplyType.ERROR,
    req.cookieHi,
    req.cookieLo,
    req.offset,
    6 + msg.length,
    req.offsetRaw,
  );
  buf.writeUInt32BE(error, hdr);
  buf.writeUInt16BE(msg.length, hdr + 4);
  msg.copy(buf, hdr + 6);
  return buf;
}

/**
 * Allocate a READ reply carrying `length` data bytes; returns the buffer and
 * the offset at which the caller must place the data. One allocation, one write.
 */
export function allocReadReply(
  mode: ReplyMode,
  req: Pick<Request, 'cookieHi' | 'cookieLo' | 'offset'>,
  length: number,
  alloc: (n: number) => Buffer = Buffer.allocUnsafe,
): { buf: Buffer; dataOffset: number } {
  const dataOffset = readReplyHeaderBytes(mode);
  const buf = alloc(dataOffset + length);
  writeReadReplyHeader(buf, mode, req, length);
  return { buf, dataOffset };
}

/** Bytes of a read reply before its data: the simple reply header, or an OFFSET_DATA chunk's header and offset. */
export function readReplyHeaderBytes(mode: ReplyMode): number {
  return mode === 'simple' ? SIMPLE_REPLY_HEADER_BYTES : chunkHeaderBytes(mode === 'extended') + 8;
}

/** A read reply's bytes before its `length` bytes of data, written at the start of `buf`. */
export function writeReadReplyHeader(
  buf: Buffer,
  mode: ReplyMode,
  req: Pick<Request, 'cookieHi' | 'cookieLo' | 'offset'>,
  length: number,
): void {
  if (mode === 'simple') {
    writeSimpleReplyHeader(buf, 0, 0, req.cookieHi, req.cookieLo);
    return;
  }
  const extended = mode === 'extended';
  const hdr = chunkHeaderBytes(extended);
  writeChunkHeader(
    buf,
    0,
    extended,
    ReplyFlag.DONE,
    ReplyType.OFFSET_DATA,
    req.cookieHi,
    req.cookieLo,
    req.offset,
    8 + length,
  );
  writeU64(buf, req.offset, hdr);
}

/** A final OFFSET_HOLE chunk covering the whole read (used when the range is known to be zero). */
export function encodeHoleReply(
  mode: Exclude<ReplyMode, 'simple'>,
  req: Pick<Request, 'cookieHi' | 'cookieLo' | 'offset'>,
  length: number,
): Buffer {
  const extended = mode === 'extended';
  const hdr = chunkHeaderBytes(extended);
  const buf = Buffer.allocUnsafe(hdr + 12);
  writeChunkHeader(
    buf,
    0,
    extended,
    ReplyFlag.DONE,
    ReplyType.OFFSET_HOLE,
    req.cookieHi,
    req.cookieLo,
    req.offset,
    12,
  );
  writeU64(buf, req.offset, hdr);
  buf.writeUInt32BE(length, hdr + 8);
  return buf;
}

export interface StatusExtent {
  length: number;
  flags: number;
}

/** A final BLOCK_STATUS (or BLOCK_STATUS_EXT) chunk for one context. */
export function encodeBlockStatusReply(
  mode: Exclude<ReplyMode, 'simple'>,
  req: Pick<Request, 'cookieHi' | 'cookieLo' | 'offset'>,
  contextId: number,
  extents: StatusExtent[],
  final = true,
): Buffer {
  const extended = mode === 'extended';
  const hdr = chunkHeaderBytes(extended);
  const flags = final ? ReplyFlag.DONE : 0;
  if (extended) {
    const payload = 8 + 16 * extents.length;
    const buf = Buffer.allocUnsafe(hdr + payload);
    writeChunkHeader(
      buf,
      0,
      true,
      flags,
      ReplyType.BLOCK_STATUS_EXT,
      req.cookieHi,
      req.cookieLo,
      req.offset,
      payload,
    );
    buf.writeUInt32BE(contextId, hdr);
    buf.writeUInt32BE(extents.length, hdr + 4);
    let p = hdr + 8;
    for (const e of extents) {
      writeU64(buf, e.length, p);
      writeU64(buf, e.flags, p + 8);
      p += 16;
    }
    return buf;
  }
  const payload = 4 + 8 * extents.length;
  const buf = Buffer.allocUnsafe(hdr + payload);
  writeChunkHeader(
    buf,
    0,
    false,
    flags,
    ReplyType.BLOCK_STATUS,
    req.cookieHi,
    req.cookieLo,
    req.offset,
    payload,
  );
  buf.writeUInt32BE(contextId, hdr);
  let p = hdr + 4;
  for (const e of extents) {
    buf.writeUInt32BE(e.length, p);
    buf.writeUInt32BE(e.flags, p + 4);
    p += 8;
  }
  return buf;
}

/** A reply header as a client sees it (payload, if any, follows). */
export interface ReplyHeader {
  kind: 'simple' | 'chunk';
  headerBytes: number;
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  /** Simple replies: the error. Chunks: 0 (errors are in the payload). */
  error: number;
  /** Chunk payload length; for simple replies the caller knows it from the request. */
  length: number;
}

/** Decode a reply header on the client side. */
export function decodeReplyHeader(buf: Buffer, off: number, extended: boolean): ReplyHeader | null {
  if (buf.length - off < 4) return null;
  const magic = buf.readUInt32BE(off);
  if (magic === SIMPLE_REPLY_MAGIC) {
    if (buf.length - off < SIMPLE_REPLY_HEADER_BYTES) return null;
    return {
      kind: 'simple',
      headerBytes: SIMPLE_REPLY_HEADER_BYTES,
      flags: ReplyFlag.DONE,
      type: ReplyType.NONE,
      error: buf.readUInt32BE(off + 4),
      cookieHi: buf.readUInt32BE(off + 8),
      cookieLo: buf.readUInt32BE(off + 12),
      length: 0,
    };
  }
  if (magic === STRUCTURED_REPLY_MAGIC) {
    if (buf.length - off < STRUCTURED_REPLY_HEADER_BYTES) return null;
    return {
      kind: 'chunk',
      headerBytes: STRUCTURED_REPLY_HEADER_BYTES,
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      cookieHi: buf.readUInt32BE(off + 8),
      cookieLo: buf.readUInt32BE(off + 12),
      error: 0,
      length: buf.readUInt32BE(off + 16),
    };
  }
  if (magic === EXTENDED_REPLY_MAGIC && extended) {
    if (buf.length - off < EXTENDED_REPLY_HEADER_BYTES) return null;
    return {
      kind: 'chunk',
      headerBytes: EXTENDED_REPLY_HEADER_BYTES,
      flags: buf.readUInt16BE(off + 4),
      type: buf.readUInt16BE(off + 6),
      cookieHi: buf.readUInt32BE(off + 8),
      cookieLo: buf.readUInt32BE(off + 12),
      error: 0,
      length: readU64(buf, off + 24),
    };
  }
  throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
}
