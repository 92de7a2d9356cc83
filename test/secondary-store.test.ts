// The secondary's store: epochs invisible until committed, overlay discarded
// at commit, apply idempotent, state survives a restart at every stage.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { encodeFrame } from '../src/checkpoint/format/frame.js';
import type { MutationRecord } from '../src/checkpoint/format/records.js';
import { SecondaryStore } from '../src/checkpoint/secondary/store.js';
import { blockHashes } from '../src/failover/reprotect/hash.js';
import { HashPool } from '../src/failover/reprotect/hash-pool.js';
import { deviceSuite } from './device-suite.js';
import { prng, randomBytes, rmDir, slowSyncStorage, tmpDir } from './helpers.js';
import { nodeStorage } from '../src/sys/storage.js';
import { StateDir } from '../src/checkpoint/state-dir.js';

const root = tmpDir();
afterAll(() => rmDir(root));
let n = 0;
const SIZE = 4 * 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function openStore(dir?: string, image?: string, opts: { spareJournalBytes?: number } = {}) {
  dir ??= path.join(root, `s${n++}`);
  image ??= path.join(dir + '.img');
  const dev = await FileDevice.open(image, { size: SIZE });
  const store = await SecondaryStore.open(dir, dev, opts);
  return { store, dev, dir, image };
}

/** Feed a mutation the way the link does. */
function feed(store: SecondaryStore, rec: MutationRecord, data?: Buffer) {
  return store.receive(rec, encodeFrame(rec, data), data?.length ?? 0);
}

/** The image once every committed epoch is applied. */
async function appliedImage(s: { store: SecondaryStore; dev: FileDevice }): Promise<Buffer> {
  await s.store.drainApply();
  const img = Buffer.alloc(SIZE);
  await s.dev.pread(img, 0);
  return img;
}

async function closeStore(s: { store: SecondaryStore; dev: FileDevice }): Promise<void> {
  await s.store.close();
  await s.dev.close();
}

async function readSvm(store: SecondaryStore, off: number, len: number) {
  const buf = Buffer.alloc(len);
  await store.svmDevice.pread(buf, off);
  return buf;
}

