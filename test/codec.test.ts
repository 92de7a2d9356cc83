/**
 * Property tests of the pure NBD codec and the ByteQueue.
 *
 * - Every encoder/decoder pair round-trips on seeded random values (and on the
 *   edge values: 0, 2^32 - 1, 2^53 - 1, the WIRE_TOO_BIG clamp).
 * - Every frame, split at every byte offset: any strict prefix decodes to null
 *   ("need more"), the whole frame decodes to the encoded value, also when it
 *   sits at a non-zero offset in a larger buffer; fed through a ByteQueue in
 *   two pieces (every split) or in 1-byte pieces, the result is identical.
 * - Bad magic throws ProtocolError; random bytes only ever give null, a value
 *   or a ProtocolError.
 * - Option payload parsers reject malformed input with OptionPayloadError, and
 *   never allocate in proportion to a length the peer claims.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ByteQueue } from '../src/net/bytequeue.js';
import {
  allocReadReply,
  decodeGreeting,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeReplyHeader,
  decodeRequest,
  encodeBlockStatusReply,
  encodeClientFlags,
  encodeExportNameReply,
  encodeGreeting,
  encodeHoleReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoRequest,
  encodeInfoString,
  encodeMetaContextReplyData,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeServerReplyData,
  encodeStatusReply,
  encodeString32,
  GREETING_BYTES,
  OPTION_HEADER_BYTES,
  OPTION_REPLY_HEADER_BYTES,
  OptionPayloadError,
  parseInfoRequest,
  parseMetaContextRequest,
  ProtocolError,
  readU64,
  requestHeaderBytes,
  WIRE_TOO_BIG,
  writeChunkHeader,
  writeRequestHeader,
  writeSimpleReplyHeader,
  writeU64,
  type ReplyHeader,
  type ReplyMode,
  type Request,
  type StatusExtent,
} from '../src/net/codec.js';
import {
  EXTENDED_REPLY_MAGIC,
  EXTENDED_REQUEST_MAGIC,
  IHAVEOPT,
  Info,
  NBDMAGIC,
  OPTION_REPLY_MAGIC,
  Rep,
  ReplyFlag,
  ReplyType,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from '../src/net/protocol.js';
import { limits } from '../src/limits.js';
import { prng, randomBytes } from './helpers.js';

type Rand = () => number;

// ---------------------------------------------------------------------------
// Generators

const U53_EDGES = [
  0,
  1,
  511,
  512,
  0xffffffff,
  2 ** 32,
  2 ** 32 + 1,
  2 ** 52,
  2 ** 52 + 1,
  2 ** 53 - 2,
  2 ** 53 - 1,
];

function u16(r: Rand): number {
  return r() & 0xffff;
}
function u32(r: Rand): number {
  const v = r();
  return r() % 4 === 0 ? [0, 1, 0x7fffffff, 0x80000000, 0xffffffff][v % 5] : v >>> 0;
}
/** A 64-bit value that a JS number holds exactly (< 2^53), edges included. */
function u53(r: Rand): number {
  if (r() % 3 === 0) return U53_EDGES[r() % U53_EDGES.length];
  return (r() & 0x1fffff) * 0x100000000 + r();
}
function pick<T>(r: Rand, xs: readonly T[]): T {
  return xs[r() % xs.length];
}
/** A random valid-Unicode string of at most maxBytes UTF-8 bytes. */
function str(r: Rand, maxBytes = 64): string {
  const n = r() % 24;
  let s = '';
  for (let i = 0; i < n; i++) {
    const kind = r() % 5;
    const cp =
      kind === 0
        ? 0x20 + (r() % 0x5f)
        : kind === 1
          ? 0xa0 + (r() % 0x700)
          : kind === 2
            ? 0x4e00 + (r() % 0x5000)
            : kind === 3
              ? 0x1f300 + (r() % 0x300)
              : r() % 0x80;
    const next = s + String.fromCodePoint(cp);
    if (Buffer.byteLength(next) > maxBytes) break;
    s = next;
  }
  return s;
}

// ---------------------------------------------------------------------------
// Frames: an encoded buffer, the value it encodes, and a decoder that returns
// null while bytes are missing. Composite frames (reply + payload) are decoded
// with the codec's header decoder plus the payload length the header states.

interface Frame<T = unknown> {
  name: string;
  bytes: Buffer;
  expected: T;
  decode: (buf: Buffer, off: number) => { value: T; bytes: number } | null;
}

function fixed<T>(n: number, f: (buf: Buffer, off: number) => T | null) {
  return (buf: Buffer, off: number) => {
    const v = f(buf, off);
    return v === null ? null : { value: v, bytes: n };
  };
}

function greetingFrame(r: Rand): Frame {
  const flags = u16(r);
  return {
    name: 'greeting',
    bytes: encodeGreeting(flags),
    expected: { handshakeFlags: flags },
    decode: fixed(GREETING_BYTES, decodeGreeting),
  };
}

function optionFrame(r: Rand): Frame {
  const option = u32(r);
  const payload = randomBytes(r() % 40, r);
  return {
    name: 'option',
    bytes: encodeOption(option, payload),
    expected: { option, length: payload.length, payload },
    decode: (buf, off) => {
      const hdr = decodeOptionHeader(buf, off);
      if (!hdr || buf.length - off < OPTION_HEADER_BYTES + hdr.length) return null;
      const start = off + OPTION_HEADER_BYTES;
      return {
        value: { ...hdr, payload: Buffer.from(buf.subarray(start, start + hdr.length)) },
        bytes: OPTION_HEADER_BYTES + hdr.length,
      };
    },
  };
}

function optionReplyFrame(r: Rand): Frame {
  const option = u32(r);
  const type = pick(r, [...Object.values(Rep), u32(r)]);
  const data = randomBytes(r() % 40, r);
  return {
    name: 'option reply',
    bytes: encodeOptionReply(option, type, data),
    expected: { option, type: type >>> 0, length: data.length, data },
    decode: (buf, off) => {
      const hdr = decodeOptionReplyHeader(buf, off);
      if (!hdr || buf.length - off < OPTION_REPLY_HEADER_BYTES + hdr.length) return null;
      const start = off + OPTION_REPLY_HEADER_BYTES;
      return {
        value: { ...hdr, data: Buffer.from(buf.subarray(start, start + hdr.length)) },
        bytes: OPTION_REPLY_HEADER_BYTES + hdr.length,
      };
    },
  };
}

