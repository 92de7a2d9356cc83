// The hand-written msgpack of flat frame metadata (src/checkpoint/format/flat-meta.ts), against
// msgpackr: the same bytes out, the same objects back, and msgpackr's answer for everything else.
import { Packr } from 'msgpackr';
import { describe, expect, it } from 'vitest';
import { packFlat, unpackFlat } from '../src/checkpoint/format/flat-meta.js';
import { decodeFrame, encodeFrameBuffer, FRAME_HEADER_BYTES } from '../src/checkpoint/format/frame.js';
import { prng } from './helpers.js';

const packr = new Packr({ useRecords: false, moreTypes: false });

/** Integers around every boundary of msgpack's integer forms, and beyond 2^32 (float64). */
const EDGES = [
  0,
  1,
  0x7f,
  0x80,
  0xff,
  0x100,
  0xffff,
  0x10000,
  2 ** 32 - 1,
  2 ** 32,
  2 ** 40 + 3,
  2 ** 53 - 1,
];

function randomFlat(rand: () => number): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  const n = rand() % 9;
  for (let i = 0; i < n; i++) {
    const key =
      rand() % 4 === 0
        ? Array.from({ length: 1 + (rand() % 31) }, () => String.fromCharCode(33 + (rand() % 94))).join('')
        : String.fromCharCode(97 + (rand() % 26));
    const kind = rand() % 5;
    o[key] =
      kind === 0
        ? EDGES[rand() % EDGES.length]
        : kind === 1
          ? rand() % 2 === 0
          : kind === 2
            ? Array.from({ length: rand() % 32 }, () => String.fromCharCode(rand() % 128)).join('')
            : (rand() % 2 ** 20) * (rand() % 2 ? 1 : 2 ** 30);
  }
  return o;
}

describe('flat frame metadata', () => {
  it("packs a mutation record, a seal and random flat maps to msgpackr's bytes, and reads them back as msgpackr does", () => {
    const rand = prng(77);
    const fixed = [
      { t: 'w', o: 4096, e: 1, s: 2 },
      { t: 'w', o: 2 ** 33, f: true, e: 300, s: 70000 },
      { t: 'z', o: 5e9, l: 2 ** 32, h: false, e: 1, s: 1 },
      { t: 'seal', e: 7, n: 0, b: 0 },
      {},
    ];
    for (const o of [...fixed, ...Array.from({ length: 3000 }, () => randomFlat(rand))]) {
      const want = packr.pack(o);
      const got = packFlat(o);
      expect(got, JSON.stringify(o)).not.toBeNull();
      expect(Buffer.from(got!).equals(want), JSON.stringify(o)).toBe(true);
      const back = unpackFlat(want, 0, want.length);
      expect(back).toEqual(packr.unpack(want));
      expect(Object.keys(back!)).toEqual(Object.keys(o)); // in the order written
    }
  });

  it('leaves every other shape to msgpackr', () => {
    const shapes = [
      { a: -1 },
      { a: 1.5 },
      { a: null },
      { a: undefined },
      { a: [1] },
      { a: { b: 1 } },
      { a: 'é' },
      { ['é']: 1 },
      { a: 'x'.repeat(32) },
      { ['k'.repeat(32)]: 1 },
      { a: 2 ** 53 },
      [1, 2],
      new Map([['a', 1]]),
      Object.assign(Object.create(null), { a: 1 }),
    ];
    shapes.forEach((o, i) => expect(packFlat(o as object), `shape ${i}`).toBeNull());
  });

  it('decodes nothing it is not sure of: whatever it returns, msgpackr returns too (mutated bytes)', () => {
    const rand = prng(91);
    let fast = 0;
    for (let i = 0; i < 20000; i++) {
      const good = packr.pack(randomFlat(rand));
      const b = Buffer.from(good);
      for (let k = 1 + (rand() % 3); k > 0; k--) b[rand() % b.length] = rand() % 256;
      const end = rand() % 4 === 0 ? rand() % (b.length + 1) : b.length;
      const got = unpackFlat(b, 0, end);
      let want: unknown;
      let threw = false;
      try {
        want = packr.unpack(b, { start: 0, end });
      } catch {
        threw = true;
      }
      if (got !== undefined) {
        fast++;
        expect(threw, b.subarray(0, end).toString('hex')).toBe(false);
        expect(got).toEqual(want);
      }
    }
    expect(fast).toBeGreaterThan(1000); // the fast path did take most intact-looking maps
  });

  it('frames carry their metadata through it unchanged, whichever side packed it', () => {
    const rec = { t: 'w', o: 123456789, f: true, e: 12, s: 987654321 };
    const frame = encodeFrameBuffer(rec, Buffer.from('payload'));
    const metaLength = frame.readUInt16BE(FRAME_HEADER_BYTES);
    expect(
      frame.subarray(FRAME_HEADER_BYTES + 2, FRAME_HEADER_BYTES + 2 + metaLength).equals(packr.pack(rec)),
    ).toBe(true);
    const f = decodeFrame(frame)!;
    expect(f.meta).toEqual(rec);
    expect(f.data.toString()).toBe('payload');
  });
});
