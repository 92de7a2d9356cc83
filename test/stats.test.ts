// The percentile helpers status, demos and benchmarks share.
import { describe, expect, it } from 'vitest';
import { median, percentile, quantile } from '../src/util/stats.js';

describe('stats', () => {
  it('median: the middle value, the mean of the two middle ones for an even count, in any order', () => {
    expect(median([3, 1, 2])).toBe(2);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(median([])).toBeNaN();
  });

  it('percentile and quantile: nearest rank', () => {
    const xs = Array.from({ length: 30 }, (_, i) => i + 1);
    expect(percentile(xs, 0.99)).toBe(30);
    expect(percentile(xs, 0.5)).toBe(15);
    expect(quantile([...xs].reverse(), 0.5)).toBe(15);
    expect(percentile([], 0.5)).toBeNaN();
  });
});
