/**
 * Frames: the unit of the replication link and of every journal file.
 *
 * Notes on the design:
 * - One format for the wire and the disk, so a record received from the
 *   primary is appended to the secondary's epoch journal byte for byte, and
 *   recovery verifies journal records with the same decoder that checks the
 *   link.
 * - Layout (big-endian):
 *     u32 magic | u32 bodyLength | u32 checksum(body) | body
 *     body = u16 metaLength | meta (msgpack) | data (raw bytes)
 *   Magic 'CBLG': the checksum is CRC-32C, computed by the native helper in
 *   hardware (~4 GB/s; every replicated byte is checksummed on both sides).
 *   Magic 'CBLF': CRC-32 (zlib), written where the native helper is missing
 *   and by earlier versions; both are read everywhere (a secondary keeps
 *   journals across restarts and upgrades).
 *   The bulk data stays outside msgpack, so encoding a 1 MiB write never
 *   copies it: the header and the data go out in one writev, and the CRC is
 *   computed incrementally over both.
 * - Pure functions over Buffers, like the NBD codec: decoding a prefix returns
 *   null; bad magic, a CRC mismatch or an oversized length throws FrameError
 *   (on the link: drop the connection; on disk: a torn tail or corruption).
 */
import { Buffer } from 'node:buffer';
import { crc32 } from 'node:zlib';
import { Packr } from 'msgpackr';
import { native } from '../../block/native.js';
import { limits } from '../../limits.js';
import { packFlat, unpackFlat } from './flat-meta.js';

/** Frames checksummed with CRC-32 (zlib). */
export const FRAME_MAGIC = 0x43424c46; // "CBLF"
/** Frames checksummed with CRC-32C. */
export const FRAME_MAGIC_C = 0x43424c47; // "CBLG"
export const FRAME_HEADER_BYTES = 12;
/** A frame never carries more than one NBD payload plus metadata. */
export const MAX_FRAME_BODY = limits.maxPayloadBytes + 64 * 1024;

const packr = new Packr({ useRecords: false, moreTypes: false });

export class FrameError extends Error {
  constructor(
    readonly reason: 'magic' | 'crc' | 'length' | 'meta',
    message: string,
  ) {
    super(message);
    this.name = 'FrameError';
  }
}

export interface Frame<M = Record<string, unknown>> {
  meta: M;
  /** Bulk payload (a view into the input buffer; copy it if you keep it past the buffer's life). */
  data: Buffer;
  /** Bytes this frame occupied, header included. */
  bytes: number;
}

/** A frame's packed metadata, its data as pieces, and its body's length, checked against the bounds. */
function packFrame(meta: object, data: Buffer | readonly Buffer[]) {
  const metaBytes = packFlat(meta) ?? packr.pack(meta);
  if (metaBytes.length > 0xffff) throw new FrameError('meta', `frame metadata of ${metaBytes.length} bytes`);
  const pieces = Buffer.isBuffer(data) ? [data] : data;
  let dataLength = 0;
  for (const p of pieces) dataLength += p.length;
  const bodyLength = 2 + metaBytes.length + dataLength;
  if (bodyLength > MAX_FRAME_BODY) throw new FrameError('length', `frame body of ${bodyLength} bytes`);
  return { metaBytes, pieces, bodyLength };
}

/** Encode a frame as [header+meta, ...data] for a writev (the data's pieces as given, empty ones left out). */
export function encodeFrame(meta: object, data: Buffer | readonly Buffer[] = EMPTY): Buffer[] {
  const { metaBytes, pieces, bodyLength } = packFrame(meta, data);
  const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES + 2 + metaBytes.length);
  head.writeUInt32BE(native ? FRAME_MAGIC_C : FRAME_MAGIC, 0);
  head.writeUInt32BE(bodyLength, 4);
  head.writeUInt16BE(metaBytes.length, FRAME_HEADER_BYTES);
  metaBytes.copy(head, FRAME_HEADER_BYTES + 2);
  const sum = native ? crc32c : crc32;
  let crc = sum(head.subarray(FRAME_HEADER_BYTES));
  for (const p of pieces) crc = sum(p, crc);
  head.writeUInt32BE(crc, 8);
  return [head, ...pieces.filter((p) => p.length > 0)];
}

