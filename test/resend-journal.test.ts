/**
 * The primary's resend buffer (src/checkpoint/format/resend-journal.ts):
 * frames in memory chunks up to a shared budget, then in a file; read back
 * as one stream at any position; the live views are the frames' bytes; a
 * chunk is reused only when its epoch is dropped and no queued write holds
 * it; a clean stop leaves the whole stream in the journal file.
 */
import fs from 'node:fs';
import path from 'node:path';
import v8 from 'node:v8';
import { afterAll, describe, expect, it } from 'vitest';
import { encodeFrame } from '../src/checkpoint/format/frame.js';
import { scanJournal } from '../src/checkpoint/format/journal.js';
import { CHUNK_BYTES, ResendJournal, ResendMemory } from '../src/checkpoint/format/resend-journal.js';
import { PrimaryLog } from '../src/checkpoint/primary/log.js';
import { realRandom } from '../src/sys/clock.js';
import { nodeStorage } from '../src/sys/storage.js';
import { prng, randomBytes, rmDir, tmpDir } from './helpers.js';

const dirs: string[] = [];
afterAll(() => dirs.forEach(rmDir));
const fresh = () => {
  const d = tmpDir('colo-blk-resend-');
  dirs.push(d);
  return d;
};

/** Frames of random sizes, some larger than a chunk. */
function frames(seed: number, n: number) {
  const rand = prng(seed);
  return Array.from({ length: n }, (_, i) => {
    const big = i % 5 === 4;
    const len = big ? CHUNK_BYTES + (rand() % 100_000) : rand() % 200_000;
    return { meta: { t: 'w', o: i * 4096, s: i + 1, e: 1 }, data: randomBytes(len, rand) };
  });
}

