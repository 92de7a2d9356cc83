// Block hashes for resynchronisation: a block known to be a hole is not read,
// and hashes exactly as if it had been (so two sides that know different
// things about their holes still agree on equal contents).
import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { subtractRanges, type Range } from '../src/failover/activity.js';
import {
  blockHashes,
  deviceZeroRanges,
  HASH_BYTES,
  ZERO_MARK,
  type ZeroRanges,
} from '../src/failover/reprotect/hash.js';
import { MemoryDevice } from '../src/block/memory.js';
import { HashPool } from '../src/failover/reprotect/hash-pool.js';

/** A small deterministic generator (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A disk of `size` bytes: runs of random data and runs of zeroes; the zero runs, some of them "holes". */
function sparseDisk(seed: number, size: number): { disk: Buffer; holes: Range[] } {
  const r = rng(seed);
  const disk = Buffer.alloc(size);
  const holes: Range[] = [];
  for (let at = 0; at < size;) {
    const len = Math.min(size - at, 512 * (1 + Math.floor(r() * 4096)));
    const kind = r();
    if (kind < 0.4) for (let i = at; i < at + len; i++) disk[i] = Math.floor(r() * 256) | 1;
    else if (kind < 0.8) {
      // A hole the device reports (merged with one just before it, as a device reports them).
      const last = holes[holes.length - 1];
      if (last && last.offset + last.length === at) last.length += len;
      else holes.push({ offset: at, length: len });
    }
    // else: zeroes written as data (not reported as a hole)
    at += len;
  }
  return { disk, holes };
}

/** The reference: every block read and hashed, zero blocks marked. */
function reference(disk: Buffer, offset: number, length: number, block: number): Buffer {
  const out: Buffer[] = [];
  for (let at = offset; at < offset + length; at += block) {
    const b = disk.subarray(at, Math.min(at + block, offset + length));
    out.push(
      b.equals(Buffer.alloc(b.length)) ? ZERO_MARK : createHash('sha256').update(b).digest().subarray(0, 16),
    );
  }
  return Buffer.concat(out);
}

