// The activity log (failover/activity.ts): regions are on disk before the
// write they cover goes ahead, concurrent writers share one sync, a torn slot
// falls back to the previous one, and extents cool only after their commit.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ActivityLog, mergeRanges } from '../src/failover/activity.js';
import { rmDir, tmpDir } from './helpers.js';
import { nodeStorage } from '../src/sys/storage.js';

const root = tmpDir();
afterAll(() => rmDir(root));
let n = 0;
const MiB = 1024 * 1024;

function fresh(size = 64 * MiB) {
  const dir = path.join(root, `a${n++}`);
  fs.mkdirSync(dir);
  return { dir, log: ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), size) };
}

describe('activity log', () => {
  it('records a cold extent durably before the write, and a hot one at no cost', async () => {
    const { dir, log } = fresh();
    const p = log.ensureHot(3 * MiB + 10, 4096, 1);
    expect(p).not.toBeNull();
    await p;
    expect(log.syncs).toBe(1);
    expect(log.ensureHot(3 * MiB + 8192, 4096, 1)).toBeNull(); // same extent: already on disk
    await log.close();
    const again = ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), 64 * MiB);
    expect(again.hotRanges()).toEqual([{ offset: 3 * MiB, length: MiB }]);
    expect(again.exactBytes).toBe(0); // the exact map is memory only
    await again.close();
  });

  it('concurrent writers to cold extents share syncs (group commit)', async () => {
    const { log } = fresh();
    await Promise.all(Array.from({ length: 32 }, (_, i) => log.ensureHot(i * MiB, 4096, 1)));
    expect(log.hotRanges()).toEqual([{ offset: 0, length: 32 * MiB }]);
    expect(log.syncs).toBeLessThanOrEqual(2);
    await log.close();
  });

  it('exact ranges of a 1 TiB disk match a model, across bitmap pages, and clear at a commit', async () => {
    const { log } = fresh(2 ** 40);
    let seed = 7;
    const r = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const model: { offset: number; length: number }[] = [];
    for (let i = 0; i < 400; i++) {
      // Clustered around page edges (a page is 2^15 blocks of 4 KiB) and spread over the disk.
      const page = Math.floor(r() * 64) * 2 ** 15 * 4096;
      const offset = page + Math.floor((r() - 0.5) * 64) * 4096 + (i % 3 === 0 ? 2 ** 38 : 0);
      const length = 1 + Math.floor(r() * 40_000);
      log.mark(Math.max(0, offset), length, 1);
      const start = Math.floor(Math.max(0, offset) / 4096) * 4096;
      model.push({ offset: start, length: Math.ceil((Math.max(0, offset) + length) / 4096) * 4096 - start });
    }
    const want = mergeRanges(model);
    expect(log.exactRanges()).toEqual(want);
    expect(log.exactBytes).toBe(want.reduce((a, x) => a + x.length, 0));
    log.cool(1);
    expect(log.exactRanges()).toEqual([]);
    expect(log.exactBytes).toBe(0);
    await log.close();
  });

  it('counts exact bytes at block granularity and merges ranges', async () => {
    const { log } = fresh();
    log.mark(0, 100, 1);
    log.mark(4096, 8192, 1);
    log.mark(10 * MiB, 1, 1);
    expect(log.exactBytes).toBe(4 * 4096);
    expect(log.exactRanges()).toEqual([
      { offset: 0, length: 3 * 4096 },
      { offset: 10 * MiB, length: 4096 },
    ]);
    expect(
      mergeRanges([
        { offset: 5, length: 5 },
        { offset: 0, length: 5 },
        { offset: 20, length: 1 },
      ]),
    ).toEqual([
      { offset: 0, length: 10 },
      { offset: 20, length: 1 },
    ]);
    await log.close();
  });

  it('after a commit, cools the least recently written extents past a working set, and idle ones', async () => {
    const { log } = fresh();
    // Extents 0..9 written in epochs 1..10, extent 10 in epoch 3 as well.
    for (let x = 0; x < 10; x++) await log.ensureHot(x * MiB, 4096, x + 1);
    await log.ensureHot(10 * MiB, 4096, 3);
    expect(log.hotBytes).toBe(11 * MiB);
    // Committed through 8: 9 candidates; keep 6 → the 5 oldest go (epochs 1, 2, both of 3, 4).
    log.coolLeastRecent(8, 6, 0);
    expect(log.hotBytes).toBe(6 * MiB);
    expect(log.hotRanges()).toEqual([{ offset: 4 * MiB, length: 6 * MiB }]);
    // Of two extents of the cut epoch, only as many go as the budget needs.
    await log.ensureHot(20 * MiB, 4096, 5);
    log.coolLeastRecent(8, 6, 0); // 7 hot: one of the two of epoch 5 (extents 4 and 20) goes
    expect(log.hotBytes).toBe(6 * MiB);
    const hot = log.hotRanges();
    const has = (x: number) => hot.some((r) => r.offset <= x * MiB && x * MiB < r.offset + r.length);
    expect([has(4), has(20)].filter(Boolean).length).toBe(1);
    expect([5, 6, 7, 8, 9].every(has)).toBe(true);
    // Within the working set nothing more cools; idle ones do, whatever the count.
    log.coolLeastRecent(8, 100, 0);
    expect(log.hotBytes).toBe(6 * MiB);
    log.coolLeastRecent(8, 100, 7);
    expect(log.hotRanges()).toEqual([{ offset: 7 * MiB, length: 3 * MiB }]);
    // Never an extent whose last write is not committed, even far over the budget.
    log.coolLeastRecent(8, 0, 0);
    expect(log.hotRanges()).toEqual([{ offset: 8 * MiB, length: 2 * MiB }]);
    await log.close();
  });

  it('knows which hot extents the exact blocks may not cover: past the commit, or from before a restart', async () => {
    const { dir, log } = fresh();
    // Protected writes in epochs 4 and 5, then a commit that covers epoch 4 only.
    await log.ensureHot(0, 4096, 4);
    await log.ensureHot(1 * MiB, 4096, 4);
    await log.ensureHot(2 * MiB, 4096, 5);
    expect(log.unknownRanges()).toEqual([]); // every block since the last commit is exact
    log.coolLeastRecent(4, 100, 0); // a working set: all three stay hot
    expect(log.hotBytes).toBe(3 * MiB);
    // Extents 0 and 1 hold nothing the peer lacks; extent 2's epoch-5 block lost its exact bit.
    expect(log.exactBytes).toBe(0);
    expect(log.unknownRanges()).toEqual([{ offset: 2 * MiB, length: MiB }]);
    // Alone now (no more commits): writes to known-clean and to cold extents are exact blocks.
    await log.ensureHot(1 * MiB + 8192, 4096, 6);
    await log.ensureHot(9 * MiB, 4096, 6);
    expect(log.exactRanges()).toEqual([
      { offset: 1 * MiB + 8192, length: 4096 },
      { offset: 9 * MiB, length: 4096 },
    ]);
    expect(log.unknownRanges()).toEqual([{ offset: 2 * MiB, length: MiB }]);
    // A commit covering everything: nothing unknown; a later one that covers less marks only those.
    log.coolLeastRecent(6, 100, 0);
    expect(log.unknownRanges()).toEqual([]);
    await log.ensureHot(9 * MiB, 4096, 8);
    log.coolLeastRecent(7, 100, 0);
    expect(log.unknownRanges()).toEqual([{ offset: 9 * MiB, length: MiB }]);
    // Dropping the exact blocks by hand makes every hot extent unknown.
    log.clearExact();
    expect(log.unknownRanges()).toEqual(log.hotRanges());
    await log.reset();
    expect(log.unknownRanges()).toEqual([]);
    await log.ensureHot(5 * MiB, 4096, 9);
    await log.close();
    // After a restart the exact blocks are gone: every hot extent is unknown.
    const again = ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), 64 * MiB);
    expect(again.hotRanges()).toEqual([{ offset: 5 * MiB, length: MiB }]);
    expect(again.unknownRanges()).toEqual([{ offset: 5 * MiB, length: MiB }]);
    await again.close();
  });

  it('a sequential writer rewriting the disk waits for the bitmap once per extent, not once per pass', async () => {
    const passes = async (coolAfter: (log: ActivityLog, epoch: number) => void) => {
      const { log } = fresh(32 * MiB);
      let epoch = 1;
      const waitsPerPass: number[] = [];
      for (let pass = 0; pass < 3; pass++) {
        let waits = 0;
        // One extent per epoch, committed as the next one is written (a checkpoint every 100 ms).
        for (let x = 0; x < 32; x++, epoch++) {
          const p = log.ensureHot(x * MiB, MiB, epoch);
          if (p) {
            waits++;
            await p;
          }
          coolAfter(log, epoch - 1);
        }
        waitsPerPass.push(waits);
      }
      await log.close();
      return waitsPerPass;
    };
    const lru = await passes((log, committed) => log.coolLeastRecent(committed - 4, 64, committed - 600));
    expect(lru).toEqual([32, 0, 0]); // the disk is the working set: it stays hot
    const eager = await passes((log, committed) => log.cool(committed - 4));
    expect(eager[1]).toBeGreaterThanOrEqual(28); // cooling every committed extent: a wait per extent, every pass
    // Past the working set the oldest cool, so a disk larger than it waits again, as it must.
    const small = await passes((log, committed) => log.coolLeastRecent(committed - 4, 16, committed - 600));
    expect(small[1]).toBeGreaterThanOrEqual(16);
  });

  it('cools only extents whose last write is committed, and rewrites the file lazily', async () => {
    const { dir, log } = fresh();
    await log.ensureHot(0, 4096, 3);
    await log.ensureHot(5 * MiB, 4096, 5);
    log.cool(4);
    expect(log.hotRanges()).toEqual([{ offset: 5 * MiB, length: MiB }]);
    await log.persist();
    // A cooled extent written again must be made durable again before the write.
    const p = log.ensureHot(0, 4096, 6);
    expect(p).not.toBeNull();
    await p;
    await log.close();
    expect(ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), 64 * MiB).hotRanges()).toEqual([
      { offset: 0, length: MiB },
      { offset: 5 * MiB, length: MiB },
    ]);
  });

  it('an extent with a write under way never cools: it cools once the epoch the write ended in is committed', async () => {
    const { log } = fresh();
    // A write begins in epoch 3 and waits (for the range, the bitmap's sync, a slow disk) while
    // epochs 3, 4 and 5 are sealed and committed.
    log.hold(2 * MiB, 4096);
    await log.ensureHot(2 * MiB, 4096, 3);
    log.cool(5);
    expect(log.hotRanges(), 'cooled under a write that may land in a later epoch').toEqual([
      { offset: 2 * MiB, length: MiB },
    ]);
    expect(log.unknownRanges()).toEqual([{ offset: 2 * MiB, length: MiB }]); // its exact bits went with the commit
    log.coolLeastRecent(5, 0, 5); // nor by the steady-state cooling, even with no working set kept
    expect(log.hotRanges()).toEqual([{ offset: 2 * MiB, length: MiB }]);
    log.release(2 * MiB, 4096, 6); // it was logged in epoch 6 at the latest
    log.cool(5);
    expect(log.hotRanges()).toEqual([{ offset: 2 * MiB, length: MiB }]);
    log.cool(6);
    expect(log.hotRanges()).toEqual([]);
    await log.close();
  });

  it('a torn slot falls back to the previous durable state', async () => {
    const { dir, log } = fresh();
    await log.ensureHot(0, 1, 1); // slot 1
    await log.ensureHot(2 * MiB, 1, 1); // slot 0
    await log.close();
    // Tear the newest slot (sequence 2, at offset 0): its CRC no longer matches.
    const fd = fs.openSync(path.join(dir, 'activity.bitmap'), 'r+');
    fs.writeSync(fd, Buffer.from([0xff]), 0, 1, 32);
    fs.closeSync(fd);
    const again = ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), 64 * MiB);
    expect(again.hotRanges()).toEqual([{ offset: 0, length: MiB }]);
    await again.close();
    // A bitmap for another disk size is refused, not misread.
    expect(() => ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), 4096 * MiB)).toThrow(
      /describes a disk of/,
    );
  });
});