describe('resend journal', () => {
  for (const budget of [0, 2 * CHUNK_BYTES, 64 * CHUNK_BYTES])
    it(`holds the stream exactly, in memory and past the budget (${budget / CHUNK_BYTES} chunks)`, () => {
      const dir = fresh();
      const memory = new ResendMemory(budget);
      const j = new ResendJournal(nodeStorage, path.join(dir, '1.journal'), memory);
      const fs_ = frames(budget + 5, 30);
      const expected: Buffer[] = [];
      let border = -1;
      for (const f of fs_) {
        const r = j.append(f.meta, f.data);
        if (!r.inMemory && border < 0) border = r.offset;
        const parts = encodeFrame(f.meta, f.data);
        const bytes = Buffer.concat(parts);
        expect(r.offset).toBe(Buffer.concat(expected).length);
        expect(r.bytes).toBe(bytes.length);
        expect(r.dataPos).toBe(r.offset + parts[0].length);
        expect(Buffer.concat(r.parts).equals(bytes)).toBe(true);
        if (r.inMemory) {
          const held = j.viewsAt(r.offset, r.bytes)!;
          expect(Buffer.concat(held.views).equals(bytes)).toBe(true);
          held.release();
        }
        expected.push(bytes);
      }
      const all = Buffer.concat(expected);
      expect(j.size).toBe(all.length);
      expect(j.spilled).toBe(budget < all.length);
      // Any range reads back, across chunks and across the memory/file border.
      expect(border !== 0 || budget === 0).toBe(true);
      if (border > 0) {
        const buf = Buffer.alloc(Math.min(300, all.length - border + 100));
        j.read(buf, border - 100);
        expect(buf.equals(all.subarray(border - 100, border - 100 + buf.length)), 'across the border').toBe(
          true,
        );
      }
      const rand = prng(9);
      for (let k = 0; k < 200; k++) {
        const from = rand() % all.length;
        const len = Math.min(all.length - from, rand() % (2 * CHUNK_BYTES));
        const buf = Buffer.alloc(len);
        j.read(buf, from);
        expect(buf.equals(all.subarray(from, from + len)), `${from}+${len}`).toBe(true);
      }
      // The sender's zero-copy reads: the memory part as views, the file part refused.
      for (let k = 0; k < 50; k++) {
        const from = rand() % all.length;
        const len = 1 + Math.min(all.length - from - 1, rand() % (2 * CHUNK_BYTES));
        const held = j.viewsAt(from, len);
        const inMemory = border < 0 || from + len <= border;
        expect(held !== null, `views at ${from}+${len}`).toBe(inMemory);
        if (held) {
          expect(Buffer.concat(held.views).equals(all.subarray(from, from + len))).toBe(true);
          held.release();
        }
      }
      // Scanned as a journal (inspection): every frame.
      const scan = scanJournal(nodeStorage, j.path, () => {}, { file: j.asFile() });
      expect(scan.records).toBe(fs_.length);
      expect(scan.corruption).toBeNull();
      j.close();
      expect(memory.usedBytes).toBe(0);
    });

  for (const budget of [0, 2 * CHUNK_BYTES, 64 * CHUNK_BYTES])
    it(`keeps none of the caller's buffers: data overwritten after append, as a reused NBD payload buffer is, changes nothing (${budget / CHUNK_BYTES} chunks)`, () => {
      const dir = fresh();
      const memory = new ResendMemory(budget);
      const j = new ResendJournal(nodeStorage, path.join(dir, '1.journal'), memory);
      const rand = prng(budget + 77);
      const expected: Buffer[] = [];
      const sent: Buffer[] = [];
      // Below the file writer's flush size, so a frame in the file part waits for a later turn.
      for (let i = 0; i < 40; i++) {
        const data = randomBytes(1 + (rand() % 300_000), rand);
        const meta = { t: 'w', o: i * 4096, s: i + 1, e: 1 };
        // Two pieces, as a payload arrives in socket chunks.
        const cut = rand() % data.length;
        const pieces = [data.subarray(0, cut), data.subarray(cut)];
        expected.push(Buffer.concat(encodeFrame(meta, Buffer.from(data))));
        const r = j.append(meta, pieces);
        for (const p of r.parts) expect(p.buffer).not.toBe(data.buffer);
        sent.push(Buffer.concat(r.parts)); // what the link would send now
        data.fill(0xee); // the caller reuses its buffer at once
      }
      const all = Buffer.concat(expected);
      expect(Buffer.concat(sent).equals(all)).toBe(true);
      expect(j.spilled).toBe(budget < all.length);
      const back = Buffer.alloc(all.length);
      j.read(back, 0);
      expect(back.equals(all)).toBe(true);
      j.close();
    });

  it('reuses a chunk only once its epoch is dropped and no queued write holds it', () => {
    const dir = fresh();
    const memory = new ResendMemory(2 * CHUNK_BYTES);
    const a = new ResendJournal(nodeStorage, path.join(dir, '1.journal'), memory);
    const r = a.append({ t: 'w', o: 0, s: 1, e: 1 }, Buffer.alloc(CHUNK_BYTES + 10, 7));
    expect(r.inMemory).toBe(true);
    const held = a.viewsAt(r.offset, r.bytes)!; // a socket still has it queued
    const release = held.release;
    a.close();
    expect(memory.usedBytes).toBe(2 * CHUNK_BYTES);
    // The budget is held: a new epoch goes to its file.
    const b = new ResendJournal(nodeStorage, path.join(dir, '2.journal'), memory);
    expect(b.append({ t: 'w', o: 0, s: 2, e: 2 }, Buffer.alloc(100, 1)).inMemory).toBe(false);
    // The write went out: the chunks come back, and the queued bytes were never overwritten.
    expect(
      Buffer.concat(held.views)
        .subarray(-10)
        .every((x) => x === 7),
    ).toBe(true);
    release();
    release(); // twice is once
    expect(memory.usedBytes).toBe(0);
    const c = new ResendJournal(nodeStorage, path.join(dir, '3.journal'), memory);
    expect(c.append({ t: 'w', o: 0, s: 3, e: 3 }, Buffer.alloc(100, 2)).inMemory).toBe(true);
    b.close();
    c.close();
  });

  it('places consecutive frames one after another in one chunk (chunk, at), held by the sender until released', () => {
    const dir = fresh();
    const memory = new ResendMemory(2 * CHUNK_BYTES);
    const a = new ResendJournal(nodeStorage, path.join(dir, '1.journal'), memory);
    const meta = { t: 'w', o: 0, s: 1, e: 1 };
    const data = Buffer.alloc(4096, 3);
    const r1 = a.append(meta, data);
    const r2 = a.append({ ...meta, s: 2 }, data);
    expect(r1.chunk).not.toBeNull();
    expect(r2.chunk).toBe(r1.chunk);
    expect(r2.at).toBe(r1.at + r1.bytes); // a run of the chunk's bytes: what the link sends as one view
    const run = r1.chunk!.subarray(r1.at, r2.at + r2.bytes);
    expect(
      run.equals(Buffer.concat([...encodeFrame(meta, data), ...encodeFrame({ ...meta, s: 2 }, data)])),
    ).toBe(true);
    a.hold(run);
    expect(a.releaserOf(r1.parts[0])).toBe(a.releaserOf(run)); // one function per chunk, not one per frame
    // A frame across two chunks is not in one: the sender takes viewsAt.
    const big = a.append({ ...meta, s: 3 }, Buffer.alloc(CHUNK_BYTES, 4));
    expect(big.inMemory).toBe(true);
    expect(big.chunk).toBeNull();
    a.close();
    expect(memory.usedBytes).toBe(CHUNK_BYTES); // the epoch is gone; the queued run holds its chunk
    expect(
      run.equals(Buffer.concat([...encodeFrame(meta, data), ...encodeFrame({ ...meta, s: 2 }, data)])),
    ).toBe(true);
    a.releaserOf(run)();
    expect(memory.usedBytes).toBe(0);
  });

  it('holds the chunks under views taken for sending until they are released', () => {
    const dir = fresh();
    const memory = new ResendMemory(2 * CHUNK_BYTES);
    const a = new ResendJournal(nodeStorage, path.join(dir, '1.journal'), memory);
    a.append({ t: 'w', o: 0, s: 1, e: 1 }, Buffer.alloc(CHUNK_BYTES + 10, 7));
    const held = a.viewsAt(CHUNK_BYTES - 5, 20)!; // across the two chunks
    expect(held.views.length).toBe(2);
    a.close();
    expect(memory.usedBytes).toBe(2 * CHUNK_BYTES); // the epoch is gone; the queued bytes are not
    held.release();
    held.release(); // twice is once
    expect(memory.usedBytes).toBe(0);
  });

  it('a clean stop leaves the whole stream, memory part first, in its journal file', () => {
    const dir = fresh();
    const memory = new ResendMemory(CHUNK_BYTES);
    const file = path.join(dir, '4.journal');
    const j = new ResendJournal(nodeStorage, file, memory);
    // Small frames in memory, then one that does not fit: the rest in the file.
    const fs_ = [
      ...frames(3, 12).filter((f) => f.data.length < CHUNK_BYTES / 16),
      { meta: { t: 'w', o: 0, s: 99, e: 1 }, data: Buffer.alloc(CHUNK_BYTES, 5) },
      { meta: { t: 'w', o: 0, s: 100, e: 1 }, data: Buffer.alloc(1000, 6) },
    ];
    const all = Buffer.concat(fs_.map((f) => Buffer.concat(encodeFrame(f.meta, f.data))));
    for (const f of fs_) j.append(f.meta, f.data);
    expect(j.spilled).toBe(true);
    j.close({ keep: true });
    expect(fs.readFileSync(file).equals(all)).toBe(true);
    expect(fs.existsSync(`${file}.tmp`)).toBe(false);
    // Dropped (not kept): nothing is left.
    const k = new ResendJournal(nodeStorage, path.join(dir, '5.journal'), memory);
    k.append({ t: 'w', o: 0, s: 1, e: 5 }, Buffer.alloc(10));
    k.close();
    expect(fs.existsSync(path.join(dir, '5.journal'))).toBe(false);
  });
});