describe('block hashes', () => {
  it('agree with reading every block, whatever is known about holes, at every block size', async () => {
    for (let seed = 1; seed <= 6; seed++) {
      const size = 12 * 1024 * 1024 + 4096 * seed;
      const { disk, holes } = sparseDisk(seed, size);
      let reads = 0;
      let insideHole = 0;
      let bytesRead = 0;
      const read = async (buf: Buffer, off: number) => {
        reads++;
        bytesRead += buf.length;
        // Nothing wholly inside a hole is read: it is known to be zero.
        for (const h of holes) if (off >= h.offset && off + buf.length <= h.offset + h.length) insideHole++;
        disk.copy(buf, 0, off, off + buf.length);
      };
      const zeroes: ZeroRanges = async (o, l) =>
        holes
          .filter((h) => h.offset < o + l && o < h.offset + h.length)
          .map((h) => {
            const s = Math.max(o, h.offset);
            return { offset: s, length: Math.min(o + l, h.offset + h.length) - s };
          });
      const r = rng(seed * 7);
      for (const block of [4096, 65536, 3 * 1024 * 1024 + 512, 8 * 1024 * 1024, size]) {
        const offset = Math.floor(r() * 1024) * 512;
        const length = size - offset - Math.floor(r() * 1024) * 512;
        const want = reference(disk, offset, length, block);
        expect((await blockHashes(read, offset, length, block)).equals(want)).toBe(true);
        bytesRead = 0;
        insideHole = 0;
        const withHoles = await blockHashes(read, offset, length, block, zeroes);
        expect(withHoles.equals(want), `seed ${seed} block ${block}`).toBe(true);
        expect(insideHole).toBe(0);
        const holeBytes = holes.reduce((a, h) => a + h.length, 0);
        // Only the blocks that straddle a hole's ends are read beyond the data.
        expect(bytesRead).toBeLessThanOrEqual(size - holeBytes + holes.length * 2 * Math.min(block, 1 << 20));
      }
      expect(reads).toBeGreaterThan(0);
    }
  });

  it('a pool of any size hashes like one thread, and a failed read fails the call with nothing left behind', async () => {
    const { disk } = sparseDisk(42, 9 * 1024 * 1024 + 512);
    const read = async (buf: Buffer, off: number) => void disk.copy(buf, 0, off, off + buf.length);
    const want = reference(disk, 0, disk.length, 65536);
    for (const size of [1, 3]) {
      const pool = new HashPool(size);
      try {
        expect((await blockHashes(read, 0, disk.length, 65536, undefined, pool)).equals(want)).toBe(true);
        expect(
          (await blockHashes(read, 512, disk.length - 512, 4096, undefined, pool)).equals(
            reference(disk, 512, disk.length - 512, 4096),
          ),
        ).toBe(true);
        let n = 0;
        const failing = async (buf: Buffer, off: number) => {
          if (++n === 5) throw new Error('EIO: the disk went away');
          await read(buf, off);
        };
        await expect(blockHashes(failing, 0, disk.length, 65536, undefined, pool)).rejects.toThrow(/EIO/);
        // The pool still works after a failed call.
        expect((await blockHashes(read, 0, disk.length, 65536, undefined, pool)).equals(want)).toBe(true);
      } finally {
        await pool.close();
      }
    }
  });

  it('a disk that is one hole is one mark, read not at all', async () => {
    let bytesRead = 0;
    const size = 64 * 1024 * 1024 * 1024;
    const h = await blockHashes(
      async (buf) => {
        bytesRead += buf.length;
        buf.fill(0);
      },
      0,
      size,
      size,
      async (o, l) => [{ offset: o, length: l }],
    );
    expect(h.equals(ZERO_MARK)).toBe(true);
    expect(h.length).toBe(HASH_BYTES);
    expect(bytesRead).toBe(0);
  });

  it('holes of a device: its zero extents, merged', async () => {
    const dev = new MemoryDevice(16 * 1024 * 1024);
    await dev.pwrite(Buffer.alloc(8192, 1), 1024 * 1024);
    await dev.pwrite(Buffer.alloc(4096, 2), 9 * 1024 * 1024);
    const zs = await deviceZeroRanges(dev, 0, dev.size);
    const data: Range[] = [
      { offset: 1024 * 1024, length: 8192 },
      { offset: 9 * 1024 * 1024, length: 4096 },
    ];
    // Every written byte is outside the holes; the holes cover everything else (a memory device
    // allocates in pages, so a hole may stop short of a write, never overlap it).
    for (const d of data)
      for (const z of zs)
        expect(z.offset + z.length <= d.offset || z.offset >= d.offset + d.length).toBe(true);
    expect(zs.reduce((a, z) => a + z.length, 0)).toBeGreaterThan(dev.size - 1024 * 1024);
  });

  it('subtractRanges matches a byte map', () => {
    const r = rng(99);
    for (let round = 0; round < 300; round++) {
      const size = 2000;
      const mk = () => {
        const out: Range[] = [];
        for (let at = Math.floor(r() * 50); at < size;) {
          const len = 1 + Math.floor(r() * 120);
          if (at + len > size) break;
          out.push({ offset: at, length: len });
          at += len + 1 + Math.floor(r() * 120);
        }
        return out;
      };
      const a = mk();
      const b = mk();
      const map = new Uint8Array(size);
      for (const x of a) map.fill(1, x.offset, x.offset + x.length);
      for (const x of b) map.fill(0, x.offset, x.offset + x.length);
      const got = new Uint8Array(size);
      for (const x of subtractRanges(a, b)) {
        expect(x.length).toBeGreaterThan(0);
        got.fill(1, x.offset, x.offset + x.length);
      }
      expect(Buffer.from(got).equals(Buffer.from(map))).toBe(true);
    }
  });
});
