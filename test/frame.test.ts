// The replication/journal frame codec: round trips, every prefix needs more
// bytes, and every single-bit corruption is detected.
import { describe, expect, it } from 'vitest';
import { ByteQueue } from '../src/net/bytequeue.js';
import {
  decodeFrame,
  encodeFrameBuffer,
  FrameError,
  MAX_FRAME_BODY,
  peekFrameBytes,
} from '../src/checkpoint/format/frame.js';
import { prng, randomBytes } from './helpers.js';

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
});
