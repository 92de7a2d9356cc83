// Block hashes for resynchronisation: a block known to be a hole is not read,
// and hashes exactly as if it had been (so two sides that know different
// things about their holes still agree on equal contents); with either digest.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
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
import { rmDir, ROOT, run, tmpDir } from './helpers.js';
import { FileDevice } from '../src/block/file.js';
import { commonHashAlg, HashPool, localHashAlgs, type HashAlg } from '../src/failover/reprotect/hash-pool.js';

/** The BLAKE3 package, straight (the reference for the pool's workers and the blocks' code). */
const blake3 = (createRequire(import.meta.url)('@napi-rs/blake-hash') as { blake3(b: Uint8Array): Buffer })
  .blake3;

function digest(alg: HashAlg, b: Buffer): Buffer {
  return alg === 'blake3' ? blake3(b) : createHash('sha256').update(b).digest();
}

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
function reference(
  disk: Buffer,
  offset: number,
  length: number,
  block: number,
  alg: HashAlg = 'sha256',
): Buffer {
  const out: Buffer[] = [];
  for (let at = offset; at < offset + length; at += block) {
    const b = disk.subarray(at, Math.min(at + block, offset + length));
    out.push(b.equals(Buffer.alloc(b.length)) ? ZERO_MARK : digest(alg, b).subarray(0, 16));
  }
  return Buffer.concat(out);
}

