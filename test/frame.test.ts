// The replication/journal frame codec: round trips, every prefix needs more
// bytes, and every single-bit corruption is detected.
import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../src/net/bytequeue.js';
import { crc32 } from 'node:zlib';
import { native } from '../src/block/native.js';
import {
  crc32c,
  crc32cSoft,
  decodeFrame,
  decodeFramePieces,
  encodeFrame,
  encodeFrameBuffer,
  encodeFrameInto,
  FRAME_HEADER_BYTES,
  FRAME_MAGIC,
  FRAME_MAGIC_C,
  FrameError,
  MAX_FRAME_BODY,
  peekFrameBytes,
} from '../src/checkpoint/format/frame.js';
import { prng, randomBytes, splitPieces } from './helpers.js';

describe('frame codec', () => {
  const meta = { t: 'w', e: 12, s: 3456789, o: 2 ** 40 + 17, f: true };
  const data = randomBytes(300, prng(5));
  const frame = encodeFrameBuffer(meta, data);

  it('round-trips meta and data', () => {
    const f = decodeFrame(frame)!;
    expect(f.meta).toEqual(meta);
    expect(f.data.equals(data)).toBe(true);
    expect(f.bytes).toBe(frame.length);
    expect(decodeFrame(encodeFrameBuffer({ t: 'seal', e: 1 }))!.data.length).toBe(0);
  });

  it.runIf(native)(
    'encodes in place byte for byte as encodeFrame, and writes nothing where the frame does not fit',
    () => {
      const rand = prng(17);
      const target = Buffer.alloc(64 * 1024, 0xee);
      for (let k = 0; k < 200; k++) {
        const m = {
          t: 'w',
          e: 1 + (rand() % 9),
          s: rand(),
          o: rand() * 512,
          f: rand() % 2 === 0 || undefined,
        };
        const pieces = Array.from({ length: rand() % 4 }, () => randomBytes(rand() % 5000, rand));
        const want = Buffer.concat(encodeFrame(m, pieces));
        // Anywhere, or exactly fitting, or one byte short of fitting.
        const at = [rand() % target.length, target.length - want.length, target.length - want.length + 1][
          k % 3
        ];
        const before = Buffer.from(target);
        const n = encodeFrameInto(m, pieces, target, at);
        if (at + want.length > target.length) {
          expect(n).toBe(-1);
          expect(target.equals(before)).toBe(true);
          continue;
        }
        expect(n).toBe(want.length);
        expect(target.subarray(at, at + n).equals(want)).toBe(true);
        expect(target.subarray(0, at).equals(before.subarray(0, at))).toBe(true);
        expect(target.subarray(at + n).equals(before.subarray(at + n))).toBe(true);
      }
    },
  );

  it('needs more bytes for every strict prefix, and decodes through a ByteQueue split anywhere', () => {
    for (let i = 0; i < frame.length; i++) expect(decodeFrame(frame.subarray(0, i))).toBeNull();
    for (let split = 1; split < frame.length; split++) {
      const q = new ByteQueue();
      q.push(frame.subarray(0, split));
      const n = q.length >= 12 ? peekFrameBytes(q.peek(12)) : null;
      q.push(frame.subarray(split));
      const total = peekFrameBytes(q.peek(12))!;
      if (n !== null) expect(n).toBe(total);
      expect(decodeFrame(q.take(total))!.meta).toEqual(meta);
    }
  });

  it('decodes a frame given in pieces exactly as the whole, split anywhere; data stays in views', () => {
    const rand = prng(77);
    for (let k = 0; k < 300; k++) {
      const pieces = splitPieces(frame, rand).filter((p) => p.length > 0);
      const f = decodeFramePieces(pieces);
      expect(f.meta).toEqual(meta);
      expect(f.bytes).toBe(frame.length);
      expect(Buffer.concat(f.data).equals(data)).toBe(true);
      for (const d of f.data) expect(d.buffer).toBe(frame.buffer); // views, not copies
    }
    // A frame encoded from pieces is the frame encoded from their concatenation.
    expect(Buffer.concat(encodeFrame(meta, splitPieces(data, rand))).equals(frame)).toBe(true);
    // Every single-bit flip is caught, whichever piece it lands in.
    for (let i = 0; i < frame.length; i += 7) {
      const bad = Buffer.from(frame);
      bad[i] ^= 0x10;
      const pieces = [bad.subarray(0, 5), bad.subarray(5, 100), bad.subarray(100)];
      let threw = false;
      try {
        decodeFramePieces(pieces);
      } catch (err) {
        expect(err).toBeInstanceOf(FrameError);
        threw = true;
      }
      expect(threw, `flip in byte ${i}`).toBe(true);
    }
    expect(() => decodeFramePieces([frame, Buffer.alloc(1)])).toThrow(FrameError);
  });

  it('refuses a frame whose metadata length overruns its body, or given with bytes missing or extra: whole or in pieces', () => {
    // A well-formed checksum over a body whose metadata length claims more than the body holds.
    const body = Buffer.concat([Buffer.from([0x01, 0x00]), Buffer.from([0x80])]); // meta length 256, 1 byte
    const head = Buffer.alloc(FRAME_HEADER_BYTES);
    head.writeUInt32BE(FRAME_MAGIC, 0);
    head.writeUInt32BE(body.length, 4);
    head.writeUInt32BE(crc32(body), 8);
    const overrun = Buffer.concat([head, body]);
    const longer = Buffer.concat([frame, Buffer.alloc(3)]);
    for (const split of [false, true]) {
      const asGiven = (b: Buffer) => (split ? [b.subarray(0, 3), b.subarray(3)] : [b]);
      expect(() => decodeFramePieces(asGiven(overrun)), `split ${split}`).toThrow(/overruns the body/);
      expect(() => decodeFramePieces(asGiven(longer)), `split ${split}`).toThrow(/given as/);
      expect(() => decodeFramePieces(asGiven(frame.subarray(0, frame.length - 1))), `split ${split}`).toThrow(
        /given as/,
      );
    }
  });

  it('detects every single-bit flip', () => {
    for (let i = 0; i < frame.length; i++) {
      for (const bit of [0, 3, 7]) {
        const bad = Buffer.from(frame);
        bad[i] ^= 1 << bit;
        let threw = false;
        try {
          const f = decodeFrame(bad);
          // A flip in the length field can make the frame look incomplete.
          if (f === null) threw = true;
        } catch (err) {
          expect(err).toBeInstanceOf(FrameError);
          threw = true;
        }
        expect(threw, `flip of bit ${bit} in byte ${i} went unnoticed`).toBe(true);
      }
    }
  });

  it('rejects oversized lengths before waiting for them', () => {
    const bad = Buffer.from(frame);
    bad.writeUInt32BE(MAX_FRAME_BODY + 1, 4);
    expect(() => decodeFrame(bad.subarray(0, 12))).toThrow(/out of bounds/);
    bad.writeUInt32BE(0xffffffff, 4);
    expect(() => peekFrameBytes(bad)).toThrow(FrameError);
  });

  it('CRC-32C: the standard check value, native and JavaScript agree, continuation works', () => {
    expect(crc32cSoft(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    const rnd = prng(11);
    for (let n = 0; n < 300; n += 7) {
      const b = randomBytes(n + 1000, rnd).subarray(n % 8); // unaligned starts too
      expect(crc32c(b)).toBe(crc32cSoft(b));
      expect(crc32c(b.subarray(n), crc32c(b.subarray(0, n)))).toBe(crc32c(b));
    }
  });

  it("CRC-32C agrees with the JavaScript one across the native code's three-stream block sizes", () => {
    // The native CRC runs three streams over blocks of 3 × 256 B and 3 × 8 KiB and joins them:
    // lengths around and across those sizes, unaligned starts, and a running CRC carried in.
    const rnd = prng(12);
    const lengths = [
      767,
      768,
      769,
      1535,
      1536,
      2304,
      4096 + 48,
      24_575,
      24_576,
      24_577,
      49_152 + 777,
      100_003,
    ];
    for (const n of lengths) {
      const b = randomBytes(n + 8, rnd)
        .subarray(rnd() % 8, n + 8)
        .subarray(0, n);
      expect(b.length).toBe(n);
      const prev = rnd() >>> 0;
      expect(crc32c(b), `length ${n}`).toBe(crc32cSoft(b));
      expect(crc32c(b, prev), `length ${n} after ${prev}`).toBe(crc32cSoft(b, prev));
      const cut = rnd() % n;
      expect(crc32c(b.subarray(cut), crc32c(b.subarray(0, cut)))).toBe(crc32cSoft(b));
    }
  });

  it('writes CRC-32C frames where the native helper is loaded, and reads both kinds', () => {
    expect(frame.readUInt32BE(0)).toBe(native ? FRAME_MAGIC_C : FRAME_MAGIC);
    // A frame of the other kind, as an earlier version (or a node without the helper) wrote it.
    const other = Buffer.from(frame);
    const body = other.subarray(12);
    if (native) {
      other.writeUInt32BE(FRAME_MAGIC, 0);
      other.writeUInt32BE(crc32(body), 8);
    } else {
      other.writeUInt32BE(FRAME_MAGIC_C, 0);
      other.writeUInt32BE(crc32cSoft(body), 8);
    }
    const f = decodeFrame(other)!;
    expect(f.meta).toEqual(meta);
    expect(f.data.equals(data)).toBe(true);
    // The checksum of one kind does not pass for the other.
    const swapped = Buffer.from(other);
    swapped.writeUInt32BE(other.readUInt32BE(0) === FRAME_MAGIC ? FRAME_MAGIC_C : FRAME_MAGIC, 0);
    expect(() => decodeFrame(swapped)).toThrow(FrameError);
  });
});
