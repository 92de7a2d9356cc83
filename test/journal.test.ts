// Journal files: append and scan back, torn tails vs corruption in the middle.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { JournalWriter, scanJournal } from '../src/checkpoint/format/journal.js';
import { prng, randomBytes, rmDir, tmpDir } from './helpers.js';
import { nodeStorage } from '../src/sys/storage.js';

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
});