describe('primary log: releasing epochs the secondary holds durably', () => {
  it('lets an in-memory epoch go at once, a spilled one only without keepSpilled (at the commit)', () => {
    const dir = fresh();
    const plog = new PrimaryLog(nodeStorage, dir, 1, 1 << 30, realRandom, 2 * CHUNK_BYTES);
    const rand = prng(7);
    // Epoch 1 fits in memory; epoch 2 overflows the two chunks (a file part).
    plog.append({ t: 'w', o: 0 }, randomBytes(1000, rand));
    plog.seal();
    for (let i = 0; i < 3; i++) plog.append({ t: 'w', o: i * 4096 }, randomBytes(CHUNK_BYTES, rand));
    plog.seal();
    expect(plog.epoch(1).journal!.spilled).toBe(false);
    expect(plog.epoch(2).journal!.spilled).toBe(true);
    expect(fs.existsSync(path.join(dir, '2.journal'))).toBe(true);
    // The durable answer for 2 (covering 1): 1 goes, 2 (spilled) stays, file and all.
    plog.releaseThrough(2, { keepSpilled: true });
    expect(plog.heldEpochs().map((e) => e.epoch)).toEqual([2, 3]);
    expect(plog.epoch(2).journal).not.toBeNull();
    // The commit: 2 goes too.
    plog.releaseThrough(2);
    expect(plog.heldEpochs().map((e) => e.epoch)).toEqual([3]);
    expect(plog.heldBytes).toBe(0);
    plog.close();
  });
});

describe('primary log: records keep one hidden class', () => {
  it('gives the records of a long run one V8 map, so the encoder and the link stay on their fast paths', () => {
    // `{ ...m, e, s }` gave each record a map of its own once V8 optimised
    // append (Node 20): ~0.85 µs a record and every downstream inline cache
    // missing (a quarter of the replicating primary's CPU at 4 KiB writes).
    v8.setFlagsFromString('--allow-natives-syntax');
    const sameMap = new Function('a', 'b', 'return %HaveSameMap(a, b)') as (a: object, b: object) => boolean;
    const plog = new PrimaryLog(nodeStorage, fresh(), 1, 1 << 30, realRandom, 4 * CHUNK_BYTES);
    const data = Buffer.alloc(16);
    const kept: object[] = [];
    for (let i = 0; i < 60_000; i++) {
      const r = plog.append({ t: 'w', o: (i * 4096) % (1 << 30), f: undefined }, data);
      if (i >= 59_990) kept.push(r);
      if (i % 1000 === 999) plog.releaseThrough(plog.seal().e);
    }
    for (const r of kept.slice(1)) expect(sameMap(kept[0], r)).toBe(true);
    expect(kept[0]).toMatchObject({ t: 'w', e: plog.current - 1, s: 59_991 });
    plog.close();
  });
});
