/**
 * The VM's RAM as checkpoints see it (src/checkpoint/qemu/ram.ts): a mapped
 * RAM file compared page by page against the last checkpoint's copy. First
 * against a file this test writes (exact page sets, any number of threads,
 * the copy brought up to date), then against a real guest's RAM under QEMU:
 * while paused, the copy equals the RAM file byte for byte after each diff,
 * and the figure for a 256 MiB guest is printed.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, expect, it, vi } from 'vitest';
import { native } from '../src/block/native.js';
import { QmpClient } from '../src/checkpoint/qemu/qmp.js';
import { PAGE_BYTES, RamImage } from '../src/checkpoint/qemu/ram.js';
import { killAll, prng, rmDir, tmpDir } from './helpers.js';
import { describeWith } from './tools.js';
import { bootGuest } from './vm-helpers.js';

const dirs: string[] = [];
afterAll(async () => {
  await killAll();
  dirs.forEach(rmDir);
});

const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

// The native helpers are built at install with a C compiler; without one this says so and skips.
describeWith(native ? [] : ['c++'], 'RAM pages changed since the last checkpoint', () => {
  it('lists exactly the pages written, with any number of threads, and keeps the copy exact', () => {
    const dir = tmpDir('colo-blk-ram-');
    dirs.push(dir);
    const file = path.join(dir, 'ram');
    const pages = 2048 + 3; // 8 MiB and a bit: threads split it unevenly
    fs.writeFileSync(file, Buffer.alloc(pages * PAGE_BYTES));
    const fd = fs.openSync(file, 'r+');
    const rand = prng(17);
    try {
      for (const threads of [1, 3]) {
        fs.writeSync(fd, Buffer.alloc(pages * PAGE_BYTES), 0, pages * PAGE_BYTES, 0);
        const ram = RamImage.open(file, threads);
        // The copy starts as zeroes: a fresh file has no changed page.
        expect(ram.diff().pages.length).toBe(0);
        ram.checkpointed();
        for (let round = 0; round < 4; round++) {
          const touched = new Set<number>();
          for (let k = 0; k < 50; k++) touched.add(rand() % pages);
          for (const p of touched) {
            // A zero page with one non-zero word somewhere: never what the page held before.
            const b = Buffer.alloc(PAGE_BYTES, 0);
            b.writeUInt32LE(((round + 1) << 24) | (rand() & 0xffffff) | 1, (rand() % (PAGE_BYTES / 4)) * 4);
            fs.writeSync(fd, b, 0, b.length, p * PAGE_BYTES);
          }
          // Rewriting a page with the bytes it already has is no change.
          const untouched = [...Array(pages).keys()].find((p) => !touched.has(p))!;
          const same = Buffer.alloc(PAGE_BYTES);
          fs.readSync(fd, same, 0, PAGE_BYTES, untouched * PAGE_BYTES);
          fs.writeSync(fd, same, 0, PAGE_BYTES, untouched * PAGE_BYTES);
          const d = ram.diff();
          expect([...d.pages]).toEqual([...touched].sort((a, b) => a - b));
          for (const p of touched) {
            const b = Buffer.alloc(PAGE_BYTES);
            fs.readSync(fd, b, 0, PAGE_BYTES, p * PAGE_BYTES);
            expect(ram.page(p).equals(b), `page ${p}`).toBe(true);
          }
          // Until the checkpoint is committed, a later diff carries these pages again, with new ones.
          const extra = (rand() % pages) | 0;
          const b = Buffer.alloc(PAGE_BYTES, 0xee);
          fs.writeSync(fd, b, 0, b.length, extra * PAGE_BYTES);
          expect([...ram.diff().pages]).toEqual([...new Set([...touched, extra])].sort((a, c) => a - c));
          ram.checkpointed();
          expect(ram.diff().pages.length, 'after a commit, nothing changed').toBe(0);
        }
        ram.close();
      }
    } finally {
      fs.closeSync(fd);
    }
  });

  it('asks the file only about its holes once their neighbours are known, and finds new data in them', () => {
    const dir = tmpDir('colo-blk-ram-');
    dirs.push(dir);
    const file = path.join(dir, 'ram');
    const MiB = 1024 * 1024;
    const pages = (64 * MiB) / PAGE_BYTES;
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 64 * MiB);
    const fd = fs.openSync(file, 'r+');
    const page = (v: number) => Buffer.alloc(PAGE_BYTES, v);
    const at = (p: number, v: number) => fs.writeSync(fd, page(v), 0, PAGE_BYTES, p * PAGE_BYTES);
    const seekHole = vi.spyOn(native!, 'seekHole');
    try {
      const ram = RamImage.open(file, 2);
      // Data in three places, 16 MiB apart (gaps far over the 1 MiB that ranges merge across).
      const runs = [0, (16 * MiB) / PAGE_BYTES, (48 * MiB) / PAGE_BYTES];
      for (const r of runs) for (let p = r; p < r + 256; p++) at(p, 1);
      expect(ram.diff().pages.length).toBe(3 * 256);
      ram.checkpointed();
      // Known ranges are not walked again: SEEK_HOLE would go page by page through them.
      seekHole.mockClear();
      at(runs[1] + 7, 2);
      expect([...ram.diff().pages]).toEqual([runs[1] + 7]);
      expect(seekHole).not.toHaveBeenCalled();
      // Not checkpointed: the next diff carries that page again, and lists pages in order though
      // the new ones (in a hole that had no data: found by SEEK_DATA) lie before and after it.
      const fresh = [(8 * MiB) / PAGE_BYTES + 3, (40 * MiB) / PAGE_BYTES, pages - 1];
      for (const p of fresh) at(p, 3);
      expect([...ram.diff().pages]).toEqual([fresh[0], runs[1] + 7, fresh[1], fresh[2]]);
      expect(seekHole).toHaveBeenCalledTimes(3);
      ram.checkpointed();
      expect(ram.diff().pages.length).toBe(0);
      // A known range the file gave back (a hole again) is still compared: its pages read as zeroes.
      native!.punchHole(fd, runs[2] * PAGE_BYTES, 2 * PAGE_BYTES);
      expect([...ram.diff().pages]).toEqual([runs[2], runs[2] + 1]);
      expect(ram.page(runs[2]).every((b) => b === 0)).toBe(true);
      ram.close();
    } finally {
      seekHole.mockRestore();
      fs.closeSync(fd);
    }
  });
});

describeWith(['qemu-system-x86_64', 'busybox', 'cpio', 'mkfs.ext4'], 'RAM of a real guest under QEMU', () => {
  it('in a sparse RAM file compares only the data and what was data, and sees pages punched back to holes', () => {
    const dir = tmpDir('colo-blk-ram-');
    dirs.push(dir);
    const file = path.join(dir, 'ram');
    const pages = 64 * 1024; // 256 MiB of holes
    fs.writeFileSync(file, '');
    fs.truncateSync(file, pages * PAGE_BYTES);
    const fd = fs.openSync(file, 'r+');
    const rand = prng(23);
    try {
      const ram = RamImage.open(file, 2);
      expect(ram.diff().pages.length).toBe(0);
      ram.checkpointed();
      // Pages scattered over the file: many separate data ranges, some close, some far apart.
      const written = new Set<number>();
      for (let k = 0; k < 40; k++) written.add(rand() % pages);
      written.add(pages - 1);
      written.add(0);
      const page = (v: number) => Buffer.alloc(PAGE_BYTES, v);
      for (const p of written) fs.writeSync(fd, page(7), 0, PAGE_BYTES, p * PAGE_BYTES);
      expect([...ram.diff().pages]).toEqual([...written].sort((a, b) => a - b));
      ram.checkpointed();
      expect(ram.diff().pages.length).toBe(0);
      // A page given back to the file system (a hole again) reads as zeroes: that is a change.
      const gone = [...written][3];
      native!.punchHole(fd, gone * PAGE_BYTES, PAGE_BYTES);
      const other = [...written][5];
      fs.writeSync(fd, page(9), 0, PAGE_BYTES, other * PAGE_BYTES);
      expect([...ram.diff().pages]).toEqual([gone, other].sort((a, b) => a - b));
      expect(ram.page(gone).every((b) => b === 0)).toBe(true);
      expect(ram.page(other).equals(page(9))).toBe(true);
      ram.checkpointed();
      // And the hole stays unchanged after.
      expect(ram.diff().pages.length).toBe(0);
      ram.close();
    } finally {
      fs.closeSync(fd);
    }
  });

  it('finds the pages a running guest dirtied between two pauses, and the copy equals the RAM', async () => {
    const dir = tmpDir('colo-blk-ram-vm-');
    dirs.push(dir);
    const disk = path.join(dir, 'disk.img');
    fs.writeFileSync(disk, Buffer.alloc(0));
    fs.truncateSync(disk, 64 * 1024 * 1024);
    const { execFileSync } = await import('node:child_process');
    execFileSync('mkfs.ext4', ['-q', '-F', disk]);
    const guest = await bootGuest(dir, { workload: 'fsync-loop', disk });
    const qmp = await QmpClient.connect({ path: guest.qmpPath });
    try {
      await guest.waitSerial(/colo-guest: synced 3/);
      const ram = RamImage.open(guest.ramPath);
      await qmp.execute('stop');
      const first = ram.diff();
      expect(first.pages.length).toBeGreaterThan(1000); // the kernel, the initramfs, page tables ...
      ram.checkpointed();
      await qmp.execute('cont');
      await new Promise((r) => setTimeout(r, 300));
      await qmp.execute('stop');
      const d = ram.diff();
      // The copy is the RAM, byte for byte, while the guest is paused.
      const whole = fs.readFileSync(guest.ramPath);
      let equal = true;
      for (let off = 0; off < whole.length && equal; off += 64 * PAGE_BYTES)
        for (let p = off / PAGE_BYTES; p < (off + 64 * PAGE_BYTES) / PAGE_BYTES; p++)
          if (!ram.page(p).equals(whole.subarray(p * PAGE_BYTES, (p + 1) * PAGE_BYTES))) {
            equal = false;
            break;
          }
      expect(equal).toBe(true);
      expect(d.pages.length).toBeGreaterThan(0);
      expect(d.pages.length).toBeLessThan(first.pages.length);
      console.log(
        `256 MiB guest, 300 ms of fsync-loop: ${d.pages.length} pages (${((d.pages.length * PAGE_BYTES) / 2 ** 20).toFixed(1)} MiB) changed, ` +
          `found in ${d.ms.toFixed(1)} ms on ${ram.threads} threads (first, full: ${first.pages.length} pages in ${first.ms.toFixed(1)} ms); sha ${sha(whole).slice(0, 8)}`,
      );
      await qmp.execute('cont');
      ram.close();
    } finally {
      qmp.close();
      await guest.kill();
    }
  }, 120_000);
});
