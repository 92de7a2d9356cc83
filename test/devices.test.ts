import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { MemoryDevice } from '../src/block/memory.js';
import { native } from '../src/block/native.js';
import { deviceSuite } from './device-suite.js';
import { rmDir, tmpDir } from './helpers.js';
import { describeWith } from './tools.js';

const dir = tmpDir();
afterAll(() => rmDir(dir));
let n = 0;

type WritevSync = typeof fs.writevSync;
/**
 * Run `body` with fs.writevSync (a write on the event loop) replaced by `hook`, which gets the real
 * one to call; restored afterwards, whatever happens.
 */
async function withLoopWrites(
  hook: (real: WritevSync, fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) => number,
  body: () => Promise<void>,
): Promise<void> {
  const real = fs.writevSync;
  fs.writevSync = ((fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) =>
    hook(real, fd, bufs, pos)) as WritevSync;
  try {
    await body();
  } finally {
    fs.writevSync = real;
  }
}

deviceSuite('MemoryDevice', async (size) => ({ device: new MemoryDevice(size) }));
deviceSuite('MemoryDevice (small pages)', async (size) => ({
  device: new MemoryDevice(size, { pageBytes: 4096 }),
}));
deviceSuite('FileDevice (sync I/O)', async (size) => {
  const p = path.join(dir, `sync-${n++}.img`);
  return { device: await FileDevice.open(p, { size }), cleanup: () => fs.rmSync(p) };
});
deviceSuite('FileDevice (async I/O)', async (size) => {
  const p = path.join(dir, `async-${n++}.img`);
  return { device: await FileDevice.open(p, { size, io: 'async' }), cleanup: () => fs.rmSync(p) };
});