function randomRequest(r: Rand, extended: boolean): Request {
  return {
    flags: u16(r),
    type: u16(r),
    cookieHi: u32(r),
    cookieLo: u32(r),
    offset: u53(r),
    length: extended ? u53(r) : u32(r),
  };
}

function requestFrame(r: Rand, extended: boolean): Frame<Request> {
  const req = randomRequest(r, extended);
  const bytes = Buffer.alloc(requestHeaderBytes(extended));
  expect(writeRequestHeader(bytes, 0, req, extended)).toBe(bytes.length);
  return {
    name: extended ? 'extended request' : 'compact request',
    bytes,
    expected: req,
    decode: fixed(requestHeaderBytes(extended), (b, o) => decodeRequest(b, o, extended)),
  };
}

/** Decode a whole reply frame (header + payload) the way a client does. */
function decodeReplyFrame(extended: boolean, simpleDataBytes = 0) {
  return (buf: Buffer, off: number) => {
    const hdr = decodeReplyHeader(buf, off, extended);
    if (!hdr) return null;
    const payloadBytes = hdr.kind === 'simple' ? simpleDataBytes : hdr.length;
    if (buf.length - off < hdr.headerBytes + payloadBytes) return null;
    const start = off + hdr.headerBytes;
    const raw = Buffer.from(buf.subarray(off, start));
    return {
      value: { hdr, raw, payload: Buffer.from(buf.subarray(start, start + payloadBytes)) },
      bytes: hdr.headerBytes + payloadBytes,
    };
  };
}

interface DecodedReply {
  hdr: ReplyHeader;
  raw: Buffer;
  payload: Buffer;
}

function replyFrame(
  name: string,
  bytes: Buffer,
  extended: boolean,
  simpleDataBytes = 0,
): Frame<DecodedReply> {
  const decode = decodeReplyFrame(extended, simpleDataBytes);
  const whole = decode(bytes, 0);
  expect(whole, `${name} decodes`).not.toBeNull();
  expect(whole!.bytes, `${name} is exactly one frame`).toBe(bytes.length);
  return { name, bytes, expected: whole!.value, decode };
}

const CHUNK_MODES: Exclude<ReplyMode, 'simple'>[] = ['structured', 'extended'];
const ALL_MODES: ReplyMode[] = ['simple', 'structured', 'extended'];

/** A random sample of every kind of frame (used by the split and queue properties). */
function allFrames(r: Rand): Frame[] {
  const req = { cookieHi: u32(r), cookieLo: u32(r), offset: u53(r) };
  const frames: Frame[] = [
    greetingFrame(r),
    optionFrame(r),
    optionReplyFrame(r),
    requestFrame(r, false),
    requestFrame(r, true),
  ];
  for (const mode of ALL_MODES) {
    frames.push(replyFrame(`${mode} ok status`, encodeStatusReply(mode, req, 0), mode === 'extended'));
    frames.push(
      replyFrame(`${mode} error status`, encodeStatusReply(mode, req, 22, str(r)), mode === 'extended'),
    );
    const len = r() % 64;
    const { buf, dataOffset } = allocReadReply(mode, req, len);
    randomBytes(len, r).copy(buf, dataOffset);
    frames.push(replyFrame(`${mode} read`, buf, mode === 'extended', len));
  }
  for (const mode of CHUNK_MODES) {
    frames.push(replyFrame(`${mode} hole`, encodeHoleReply(mode, req, u32(r)), mode === 'extended'));
    const extents = Array.from({ length: r() % 6 }, () => ({ length: u32(r), flags: r() & 3 }));
    frames.push(
      replyFrame(
        `${mode} block status`,
        encodeBlockStatusReply(mode, req, u32(r), extents, r() % 2 === 0),
        mode === 'extended',
      ),
    );
  }
  return frames;
}

/** Run a frame through the "split at every offset" properties. */
function checkSplits(frame: Frame): void {
  const { bytes, expected, decode, name } = frame;
  // Whole frame, at offset 0 and embedded after junk with trailing junk.
  const whole = decode(bytes, 0);
  expect(whole, name).not.toBeNull();
  expect(whole!.value, name).toEqual(expected);
  expect(whole!.bytes, name).toBe(bytes.length);
  const junk = Buffer.from([0xde, 0xad, 0xbe]);
  const embedded = Buffer.concat([junk, bytes, junk]);
  const at = decode(embedded, junk.length);
  expect(at?.value, `${name} at offset ${junk.length}`).toEqual(expected);
  // Every strict prefix needs more bytes (also at a non-zero offset).
  for (let n = 0; n < bytes.length; n++) {
    expect(decode(bytes.subarray(0, n), 0), `${name}: prefix of ${n}/${bytes.length} bytes`).toBeNull();
    expect(
      decode(embedded.subarray(0, junk.length + n), junk.length),
      `${name}: offset prefix ${n}`,
    ).toBeNull();
  }
  // Through a ByteQueue in two pieces, split at every offset.
  for (let cut = 0; cut <= bytes.length; cut++) {
    const got = feed(decode, [bytes.subarray(0, cut), bytes.subarray(cut)]);
    expect(got, `${name}: split at ${cut}`).toEqual([expected]);
  }
  // And in 1-byte pieces.
  const ones = Array.from(bytes, (b) => Buffer.from([b]));
  expect(feed(decode, ones), `${name}: 1-byte pieces`).toEqual([expected]);
}

/**
 * Feed pieces into a ByteQueue the way the socket layer does: after each piece
 * decode as many whole frames as are there; return every decoded value. The
 * queue must be empty at the end.
 */
function feed<T>(decode: Frame<T>['decode'], pieces: Buffer[]): T[] {
  const q = new ByteQueue();
  const out: T[] = [];
  for (const p of pieces) {
    // Copy: a socket never hands the same memory twice.
    q.push(Buffer.from(p));
    for (;;) {
      if (q.length === 0) break;
      const got = decode(q.peek(q.length), 0);
      if (!got) break;
      q.skip(got.bytes);
      out.push(got.value);
    }
  }
  expect(q.length, 'bytes left over in the queue').toBe(0);
  return out;
}

// ---------------------------------------------------------------------------