describe('block hashes', () => {
  it('this build has BLAKE3, and it gives the specification’s answers', () => {
    // COLO_BLK_NO_BLAKE3 turns it off on purpose; otherwise a build without it is a broken install.
    if (process.env.COLO_BLK_NO_BLAKE3) expect(localHashAlgs).toEqual(['sha256']);
    else expect(localHashAlgs).toEqual(['blake3', 'sha256']);
    expect(blake3(Buffer.alloc(0)).toString('hex')).toBe(
      'af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262',
    );
    expect(blake3(Buffer.from('abc')).toString('hex')).toBe(
      '6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85',
    );
  });

  it('the digest of a pair: the first of the primary’s that the secondary has', () => {
    expect(commonHashAlg(['blake3', 'sha256'], ['blake3', 'sha256'])).toBe('blake3');
    expect(commonHashAlg(['blake3', 'sha256'], ['sha256'])).toBe('sha256');
    expect(commonHashAlg(['sha256'], ['blake3', 'sha256'])).toBe('sha256');
    expect(commonHashAlg(['blake3', 'sha256'], [])).toBe('sha256');
  });

  it('the two digests differ, and a pool without BLAKE3 refuses to hash with it', async () => {
    const block = Buffer.alloc(65536, 7);
    const read = async (buf: Buffer, off: number) => void block.copy(buf, 0, off, off + buf.length);
    const opts = { pool: new HashPool(0, ['sha256']) };
    const sha = await blockHashes(read, 0, block.length, 65536, opts);
    expect(sha.equals(reference(block, 0, block.length, 65536))).toBe(true);
    await expect(blockHashes(read, 0, block.length, 65536, { ...opts, alg: 'blake3' })).rejects.toThrow(
      /does not hash with blake3/,
    );
    // A block larger than a piece goes another way (hashed piece by piece): refused there too.
    const big = async (buf: Buffer) => void buf.fill(7);
    await expect(blockHashes(big, 0, 4 << 20, 4 << 20, { ...opts, alg: 'blake3' })).rejects.toThrow(
      /does not hash with blake3/,
    );
    expect(() => new HashPool(0, ['md5' as HashAlg])).toThrow(/cannot compute md5/);
    const b3 = await blockHashes(read, 0, block.length, 65536, { pool: new HashPool(0), alg: 'blake3' });
    expect(b3.equals(blake3(block).subarray(0, 16))).toBe(true);
    expect(b3.equals(sha)).toBe(false);
  });

  it.each(['sha256', 'blake3'] as const)(
    'agree with reading every block, whatever is known about holes, at every block size (%s)',
    async (alg) => {
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
          const want = reference(disk, offset, length, block, alg);
          expect((await blockHashes(read, offset, length, block, { alg })).equals(want)).toBe(true);
          bytesRead = 0;
          insideHole = 0;
          const withHoles = await blockHashes(read, offset, length, block, { zeroes, alg });
          expect(withHoles.equals(want), `seed ${seed} block ${block}`).toBe(true);
          expect(insideHole).toBe(0);
          const holeBytes = holes.reduce((a, h) => a + h.length, 0);
          // Only the blocks that straddle a hole's ends are read beyond the data.
          expect(bytesRead).toBeLessThanOrEqual(
            size - holeBytes + holes.length * 2 * Math.min(block, 1 << 20),
          );
        }
        expect(reads).toBeGreaterThan(0);
      }
    },
  );

  it('a pool of any size hashes like one thread, with either digest, and a failed read fails the call with nothing left behind', async () => {
    const { disk } = sparseDisk(42, 9 * 1024 * 1024 + 512);
    const read = async (buf: Buffer, off: number) => void disk.copy(buf, 0, off, off + buf.length);
    for (const alg of ['sha256', 'blake3'] as const) {
      const want = reference(disk, 0, disk.length, 65536, alg);
      for (const size of [1, 3]) {
        const pool = new HashPool(size);
        try {
          expect((await blockHashes(read, 0, disk.length, 65536, { pool, alg })).equals(want)).toBe(true);
          expect(
            (await blockHashes(read, 512, disk.length - 512, 4096, { pool, alg })).equals(
              reference(disk, 512, disk.length - 512, 4096, alg),
            ),
          ).toBe(true);
          let n = 0;
          const failing = async (buf: Buffer, off: number) => {
            if (++n === 5) throw new Error('EIO: the disk went away');
            await read(buf, off);
          };
          await expect(blockHashes(failing, 0, disk.length, 65536, { pool, alg })).rejects.toThrow(/EIO/);
          // The pool still works after a failed call.
          expect((await blockHashes(read, 0, disk.length, 65536, { pool, alg })).equals(want)).toBe(true);
        } finally {
          await pool.close();
        }
      }
    }
  });

  it('ranges on a file are read and hashed by the workers themselves: the same hashes, every descriptor closed after, a failed read fails the call', async () => {
    const dir = tmpDir();
    try {
      const size = 11 * 1024 * 1024 + 4096;
      const { disk, holes } = sparseDisk(77, size);
      const image = path.join(dir, 'disk.img');
      fs.writeFileSync(image, disk);
      const dev = await FileDevice.open(image);
      const fdsBefore = fs.readdirSync('/proc/self/fd').length;
      let readerBytes = 0;
      const read = async (buf: Buffer, off: number) => {
        readerBytes += buf.length;
        await dev.pread(buf, off);
      };
      const zeroes: ZeroRanges = async (o, l) =>
        holes
          .filter((h) => h.offset < o + l && o < h.offset + h.length)
          .map((h) => ({
            offset: Math.max(o, h.offset),
            length: Math.min(o + l, h.offset + h.length) - Math.max(o, h.offset),
          }));
      try {
        for (const size of [1, 3]) {
          const pool = new HashPool(size);
          const files: number[] = [];
          const hashFile = pool.hashFile.bind(pool);
          pool.hashFile = (fd, ...rest) => {
            files.push(fd);
            return hashFile(fd, ...rest);
          };
          try {
            for (const alg of ['sha256', 'blake3'] as const)
              for (const [offset, block] of [
                [0, 65536],
                [512, 4096],
                [4096 * 3, 1024 * 1024],
              ] as const) {
                const length = disk.length - offset - 512;
                const want = reference(disk, offset, length, block, alg);
                readerBytes = 0;
                const file = (o: number, l: number) => dev.fileRange(o, l);
                const got = await blockHashes(read, offset, length, block, { pool, alg, file, zeroes });
                expect(got.equals(want), `${alg} block ${block} at ${offset}`).toBe(true);
                // The workers read the long runs; this side only the short ones between holes.
                expect(readerBytes).toBeLessThan(length / 2);
              }
            expect(files.length).toBeGreaterThan(0);
            // Each job had a descriptor of its own, not the device's.
            expect(files.every((fd) => fd !== dev.fileRange(0, 1)!.fd)).toBe(true);
            // A read that fails (a directory has no bytes) fails the call, with its code; the pool goes on.
            const dirFd = fs.openSync(dir, 'r');
            try {
              await expect(pool.hashFile(dirFd, 0, 1 << 20, 65536, 16)).rejects.toMatchObject({
                code: 'EISDIR',
              });
            } finally {
              fs.closeSync(dirFd);
            }
            // Past the end of a short file: zeroes, as a device reads there.
            const fd = fs.openSync(image, 'r');
            try {
              const tail = await pool.hashFile(fd, disk.length - 65536, 1 << 20, 65536, 16);
              const want = Buffer.concat([
                disk.subarray(disk.length - 65536),
                Buffer.alloc((1 << 20) - 65536),
              ]);
              expect(tail.equals(reference(want, 0, want.length, 65536))).toBe(true);
            } finally {
              fs.closeSync(fd);
            }
          } finally {
            await pool.close();
          }
        }
      } finally {
        await dev.close();
      }
      expect(fs.readdirSync('/proc/self/fd').length).toBeLessThanOrEqual(fdsBefore);
    } finally {
      rmDir(dir);
    }
  });

  it('a file that cannot be opened again is read the usual way, and later calls still hand files to the workers', async () => {
    const dir = tmpDir();
    const pool = new HashPool(1);
    try {
      const disk = Buffer.alloc(2 * 1024 * 1024);
      for (let i = 0; i < disk.length; i += 4096) disk.writeUInt32LE(i + 1, i);
      const image = path.join(dir, 'disk.img');
      fs.writeFileSync(image, disk);
      const dev = await FileDevice.open(image);
      let jobs = 0;
      const hashFile = pool.hashFile.bind(pool);
      pool.hashFile = (...args) => {
        jobs++;
        return hashFile(...args);
      };
      let readerBytes = 0;
      const read = async (buf: Buffer, off: number) => {
        readerBytes += buf.length;
        await dev.pread(buf, off);
      };
      const want = reference(disk, 0, disk.length, 65536);
      try {
        // A descriptor number nothing has open: /proc/self/fd has no such entry.
        const gone = () => ({ fd: 1_000_000, offset: 0 });
        expect((await blockHashes(read, 0, disk.length, 65536, { pool, file: gone })).equals(want)).toBe(
          true,
        );
        expect(jobs).toBe(0);
        expect(readerBytes).toBe(disk.length);
        readerBytes = 0;
        const file = (o: number, l: number) => dev.fileRange(o, l);
        expect((await blockHashes(read, 0, disk.length, 65536, { pool, file })).equals(want)).toBe(true);
        expect(jobs).toBeGreaterThan(0);
        expect(readerBytes).toBe(0);
      } finally {
        await dev.close();
      }
    } finally {
      await pool.close();
      rmDir(dir);
    }
  });

  it('in a process of its own: the pool holds it open while hashing and not after; COLO_BLK_NO_BLAKE3 leaves SHA-256', async () => {
    // Nothing else keeps the event loop alive: the workers' jobs must (a top-level await left
    // unsettled exits 13), and the idle workers must not (the process would never end).
    const mod = pathToFileURL(path.join(ROOT, 'dist/src/failover/reprotect/hash.js')).href;
    const poolMod = pathToFileURL(path.join(ROOT, 'dist/src/failover/reprotect/hash-pool.js')).href;
    const script =
      `import { blockHashes } from '${mod}'; import { localHashAlgs } from '${poolMod}';` +
      `const d = Buffer.alloc(8 << 20, 3); const read = async (b, o) => void d.copy(b, 0, o, o + b.length);` +
      `const h = await blockHashes(read, 0, d.length, 65536, { alg: localHashAlgs[0] });` +
      `console.log(localHashAlgs.join(','), h.subarray(0, 16).toString('hex'));`;
    for (const off of [false, true]) {
      const env = { ...process.env };
      if (off) env.COLO_BLK_NO_BLAKE3 = '1';
      else delete env.COLO_BLK_NO_BLAKE3;
      const t = performance.now();
      const r = await run(process.execPath, ['--input-type=module', '-e', script], {
        env,
        timeoutMs: 20_000,
      });
      expect(r.code, r.stderr).toBe(0);
      expect(performance.now() - t).toBeLessThan(15_000);
      const [algs, first] = r.stdout.trim().split(' ');
      const alg: HashAlg = off ? 'sha256' : 'blake3';
      expect(algs).toBe(off ? 'sha256' : 'blake3,sha256');
      expect(first).toBe(digest(alg, Buffer.alloc(65536, 3)).subarray(0, 16).toString('hex'));
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
      { zeroes: async (o, l) => [{ offset: o, length: l }] },
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
