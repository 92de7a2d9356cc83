/**
 * The secondary's committed copy of a VM's memory (src/checkpoint/qemu/
 * standby-ram.ts): checkpoints received, committed, discarded, reopened; and
 * power cuts at every sync of a run of checkpoints (test/power-loss.ts): after
 * any cut the store reopens to exactly one committed checkpoint (RAM image
 * and device state of the same checkpoint, never a mix), and never one older
 * than the last commit that returned.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { setIoTracer } from '../src/block/io-trace.js';
import { PAGE_BYTES } from '../src/checkpoint/qemu/ram.js';
import { StandbyRam } from '../src/checkpoint/qemu/standby-ram.js';
import { nodeStorage } from '../src/sys/storage.js';
import { recordFaults } from './fault-counts.js';
import { prng, rmDir, tmpDir } from './helpers.js';
import {
  cutPoints,
  materialize,
  powerCut,
  snapshotFiles,
  TraceRecorder,
  type CutOptions,
} from './power-loss.js';

const root = tmpDir('colo-blk-standby-ram-');
afterAll(() => {
  setIoTracer(null);
  rmDir(root);
});

const PAGES = 512; // a 2 MiB RAM
const SIZE = PAGES * PAGE_BYTES;
const sha = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex').slice(0, 16);

/**
 * A run of checkpoints: each changes some pages of the RAM and has its own
 * device state; checkpoint `fullAt` is a pairing's: a new RAM from zero,
 * carrying its every non-zero page (the pages it does not carry are zero).
 */
function checkpoints(seed: number, count: number, fullAt = 0) {
  const rand = prng(seed);
  const ram = Buffer.alloc(SIZE);
  const out: { epoch: number; pages: number[]; data: Buffer; device: Buffer; ram: Buffer; full: boolean }[] =
    [];
  for (let e = 1; e <= count; e++) {
    const full = e === fullAt;
    if (full) ram.fill(0);
    const set = new Set<number>();
    const n = 1 + (rand() % 300);
    for (let k = 0; k < n; k++) set.add(rand() % PAGES);
    const pages = [...set].sort((a, b) => a - b);
    const data = Buffer.alloc(pages.length * PAGE_BYTES);
    pages.forEach((p, i) => {
      const page = data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES);
      page.fill(e);
      page.writeUInt32LE(rand(), (rand() % 1024) * 4);
      page.copy(ram, p * PAGE_BYTES);
    });
    const device = Buffer.from(`device state of checkpoint ${e} `.repeat(1 + (rand() % 500)));
    out.push({ epoch: e, pages, data, device, ram: Buffer.from(ram), full });
  }
  return out;
}

describe('the standby copy of a VM memory', () => {
  it('commits checkpoints in order, discards the uncommitted, and reopens to the last commit', async () => {
    const dir = path.join(root, 'basic');
    const cps = checkpoints(3, 4);
    let s = await StandbyRam.open(nodeStorage, dir, SIZE);
    expect(s.committed.epoch).toBe(0);
    expect(fs.readFileSync(s.committed.ram).equals(Buffer.alloc(SIZE))).toBe(true);
    for (const c of cps.slice(0, 3)) {
      s.receive(c.epoch, c.pages, c.data, c.device);
      await s.commit(c.epoch);
      expect(s.committed.epoch).toBe(c.epoch);
      expect(sha(fs.readFileSync(s.committed.ram))).toBe(sha(c.ram));
      expect(fs.readFileSync(s.committed.device!).equals(c.device)).toBe(true);
    }
    // Received, never committed: gone at reopen; the last commit stays.
    const last = cps[3];
    s.receive(last.epoch, last.pages, last.data, last.device);
    s.close();
    s = await StandbyRam.open(nodeStorage, dir, SIZE);
    expect(s.committed.epoch).toBe(3);
    expect(sha(fs.readFileSync(s.committed.ram))).toBe(sha(cps[2].ram));
    expect(fs.readdirSync(dir).sort()).toEqual(['commits.log', 'dev-3.bin', 'ram.img']);
    // Bad input is refused with a reason, and changes nothing.
    expect(() => s.receive(3, [1], Buffer.alloc(PAGE_BYTES), Buffer.alloc(1))).toThrow(
      /not after the committed 3/,
    );
    expect(() => s.receive(5, [PAGES], Buffer.alloc(PAGE_BYTES), Buffer.alloc(1))).toThrow(/outside a RAM/);
    expect(() => s.receive(5, [1, 2], Buffer.alloc(PAGE_BYTES), Buffer.alloc(1))).toThrow(/need 8192 bytes/);
    await expect(s.commit(5)).rejects.toThrow(/was not received/);
    s.close();
    await expect(StandbyRam.open(nodeStorage, dir, SIZE * 2)).rejects.toThrow(/use another directory/);
  });

  it('after a power cut anywhere, holds exactly one committed checkpoint, never older than the last commit that returned (a full one among them: the image replaced, not patched)', async () => {
    const CHOICES: CutOptions[] = [
      { writeback: 'none', tear: 'none', metadata: 'guaranteed' },
      { writeback: 'mixed', tear: 'sector', metadata: 'random' },
      { writeback: 'all', tear: 'none', metadata: 'all' },
    ];
    const dir = path.join(root, 'cuts');
    const cps = checkpoints(11, 6, 4);
    const rams = [Buffer.alloc(SIZE), ...cps.map((c) => c.ram)];
    const devices = [null, ...cps.map((c) => c.device)];
    fs.mkdirSync(dir, { recursive: true });
    const initial = snapshotFiles(dir);
    const trace = new TraceRecorder();
    setIoTracer(trace);
    /** Trace position at which each commit returned. */
    const returned: { epoch: number; at: number }[] = [];
    try {
      // A tiny log limit: the log is rewritten during the run, and cuts land in that too.
      const s = await StandbyRam.open(nodeStorage, dir, SIZE, { compactBytes: 200 });
      for (const c of cps) {
        s.receive(c.epoch, c.pages, c.data, c.device, c.full);
        await s.commit(c.epoch);
        returned.push({ epoch: c.epoch, at: trace.position });
      }
      s.close();
    } finally {
      setIoTracer(null);
    }
    expect(
      trace.events.some((ev) => ev.op === 'rename' && ev.path.endsWith('commits.log.new')),
      'the log was rewritten during the run',
    ).toBe(true);
    const rand = prng(99);
    const points = cutPoints(
      trace.events,
      returned.map((r) => r.at),
      40,
      rand,
    );
    let cuts = 0;
    for (const k of points)
      for (const opts of CHOICES) {
        const cut = powerCut(initial, trace.events, k, opts, rand);
        const to = path.join(root, `cut-${cuts++}`);
        materialize(cut.files, dir, to);
        const s = await StandbyRam.open(nodeStorage, to, SIZE);
        const e = s.committed.epoch;
        const floor = Math.max(0, ...returned.filter((r) => r.at <= k).map((r) => r.epoch));
        const why = `${cut.notes.join('; ')}: epoch ${e}, last commit returned ${floor}`;
        expect(e, why).toBeGreaterThanOrEqual(floor);
        expect(sha(fs.readFileSync(s.committed.ram)), why).toBe(sha(rams[e]));
        if (e === 0) expect(s.committed.device, why).toBeNull();
        else expect(fs.readFileSync(s.committed.device!).equals(devices[e]!), why).toBe(true);
        s.close();
        rmDir(to);
      }
    expect(cuts).toBeGreaterThan(30);
    recordFaults('standby RAM power cuts', cuts, 'cuts recovered and checked');
  });
});