describe('64-bit fields', () => {
  it('writeU64/readU64 round-trip every value below 2^53', () => {
    const r = prng(1);
    const buf = Buffer.alloc(12);
    for (let i = 0; i < 5000; i++) {
      const v = i < U53_EDGES.length ? U53_EDGES[i] : u53(r);
      writeU64(buf, v, 2);
      expect(readU64(buf, 2)).toBe(v);
      expect(buf.readBigUInt64BE(2)).toBe(BigInt(v));
    }
  });

  it('clamps every value at or above 2^53 to WIRE_TOO_BIG', () => {
    const r = prng(2);
    const buf = Buffer.alloc(8);
    const edges = [
      2n ** 53n,
      2n ** 53n + 1n,
      2n ** 63n,
      2n ** 64n - 1n,
      0x0020000000000000n,
      0xffffffff00000000n,
    ];
    for (let i = 0; i < 2000; i++) {
      const v =
        i < edges.length
          ? edges[i]
          : 2n ** 53n + (((BigInt(r()) << 32n) | BigInt(r())) % (2n ** 64n - 2n ** 53n));
      buf.writeBigUInt64BE(v);
      expect(readU64(buf, 0), `0x${v.toString(16)}`).toBe(WIRE_TOO_BIG);
    }
    writeU64(buf, WIRE_TOO_BIG, 0);
    expect(buf.readBigUInt64BE(0)).toBe(2n ** 53n);
    expect(readU64(buf, 0)).toBe(WIRE_TOO_BIG);
    // Nothing below the clamp maps onto it.
    buf.writeBigUInt64BE(2n ** 53n - 1n);
    expect(readU64(buf, 0)).toBe(2 ** 53 - 1);
  });
});

