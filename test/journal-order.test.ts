// The applier's order of an epoch's data extents: by journal position, as a comparator sort gives it.
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { Extent } from '../src/checkpoint/format/extent-map.js';
import { inJournalOrder } from '../src/checkpoint/secondary/applier.js';

const extent = (pos: number, start: number): Extent => ({
  start,
  end: start + 1,
  kind: 'data',
  file: 0,
  pos,
});

/** What the applier sorted with before: positions ascending, ties in their given order (a stable sort). */
const byComparator = (xs: Extent[]): Extent[] => [...xs].sort((a, b) => a.pos - b.pos);

describe('inJournalOrder', () => {
  it('orders extents by journal position, keeping the order of equal ones, at any count', () => {
    fc.assert(
      fc.property(fc.array(fc.nat({ max: 2 ** 40 }), { maxLength: 3000 }), (positions) => {
        const xs = positions.map((p, i) => extent(p, i));
        const got = inJournalOrder([...xs]);
        expect(got.map((x) => x.start)).toEqual(byComparator(xs).map((x) => x.start));
      }),
      { numRuns: 200, seed: 4242 },
    );
  });

  it('returns the same extents, each once', () => {
    const xs = Array.from({ length: 5000 }, (_, i) => extent((i * 7919) % 5003, i));
    const got = inJournalOrder([...xs]);
    expect(new Set(got).size).toBe(xs.length);
    expect(got.every((x) => xs.includes(x))).toBe(true);
  });

  it('falls back to the comparator where a scaled position would pass 2^53', () => {
    // Five extents scale positions by 8: 2^52 × 8 is past 2^53, where doubles no longer hold every integer.
    const big = 2 ** 52 - 1;
    const xs = [extent(big, 0), extent(3, 1), extent(big - 1, 2), extent(3, 3), extent(0, 4)];
    expect(inJournalOrder([...xs]).map((x) => x.start)).toEqual([4, 1, 3, 2, 0]);
  });

  it('leaves an empty or one-extent list as it is', () => {
    expect(inJournalOrder([])).toEqual([]);
    const one = [extent(9, 0)];
    expect(inJournalOrder(one)).toBe(one);
  });
});
