// Journal files: append and scan back, torn tails vs corruption in the middle.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { JournalWriter, scanJournal } from '../src/checkpoint/format/journal.js';
import { epochJournal } from '../src/checkpoint/format/records.js';
import { prng, randomBytes, rmDir, slowSyncStorage, tmpDir } from './helpers.js';
import { nodeStorage, type Storage, type StorageFile } from '../src/sys/storage.js';
import { encodeFrame } from '../src/checkpoint/format/frame.js';
import { CommitJournal } from '../src/checkpoint/secondary/commit-journal.js';

const dir = tmpDir();
afterAll(() => rmDir(dir));

function writeJournal(name: string, n: number) {
  const p = path.join(dir, name);
  const j = JournalWriter.open(nodeStorage, p);
  const rand = prng(n);
  const datas: Buffer[] = [];
  const offsets: number[] = [];
  for (let i = 0; i < n; i++) {
    const data = randomBytes(1 + (rand() % 5000), rand);
    datas.push(data);
    offsets.push(j.append({ t: 'w', s: i, o: i * 4096 }, data).offset);
  }
  return { p, j, datas, offsets };
}

describe('journal', () => {
  it('scans back every record with its data position', async () => {
    const { p, j, datas } = writeJournal('a.journal', 50);
    await j.sync();
    expect(j.unsyncedBytes).toBe(0);
    const seen: number[] = [];
    const r = scanJournal<{ s: number }>(nodeStorage, p, (rec) => {
      const buf = Buffer.alloc(rec.dataLength);
      j.read(buf, rec.dataPos);
      expect(buf.equals(datas[rec.meta.s])).toBe(true);
      seen.push(rec.meta.s);
    });
    j.close();
    expect(seen).toEqual([...Array(50).keys()]);
    expect(r).toMatchObject({ records: 50, tornTail: null, corruption: null, validEnd: fs.statSync(p).size });
  });

  it('a sync waiting behind another never starts an fdatasync once the journal is closed', async () => {
    // The second sync waits for the first; the close, meanwhile, closes the descriptor as soon as
    // the first is done. Before the fix the second then issued its own fdatasync on that
    // descriptor: EBADF on a busy thread pool (an unhandled rejection in a loaded CI run).
    const { storage, state } = slowSyncStorage(20);
    const j = JournalWriter.open(storage, path.join(dir, 'close-race.journal'));
    j.append({ t: 'a' }, Buffer.alloc(1000, 1));
    const first = j.sync();
    j.append({ t: 'b' }, Buffer.alloc(1000, 2));
    const second = j.sync();
    j.close();
    await first; // the sync in flight at the close completes: its caller gets its answer
    await expect(second).rejects.toMatchObject({ code: 'ESHUTDOWN' });
    expect(state.closedSyncs).toBe(0);
  });

  it('reports a torn tail at every cut point of the last record, and reopening truncates it', () => {
    const { p, j, offsets } = writeJournal('b.journal', 5);
    j.close();
    const full = fs.readFileSync(p);
    const last = offsets[4];
    for (let cut = last + 1; cut < full.length; cut += 97) {
      fs.writeFileSync(p, full.subarray(0, cut));
      const r = scanJournal(nodeStorage, p, () => {});
      expect(r.records).toBe(4);
      expect(r.validEnd).toBe(last);
      expect(r.tornTail?.offset).toBe(last);
      expect(r.corruption).toBeNull();
    }
    const w = JournalWriter.open(nodeStorage, p, last);
    expect(fs.statSync(p).size).toBe(last);
    w.append({ t: 'w', s: 99 });
    w.close();
    expect(scanJournal(nodeStorage, p, () => {}).records).toBe(5);
  });

  it('refuses to read past corruption in the middle', () => {
    const { p, j, offsets } = writeJournal('c.journal', 10);
    j.close();
    const buf = fs.readFileSync(p);
    buf[offsets[3] + 40] ^= 0xff; // inside record 3's body
    fs.writeFileSync(p, buf);
    let count = 0;
    const r = scanJournal(nodeStorage, p, () => count++);
    expect(count).toBe(3);
    expect(r.corruption?.offset).toBe(offsets[3]);
    expect(r.corruption?.reason).toMatch(/checksum/);
    expect(r.tornTail).toBeNull();
  });

  it('treats a damaged final record as a torn tail', () => {
    const { p, j, offsets } = writeJournal('d.journal', 4);
    j.close();
    const buf = fs.readFileSync(p);
    buf[buf.length - 1] ^= 0x55;
    fs.writeFileSync(p, buf);
    const r = scanJournal(nodeStorage, p, () => {});
    expect(r.records).toBe(3);
    expect(r.tornTail?.offset).toBe(offsets[3]);
  });

  describe('an epoch journal written over a spare (scanned with its epoch)', () => {
    /** A spare holding `old` frames of epoch 3 (4 KiB of data each), then `fresh` frames of epoch 5 written over its start. */
    function overSpare(name: string, old: number, fresh: number) {
      const p = path.join(dir, name);
      const spare = JournalWriter.open(nodeStorage, p);
      for (let i = 0; i < old; i++) spare.append({ t: 'w', e: 3, s: i, o: i * 4096 }, Buffer.alloc(4096, 3));
      spare.close();
      const j = JournalWriter.overwrite(nodeStorage, p);
      const offsets: number[] = [];
      for (let i = 0; i < fresh; i++)
        offsets.push(j.append({ t: 'w', e: 5, s: 100 + i, o: i * 4096 }, Buffer.alloc(4096, 5)).offset);
      j.close();
      return { p, offsets, end: j.size };
    }

    it('ends at the first frame of another epoch: the bytes left from the earlier use', () => {
      const { p, end } = overSpare('spare-a.journal', 6, 2);
      const seen: number[] = [];
      const r = scanJournal<{ e: number }>(nodeStorage, p, (rec) => seen.push(rec.meta.e), {
        bounds: epochJournal(5),
      });
      expect(seen).toEqual([5, 5]);
      expect(r).toMatchObject({ records: 2, validEnd: end, tornTail: null, corruption: null });
      expect(r.leftover).toEqual({ offset: end });
      // Without its epoch, the scan would take the leftover frames for its own.
      expect(scanJournal(nodeStorage, p, () => {}).records).toBe(6);
    });

    it('a torn frame followed by leftover frames is a torn tail, not corruption', () => {
      const { p, offsets } = overSpare('spare-b.journal', 6, 2);
      const buf = fs.readFileSync(p);
      buf[offsets[1] + 100] ^= 0xff; // the second frame of epoch 5, half written
      fs.writeFileSync(p, buf);
      const r = scanJournal(nodeStorage, p, () => {}, { bounds: epochJournal(5) });
      expect(r.records).toBe(1);
      expect(r.tornTail?.offset).toBe(offsets[1]);
      expect(r.corruption).toBeNull();
      // Unscoped, the intact frame after it looks like data past a damaged one.
      expect(scanJournal(nodeStorage, p, () => {}).corruption?.offset).toBe(offsets[1]);
    });

    it('a damaged frame followed by a frame of the same epoch is still corruption', () => {
      const { p, offsets } = overSpare('spare-c.journal', 6, 4);
      const buf = fs.readFileSync(p);
      buf[offsets[1] + 100] ^= 0xff;
      fs.writeFileSync(p, buf);
      const r = scanJournal(nodeStorage, p, () => {}, { bounds: epochJournal(5) });
      expect(r.records).toBe(1);
      expect(r.corruption?.offset).toBe(offsets[1]);
      expect(r.tornTail).toBeNull();
    });
  });
});