describe('round trips', () => {
  it('greeting and client flags', () => {
    const r = prng(3);
    for (let i = 0; i < 500; i++) {
      const flags = i < 2 ? [0, 0xffff][i] : u16(r);
      const g = encodeGreeting(flags);
      expect(g.length).toBe(GREETING_BYTES);
      expect(g.readBigUInt64BE(0)).toBe(NBDMAGIC);
      expect(g.readBigUInt64BE(8)).toBe(IHAVEOPT);
      expect(decodeGreeting(g, 0)).toEqual({ handshakeFlags: flags });
      const cf = i < 3 ? [0, 0xffffffff, 3][i] : u32(r);
      const enc = encodeClientFlags(cf);
      expect(enc.length).toBe(4);
      expect(enc.readUInt32BE(0)).toBe(cf >>> 0);
    }
    // Negative (signed) input is written as the same 32 bits.
    expect(encodeClientFlags(-1).readUInt32BE(0)).toBe(0xffffffff);
  });

  it('option header and option reply header', () => {
    const r = prng(4);
    for (let i = 0; i < 500; i++) {
      const option = u32(r);
      const payload = randomBytes(r() % 300, r);
      const enc = encodeOption(option, payload);
      expect(enc.length).toBe(OPTION_HEADER_BYTES + payload.length);
      expect(decodeOptionHeader(enc, 0)).toEqual({ option, length: payload.length });
      expect(enc.subarray(OPTION_HEADER_BYTES).equals(payload)).toBe(true);

      const type = i % 2 ? pick(r, Object.values(Rep)) : u32(r);
      const rep = encodeOptionReply(option, type, payload);
      expect(rep.readBigUInt64BE(0)).toBe(OPTION_REPLY_MAGIC);
      expect(decodeOptionReplyHeader(rep, 0)).toEqual({ option, type: type >>> 0, length: payload.length });
      expect(rep.subarray(OPTION_REPLY_HEADER_BYTES).equals(payload)).toBe(true);
    }
    // Error reply types have the top bit set and survive as unsigned.
    const err = decodeOptionReplyHeader(encodeOptionReply(7, Rep.ERR_UNKNOWN, Buffer.from('x')), 0)!;
    expect(err.type).toBe(0x80000006);
  });

  it('info request (INFO/GO payload)', () => {
    const r = prng(5);
    for (let i = 0; i < 500; i++) {
      const name = i === 0 ? '' : str(r, limits.maxStringBytes);
      const infos = Array.from({ length: r() % 8 }, () => (r() % 3 ? pick(r, Object.values(Info)) : u16(r)));
      const enc = encodeInfoRequest(name, infos);
      expect(enc.length).toBe(4 + Buffer.byteLength(name) + 2 + 2 * infos.length);
      expect(parseInfoRequest(enc, limits.maxStringBytes)).toEqual({ name, infos });
    }
    // A name of exactly the limit is accepted.
    const max = 'n'.repeat(limits.maxStringBytes);
    expect(parseInfoRequest(encodeInfoRequest(max, [Info.NAME]), limits.maxStringBytes).name).toBe(max);
  });

  it('metadata context request', () => {
    const r = prng(6);
    for (let i = 0; i < 500; i++) {
      const exportName = str(r, 100);
      const queries = Array.from({ length: r() % 10 }, () => (r() % 2 ? 'base:allocation' : str(r, 200)));
      const enc = encodeMetaContextRequest(exportName, queries);
      expect(parseMetaContextRequest(enc, limits.maxStringBytes, limits.maxMetaQueries)).toEqual({
        exportName,
        queries,
      });
    }
    const many = Array.from({ length: limits.maxMetaQueries }, (_, i) => `q:${i}`);
    expect(
      parseMetaContextRequest(
        encodeMetaContextRequest('', many),
        limits.maxStringBytes,
        limits.maxMetaQueries,
      ).queries,
    ).toEqual(many);
  });

  it('option reply data helpers (export-name reply, SERVER, INFO_*, META_CONTEXT)', () => {
    const r = prng(7);
    for (let i = 0; i < 300; i++) {
      const size = u53(r);
      const flags = u16(r);
      for (const noZeroes of [true, false]) {
        const e = encodeExportNameReply(size, flags, noZeroes);
        expect(e.length).toBe(noZeroes ? 10 : 134);
        expect(readU64(e, 0)).toBe(size);
        expect(e.readUInt16BE(8)).toBe(flags);
        expect(e.subarray(10).every((b) => b === 0)).toBe(true);
      }
      const ie = encodeInfoExport(size, flags);
      expect([ie.readUInt16BE(0), readU64(ie, 2), ie.readUInt16BE(10), ie.length]).toEqual([
        Info.EXPORT,
        size,
        flags,
        12,
      ]);
      const s = str(r, 200);
      const is = encodeInfoString(Info.DESCRIPTION, s);
      expect([is.readUInt16BE(0), is.toString('utf8', 2)]).toEqual([Info.DESCRIPTION, s]);
      const [a, b, c] = [u32(r), u32(r), u32(r)];
      const bs = encodeInfoBlockSize(a, b, c);
      expect([
        bs.readUInt16BE(0),
        bs.readUInt32BE(2),
        bs.readUInt32BE(6),
        bs.readUInt32BE(10),
        bs.length,
      ]).toEqual([Info.BLOCK_SIZE, a, b, c, 14]);
      const desc = str(r, 100);
      const sv = encodeServerReplyData(s, desc);
      const nlen = sv.readUInt32BE(0);
      expect([sv.toString('utf8', 4, 4 + nlen), sv.toString('utf8', 4 + nlen)]).toEqual([s, desc]);
      const id = u32(r);
      const mc = encodeMetaContextReplyData(id, s);
      expect([mc.readUInt32BE(0), mc.toString('utf8', 4)]).toEqual([id, s]);
      const s32 = encodeString32(s);
      expect([s32.readUInt32BE(0), s32.toString('utf8', 4)]).toEqual([Buffer.byteLength(s), s]);
    }
  });

  for (const extended of [false, true]) {
    it(`${extended ? 'extended' : 'compact'} request header`, () => {
      const r = prng(extended ? 9 : 8);
      const buf = Buffer.alloc(64);
      for (let i = 0; i < 3000; i++) {
        const req = randomRequest(r, extended);
        const off = r() % 20;
        const n = writeRequestHeader(buf, off, req, extended);
        expect(n).toBe(requestHeaderBytes(extended));
        expect(buf.readUInt32BE(off)).toBe(extended ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC);
        expect(decodeRequest(buf, off, extended)).toEqual(req);
      }
      // Offsets (and extended lengths) near 2^53 survive exactly.
      for (const v of [2 ** 53 - 1, 2 ** 53 - 2, 2 ** 52 + 1, 2 ** 32, 2 ** 32 - 1]) {
        const req = {
          flags: 1,
          type: 2,
          cookieHi: 3,
          cookieLo: 4,
          offset: v,
          length: extended ? v : 0xffffffff,
        };
        writeRequestHeader(buf, 0, req, extended);
        expect(decodeRequest(buf, 0, extended)).toEqual(req);
      }
      // 64-bit values beyond 2^53 decode to the clamp, never to a rounded number.
      writeRequestHeader(
        buf,
        0,
        { flags: 0, type: 0, cookieHi: 0, cookieLo: 0, offset: 0, length: 0 },
        extended,
      );
      for (const big of [2n ** 53n, 2n ** 53n + 1n, 2n ** 64n - 1n]) {
        buf.writeBigUInt64BE(big, 16);
        if (extended) buf.writeBigUInt64BE(big, 24);
        const d = decodeRequest(buf, 0, extended)!;
        expect(d.offset).toBe(WIRE_TOO_BIG);
        if (extended) expect(d.length).toBe(WIRE_TOO_BIG);
      }
      // The compact length is 32 bits wide: the field after it is not read.
      if (!extended) {
        buf.writeUInt32BE(0xffffffff, 24);
        buf.writeUInt32BE(0x12345678, 28);
        expect(decodeRequest(buf, 0, false)!.length).toBe(0xffffffff);
      }
    });
  }

  it('simple reply header', () => {
    const r = prng(10);
    const buf = Buffer.alloc(40);
    for (let i = 0; i < 1000; i++) {
      const [error, hi, lo] = [u32(r), u32(r), u32(r)];
      const off = r() % 20;
      expect(writeSimpleReplyHeader(buf, off, error, hi, lo)).toBe(16);
      expect(buf.readUInt32BE(off)).toBe(SIMPLE_REPLY_MAGIC);
      for (const extended of [false, true])
        expect(decodeReplyHeader(buf, off, extended)).toEqual({
          kind: 'simple',
          headerBytes: 16,
          flags: ReplyFlag.DONE,
          type: ReplyType.NONE,
          error,
          cookieHi: hi,
          cookieLo: lo,
          length: 0,
        });
    }
  });

  for (const extended of [false, true]) {
    it(`${extended ? 'extended' : 'structured'} chunk header`, () => {
      const r = prng(extended ? 12 : 11);
      const buf = Buffer.alloc(64);
      for (let i = 0; i < 2000; i++) {
        const flags = u16(r);
        const type = u16(r);
        const [hi, lo] = [u32(r), u32(r)];
        const reqOffset = u53(r);
        const len = extended ? u53(r) : u32(r);
        const off = r() % 20;
        const n = writeChunkHeader(buf, off, extended, flags, type, hi, lo, reqOffset, len);
        expect(n).toBe(extended ? 32 : 20);
        expect(buf.readUInt32BE(off)).toBe(extended ? EXTENDED_REPLY_MAGIC : STRUCTURED_REPLY_MAGIC);
        expect(decodeReplyHeader(buf, off, extended)).toEqual({
          kind: 'chunk',
          headerBytes: n,
          flags,
          type,
          cookieHi: hi,
          cookieLo: lo,
          error: 0,
          length: len,
        });
        if (extended) expect(readU64(buf, off + 16)).toBe(reqOffset);
      }
      if (extended) {
        // A request offset at the clamp is echoed as the largest exact value.
        writeChunkHeader(buf, 0, true, 1, 0, 0, 0, WIRE_TOO_BIG, 0);
        expect(buf.readBigUInt64BE(16)).toBe(2n ** 53n - 1n);
        // An extended reply magic is only valid once extended headers are negotiated.
        expect(() => decodeReplyHeader(buf, 0, false)).toThrow(ProtocolError);
      }
    });
  }

  it('status replies (success, and errors with messages) in every mode', () => {
    const r = prng(13);
    for (let i = 0; i < 600; i++) {
      const mode = ALL_MODES[i % 3];
      const req = { cookieHi: u32(r), cookieLo: u32(r), offset: u53(r) };
      const error = i % 4 === 0 ? 0 : pick(r, [1, 5, 12, 22, 28, 75, 95, 108, u32(r) || 1]);
      const message = i % 7 === 0 ? '' : i % 11 === 0 ? 'é'.repeat(3000) : str(r, 300);
      const enc = encodeStatusReply(mode, req, error, message);
      const dec = decodeReplyFrame(mode === 'extended')(enc, 0)!;
      expect(dec.bytes).toBe(enc.length);
      const { hdr, payload, raw } = dec.value;
      expect([hdr.cookieHi, hdr.cookieLo]).toEqual([req.cookieHi, req.cookieLo]);
      if (mode === 'simple') {
        expect(hdr.kind).toBe('simple');
        expect(hdr.error).toBe(error);
        expect(enc.length).toBe(16);
        continue;
      }
      expect(hdr.kind).toBe('chunk');
      expect(hdr.flags & ReplyFlag.DONE).toBe(ReplyFlag.DONE);
      if (mode === 'extended') expect(readU64(raw, 16)).toBe(req.offset);
      if (error === 0) {
        expect([hdr.type, hdr.length]).toEqual([ReplyType.NONE, 0]);
        continue;
      }
      expect(hdr.type).toBe(ReplyType.ERROR);
      expect(payload.readUInt32BE(0)).toBe(error);
      const msgLen = payload.readUInt16BE(4);
      expect(payload.length).toBe(6 + msgLen);
      const msgBytes = Buffer.from(message, 'utf8');
      // Messages are capped at 4096 bytes (the spec's string limit) and are a prefix of the original.
      expect(msgLen).toBe(Math.min(msgBytes.length, 4096));
      expect(payload.subarray(6).equals(msgBytes.subarray(0, msgLen))).toBe(true);
    }
  });

  it('read replies in every mode carry the data at the right place', () => {
    const r = prng(14);
    for (let i = 0; i < 300; i++) {
      const mode = ALL_MODES[i % 3];
      const req = { cookieHi: u32(r), cookieLo: u32(r), offset: u53(r) };
      const len = i < 3 ? 0 : r() % 3000;
      const data = randomBytes(len, r);
      const { buf, dataOffset } = allocReadReply(mode, req, len);
      data.copy(buf, dataOffset);
      expect(buf.length).toBe(dataOffset + len);
      const dec = decodeReplyFrame(mode === 'extended', len)(buf, 0)!;
      const { hdr, payload } = dec.value;
      expect([hdr.cookieHi, hdr.cookieLo, hdr.error]).toEqual([req.cookieHi, req.cookieLo, 0]);
      if (mode === 'simple') {
        expect(payload.equals(data)).toBe(true);
        continue;
      }
      expect([hdr.type, hdr.flags & ReplyFlag.DONE, hdr.length]).toEqual([
        ReplyType.OFFSET_DATA,
        ReplyFlag.DONE,
        8 + len,
      ]);
      expect(readU64(payload, 0)).toBe(req.offset);
      expect(payload.subarray(8).equals(data)).toBe(true);
    }
  });

  it('hole replies', () => {
    const r = prng(15);
    for (let i = 0; i < 300; i++) {
      const mode = CHUNK_MODES[i % 2];
      const req = { cookieHi: u32(r), cookieLo: u32(r), offset: u53(r) };
      const len = u32(r) || 1;
      const enc = encodeHoleReply(mode, req, len);
      const { hdr, payload, raw } = decodeReplyFrame(mode === 'extended')(enc, 0)!.value;
      expect([hdr.type, hdr.flags & ReplyFlag.DONE, hdr.length]).toEqual([
        ReplyType.OFFSET_HOLE,
        ReplyFlag.DONE,
        12,
      ]);
      expect([hdr.cookieHi, hdr.cookieLo]).toEqual([req.cookieHi, req.cookieLo]);
      expect([readU64(payload, 0), payload.readUInt32BE(8)]).toEqual([req.offset, len]);
      if (mode === 'extended') expect(readU64(raw, 16)).toBe(req.offset);
    }
  });

  it('block status replies in both formats', () => {
    const r = prng(16);
    for (let i = 0; i < 400; i++) {
      const mode = CHUNK_MODES[i % 2];
      const extended = mode === 'extended';
      const req = { cookieHi: u32(r), cookieLo: u32(r), offset: u53(r) };
      const id = u32(r);
      const final = r() % 2 === 0;
      const extents: StatusExtent[] = Array.from({ length: i < 2 ? 0 : r() % 20 }, () => ({
        length: extended ? u53(r) : u32(r),
        flags: r() % 3 ? r() & 3 : u32(r),
      }));
      const enc = encodeBlockStatusReply(mode, req, id, extents, final);
      const { hdr, payload } = decodeReplyFrame(extended)(enc, 0)!.value;
      expect(hdr.type).toBe(extended ? ReplyType.BLOCK_STATUS_EXT : ReplyType.BLOCK_STATUS);
      expect(hdr.flags & ReplyFlag.DONE).toBe(final ? ReplyFlag.DONE : 0);
      expect(payload.readUInt32BE(0)).toBe(id);
      const got: StatusExtent[] = [];
      if (extended) {
        expect(payload.readUInt32BE(4)).toBe(extents.length);
        expect(payload.length).toBe(8 + 16 * extents.length);
        for (let p = 8; p < payload.length; p += 16)
          got.push({ length: readU64(payload, p), flags: readU64(payload, p + 8) });
      } else {
        expect(payload.length).toBe(4 + 8 * extents.length);
        for (let p = 4; p < payload.length; p += 8)
          got.push({ length: payload.readUInt32BE(p), flags: payload.readUInt32BE(p + 4) });
      }
      expect(got).toEqual(extents);
    }
  });
});