/**
 * Encode a frame straight into `target` at `at`, the checksum computed over
 * the bytes in place (one pass, no parts to gather): the primary's resend
 * buffer takes its frames this way. Returns the frame's size, or -1 when it
 * would not fit before the end of `target` (nothing written) or the native
 * helper is missing (the caller then uses encodeFrame). Byte for byte what
 * encodeFrame gives.
 */
export function encodeFrameInto(
  meta: object,
  data: Buffer | readonly Buffer[] = EMPTY,
  target: Buffer,
  at: number,
): number {
  if (!native) return -1;
  const { metaBytes, pieces, bodyLength } = packFrame(meta, data);
  const total = FRAME_HEADER_BYTES + bodyLength;
  if (at + total > target.length) return -1;
  target.writeUInt32BE(FRAME_MAGIC_C, at);
  target.writeUInt32BE(bodyLength, at + 4);
  target.writeUInt16BE(metaBytes.length, at + FRAME_HEADER_BYTES);
  let p = at + FRAME_HEADER_BYTES + 2;
  p += metaBytes.copy(target, p);
  for (const piece of pieces) p += piece.copy(target, p);
  target.writeUInt32BE(native.crc32c(target.subarray(at + FRAME_HEADER_BYTES, at + total), 0), at + 8);
  return total;
}

/** Encode into one Buffer (tests and small control frames). */
export function encodeFrameBuffer(meta: object, data: Buffer = EMPTY): Buffer {
  const parts = encodeFrame(meta, data);
  return parts.length > 1 ? Buffer.concat(parts) : parts[0];
}

/** Decode one frame at `off`; null if incomplete. */
export function decodeFrame<M = Record<string, unknown>>(buf: Buffer, off = 0): Frame<M> | null {
  const total = peekFrameBytes(buf, off);
  if (total === null || buf.length - off < total) return null;
  const f = decodeFramePieces<M>([buf.subarray(off, off + total)], off);
  return { meta: f.meta, data: f.data[0] ?? EMPTY, bytes: total };
}

/** The metadata in `bytes` (or in its [start, end)), which must be a map. */
function unpackMeta<M>(bytes: Buffer, off: number, start = 0, end = bytes.length): M {
  const flat = unpackFlat(bytes, start, end);
  if (flat) return flat as M;
  let meta: M;
  try {
    meta = packr.unpack(bytes, { start, end }) as M;
  } catch (err) {
    throw new FrameError('meta', `undecodable frame metadata at ${off}: ${(err as Error).message}`);
  }
  if (meta === null || typeof meta !== 'object')
    throw new FrameError('meta', `frame metadata is not a map at ${off}`);
  return meta;
}

/** Bytes [from, to) of the pieces' concatenation, as views of them. */
export function piecesRange(pieces: readonly Buffer[], from: number, to: number): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const p of pieces) {
    const end = at + p.length;
    if (end > from && at < to) out.push(p.subarray(Math.max(0, from - at), Math.min(p.length, to - at)));
    at = end;
    if (at >= to) break;
  }
  return out;
}

/** Bytes [from, from + length) of the pieces, a view when they lie in one piece, else a copy. */
function gather(pieces: readonly Buffer[], from: number, length: number): Buffer {
  const r = piecesRange(pieces, from, from + length);
  return r.length === 1 ? r[0] : Buffer.concat(r, length);
}

/**
 * Decode one whole frame given as pieces (views of the socket's chunks, as a
 * reader takes it): only the header and metadata are gathered, the checksum
 * runs over the pieces in turn, and the data stays in pieces.
 */
