// ExtentMap against a per-byte model under seeded random inserts and deletes.
import { describe, expect, it } from 'vitest';
import { ExtentMap } from '../src/checkpoint/format/extent-map.js';
import { prng } from './helpers.js';

/** Model: per byte, -1 = not held, -2 = zero, else the source position. */
function check(map: ExtentMap, model: Int32Array, seed: number, step: number): void {
  const segs = map.lookup(0, model.length);
  let pos = 0;
  let held = 0;
  for (const s of segs) {
    expect(s.start, `seed ${seed} step ${step}`).toBe(pos);
    for (let i = s.start; i < s.end; i++) {
      const want = model[i];
      const got =
        s.extent === null ? -1 : s.extent.kind === 'zero' ? -2 : s.extent.pos + (i - s.extent.start);
      if (got !== want) throw new Error(`seed ${seed} step ${step}: byte ${i} is ${got}, model says ${want}`);
      if (got !== -1) held++;
    }
    pos = s.end;
  }
  expect(pos).toBe(model.length);
  expect(map.bytes, `seed ${seed} step ${step}: held bytes`).toBe(held);
}

describe('ExtentMap', () => {
  it('splits and overwrites like a byte array (small buckets, many seeds)', () => {
    for (let seed = 1; seed <= 40; seed++) {
      const rand = prng(seed);
      const size = 4096;
      const map = new ExtentMap(8); // 256-byte buckets: lots of boundary crossings
      const model = new Int32Array(size).fill(-1);
      let nextPos = 0;
      for (let step = 0; step < 150; step++) {
        const start = rand() % size;
        const len = 1 + (rand() % Math.min(700, size - start));
        const op = rand() % 10;
        if (op < 6) {
          const pos = nextPos;
          nextPos += len + (rand() % 3); // sometimes contiguous, sometimes not
          map.set(start, len, 'data', 1, pos);
          for (let i = 0; i < len; i++) model[start + i] = pos + i;
        } else if (op < 8) {
          map.set(start, len, 'zero');
          model.fill(-2, start, start + len);
        } else {
          map.delete(start, len);
          model.fill(-1, start, start + len);
        }
        if (step % 10 === 0) check(map, model, seed, step);
      }
      check(map, model, seed, 150);
    }
  });

  it('keeps a bucket of thousands of entries right: a log appended in order, then overwrites anywhere', () => {
    // The guest's log: 512-byte records in order, each at its own journal place
    // (frame headers between them, so they never coalesce), all in one bucket.
    for (let seed = 1; seed <= 4; seed++) {
      const rand = prng(seed);
      const size = 1 << 20;
      const map = new ExtentMap();
      const model = new Int32Array(size).fill(-1);
      let nextPos = 0;
      for (let at = 0; at + 512 <= size; at += 512) {
        map.set(at, 512, 'data', 1, nextPos);
        for (let i = 0; i < 512; i++) model[at + i] = nextPos + i;
        nextPos += 512 + 40;
      }
      expect(map.size).toBe(2048);
      for (let step = 0; step < 300; step++) {
        const start = rand() % size;
        const len = 1 + (rand() % Math.min(rand() % 2 ? 600 : 20_000, size - start));
        map.set(start, len, 'data', 1, nextPos);
        for (let i = 0; i < len; i++) model[start + i] = nextPos + i;
        nextPos += len + 40;
        // A lookup that starts inside the bucket, not at its first entry.
        const from = rand() % size;
        const seg = map.lookup(from, 1)[0];
        expect(seg.extent!.pos + (from - seg.extent!.start), `seed ${seed} step ${step}`).toBe(model[from]);
      }
      check(map, model, seed, 300);
    }
  });

  it('coalesces sequential writes into one extent', () => {
    const map = new ExtentMap();
    for (let i = 0; i < 256; i++) map.set(i * 4096, 4096, 'data', 7, 1000 + i * 4096);
    expect(map.size).toBe(1);
    expect(map.bytes).toBe(1024 * 1024);
    const [seg] = map.lookup(8192, 100);
    expect(seg.extent!.pos + (seg.start - seg.extent!.start)).toBe(1000 + 8192);
  });

  it('looks up partial ranges and reports holes', () => {
    const map = new ExtentMap();
    map.set(10, 10, 'data', 1, 500);
    map.set(30, 5, 'zero');
    const segs = map.lookup(0, 40).map((s) => [s.start, s.end, s.extent?.kind ?? null]);
    expect(segs).toEqual([
      [0, 10, null],
      [10, 20, 'data'],
      [20, 30, null],
      [30, 35, 'zero'],
      [35, 40, null],
    ]);
    expect(map.overlaps(20, 10)).toBe(false);
    expect(map.overlaps(19, 2)).toBe(true);
  });
});