describe('framing: split at every byte offset', () => {
  it('every frame kind: strict prefixes need more; whole frames, 2-piece and 1-byte feeds decode identically', () => {
    for (let seed = 100; seed < 130; seed++) {
      const frames = allFrames(prng(seed));
      expect(frames.length).toBeGreaterThan(15);
      for (const f of frames) checkSplits(f);
    }
  });

  it('edge-valued request headers (2^53 - 1, the clamp, 0xFFFFFFFF) survive every split', () => {
    for (const extended of [false, true]) {
      for (const v of [0, 2 ** 32 - 1, 2 ** 53 - 1, WIRE_TOO_BIG]) {
        const req = {
          flags: 0xffff,
          type: 0xffff,
          cookieHi: 0xffffffff,
          cookieLo: 0,
          offset: v,
          length: extended ? v : 0xffffffff,
        };
        const bytes = Buffer.alloc(requestHeaderBytes(extended));
        writeRequestHeader(bytes, 0, req, extended);
        checkSplits({
          name: `request ${v}`,
          bytes,
          // A clamped offset keeps its raw halves in extended mode (extended replies echo them).
          expected: extended && v === WIRE_TOO_BIG ? { ...req, offsetRaw: [0x200000, 0] } : req,
          decode: fixed(bytes.length, (b, o) => decodeRequest(b, o, extended)),
        });
      }
    }
  });

  it('a stream of many frames cut into random pieces decodes to the same sequence', () => {
    for (let seed = 200; seed < 260; seed++) {
      const r = prng(seed);
      // One stream per decoder family, as a socket would carry it.
      const families: Frame[][] = [[], [], [], [], []];
      for (let i = 0; i < 40; i++) {
        const req = { cookieHi: u32(r), cookieLo: u32(r), offset: u53(r) };
        families[0].push(optionFrame(r));
        families[1].push(requestFrame(r, false));
        families[2].push(requestFrame(r, true));
        const mode = pick(r, CHUNK_MODES);
        families[mode === 'extended' ? 3 : 4].push(
          r() % 2
            ? replyFrame('status', encodeStatusReply(mode, req, r() % 2 ? 0 : 5, str(r)), mode === 'extended')
            : replyFrame(
                'bs',
                encodeBlockStatusReply(mode, req, 1, [{ length: u32(r), flags: 3 }]),
                mode === 'extended',
              ),
        );
      }
      for (const fam of families) {
        if (fam.length === 0) continue;
        const stream = Buffer.concat(fam.map((f) => f.bytes));
        const pieces: Buffer[] = [];
        for (let pos = 0; pos < stream.length;) {
          const n = Math.min(stream.length - pos, r() % 3 === 0 ? 1 : 1 + (r() % 97));
          pieces.push(stream.subarray(pos, pos + n));
          pos += n;
        }
        expect(feed(fam[0].decode, pieces)).toEqual(fam.map((f) => f.expected));
      }
    }
  });
});