export function decodeFramePieces<M = Record<string, unknown>>(
  pieces: readonly Buffer[],
  /** Where the frame starts in its file or stream, for the error messages. */
  off = 0,
): { meta: M; data: Buffer[]; bytes: number } {
  if (pieces.length === 1 && pieces[0].length >= FRAME_HEADER_BYTES + 2)
    return decodeWhole<M>(pieces[0], off);
  const head = gather(pieces, 0, FRAME_HEADER_BYTES + 2);
  const total = peekFrameBytes(head)!;
  let have = 0;
  for (const p of pieces) have += p.length;
  if (have !== total) throw new FrameError('length', `a frame of ${total} bytes given as ${have}`);
  const sum = head.readUInt32BE(0) === FRAME_MAGIC_C ? crc32c : crc32;
  let crc = 0;
  for (const p of piecesRange(pieces, FRAME_HEADER_BYTES, total)) crc = sum(p, crc);
  if (crc !== head.readUInt32BE(8)) throw new FrameError('crc', `frame checksum mismatch at ${off}`);
  const metaLength = head.readUInt16BE(FRAME_HEADER_BYTES);
  const dataAt = FRAME_HEADER_BYTES + 2 + metaLength;
  if (dataAt > total) throw new FrameError('meta', `frame metadata overruns the body at ${off}`);
  const meta = unpackMeta<M>(gather(pieces, FRAME_HEADER_BYTES + 2, metaLength), off);
  return { meta, data: piecesRange(pieces, dataAt, total), bytes: total };
}

/**
 * decodeFramePieces for a frame that lies in one piece (most of what a
 * secondary reads, its socket reading into slabs): the same checks, without
 * gathering the header and metadata into views of their own.
 */
function decodeWhole<M>(p: Buffer, off: number): { meta: M; data: Buffer[]; bytes: number } {
  const total = peekFrameBytes(p)!;
  if (p.length !== total) throw new FrameError('length', `a frame of ${total} bytes given as ${p.length}`);
  const sum = p.readUInt32BE(0) === FRAME_MAGIC_C ? crc32c : crc32;
  if (sum(p.subarray(FRAME_HEADER_BYTES), 0) !== p.readUInt32BE(8))
    throw new FrameError('crc', `frame checksum mismatch at ${off}`);
  const dataAt = FRAME_HEADER_BYTES + 2 + p.readUInt16BE(FRAME_HEADER_BYTES);
  if (dataAt > total) throw new FrameError('meta', `frame metadata overruns the body at ${off}`);
  const meta = unpackMeta<M>(p, off, FRAME_HEADER_BYTES + 2, dataAt);
  return { meta, data: dataAt < total ? [p.subarray(dataAt)] : [], bytes: total };
}

/** Peek the total size of the frame at `off` (header must be present); validates magic and bounds. */
export function peekFrameBytes(buf: Buffer, off = 0): number | null {
  if (buf.length - off < FRAME_HEADER_BYTES) return null;
  const magic = buf.readUInt32BE(off);
  if (magic !== FRAME_MAGIC && magic !== FRAME_MAGIC_C)
    throw new FrameError('magic', `bad frame magic 0x${magic.toString(16)} at ${off}`);
  const bodyLength = buf.readUInt32BE(off + 4);
  if (bodyLength < 2 || bodyLength > MAX_FRAME_BODY)
    throw new FrameError('length', `frame body length ${bodyLength} at ${off} is out of bounds`);
  return FRAME_HEADER_BYTES + bodyLength;
}

const EMPTY = Buffer.alloc(0);

let table: Uint32Array | null = null;
/** CRC-32C in JavaScript: reads a CBLG frame where the native helper is missing (slow, but correct). */
export function crc32cSoft(buf: Buffer, prev = 0): number {
  if (!table) {
    table = new Uint32Array(256);
    for (let i = 0; i < 256; i++) {
      let c = i;
      for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
      table[i] = c >>> 0;
    }
  }
  let crc = ~prev >>> 0;
  for (let i = 0; i < buf.length; i++) crc = table[(crc ^ buf[i]) & 0xff] ^ (crc >>> 8);
  return ~crc >>> 0;
}

/**
 * CRC-32C: the native helper (in hardware where the CPU can), else JavaScript. Frames are written
 * with it only where the helper is loaded (elsewhere with zlib's CRC-32).
 */
export const crc32c: (buf: Buffer, prev?: number) => number = native
  ? (buf, prev = 0) => native!.crc32c(buf, prev)
  : crc32cSoft;