describe('journal on a disk that fills up', () => {
  /** nodeStorage, but writes fail with `error` while `full` is set (after writing `partial` bytes of the batch). */
  function fillable(error: string) {
    /** `once`: the disk has room again right after one write is refused (space freed meanwhile). */
    const state = { full: false, partial: 0, refused: 0, once: false };
    const storage: Storage = Object.create(nodeStorage) as Storage;
    storage.open = (p: string): StorageFile => {
      const f = nodeStorage.open(p);
      return Object.assign(Object.create(f) as StorageFile, {
        writev(buffers: readonly Buffer[], pos: number): void {
          if (!state.full) return f.writev(buffers, pos);
          state.refused++;
          if (state.once) state.full = false;
          if (state.partial) f.writev([Buffer.concat(buffers as Buffer[]).subarray(0, state.partial)], pos);
          throw Object.assign(new Error(`${error}: simulated`), { code: error });
        },
      });
    };
    return { storage, state };
  }

  it('ENOSPC: nothing given is lost, appends are refused while full, and all of it is written once there is space', async () => {
    const { storage, state } = fillable('ENOSPC');
    const p = path.join(dir, 'full.journal');
    const j = JournalWriter.open(storage, p);
    const datas = [Buffer.alloc(3000, 1), Buffer.alloc(5000, 2)];
    j.append({ t: 'w', s: 0, o: 0 }, datas[0]);
    await j.sync();
    // A record appended, then the disk fills: its flush writes a part of it and fails.
    const reused = Buffer.alloc(7000, 3);
    j.appendRaw(encodeFrame({ t: 'w', s: 1, o: 4096 }, reused), reused.length);
    state.full = true;
    state.partial = 100;
    await expect(j.sync()).rejects.toMatchObject({ code: 'ENOSPC' });
    reused.fill(0xee); // the caller reuses its buffer once the turn is over
    expect(() => j.append({ t: 'w', s: 2, o: 8192 }, datas[1]), 'an append while the disk is full').toThrow(
      /ENOSPC/,
    );
    state.full = false;
    j.append({ t: 'w', s: 2, o: 8192 }, datas[1]);
    await j.sync();
    j.close();
    const recs: { s: number; data: Buffer }[] = [];
    const scan = scanJournal<{ s: number }>(
      nodeStorage,
      p,
      (r) => recs.push({ s: r.meta.s, data: Buffer.from(r.data!) }),
      {
        withData: true,
      },
    );
    expect(scan.corruption).toBeNull();
    expect(scan.tornTail).toBeNull();
    expect(recs.map((r) => r.s)).toEqual([0, 1, 2]);
    expect(recs[1].data.equals(Buffer.alloc(7000, 3)), 'the record written after the failure').toBe(true);
    expect(recs[2].data.equals(datas[1])).toBe(true);
    expect(state.refused).toBeGreaterThan(0);
  });

  it('a commit record that failed never appears: not when space is freed at once, not after a restart', async () => {
    const { storage, state } = fillable('ENOSPC');
    const p = path.join(dir, 'commits.journal');
    const { journal } = CommitJournal.open(storage, p);
    await journal.record({ t: 'commit', e: 1, overlay: 2, at: 1 });
    const good = fs.statSync(p).size;
    // A fold (the SVM's overlay 2 becomes layer 2, overlay 3 the current one) fails part-way;
    // the disk has room again before the failed writer is closed.
    state.full = true;
    state.once = true;
    state.partial = 20;
    await expect(journal.record({ t: 'fold', overlay: 2, next: 3, at: 2 })).rejects.toMatchObject({
      code: 'ENOSPC',
    });
    expect(fs.statSync(p).size, 'bytes of the failed record are left in the file').toBe(good);
    journal.close();
    // A restart (the process gave up on the failure): overlay 2 is still the current one.
    const again = CommitJournal.open(nodeStorage, p);
    expect(again.state.overlayId).toBe(2);
    expect(again.state.foldedIds).toEqual([]);
    expect(again.scan?.tornTail ?? null).toBeNull();
    // And the next record goes where the failed one would have been.
    await again.journal.record({ t: 'commit', e: 2, overlay: 2, at: 3 });
    again.journal.close();
    expect(CommitJournal.open(nodeStorage, p).state.lastCommitted).toBe(2);
  });

  it('EIO: the journal fails for good', async () => {
    const { storage, state } = fillable('EIO');
    const j = JournalWriter.open(storage, path.join(dir, 'eio.journal'));
    state.full = true;
    j.append({ t: 'w', s: 0, o: 0 }, Buffer.alloc(100, 1));
    await expect(j.sync()).rejects.toMatchObject({ code: 'EIO' });
    state.full = false;
    expect(() => j.append({ t: 'w', s: 1, o: 0 }, Buffer.alloc(100, 1))).toThrow(/EIO/);
    await expect(j.sync()).rejects.toMatchObject({ code: 'EIO' });
    j.close();
  });
});