describe('bad magic', () => {
  it('every decoder throws ProtocolError on a corrupted magic', () => {
    const r = prng(300);
    const cases: { name: string; bytes: Buffer; magicBytes: number; decode: (b: Buffer) => unknown }[] = [
      {
        name: 'greeting NBDMAGIC',
        bytes: encodeGreeting(3),
        magicBytes: 8,
        decode: (b) => decodeGreeting(b, 0),
      },
      {
        name: 'option header',
        bytes: encodeOption(7, Buffer.from('abc')),
        magicBytes: 8,
        decode: (b) => decodeOptionHeader(b, 0),
      },
      {
        name: 'option reply',
        bytes: encodeOptionReply(7, Rep.ACK),
        magicBytes: 8,
        decode: (b) => decodeOptionReplyHeader(b, 0),
      },
      {
        name: 'compact request',
        bytes: requestFrame(r, false).bytes,
        magicBytes: 4,
        decode: (b) => decodeRequest(b, 0, false),
      },
      {
        name: 'extended request',
        bytes: requestFrame(r, true).bytes,
        magicBytes: 4,
        decode: (b) => decodeRequest(b, 0, true),
      },
      {
        name: 'structured reply',
        bytes: encodeStatusReply('structured', { cookieHi: 1, cookieLo: 2, offset: 3 }, 0),
        magicBytes: 4,
        decode: (b) => decodeReplyHeader(b, 0, false),
      },
      {
        name: 'extended reply',
        bytes: encodeStatusReply('extended', { cookieHi: 1, cookieLo: 2, offset: 3 }, 0),
        magicBytes: 4,
        decode: (b) => decodeReplyHeader(b, 0, true),
      },
      {
        name: 'simple reply',
        bytes: encodeStatusReply('simple', { cookieHi: 1, cookieLo: 2, offset: 3 }, 0),
        magicBytes: 4,
        decode: (b) => decodeReplyHeader(b, 0, true),
      },
    ];
    for (const c of cases) {
      expect(() => c.decode(c.bytes), c.name).not.toThrow();
      for (let byte = 0; byte < c.magicBytes; byte++) {
        for (const bit of [0, 3, 7]) {
          const bad = Buffer.from(c.bytes);
          bad[byte] ^= 1 << bit;
          expect(() => c.decode(bad), `${c.name}: byte ${byte} bit ${bit}`).toThrow(ProtocolError);
        }
      }
    }
    // The greeting's second magic (IHAVEOPT: oldstyle servers send something else).
    const g = encodeGreeting(1);
    g[12] ^= 0xff;
    expect(() => decodeGreeting(g, 0)).toThrow(ProtocolError);
    // Magics that belong to the other mode are rejected too.
    const compact = requestFrame(r, false).bytes;
    const ext = Buffer.concat([compact, Buffer.alloc(4)]);
    expect(() => decodeRequest(ext, 0, true)).toThrow(/compact request header/);
    const extended = requestFrame(r, true).bytes;
    expect(() => decodeRequest(extended, 0, false)).toThrow(ProtocolError);
    // ProtocolError carries the EPROTO code the connection layer relies on.
    try {
      decodeRequest(extended, 0, false);
    } catch (err) {
      expect((err as ProtocolError).code).toBe('EPROTO');
    }
  });

  it('random bytes give null, a value, or a ProtocolError — never another exception', () => {
    const r = prng(301);
    const decoders: ((b: Buffer) => unknown)[] = [
      (b) => decodeGreeting(b, 0),
      (b) => decodeOptionHeader(b, 0),
      (b) => decodeOptionReplyHeader(b, 0),
      (b) => decodeRequest(b, 0, false),
      (b) => decodeRequest(b, 0, true),
      (b) => decodeReplyHeader(b, 0, false),
      (b) => decodeReplyHeader(b, 0, true),
    ];
    const magics = [
      REQUEST_MAGIC,
      EXTENDED_REQUEST_MAGIC,
      SIMPLE_REPLY_MAGIC,
      STRUCTURED_REPLY_MAGIC,
      EXTENDED_REPLY_MAGIC,
    ];
    for (let i = 0; i < 5000; i++) {
      const buf = randomBytes(r() % 40, r);
      // Often start with a valid magic so that the field decoding is exercised.
      if (buf.length >= 4 && i % 2) buf.writeUInt32BE(pick(r, magics), 0);
      if (buf.length >= 8 && i % 5 === 0)
        buf.writeBigUInt64BE(pick(r, [IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC]), 0);
      for (const d of decoders) {
        try {
          d(buf);
        } catch (err) {
          expect(err, `decoder threw on ${buf.toString('hex')}`).toBeInstanceOf(ProtocolError);
        }
      }
    }
  });
});

// ---------------------------------------------------------------------------