describe('FileDevice specifics', () => {
  it('loads the native helpers (fallocate, SEEK_DATA) on this machine', () => {
    expect(native).not.toBeNull();
  });

  it('creates a sparse image of the given size', async () => {
    const p = path.join(dir, 'sparse.img');
    const dev = await FileDevice.open(p, { size: 64 * 1024 * 1024 });
    expect(fs.statSync(p).size).toBe(64 * 1024 * 1024);
    expect(fs.statSync(p).blocks).toBe(0);
    expect(await dev.extents(0, dev.size)).toEqual([{ offset: 0, length: dev.size, flags: 3 }]);
    await dev.close();
  });

  it('punches holes on trim (allocated blocks go down)', async () => {
    const p = path.join(dir, 'punch.img');
    const dev = await FileDevice.open(p, { size: 8 * 1024 * 1024 });
    await dev.pwrite(Buffer.alloc(8 * 1024 * 1024, 1), 0);
    const before = fs.statSync(p).blocks;
    await dev.trim(0, 4 * 1024 * 1024);
    expect(fs.statSync(p).blocks).toBeLessThan(before);
    await dev.close();
  });

  it('provisions the range on zero without holes (NO_HOLE)', async () => {
    const p = path.join(dir, 'nohole.img');
    const dev = await FileDevice.open(p, { size: 8 * 1024 * 1024 });
    expect(fs.statSync(p).blocks).toBe(0);
    await dev.zero(0, 4 * 1024 * 1024, { mayTrim: false });
    expect(fs.statSync(p).blocks * 512).toBeGreaterThanOrEqual(4 * 1024 * 1024);
    await dev.close();
  });

  it('memory device provisions NO_HOLE zeroes, but refuses to allocate a huge range', async () => {
    const dev = new MemoryDevice(1024 * 1024 * 1024 * 1024);
    await dev.zero(0, 262144, { mayTrim: false });
    expect((await dev.extents(0, 262144)).every((e) => e.flags === 0)).toBe(true);
    // 1 TiB of provisioning would exhaust memory: EOVERFLOW, nothing allocated.
    await expect(dev.zero(0, dev.size, { mayTrim: false })).rejects.toMatchObject({ code: 'EOVERFLOW' });
    expect(dev.allocatedBytes).toBe(262144);
    await dev.zero(0, 262144, { mayTrim: true });
    expect((await dev.extents(0, 262144)).every((e) => e.flags === 3)).toBe(true);
  });

  it('copies from another file inside the kernel (copy_file_range)', async () => {
    const src = path.join(dir, 'copy-src.bin');
    fs.writeFileSync(src, Buffer.concat([Buffer.alloc(100, 1), Buffer.alloc(70_000, 0xcd)]));
    const dev = await FileDevice.open(path.join(dir, 'copy-dst.img'), { size: 1024 * 1024 });
    const fd = fs.openSync(src, 'r');
    expect(await dev.copyFromFile(fd, 100, 5000, 70_000)).toBe(true);
    fs.closeSync(fd);
    const buf = Buffer.alloc(70_002);
    await dev.pread(buf, 4999);
    expect(buf[0]).toBe(0);
    expect(buf.subarray(1, 70_001).equals(Buffer.alloc(70_000, 0xcd))).toBe(true);
    expect(buf[70_001]).toBe(0);
    await dev.close();
  });

  it('copies a batch of ranges from another file on a pool thread, in any order, small and large', async () => {
    const src = path.join(dir, 'ranges-src.bin');
    const data = Buffer.from(Array.from({ length: 3 << 20 }, (_, i) => (i * 131 + (i >> 12)) & 0xff));
    fs.writeFileSync(src, data);
    const dev = await FileDevice.open(path.join(dir, 'ranges-dst.img'), { size: 4 << 20 });
    const want = Buffer.alloc(4 << 20);
    // [srcPos, offset, length]: neighbours in the source (read together), one far away,
    // one large (copied in the kernel), given out of source order.
    const list = [
      [5000, 3_000_000, 4096],
      [0, 100, 4000],
      [4010, 2_000_000, 900],
      [1 << 20, 1_000_000, 700_000],
      [2_900_000, 5, 95],
      [8200, 3_500_000, 65_536],
    ];
    const ranges = new Float64Array(list.flat());
    for (const [from, to, len] of list) data.copy(want, to, from, from + len);
    const fd = fs.openSync(src, 'r');
    expect(await dev.copyRangesFromFile(fd, ranges, list.length)).toBe(true);
    const got = Buffer.alloc(4 << 20);
    await dev.pread(got, 0);
    expect(got.equals(want)).toBe(true);
    // A range past the source's end is an error, not a short copy reported as done.
    await expect(dev.copyRangesFromFile(fd, new Float64Array([3 << 20, 0, 4096]), 1)).rejects.toMatchObject({
      code: 'EIO',
    });
    // A source position that is no whole number is refused before anything is copied.
    await expect(dev.copyRangesFromFile(fd, new Float64Array([NaN, 0, 4096]), 1)).rejects.toThrow(
      /whole number/,
    );
    fs.closeSync(fd);
    await expect(dev.copyRangesFromFile(fd, ranges, 1)).rejects.toThrow(/Bad file descriptor/);
    await dev.close();
  });

  it('copies large ranges in a batch between filesystems, through its buffer where the kernel refuses (EXDEV)', async () => {
    // The source in this suite's directory (tmpfs where there is /dev/shm), the image in the OS's
    // temporary directory (a disk here and on CI): copy_file_range between them is refused.
    const src = path.join(dir, 'xfs-src.bin');
    const data = Buffer.from(Array.from({ length: 3 << 20 }, (_, i) => (i * 7 + (i >> 16)) & 0xff));
    fs.writeFileSync(src, data);
    const other = fs.mkdtempSync(path.join(os.tmpdir(), 'colo-blk-xfs-'));
    try {
      const dev = await FileDevice.open(path.join(other, 'img'), { size: 4 << 20 });
      const list = [
        [0, 100, 1_500_000], // larger than the 1 MiB buffer: two rounds
        [2 << 20, 3_000_000, 70_000],
        [1_600_000, 2_000_000, 4096],
      ];
      const fd = fs.openSync(src, 'r');
      expect(await dev.copyRangesFromFile(fd, new Float64Array(list.flat()), list.length)).toBe(true);
      fs.closeSync(fd);
      const want = Buffer.alloc(4 << 20);
      for (const [from, to, len] of list) data.copy(want, to, from, from + len);
      const got = Buffer.alloc(4 << 20);
      await dev.pread(got, 0);
      expect(got.equals(want)).toBe(true);
      await dev.close();
    } finally {
      fs.rmSync(other, { recursive: true, force: true });
    }
  });

  it('goes on after a short pwritev from where it stopped, mid-piece', async () => {
    const p = path.join(dir, `short-${n++}.img`);
    const dev = await FileDevice.open(p, { size: 1 << 20, io: 'sync' });
    let calls = 0;
    // The kernel may write less than asked: at most 1000 bytes per call here.
    const short = (real: WritevSync, fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) => {
      calls++;
      const first = Buffer.from(bufs[0].buffer, bufs[0].byteOffset, Math.min(1000, bufs[0].byteLength));
      return real(fd, [first], pos);
    };
    await withLoopWrites(short, async () => {
      const data = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 7) & 0xff));
      await dev.pwritev([data.subarray(0, 2500), data.subarray(2500, 2500), data.subarray(2500)], 777);
      expect(calls).toBeGreaterThanOrEqual(5);
      const back = Buffer.alloc(5000);
      await dev.pread(back, 777);
      expect(back.equals(data)).toBe(true);
    }).finally(() => dev.close());
  });

  it("in 'auto' mode writes a small FUA write in the thread pool, never on the event loop", async () => {
    // On a real disk the O_DSYNC write waits for the disk: on the loop every connection would wait.
    const p = path.join(dir, `fua-${n++}.img`);
    const dev = await FileDevice.open(p, { size: 1 << 20 });
    let onLoop = 0;
    const count = (real: WritevSync, fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) => {
      onLoop++;
      return real(fd, bufs, pos);
    };
    await withLoopWrites(count, async () => {
      await dev.pwrite(Buffer.alloc(4096, 1), 0);
      expect(onLoop).toBe(1); // a small plain write stays on the loop
      await dev.pwrite(Buffer.alloc(4096, 2), 4096, { fua: true });
      expect(onLoop).toBe(1);
      const back = Buffer.alloc(8192);
      await dev.pread(back, 0);
      expect(back.equals(Buffer.concat([Buffer.alloc(4096, 1), Buffer.alloc(4096, 2)]))).toBe(true);
    }).finally(() => dev.close());
  });

  it("in 'auto' mode writes large writes on the loop until one is slow, then in the pool for 1, 2, 4 ... s", async () => {
    const p = path.join(dir, `large-${n++}.img`);
    const notes: string[] = [];
    const dev = await FileDevice.open(p, {
      size: 8 << 20,
      log: { warn: (msg) => notes.push(`warn ${msg}`), info: (msg) => notes.push(`info ${msg}`) },
    });
    let now = 1000; // a clock of the test's own: a slow write is one that moves it on by more than 10 ms
    const clock = vi.spyOn(performance, 'now').mockImplementation(() => now);
    let onLoop = 0;
    let stallMs = 0;
    const stalling = (real: WritevSync, fd: number, bufs: NodeJS.ArrayBufferView[], pos?: number) => {
      onLoop++;
      now += stallMs; // a write the page cache did not absorb
      return real(fd, bufs, pos);
    };
    const big = (v: number) => Buffer.alloc(1 << 20, v);
    /** Write 1 MiB at `atMs` after the test's start; true if it ran on the loop. */
    const write = async (atMs: number, stall = 0): Promise<boolean> => {
      now = Math.max(now, 1000 + atMs);
      stallMs = stall;
      const before = onLoop;
      await dev.pwrite(big(atMs & 0xff), (atMs % 8) << 20);
      return onLoop > before;
    };
    await withLoopWrites(stalling, async () => {
      expect(await write(0)).toBe(true);
      expect(await write(10, 20)).toBe(true); // over 10 ms + 1 MiB at 500 MB/s: slow
      expect(await write(500)).toBe(false); // in the pool for 1 s
      await dev.pwrite(Buffer.alloc(4096, 4), 7 << 20);
      expect(onLoop).toBe(3); // small writes stay on the loop
      expect(await write(1040, 20)).toBe(true); // tried on the loop again: slow again
      expect(await write(2500)).toBe(false); // 2 s now
      expect(await write(3070)).toBe(true); // fast: back to 1 s after the next slow one
      expect(await write(3080, 20)).toBe(true);
      expect(await write(4110)).toBe(true);
      // The node's log says when and why large writes left the loop, and when they came back.
      expect(
        notes.map((m) => m.replace(/^(\w+) .*?(thread pool for \d+ s|back on the event loop).*$/, '$1 $2')),
      ).toEqual([
        'warn thread pool for 1 s',
        'warn thread pool for 2 s',
        'info back on the event loop',
        'warn thread pool for 1 s',
        'info back on the event loop',
      ]);
      expect(notes[0]).toContain(`${p}: a 1.0 MiB write took 20.0 ms on the event loop`);
      const back = Buffer.alloc(1 << 20);
      await dev.pread(back, (4110 % 8) << 20);
      expect(back.equals(big(4110 & 0xff))).toBe(true);
    }).finally(() => {
      clock.mockRestore();
      return dev.close();
    });
  });

  it('maps a dense file window by window with one SEEK_HOLE per run of data, and shows holes it punches at once', async () => {
    const MiB = 1024 * 1024;
    const p = path.join(dir, 'dense.img');
    const dev = await FileDevice.open(p, { size: 64 * MiB });
    const chunk = Buffer.alloc(MiB, 7);
    for (let off = 0; off < dev.size; off += MiB) await dev.pwritev([chunk], off);
    const seekHole = vi.spyOn(native!, 'seekHole');
    try {
      // A full sync asks window by window; SEEK_HOLE would walk to the end of the file each time.
      for (let off = 0; off < dev.size; off += MiB)
        expect(await dev.extents(off, MiB)).toEqual([{ offset: off, length: MiB, flags: 0 }]);
      expect(seekHole).toHaveBeenCalledTimes(1);
      // A hole this device punches shows in the next map.
      await dev.trim(8 * MiB, 2 * MiB);
      expect(await dev.extents(7 * MiB, 4 * MiB)).toEqual([
        { offset: 7 * MiB, length: MiB, flags: 0 },
        { offset: 8 * MiB, length: 2 * MiB, flags: 3 },
        { offset: 10 * MiB, length: MiB, flags: 0 },
      ]);
      // Data written into that hole shows too: a known run of data never hides new data.
      await dev.pwritev([chunk], 9 * MiB);
      expect(await dev.extents(7 * MiB, 4 * MiB)).toEqual([
        { offset: 7 * MiB, length: MiB, flags: 0 },
        { offset: 8 * MiB, length: MiB, flags: 3 },
        { offset: 9 * MiB, length: 2 * MiB, flags: 0 },
      ]);
      // Zeroing that may punch forgets the run as well.
      await dev.zero(20 * MiB, MiB);
      expect(await dev.extents(19 * MiB, 3 * MiB)).toEqual([
        { offset: 19 * MiB, length: MiB, flags: 0 },
        { offset: 20 * MiB, length: MiB, flags: 3 },
        { offset: 21 * MiB, length: MiB, flags: 0 },
      ]);
    } finally {
      seekHole.mockRestore();
      await dev.close();
      fs.rmSync(p);
    }
  });

  it('refuses every call once closed (ESHUTDOWN), never reaching the file that got its descriptor since; close waits for calls in the thread pool', async () => {
    for (const io of ['sync', 'async'] as const) {
      const devA = await FileDevice.open(path.join(dir, `closed-a-${io}.img`), { size: 1 << 20, io });
      await devA.pwrite(Buffer.alloc(4096, 0xaa), 0);
      // Reads asked for before the close are answered from this file.
      const reads = Array.from({ length: 16 }, () => {
        const buf = Buffer.alloc(4096);
        return devA.pread(buf, 0).then(() => buf);
      });
      await devA.close();
      for (const buf of await Promise.all(reads)) expect(buf.equals(Buffer.alloc(4096, 0xaa))).toBe(true);
      // The next open takes the lowest free descriptors: the ones this device had.
      const devB = await FileDevice.open(path.join(dir, `closed-b-${io}.img`), { size: 1 << 20, io });
      await devB.pwrite(Buffer.alloc(4096, 0xbb), 0);
      const late = Buffer.alloc(4096);
      await expect(devA.pread(late, 0)).rejects.toMatchObject({ code: 'ESHUTDOWN' });
      expect(late.equals(Buffer.alloc(4096)), 'a closed device read another file').toBe(true);
      await expect(devA.pwrite(Buffer.alloc(4096, 0xcc), 0)).rejects.toMatchObject({ code: 'ESHUTDOWN' });
      await expect(devA.flush()).rejects.toMatchObject({ code: 'ESHUTDOWN' });
      await expect(devA.extents(0, 4096)).rejects.toMatchObject({ code: 'ESHUTDOWN' });
      const check = Buffer.alloc(4096);
      await devB.pread(check, 0);
      expect(check.equals(Buffer.alloc(4096, 0xbb))).toBe(true);
      await devB.close();
    }
  });

  it('keeps data across close and reopen', async () => {
    const p = path.join(dir, 'persist.img');
    const dev = await FileDevice.open(p, { size: 1024 * 1024 });
    await dev.pwrite(Buffer.from('hello colo'), 1000, { fua: true });
    await dev.close();
    const again = await FileDevice.open(p);
    const buf = Buffer.alloc(10);
    await again.pread(buf, 1000);
    expect(buf.toString()).toBe('hello colo');
    await again.close();
  });

  it('refuses a size that does not match an existing file, saying what to do', async () => {
    const p = path.join(dir, 'mismatch.img');
    fs.writeFileSync(p, Buffer.alloc(4096));
    await expect(FileDevice.open(p, { size: 8192 })).rejects.toThrow(
      /already exists with 4096 bytes.*resize/,
    );
  });

  it('explains a missing file and an empty file', async () => {
    await expect(FileDevice.open(path.join(dir, 'nope.img'))).rejects.toThrow(/does not exist; give a size/);
    const p = path.join(dir, 'empty.img');
    fs.writeFileSync(p, '');
    await expect(FileDevice.open(p)).rejects.toThrow(/is empty/);
  });

  it('read-only devices refuse writes with EPERM and advertise no write caps', async () => {
    const p = path.join(dir, 'ro.img');
    fs.writeFileSync(p, Buffer.alloc(65536, 9));
    const dev = await FileDevice.open(p, { readOnly: true });
    expect(dev.caps.write).toBe(false);
    expect(dev.caps.trim).toBe('none');
    await expect(dev.pwrite(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'EPERM' });
    const buf = Buffer.alloc(4);
    await dev.pread(buf, 0);
    expect([...buf]).toEqual([9, 9, 9, 9]);
    await dev.close();
  });
});