describe('SecondaryStore', () => {
  it('a promotion asked for while a resync starts waits for it, and is refused: from the rebase on the node is part-way through the resync, across a restart', async () => {
    const { store, dev, dir, image } = await openStore();
    await store.svmDevice.pwrite(Buffer.alloc(4096, 0x21), 0);
    const starting = store.startResync(5, { target: 'p2', mode: 'incremental' });
    const promoting = store.promote('test: racing a resync start');
    await starting;
    // Epoch 4 now names the primary's checkpoint, which this disk does not hold yet: a generation
    // based on it would claim what this node never received.
    await expect(promoting).rejects.toMatchObject({ code: 'EBUSY' });
    expect(store.syncing).toMatchObject({ target: 'p2', mode: 'incremental' });
    await store.close();
    await dev.close();
    const again = await openStore(dir, image);
    expect(again.store.promoted).toBeNull();
    expect(again.store.lastCommitted).toBe(4);
    expect(again.store.syncing).toMatchObject({ target: 'p2', mode: 'incremental' });
    await expect(again.store.promote('test: after a restart')).rejects.toMatchObject({ code: 'EBUSY' });
    await again.store.close();
    await again.dev.close();
  });

  it('a resync start waits for a commit under way: the rollback never drops the epoch being committed', async () => {
    const { store, dev } = await openStore();
    store.startSession('s1', 1);
    feed(store, { t: 'w', e: 1, s: 1, o: 8192 }, Buffer.alloc(4096, 0x5a));
    await store.seal({ t: 'seal', e: 1, n: 1, b: 4096 });
    // The old connection's commit is being recorded when a new connection starts a resync.
    const committing = store.commit(1);
    const starting = store.startResync(7, { target: 'p2', mode: 'incremental' });
    await committing;
    const { dropped } = await starting;
    expect(dropped).not.toContain(1);
    expect(store.lastCommitted).toBe(6); // rebased after the commit
    expect((await readSvm(store, 8192, 4096)).equals(Buffer.alloc(4096, 0x5a)), 'the committed epoch').toBe(
      true,
    );
    await store.close();
    await dev.close();
  });

  it('a promotion told to commit through a durable epoch (a coordinator released its output) commits it first, across a restart', async () => {
    const { store, dev, dir, image } = await openStore();
    const pvm1 = Buffer.alloc(4096, 0x11);
    const pvm2 = Buffer.alloc(4096, 0x22);
    feed(store, { t: 'w', e: 1, s: 1, o: 0 }, pvm1);
    await store.seal({ t: 'seal', e: 1, n: 1, b: 4096 });
    feed(store, { t: 'w', e: 2, s: 2, o: 8192 }, pvm2);
    // The SVM wrote on its own meanwhile: the commit of epoch 1 discards that.
    await store.svmDevice.pwrite(Buffer.alloc(4096, 0x55), 50_000);
    await expect(store.promote('test', 2)).rejects.toThrow(/not durable/); // epoch 2 was never sealed
    const p = await store.promote('test', 1);
    expect(p.committed).toBe(1);
    expect(p.droppedEpochs).toEqual([2]);
    expect((await readSvm(store, 0, 4096)).equals(pvm1)).toBe(true);
    expect((await readSvm(store, 8192, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    expect((await readSvm(store, 50_000, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await store.close();
    await dev.close();
    const again = await openStore(dir, image);
    expect(again.store.lastCommitted).toBe(1);
    expect(again.store.promoted).not.toBeNull();
    expect((await readSvm(again.store, 0, 4096)).equals(pvm1)).toBe(true);
    await again.store.close();
    await again.dev.close();
  });

  it('keeps PVM writes invisible until commit, then shows them and drops the overlay', async () => {
    const { store, dev } = await openStore();
    const pvm = Buffer.alloc(8192, 0xaa);
    const svm = Buffer.alloc(4096, 0x55);
    await store.svmDevice.pwrite(svm, 100_000);
    feed(store, { t: 'w', e: 1, s: 1, o: 0 }, pvm);
    feed(store, { t: 'z', e: 1, s: 2, o: 4096, l: 1024 });
    expect((await readSvm(store, 0, 8192)).equals(Buffer.alloc(8192))).toBe(true);
    expect((await readSvm(store, 100_000, 4096)).equals(svm)).toBe(true);
    await store.seal({ t: 'seal', e: 1, n: 2, b: 8192 });
    expect((await readSvm(store, 0, 4)).equals(Buffer.alloc(4))).toBe(true); // durable is not committed
    const r = await store.commit(1);
    expect(r.epochs).toEqual([1]);
    expect(r.overlayDiscarded.records).toBe(1);
    const want = Buffer.from(pvm);
    want.fill(0, 4096, 5120);
    expect((await readSvm(store, 0, 8192)).equals(want)).toBe(true);
    expect((await readSvm(store, 100_000, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await store.drainApply();
    const img = Buffer.alloc(8192);
    await dev.pread(img, 0);
    expect(img.equals(want)).toBe(true);
    expect(store.pendingEpochs()).toEqual([]);
    await store.close();
    await dev.close();
  });

  it("an SVM write with FUA waiting for its overlay's sync when a commit discards that overlay is answered, not failed", async () => {
    // The second FUA write waits behind the first one's slow fdatasync; the commit closes the
    // overlay meanwhile. Before the fix the second one then synced a closed descriptor: EBADF
    // to the SVM (an unhandled rejection in the power-loss test on a loaded machine).
    const { storage, state } = slowSyncStorage((p) => (p.includes('overlay') ? 50 : 1));
    const dir = path.join(root, `s${n++}`);
    const dev = await FileDevice.open(dir + '.img', { size: SIZE });
    const store = await SecondaryStore.open(new StateDir(dir, storage), dev);
    const pvm = Buffer.alloc(4096, 0xaa);
    feed(store, { t: 'w', e: 1, s: 1, o: 0 }, pvm);
    await store.seal({ t: 'seal', e: 1, n: 1, b: 4096 });
    const first = store.svmDevice.pwrite(Buffer.alloc(4096, 0x11), 8192, { fua: true });
    const second = store.svmDevice.pwrite(Buffer.alloc(4096, 0x22), 16384, { fua: true });
    await store.commit(1);
    await Promise.all([first, second]);
    expect(state.closedSyncs).toBe(0);
    // The checkpoint replaced what the SVM wrote.
    expect((await readSvm(store, 0, 4096)).equals(pvm)).toBe(true);
    expect((await readSvm(store, 16384, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await store.close();
    await dev.close();
  });

  it('applies an epoch of thousands of small writes, overwrites, zeroes and a large write byte-exact (the batched apply)', async () => {
    for (const seed of [1, 2, 3]) {
      const s = await openStore();
      const rand = prng(seed);
      const model = Buffer.alloc(SIZE);
      let seq = 0;
      let records = 0;
      let bytes = 0;
      for (let i = 0; i < 3000; i++) {
        const kind = rand() % 20;
        if (kind === 0) {
          const o = (rand() % (SIZE / 4096 - 64)) * 4096;
          const l = 4096 * (1 + (rand() % 32));
          feed(s.store, { t: 'z', e: 1, s: ++seq, o, l });
          model.fill(0, o, o + l);
          records++;
          continue;
        }
        // Mostly 512 B to 4 KiB at any byte offset (neighbours in the journal, far apart on the
        // disk), a few of 96 to 200 KiB (copied in the kernel, not through the buffer).
        const l = kind === 1 ? 96 * 1024 + (rand() % (104 * 1024)) : 512 + (rand() % 3585);
        const o = rand() % (SIZE - l);
        const data = randomBytes(l, rand);
        feed(s.store, { t: 'w', e: 1, s: ++seq, o }, data);
        data.copy(model, o);
        records++;
        bytes += l;
      }
      await s.store.seal({ t: 'seal', e: 1, n: records, b: bytes });
      await s.store.commit(1);
      const img = await appliedImage(s);
      expect(img.equals(model), `seed ${seed}`).toBe(true);
      await closeStore(s);
    }
  });

  it('reads through thousands of small layer extents exactly, while an apply rewrites the image under them', async () => {
    for (const seed of [4, 5]) {
      const s = await openStore();
      const rand = prng(seed);
      // The image holds data of its own; epoch 1 (to be committed and applied) and epoch 2
      // (received, not committed) scatter small writes over it; the SVM writes a few of its own.
      const image = randomBytes(SIZE, rand);
      await s.dev.pwrite(image, 0);
      const pvm = Buffer.from(image);
      let seq = 0;
      let svm: Buffer | null = null;
      for (const e of [1, 2]) {
        let records = 0;
        let bytes = 0;
        for (let i = 0; i < 1500; i++) {
          const l = 512 * (1 + (rand() % 16));
          const o = (rand() % ((SIZE - l) / 512)) * 512;
          const data = randomBytes(l, rand);
          feed(s.store, { t: 'w', e, s: ++seq, o }, data);
          data.copy(pvm, o);
          records++;
          bytes += l;
        }
        await s.store.seal({ t: 'seal', e, n: records, b: bytes });
        // What the SVM sees: committed epochs only.
        if (e === 1) svm = Buffer.from(pvm);
      }
      // Epoch 1 committed: its apply now writes the image in the background, under the reads below.
      await s.store.commit(1);
      for (let i = 0; i < 40; i++) {
        const data = randomBytes(4096, rand);
        const o = (rand() % (SIZE / 4096)) * 4096;
        await s.store.svmDevice.pwrite(data, o);
        data.copy(svm!, o);
      }
      const reads: Promise<void>[] = [];
      for (let i = 0; i < 60; i++) {
        const len = 1 + (rand() % (3 << 20));
        const off = rand() % (SIZE - len);
        reads.push(
          readSvm(s.store, off, len).then((got) => {
            expect(got.equals(svm!.subarray(off, off + len)), `seed ${seed} read ${off}+${len}`).toBe(true);
          }),
        );
      }
      await Promise.all(reads);
      // The PVM's disk as the resync hashes it (no overlay): equal block for block.
      const hashes = await s.store.pvmHashes(0, SIZE, 65536);
      const ref = await blockHashes(
        async (buf, off) => void pvm.copy(buf, 0, off, off + buf.length),
        0,
        SIZE,
        65536,
      );
      expect(hashes.equals(ref)).toBe(true);
      await closeStore(s);
    }
  });

  it('hashes the PVM disk with the workers reading the image where no epoch holds data, and through the epochs where one does', async () => {
    const size = 16 * 1024 * 1024;
    const dir = path.join(root, `s${n++}`);
    const image = dir + '.img';
    const rand = prng(4242);
    // What the image held before: random data, with a hole.
    const pvm = randomBytes(size, rand);
    pvm.fill(0, 5 << 20, 7 << 20);
    fs.writeFileSync(image, pvm.subarray(0, 5 << 20));
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, pvm, 7 << 20, size - (7 << 20), 7 << 20);
    fs.closeSync(fd);
    const pool = new HashPool(2);
    let fileJobs = 0;
    const hashFile = pool.hashFile.bind(pool);
    pool.hashFile = (...args) => {
      fileJobs++;
      return hashFile(...args);
    };
    const dev = await FileDevice.open(image, { size });
    const store = await SecondaryStore.open(dir, dev, { hashing: pool });
    try {
      // Two epochs hold data here and there: writes, a zeroed range, a trim; the first committed
      // (its apply runs under the hashing), the second still open.
      let seq = 0;
      for (const e of [1, 2]) {
        let records = 0;
        let bytes = 0;
        for (let i = 0; i < 6; i++) {
          const l = 512 * (1 + (rand() % 128));
          const o = (rand() % ((size - l) / 512)) * 512;
          const data = randomBytes(l, rand);
          feed(store, { t: 'w', e, s: ++seq, o }, data);
          data.copy(pvm, o);
          records++;
          bytes += l;
        }
        const z = (rand() % (size / 4096 - 64)) * 4096;
        feed(store, { t: e === 1 ? 'z' : 't', e, s: ++seq, o: z, l: 65536 });
        pvm.fill(0, z, z + 65536);
        records++;
        if (e === 1) {
          await store.seal({ t: 'seal', e, n: records, b: bytes });
          await store.commit(1);
        }
      }
      for (const alg of ['sha256', 'blake3'] as const) {
        fileJobs = 0;
        const hashes = await store.pvmHashes(0, size, 65536, alg);
        const ref = await blockHashes(
          async (buf, off) => void pvm.copy(buf, 0, off, off + buf.length),
          0,
          size,
          65536,
          {
            alg,
            pool: new HashPool(0),
          },
        );
        for (let b = 0; b < size / 65536; b++)
          expect(
            hashes.subarray(b * 16, b * 16 + 16).equals(ref.subarray(b * 16, b * 16 + 16)),
            `${alg} block ${b}`,
          ).toBe(true);
        expect(fileJobs).toBeGreaterThan(0);
      }
    } finally {
      await store.close();
      await dev.close();
      await pool.close();
    }
  });

  it('applies an epoch larger than one batch in runs of the journal: no two batches read interleaved frames', async () => {
    const s = await openStore();
    // 5,000 writes of 512 B, 768 B apart on the disk, in a shuffled order: more extents than one
    // batch takes (4,096), each its own extent, and the journal's order is not the disk's.
    const slots = Array.from({ length: 5000 }, (_, i) => i * 768);
    const rand = prng(7);
    for (let i = slots.length - 1; i > 0; i--) {
      const j = rand() % (i + 1);
      [slots[i], slots[j]] = [slots[j], slots[i]];
    }
    const model = Buffer.alloc(SIZE);
    let seq = 0;
    for (const o of slots) {
      const data = randomBytes(512, rand);
      feed(s.store, { t: 'w', e: 1, s: ++seq, o }, data);
      data.copy(model, o);
    }
    const batches: { min: number; max: number }[] = [];
    const copy = s.dev.copyRangesFromFile.bind(s.dev);
    s.dev.copyRangesFromFile = (fd, ranges, count) => {
      let min = Infinity;
      let max = -Infinity;
      for (let i = 0; i < count; i++) {
        min = Math.min(min, ranges[3 * i]);
        max = Math.max(max, ranges[3 * i]);
      }
      batches.push({ min, max });
      return copy(fd, ranges, count);
    };
    await s.store.seal({ t: 'seal', e: 1, n: slots.length, b: 512 * slots.length });
    await s.store.commit(1);
    expect((await appliedImage(s)).equals(model)).toBe(true);
    expect(batches.length).toBeGreaterThan(1);
    // Each batch is a run of the journal: one read takes neighbouring frames (interleaved
    // batches left a frame between any two of a batch's, and read each with a pread of its own).
    for (let i = 1; i < batches.length; i++) expect(batches[i].min).toBeGreaterThan(batches[i - 1].max);
    await closeStore(s);
  });
  it('refuses to make an incomplete epoch durable, and a commit of a non-durable epoch', async () => {
    const { store, dev } = await openStore();
    feed(store, { t: 'w', e: 1, s: 1, o: 0 }, Buffer.alloc(512, 1));
    await expect(store.seal({ t: 'seal', e: 1, n: 2, b: 1024 })).rejects.toThrow(
      /incomplete.*sent 2 mutations/,
    );
    await expect(store.commit(1)).rejects.toThrow(/not durable/);
    await store.close();
    await dev.close();
  });

  it('ignores resent duplicates by sequence number', async () => {
    const { store, dev } = await openStore();
    expect(feed(store, { t: 'w', e: 1, s: 1, o: 0 }, Buffer.alloc(512, 1))).toBe(true);
    expect(feed(store, { t: 'w', e: 1, s: 1, o: 0 }, Buffer.alloc(512, 1))).toBe(false);
    await store.seal({ t: 'seal', e: 1, n: 1, b: 512 });
    await store.close();
    await dev.close();
  });

  it('survives a restart between durable and commit, and after commit before apply', async () => {
    const { store, dev, dir, image } = await openStore();
    const rand = prng(3);
    const model = Buffer.alloc(SIZE);
    let s = 0;
    for (let e = 1; e <= 3; e++) {
      let bytes = 0;
      const count = 20;
      for (let i = 0; i < count; i++) {
        const off = rand() % (SIZE - 70_000);
        const data = randomBytes(1 + (rand() % 65_536), rand);
        feed(store, { t: 'w', e, s: ++s, o: off }, data);
        data.copy(model, off);
        bytes += data.length;
      }
      await store.seal({ t: 'seal', e, n: count, b: bytes });
      if (e === 1) await store.commit(1);
    }
    await store.close();
    await dev.close();
    // Restart: epoch 1 committed (applied or not), 2 and 3 durable.
    const again = await openStore(dir, image);
    expect(again.store.lastCommitted).toBe(1);
    const states = again.store.pendingEpochs().map((m) => [m.epoch, m.state]);
    // Epoch 1 may or may not have been applied before the close; 2 and 3 are durable.
    expect(states.filter(([e]) => e !== 1)).toEqual([
      [2, 'durable'],
      [3, 'durable'],
    ]);
    expect(states.filter(([e]) => e === 1).every(([, st]) => st === 'committed')).toBe(true);
    await again.store.commit(3);
    expect((await readSvm(again.store, 0, SIZE)).equals(model)).toBe(true);
    expect((await appliedImage(again)).equals(model)).toBe(true);
    await closeStore(again);
  });

  it('writes later epochs over applied journals kept as spares, and recovers one with leftover frames', async () => {
    const { store, dev, dir, image } = await openStore();
    const epochs = path.join(dir, 'epochs');
    const rand = prng(11);
    const model = Buffer.alloc(SIZE);
    const inodes = new Map<number, number>();
    let s = 0;
    /** Epoch e: `count` writes of 16 KiB (the first epochs write more, so later ones leave a leftover). */
    const epoch = async (e: number, count: number) => {
      for (let i = 0; i < count; i++) {
        const off = (rand() % (SIZE / 16_384)) * 16_384;
        const data = randomBytes(16_384, rand);
        feed(store, { t: 'w', e, s: ++s, o: off }, data);
        data.copy(model, off);
      }
      inodes.set(e, fs.statSync(path.join(epochs, `${e}.journal`)).ino);
      await store.seal({ t: 'seal', e, n: count, b: count * 16_384 });
    };
    for (let e = 1; e <= 6; e++) {
      await epoch(e, e <= 3 ? 12 : 5);
      await store.commit(e);
      await store.drainApply();
      for (let i = 0; i < 200 && store.spareJournals.ready === 0; i++) await sleep(5);
    }
    // Epochs 4-6 went into files epochs 1-3 had (each spare: renamed, never deleted).
    expect([4, 5, 6].every((e) => [1, 2, 3].map((o) => inodes.get(o)).includes(inodes.get(e)))).toBe(true);
    expect(store.spareJournals.files).toBeGreaterThan(0);
    expect(fs.readdirSync(epochs).some((f) => /^spare-\d+\.journal$/.test(f))).toBe(true);
    await epoch(7, 3); // durable, not committed, over a spare that holds 12 frames of an older epoch
    expect(fs.statSync(path.join(epochs, '7.journal')).size).toBeGreaterThan(4 * 16_384);
    await store.close();
    await dev.close();
    const again = await openStore(dir, image);
    expect(again.store.pendingEpochs()).toMatchObject([{ epoch: 7, state: 'durable', records: 3 }]);
    expect(again.store.recovery.tornTails).toEqual([]);
    expect(fs.readdirSync(epochs).filter((f) => f.startsWith('spare-'))).toEqual([]); // deleted at start
    await again.store.commit(7);
    expect((await appliedImage(again)).equals(model)).toBe(true);
    await closeStore(again);
  });

  it('a promotion deletes the spares and keeps no more (no epoch is written there again)', async () => {
    const { store, dev, dir } = await openStore();
    let s = 0;
    for (let e = 1; e <= 3; e++) {
      feed(store, { t: 'w', e, s: ++s, o: 0 }, Buffer.alloc(16_384, e));
      await store.seal({ t: 'seal', e, n: 1, b: 16_384 });
      if (e < 3) {
        await store.commit(e);
        await store.drainApply();
      }
    }
    expect(store.spareJournals.files).toBeGreaterThan(0);
    await store.promote('test: spares go');
    expect(store.spareJournals.files).toBe(0);
    const spares = () => fs.readdirSync(path.join(dir, 'epochs')).filter((f) => f.startsWith('spare-'));
    for (let i = 0; i < 200 && spares().length; i++) await sleep(5);
    expect(spares()).toEqual([]);
    await store.close();
    await dev.close();
  });

  it('keeps no spare when told to (spareJournalBytes 0), and none larger than the bound', async () => {
    for (const bound of [0, 100_000]) {
      const { store, dev, dir } = await openStore(undefined, undefined, { spareJournalBytes: bound });
      let s = 0;
      for (let e = 1; e <= 4; e++) {
        const count = e === 1 ? 8 : 2; // 128 KiB of data (over the bound), then 32 KiB
        for (let i = 0; i < count; i++)
          feed(store, { t: 'w', e, s: ++s, o: i * 16_384 }, Buffer.alloc(16_384, e));
        await store.seal({ t: 'seal', e, n: count, b: count * 16_384 });
        await store.commit(e);
        await store.drainApply();
        for (let i = 0; i < 200 && store.spareJournals.files > store.spareJournals.ready; i++) await sleep(5);
        await sleep(5);
        expect(store.spareJournals.files).toBe(e === 1 || bound === 0 ? 0 : 1);
        expect(store.spareJournals.bytes).toBeLessThanOrEqual(bound);
      }
      const spares = fs.readdirSync(path.join(dir, 'epochs')).filter((f) => f.startsWith('spare-'));
      expect(spares.length).toBe(bound === 0 ? 0 : 1);
      await store.close();
      await dev.close();
    }
  });

  it('keeps the SVM overlay across a restart (flushed writes are real data after a failover)', async () => {
    const { store, dev, dir, image } = await openStore();
    await store.svmDevice.pwrite(Buffer.from('svm data'), 5000, { fua: true });
    await store.close();
    await dev.close();
    const again = await openStore(dir, image);
    expect((await readSvm(again.store, 5000, 8)).toString()).toBe('svm data');
    await again.store.close();
    await again.dev.close();
  });

  it('refuses a state directory made for another disk size', async () => {
    const { store, dev, dir } = await openStore();
    await store.close();
    await dev.close();
    const other = path.join(root, 'other.img');
    const dev2 = await FileDevice.open(other, { size: SIZE * 2 });
    await expect(SecondaryStore.open(dir, dev2)).rejects.toThrow(/belongs to a 4194304-byte disk/);
    await dev2.close();
  });
});

// The SVM view is a BlockDevice like any other: it runs the conformance suite.
deviceSuite('SvmDevice (overlay over committed epochs over image)', async (size) => {
  const dir = path.join(root, `suite${n++}`);
  const image = dir + '.img';
  const dev = await FileDevice.open(image, { size });
  const store = await SecondaryStore.open(dir, dev);
  return {
    device: store.svmDevice,
    cleanup: async () => {
      await store.close();
      await dev.close();
      fs.rmSync(image);
    },
  };
});

describe('SecondaryStore resync marks', () => {
  it('a partial resync makes the node unpromotable, across a restart, until the done mark', async () => {
    const { History } = await import('../src/failover/history.js');
    const dir = path.join(root, `sync${n++}`);
    fs.mkdirSync(dir, { recursive: true });
    const history = History.load(nodeStorage, path.join(dir, 'history.json'));
    const image = dir + '.img';
    let dev = await FileDevice.open(image, { size: SIZE });
    let store = await SecondaryStore.open(dir, dev, { history });
    const primary = [{ n: 1, id: 'p1', by: 'p', base: 0, at: 0, reason: 'new disk' }];
    await store.startResync(10, { target: 'p1', mode: 'full' });
    feed(store, { t: 'w', e: 10, s: 1, o: 0 }, Buffer.alloc(4096, 7));
    await store.seal({ t: 'seal', e: 10, n: 1, b: 4096 });
    await store.commit(10, { state: 'partial', target: 'p1', mode: 'full' });
    await expect(store.promote('test')).rejects.toMatchObject({ code: 'EBUSY' });
    await store.close();
    await dev.close();
    dev = await FileDevice.open(image, { size: SIZE });
    store = await SecondaryStore.open(dir, dev, {
      history: History.load(nodeStorage, path.join(dir, 'history.json')),
    });
    expect(store.syncing).toMatchObject({ target: 'p1', mode: 'full' });
    await expect(store.promote('test')).rejects.toMatchObject({ code: 'EBUSY' });
    store.startSession('s2', 11);
    feed(store, { t: 'w', e: 11, s: 1, o: 4096 }, Buffer.alloc(4096, 8));
    await store.seal({ t: 'seal', e: 11, n: 1, b: 4096 });
    await store.commit(11, { state: 'done', target: 'p1', mode: 'full', history: primary });
    expect(store.syncing).toBeNull();
    expect(History.load(nodeStorage, path.join(dir, 'history.json')).last?.id).toBe('p1');
    expect(
      (await readSvm(store, 0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 7), Buffer.alloc(4096, 8)])),
    ).toBe(true);
    const r = await store.promote('test');
    expect(r.generation).toBe(2);
    expect(History.load(nodeStorage, path.join(dir, 'history.json')).generations.map((g) => g.n)).toEqual([
      1, 2,
    ]);
    await store.close();
    await dev.close();
  });
});