describe('option payload parsers', () => {
  const MAX = limits.maxStringBytes;
  const Q = limits.maxMetaQueries;

  function infoPayload(nameLen: number, nameBytes: number, countField: number, infoBytes: number): Buffer {
    const b = Buffer.alloc(4 + nameBytes + 2 + infoBytes);
    b.writeUInt32BE(nameLen >>> 0, 0);
    b.writeUInt16BE(countField, 4 + nameBytes);
    return b;
  }

  function metaPayload(
    nameLen: number,
    nameBytes: number,
    countField: number,
    rest: Buffer = Buffer.alloc(0),
  ): Buffer {
    const b = Buffer.alloc(4 + nameBytes + 4);
    b.writeUInt32BE(nameLen >>> 0, 0);
    b.writeUInt32BE(countField >>> 0, 4 + nameBytes);
    return Buffer.concat([b, rest]);
  }

  /** Throws OptionPayloadError quickly and without a big allocation. */
  function rejects(f: () => unknown, what: string, pattern?: RegExp): void {
    const sizes: number[] = [];
    const spies = (['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const).map((m) => {
      const orig = Buffer[m].bind(Buffer) as (n: number, ...rest: unknown[]) => Buffer;
      return vi.spyOn(Buffer, m).mockImplementation(((n: number, ...rest: unknown[]) => {
        sizes.push(n);
        return orig(n, ...rest);
      }) as never);
    });
    const t0 = performance.now();
    let thrown: unknown = null;
    try {
      f();
    } catch (err) {
      thrown = err;
    } finally {
      for (const s of spies) s.mockRestore();
    }
    const ms = performance.now() - t0;
    expect(thrown, what).toBeInstanceOf(OptionPayloadError);
    if (pattern) expect((thrown as Error).message, what).toMatch(pattern);
    // Generous for a loaded machine; a parser looping or allocating per claimed byte takes seconds.
    expect(ms, `${what}: took ${ms.toFixed(1)} ms`).toBeLessThan(200);
    expect(Math.max(0, ...sizes), `${what}: allocation sizes ${sizes.join(',')}`).toBeLessThanOrEqual(
      64 * 1024,
    );
  }

  afterEach(() => {
    vi.restoreAllMocks();
  });

  it('INFO/GO: name length larger than the option, or 0xFFFFFFFF', () => {
    rejects(() => parseInfoRequest(infoPayload(100, 10, 0, 0), MAX), 'name 100 > 10 left', /exceeds/);
    rejects(() => parseInfoRequest(infoPayload(0xffffffff, 2, 0, 0), MAX), 'name 0xFFFFFFFF');
    // Even with no string limit, the length is checked against what is left.
    rejects(
      () => parseInfoRequest(infoPayload(0xffffffff, 2, 0, 0), Number.MAX_SAFE_INTEGER),
      'name 0xFFFFFFFF, no limit',
      /exceeds/,
    );
    rejects(
      () => parseInfoRequest(infoPayload(0x7fffffff, 0, 0, 0), Number.MAX_SAFE_INTEGER),
      'name 2^31-1, no limit',
    );
    // A name length exactly covering the rest leaves no room for the count.
    rejects(() => parseInfoRequest(infoPayload(12, 10, 0, 0), MAX), 'name eats the count');
  });

  it('INFO/GO: too short, count mismatch, trailing bytes', () => {
    for (let n = 0; n < 6; n++) rejects(() => parseInfoRequest(Buffer.alloc(n), MAX), `${n}-byte payload`);
    rejects(() => parseInfoRequest(infoPayload(0, 0, 3, 4), MAX), 'count 3 with 2 infos', /count/);
    rejects(() => parseInfoRequest(infoPayload(0, 0, 0xffff, 0), MAX), 'count 0xFFFF with none', /count/);
    rejects(() => parseInfoRequest(infoPayload(0, 0, 1, 4), MAX), 'count 1 with 2 infos');
    rejects(() => parseInfoRequest(infoPayload(0, 0, 1, 3), MAX), 'odd trailing byte');
    rejects(
      () => parseInfoRequest(Buffer.concat([encodeInfoRequest('disk0', [1, 2]), Buffer.from([0])]), MAX),
      'trailing byte',
    );
  });

  it('INFO/GO and META_CONTEXT: strings longer than the limit', () => {
    rejects(
      () => parseInfoRequest(encodeInfoRequest('x'.repeat(MAX + 1), []), MAX),
      'name of limit + 1',
      /longer than/,
    );
    rejects(
      () => parseInfoRequest(encodeInfoRequest('é'.repeat(MAX / 2 + 1), []), MAX),
      'multibyte name over the limit in bytes',
    );
    rejects(
      () => parseMetaContextRequest(encodeMetaContextRequest('x'.repeat(MAX + 1), []), MAX, Q),
      'meta export name',
    );
    rejects(
      () => parseMetaContextRequest(encodeMetaContextRequest('', ['q'.repeat(MAX + 1)]), MAX, Q),
      'meta query',
    );
    rejects(() => parseMetaContextRequest(metaPayload(0xffffffff, 0, 0), MAX, Q), 'meta name 0xFFFFFFFF');
  });

  it('META_CONTEXT: query count 0xFFFFFFFF, counts beyond the limit or the payload', () => {
    rejects(() => parseMetaContextRequest(metaPayload(0, 0, 0xffffffff), MAX, Q), 'count 0xFFFFFFFF');
    // With no query limit the count must still fit the payload (4 bytes a query at least).
    rejects(
      () => parseMetaContextRequest(metaPayload(0, 0, 0xffffffff), MAX, Number.MAX_SAFE_INTEGER),
      'count 0xFFFFFFFF, no limit',
      /exceeds/,
    );
    rejects(
      () => parseMetaContextRequest(metaPayload(0, 0, Q + 1, Buffer.alloc(4 * (Q + 1))), MAX, Q),
      'count limit + 1',
      /limit/,
    );
    rejects(
      () => parseMetaContextRequest(metaPayload(0, 0, 3, Buffer.alloc(8)), MAX, Q),
      'count 3 with room for 2',
    );
    // A query length running past the end.
    const q = Buffer.alloc(4);
    q.writeUInt32BE(50, 0);
    rejects(
      () => parseMetaContextRequest(metaPayload(0, 0, 1, Buffer.concat([q, Buffer.alloc(10)])), MAX, Q),
      'query past the end',
      /exceeds/,
    );
    q.writeUInt32BE(0xffffffff, 0);
    rejects(
      () => parseMetaContextRequest(metaPayload(0, 0, 1, q), MAX, Number.MAX_SAFE_INTEGER),
      'query 0xFFFFFFFF',
    );
  });

  it('META_CONTEXT: too short, name past the end, trailing bytes', () => {
    for (let n = 0; n < 8; n++)
      rejects(() => parseMetaContextRequest(Buffer.alloc(n), MAX, Q), `${n}-byte payload`);
    rejects(() => parseMetaContextRequest(metaPayload(200, 5, 0), MAX, Q), 'name 200 with 9 left');
    rejects(
      () =>
        parseMetaContextRequest(
          Buffer.concat([encodeMetaContextRequest('a', ['base:allocation']), Buffer.from([1])]),
          MAX,
          Q,
        ),
      'trailing byte',
      /trailing/,
    );
    rejects(
      () => parseMetaContextRequest(metaPayload(0, 0, 0, Buffer.alloc(4)), MAX, Q),
      'count 0 with 4 trailing',
      /trailing/,
    );
  });

  it('every strict prefix and every one-byte extension of a valid payload is rejected', () => {
    const r = prng(400);
    for (let i = 0; i < 60; i++) {
      const info = encodeInfoRequest(
        str(r, 40),
        Array.from({ length: r() % 4 }, () => u16(r)),
      );
      const meta = encodeMetaContextRequest(
        str(r, 40),
        Array.from({ length: r() % 4 }, () => str(r, 30)),
      );
      for (let n = 0; n < info.length; n++)
        expect(() => parseInfoRequest(info.subarray(0, n), MAX)).toThrow(OptionPayloadError);
      for (let n = 0; n < meta.length; n++)
        expect(() => parseMetaContextRequest(meta.subarray(0, n), MAX, Q)).toThrow(OptionPayloadError);
      expect(() => parseInfoRequest(Buffer.concat([info, Buffer.from([r() & 0xff])]), MAX)).toThrow(
        OptionPayloadError,
      );
      expect(() => parseMetaContextRequest(Buffer.concat([meta, Buffer.from([r() & 0xff])]), MAX, Q)).toThrow(
        OptionPayloadError,
      );
    }
  });

  it('random and mutated payloads: a value or OptionPayloadError, quickly, never another exception', () => {
    const r = prng(401);
    const t0 = performance.now();
    for (let i = 0; i < 4000; i++) {
      let buf: Buffer;
      if (i % 2) buf = randomBytes(r() % 64, r);
      else {
        buf = Buffer.from(
          i % 4
            ? encodeInfoRequest(str(r, 20), [1, 2])
            : encodeMetaContextRequest(str(r, 20), ['base:allocation', str(r, 10)]),
        );
        for (let k = 0; k < 1 + (r() % 3); k++) if (buf.length) buf[r() % buf.length] = r() & 0xff;
      }
      for (const f of [() => parseInfoRequest(buf, MAX), () => parseMetaContextRequest(buf, MAX, Q)]) {
        try {
          f();
        } catch (err) {
          expect(err, buf.toString('hex')).toBeInstanceOf(OptionPayloadError);
        }
      }
    }
    expect(performance.now() - t0).toBeLessThan(5_000);
  });
});