// The native helpers are built at install with a C compiler; without one this says so and skips.
describeWith(native ? [] : ['c++'], "the secondary's apply copy", () => {
  let dir = ''; // made when the suite runs: a suite filtered out runs no hook, and would leave it
  beforeAll(() => {
    dir = tmpDir('colo-blk-copy-');
  });
  afterAll(() => rmDir(dir));
  it('copies from another file off the event loop (a large copy lets the loop run meanwhile)', async () => {
    const src = path.join(dir, 'copy-big.bin');
    const size = 64 * 1024 * 1024;
    fs.writeFileSync(src, Buffer.alloc(size, 0x5a));
    const dev = await FileDevice.open(path.join(dir, 'copy-big.img'), { size });
    const fd = fs.openSync(src, 'r');
    let done = false;
    const copy = dev.copyFromFile(fd, 0, 0, size).then((ok) => ((done = true), ok));
    // The loop turns while the copy runs: with a copy on the loop thread, it would be done by now.
    const doneAtNextTurn = await new Promise<boolean>((r) => setImmediate(() => r(done)));
    expect(doneAtNextTurn).toBe(false);
    expect(await copy).toBe(true);
    fs.closeSync(fd);
    const buf = Buffer.alloc(4096);
    await dev.pread(buf, size - 4096);
    expect(buf.equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    await dev.close();
    fs.rmSync(src);
  });
});
