/**
 * The behavioural conformance suite every BlockDevice runs (abstract-level
 * style: one suite, many implementations). Later layers (journal, overlay,
 * mirror) run it too. Capabilities decide which expectations apply.
 */
import { describe, expect, it, afterEach } from 'vitest';
import { ColoError } from '../src/errors.js';
import { writePieces, type BlockDevice } from '../src/block/device.js';
import { prng, randomBytes, splitPieces } from './helpers.js';

export interface DeviceFixture {
  device: BlockDevice;
  cleanup?: () => Promise<void> | void;
}

/** `factory(size)` returns a fresh, all-zero, writable device of that size. */
export function deviceSuite(name: string, factory: (size: number) => Promise<DeviceFixture>): void {
  const SIZE = 4 * 1024 * 1024;
  describe(`BlockDevice conformance: ${name}`, () => {
    let fixture: DeviceFixture | null = null;
    const open = async (size = SIZE) => {
      fixture = await factory(size);
      return fixture.device;
    };
    afterEach(async () => {
      if (fixture) {
        await fixture.device.close();
        await fixture.cleanup?.();
        fixture = null;
      }
    });

    const read = async (dev: BlockDevice, off: number, len: number) => {
      const buf = Buffer.alloc(len, 0xee);
      await dev.pread(buf, off);
      return buf;
    };

    it('reports its size and coherent capabilities', async () => {
      const dev = await open();
      expect(dev.size).toBe(SIZE);
      expect(dev.caps.write).toBe(true);
      if (!dev.caps.write) expect(dev.caps.fua).toBe('none');
    });

    it('reads zeroes when fresh', async () => {
      const dev = await open();
      expect((await read(dev, 0, 65536)).equals(Buffer.alloc(65536))).toBe(true);
      expect((await read(dev, SIZE - 100, 100)).equals(Buffer.alloc(100))).toBe(true);
    });

    it('round-trips unaligned writes across page boundaries', async () => {
      const dev = await open();
      const rand = prng(1);
      const data = randomBytes(200_003, rand);
      await dev.pwrite(data, 65_531);
      expect((await read(dev, 65_531, data.length)).equals(data)).toBe(true);
      // Neighbours untouched.
      expect((await read(dev, 65_000, 531)).equals(Buffer.alloc(531))).toBe(true);
      expect((await read(dev, 65_531 + data.length, 777)).equals(Buffer.alloc(777))).toBe(true);
    });

    it('writes pieces exactly as one write of their concatenation', async () => {
      const dev = await open();
      const data = randomBytes(300_001, prng(2));
      const cuts = [0, 1, 1, 65_536, 65_537, 200_000, 299_999, 300_001];
      const pieces = cuts.slice(1).map((c, i) => data.subarray(cuts[i], c)); // one of them empty
      await writePieces(dev, pieces, 4093, { fua: true });
      expect((await read(dev, 4093, data.length)).equals(data)).toBe(true);
      expect((await read(dev, 4000, 93)).equals(Buffer.alloc(93))).toBe(true);
      expect((await read(dev, 4093 + data.length, 100)).equals(Buffer.alloc(100))).toBe(true);
    });

    it('writes at the very end and the very start', async () => {
      const dev = await open();
      const a = Buffer.alloc(512, 0xa1);
      await dev.pwrite(a, SIZE - 512);
      await dev.pwrite(a, 0);
      expect((await read(dev, SIZE - 512, 512)).equals(a)).toBe(true);
      expect((await read(dev, 0, 512)).equals(a)).toBe(true);
    });

    it('FUA writes and flush complete and keep data', async () => {
      const dev = await open();
      const data = Buffer.alloc(8192, 0x5c);
      await dev.pwrite(data, 4096, { fua: true });
      await dev.flush();
      expect((await read(dev, 4096, 8192)).equals(data)).toBe(true);
    });

    it('zero (may trim) zeroes exactly the range', async () => {
      const dev = await open();
      await dev.pwrite(Buffer.alloc(1024 * 1024, 0x77), 0);
      await dev.zero(100_000, 300_000, { mayTrim: true });
      const all = await read(dev, 0, 1024 * 1024);
      expect(all.subarray(0, 100_000).equals(Buffer.alloc(100_000, 0x77))).toBe(true);
      expect(all.subarray(100_000, 400_000).equals(Buffer.alloc(300_000))).toBe(true);
      expect(all.subarray(400_000).equals(Buffer.alloc(1024 * 1024 - 400_000, 0x77))).toBe(true);
    });

    // Whether provisioned-but-zero space reports as a hole is up to the storage
    // (tmpfs reports fallocated pages as holes), so only the contents are checked
    // here; each device's own tests check provisioning.
    it('zero without holes (NO_HOLE) zeroes exactly the range', async () => {
      const dev = await open();
      await dev.pwrite(Buffer.alloc(262144, 0x42), 0);
      await dev.zero(4096, 131072, { mayTrim: false, fua: true });
      const all = await read(dev, 0, 262144);
      expect(all.subarray(0, 4096).equals(Buffer.alloc(4096, 0x42))).toBe(true);
      expect(all.subarray(4096, 135168).equals(Buffer.alloc(131072))).toBe(true);
      expect(all.subarray(135168).equals(Buffer.alloc(262144 - 135168, 0x42))).toBe(true);
    });

    it('fast zero either zeroes or refuses with ENOTSUP leaving data alone', async () => {
      const dev = await open();
      await dev.pwrite(Buffer.alloc(131072, 0x33), 0);
      try {
        await dev.zero(0, 131072, { fast: true });
        expect((await read(dev, 0, 131072)).equals(Buffer.alloc(131072))).toBe(true);
        expect(dev.caps.fastZero).toBe(true);
      } catch (err) {
        expect((err as ColoError).code).toBe('ENOTSUP');
        expect((await read(dev, 0, 131072)).equals(Buffer.alloc(131072, 0x33))).toBe(true);
      }
    });

    it('trim never disturbs bytes outside its range', async () => {
      const dev = await open();
      await dev.pwrite(Buffer.alloc(1024 * 1024, 0x99), 0);
      await dev.trim(65536 + 100, 262144, { fua: true });
      expect((await read(dev, 0, 65636)).equals(Buffer.alloc(65636, 0x99))).toBe(true);
      const after = 65536 + 100 + 262144;
      expect(
        (await read(dev, after, 1024 * 1024 - after)).equals(Buffer.alloc(1024 * 1024 - after, 0x99)),
      ).toBe(true);
    });

    it('extents are contiguous, non-empty and within the request', async () => {
      const dev = await open();
      await dev.pwrite(Buffer.alloc(65536, 1), 1024 * 1024);
      for (const [off, len] of [
        [0, SIZE],
        [1000, 2 * 1024 * 1024],
        [1024 * 1024 + 5, 10],
      ]) {
        const ext = await dev.extents(off, len);
        expect(ext.length).toBeGreaterThan(0);
        let pos = off;
        for (const e of ext) {
          expect(e.offset).toBe(pos);
          expect(e.length).toBeGreaterThan(0);
          pos += e.length;
        }
        expect(pos).toBeLessThanOrEqual(off + len);
      }
      // The written range is never reported as a hole.
      const ext = await dev.extents(1024 * 1024, 65536);
      expect(ext.every((e) => (e.flags & 1) === 0)).toBe(true);
    });

    it('reports holes after an aligned trim when it knows extents', async () => {
      const dev = await open();
      if (!dev.caps.extents) return expect(dev.caps.extents).toBe(false);
      await dev.pwrite(Buffer.alloc(2 * 1024 * 1024, 7), 0);
      await dev.trim(1024 * 1024, 1024 * 1024);
      const ext = await dev.extents(1024 * 1024, 1024 * 1024);
      expect(ext[0].flags & 1).toBe(1);
      expect((await read(dev, 1024 * 1024, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    });

    it('cache succeeds and changes nothing', async () => {
      const dev = await open();
      const data = Buffer.alloc(4096, 0x10);
      await dev.pwrite(data, 0);
      await dev.cache(0, SIZE);
      expect((await read(dev, 0, 4096)).equals(data)).toBe(true);
    });

    it('refuses out-of-range calls as internal errors (the server validates client ranges first)', async () => {
      const dev = await open();
      await expect(dev.pread(Buffer.alloc(10), SIZE - 5)).rejects.toMatchObject({ code: 'EINTERNAL' });
      await expect(dev.pwrite(Buffer.alloc(10), SIZE)).rejects.toMatchObject({ code: 'EINTERNAL' });
      await expect(dev.zero(-1, 10)).rejects.toMatchObject({ code: 'EINTERNAL' });
      await expect(dev.trim(0, SIZE + 1)).rejects.toMatchObject({ code: 'EINTERNAL' });
    });

    it('matches a model under a seeded random workload', async () => {
      const dev = await open();
      const model = Buffer.alloc(SIZE);
      const seed = 20261126;
      const rand = prng(seed);
      for (let i = 0; i < 400; i++) {
        const op = rand() % 10;
        const off = rand() % SIZE;
        const len = 1 + (rand() % Math.min(200_000, SIZE - off));
        if (op < 4) {
          const data = randomBytes(len, rand);
          // Half of the writes as pieces (pwritev where the device has it).
          if (op % 2 === 0) await writePieces(dev, splitPieces(data, rand), off, { fua: op === 0 });
          else await dev.pwrite(data, off, { fua: op === 0 });
          data.copy(model, off);
        } else if (op < 6) {
          await dev.zero(off, len, { mayTrim: op === 4 });
          model.fill(0, off, off + len);
        } else if (op === 6) {
          await dev.flush();
        } else {
          const got = await read(dev, off, len);
          if (!got.equals(model.subarray(off, off + len)))
            throw new Error(`seed ${seed} op ${i}: read ${off}+${len} differs from the model`);
        }
      }
      expect((await read(dev, 0, SIZE)).equals(model)).toBe(true);
    });
  });
}