// ---------------------------------------------------------------------------

describe('ByteQueue', () => {
  it('matches a flat-buffer model under random push/peek/take/takePieces/skip', () => {
    for (let seed = 500; seed < 540; seed++) {
      const r = prng(seed);
      const q = new ByteQueue();
      let model = Buffer.alloc(0);
      for (let step = 0; step < 400; step++) {
        const op = r() % 6;
        if (op <= 1) {
          const chunk = randomBytes(r() % 5 === 0 ? 0 : 1 + (r() % 50), r);
          q.push(chunk);
          model = Buffer.concat([model, chunk]);
        } else if (op === 2) {
          const n = r() % (model.length + 1);
          expect(q.peek(n).equals(model.subarray(0, n))).toBe(true);
        } else if (op === 3) {
          const n = r() % (model.length + 1);
          const got = Buffer.from(q.take(n));
          expect(got.equals(model.subarray(0, n))).toBe(true);
          model = model.subarray(n);
        } else if (op === 4) {
          const n = r() % (model.length + 10);
          expect(q.skip(n)).toBe(Math.min(n, model.length));
          model = model.subarray(Math.min(n, model.length));
        } else if (r() % 3 === 0) {
          // takePieces: views of the queued chunks, in order, no empty piece, no copy.
          const n = r() % (model.length + 1);
          const pieces = q.takePieces(n);
          expect(pieces.every((p) => p.length > 0)).toBe(true);
          expect(Buffer.concat(pieces).equals(model.subarray(0, n))).toBe(true);
          model = model.subarray(n);
        } else if (r() % 20 === 0) {
          q.clear();
          model = Buffer.alloc(0);
        }
        expect(q.length).toBe(model.length);
      }
      expect(Buffer.from(q.take(q.length)).equals(model)).toBe(true);
    }
  });

  it('peek and take beyond what is queued throw RangeError and change nothing', () => {
    const q = new ByteQueue();
    expect(() => q.peek(1)).toThrow(RangeError);
    q.push(Buffer.from([1, 2, 3]));
    q.push(Buffer.from([4]));
    q.skip(1);
    expect(() => q.take(4)).toThrow(RangeError);
    expect(q.length).toBe(3);
    expect([...q.take(3)]).toEqual([2, 3, 4]);
    expect(q.peek(0).length).toBe(0);
    expect(q.skip(5)).toBe(0);
  });

  it('views within one chunk are zero-copy; a take across chunks copies exactly that span', () => {
    const q = new ByteQueue();
    // Unpooled chunks, as sockets deliver them (Buffer.from of a short string shares a pool).
    const a = Buffer.alloc(6, 'abcdef');
    const b = Buffer.alloc(4, 'ghij');
    q.push(a);
    q.push(b);
    q.skip(1);
    const inA = q.take(3);
    expect(inA.toString()).toBe('bcd');
    expect(inA.buffer).toBe(a.buffer);
    expect(inA.byteOffset).toBe(a.byteOffset + 1);
    const across = q.take(4);
    expect(across.toString()).toBe('efgh');
    expect(across.buffer).not.toBe(a.buffer);
    expect(across.buffer).not.toBe(b.buffer);
    // Pushed chunks are not modified by copies out of them.
    expect(a.toString() + b.toString()).toBe('abcdefghij');
    expect(q.take(2).toString()).toBe('ij');
    expect(q.length).toBe(0);
  });

  it('a frame fed one byte at a time into a queue that already holds a partial frame', () => {
    // A header straddling many tiny chunks with a non-zero head offset.
    const req: Request = {
      flags: 5,
      type: 1,
      cookieHi: 7,
      cookieLo: 8,
      offset: 2 ** 53 - 1,
      length: 2 ** 40,
    };
    const one = Buffer.alloc(32);
    writeRequestHeader(one, 0, req, true);
    const stream = Buffer.concat([Buffer.from([9, 9, 9]), one, one]);
    const q = new ByteQueue();
    const got: Request[] = [];
    let skipped = false;
    for (const byte of stream) {
      q.push(Buffer.from([byte]));
      if (!skipped && q.length >= 3) {
        q.skip(3);
        skipped = true;
      }
      if (q.length >= 32) {
        got.push(decodeRequest(q.take(32), 0, true)!);
      }
    }
    expect(got).toEqual([req, req]);
  });
});
