// The mutation-coverage net for the two wrappers that matter most: the
// primary's ReplicatingDevice and the SwitchDevice a promoted node serves its
// export through. Both run the device conformance suite; then a mirror suite
// replays everything the primary logged (the frames the link would carry)
// onto a second device after every operation and compares the bytes: every
// mutating command with and without FUA, overlapping and concurrent requests
// (with random delays, so they really interleave), swaps of the switch's
// backend under load, and local failures part-way through a mutation. A
// range where the two differ must be recorded as out of sync (and the
// activity log must name it), never silently different.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  writePieces,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from '../src/block/device.js';
import { MemoryDevice } from '../src/block/memory.js';
import { SwitchDevice } from '../src/block/switch.js';
import { decodeFrame } from '../src/checkpoint/format/frame.js';
import { PrimaryLog } from '../src/checkpoint/primary/log.js';
import type { MutationRecord } from '../src/checkpoint/format/records.js';
import { ReplicatingDevice } from '../src/checkpoint/primary/replicating-device.js';
import { ColoError } from '../src/errors.js';
import { ActivityLog } from '../src/failover/activity.js';
import { NbdClient } from '../src/net/client.js';
import { Cmd, COMMANDS } from '../src/net/protocol.js';
import { deviceSuite } from './device-suite.js';
import { prng, randomBytes, rmDir, splitPieces, startServer, tmpDir } from './helpers.js';
import { nodeStorage } from '../src/sys/storage.js';

const dirs: string[] = [];
afterAll(() => dirs.forEach(rmDir));
function fresh(): string {
  const d = tmpDir('colo-blk-mirror-');
  dirs.push(d);
  return d;
}

/** A primary's disk: a ReplicatingDevice over `local`, with its log and activity log in a fresh directory. */
function replicating(local: BlockDevice) {
  const dir = fresh();
  const plog = new PrimaryLog(nodeStorage, path.join(dir, 'epochs'), 1, 1 << 30);
  const activity = ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), local.size);
  const device = new ReplicatingDevice(local, plog, activity);
  return {
    device,
    plog,
    activity,
    cleanup: async () => {
      plog.close();
      await activity.close();
    },
  };
}

deviceSuite('ReplicatingDevice', async (size) => {
  const r = replicating(new MemoryDevice(size));
  return { device: r.device, cleanup: r.cleanup };
});
deviceSuite('SwitchDevice', async (size) => ({ device: new SwitchDevice(new MemoryDevice(size)) }));
deviceSuite('SwitchDevice over a ReplicatingDevice', async (size) => {
  const r = replicating(new MemoryDevice(size));
  return { device: new SwitchDevice(r.device), cleanup: r.cleanup };
});

/**
 * A local disk that misbehaves on request: random delays before a mutation
 * lands and after (so concurrent requests land and complete out of order, and
 * not always in the same order as each other), and failures part-way through a mutation
 * (part of a write lands, a zeroing stops after a chunk) or a failing read.
 */
class FaultyDevice implements BlockDevice {
  /** Probability (0..1) that a mutation fails part-way. */
  failRate = 0;
  /** The next read-back fails too (so the range cannot be logged: out of sync). */
  failReads = false;
  failures = 0;
  /** Writes done through pwritevNow. */
  writtenNow = 0;
  constructor(
    readonly inner: MemoryDevice,
    private readonly rand: () => number,
  ) {}
  get size(): number {
    return this.inner.size;
  }
  get caps(): Capabilities {
    return this.inner.caps;
  }
  private async jitter(): Promise<void> {
    const r = this.rand() % 4;
    if (r === 1) await new Promise<void>((res) => setImmediate(res));
    else if (r === 2) await new Promise<void>((res) => setTimeout(res, this.rand() % 3));
  }
  private failing(): boolean {
    return this.failRate > 0 && this.rand() % 1000 < this.failRate * 1000;
  }
  async pread(buf: Buffer, offset: number): Promise<void> {
    await this.jitter();
    if (this.failReads) throw new ColoError('EIO', 'injected read failure');
    return this.inner.pread(buf, offset);
  }
  async pwrite(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void> {
    await this.jitter();
    if (this.failing()) {
      this.failures++;
      const part = buf.length > 1 ? this.rand() % buf.length : 0;
      if (part) await this.inner.pwrite(buf.subarray(0, part), offset);
      throw new ColoError('EIO', `injected failure after ${part} of ${buf.length} bytes`);
    }
    void opts; // a memory disk is durable as soon as written
    await this.inner.pwrite(buf, offset);
    // The bytes have landed; the completion may still come late (a pool thread's callback
    // queued behind another's): overlapping writes then complete in another order than they landed.
    await this.jitter();
  }
  /** Half the time a write is done at once (the replicating device's fast path), failing as pwrite does. */
  pwritevNow(bufs: readonly Buffer[], offset: number): boolean {
    if (this.rand() % 2 === 0) return false;
    this.writtenNow++;
    const buf = bufs.length === 1 ? bufs[0] : Buffer.concat(bufs);
    if (this.failing()) {
      this.failures++;
      const part = buf.length > 1 ? this.rand() % buf.length : 0;
      if (part) this.inner.pwritevNow([buf.subarray(0, part)], offset);
      throw new ColoError('EIO', `injected failure after ${part} of ${buf.length} bytes`);
    }
    return this.inner.pwritevNow([buf], offset);
  }
  preadNow(buf: Buffer, offset: number): boolean {
    if (this.failReads) throw new ColoError('EIO', 'injected read failure');
    return this.inner.preadNow(buf, offset);
  }
  async zero(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await this.jitter();
    if (this.failing()) {
      this.failures++;
      const part = length > 1 ? this.rand() % length : 0;
      if (part) await this.inner.zero(offset, part, opts);
      throw new ColoError('EIO', `injected failure after zeroing ${part} of ${length} bytes`);
    }
    await this.inner.zero(offset, length, opts);
    await this.jitter(); // landed; the completion may come late
  }
  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.zero(offset, length, { ...opts, mayTrim: true });
  }
  async flush(): Promise<void> {
    await this.jitter();
    return this.inner.flush();
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.inner.extents(offset, length);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache(offset, length);
  }
  async close(): Promise<void> {}
}

/** Applies the frames a primary logs (as the link would carry them) to a device, in order. */
class Mirror {
  readonly device: MemoryDevice;
  private chain: Promise<void> = Promise.resolve();
  records = 0;
  constructor(size: number) {
    this.device = new MemoryDevice(size);
  }
  attach(plog: PrimaryLog): void {
    plog.onAppend = (_epoch, r) => {
      const f = decodeFrame<MutationRecord | { t: 'seal' }>(Buffer.concat(r.parts))!;
      const rec = f.meta;
      const data = Buffer.from(f.data);
      if (rec.t === 'seal') return;
      this.records++;
      this.chain = this.chain.then(() =>
        rec.t === 'w'
          ? this.device.pwrite(data, rec.o)
          : this.device.zero(rec.o, rec.l, { mayTrim: rec.t === 't' || rec.h === true }),
      );
    };
  }
  settled(): Promise<void> {
    return this.chain;
  }
}

async function readAll(dev: BlockDevice): Promise<Buffer> {
  const buf = Buffer.alloc(dev.size);
  await dev.pread(buf, 0);
  return buf;
}

/** Byte ranges where two buffers differ. */
function differences(a: Buffer, b: Buffer): { offset: number; length: number }[] {
  const out: { offset: number; length: number }[] = [];
  const step = 4096;
  for (let o = 0; o < a.length; o += step) {
    const end = Math.min(a.length, o + step);
    if (a.compare(b, o, end, o, end) === 0) continue;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === o) last.length += end - o;
    else out.push({ offset: o, length: end - o });
  }
  return out;
}

const covered = (r: { offset: number; length: number }, by: { offset: number; length: number }[]) =>
  by.some((x) => x.offset <= r.offset && r.offset + r.length <= x.offset + x.length);

interface MirrorStats {
  ops: number;
  failures: number;
  outOfSync: number;
  swaps: number;
  records: number;
  writtenNow: number;
}

/**
 * One seeded mirror run: random batches of concurrent mutations (overlapping
 * on purpose: a small disk), with optional injected failures and backend
 * swaps; after every batch the mirror must equal the primary, or the primary
 * must have marked its peer out of sync with every differing range in its
 * activity log; then a resync (seal, resume logging, resend those ranges)
 * makes them equal again.
 */
async function mirrorRun(
  seed: number,
  opts: { failRate?: number; failReads?: boolean; switch?: boolean; batches?: number },
): Promise<MirrorStats> {
  const SIZE = 1 << 20;
  const rand = prng(seed);
  const local = new FaultyDevice(new MemoryDevice(SIZE, { pageBytes: 4096 }), rand);
  const r = replicating(local);
  const mirror = new Mirror(SIZE);
  mirror.attach(r.plog);
  const sw = new SwitchDevice(r.device);
  const dev: BlockDevice = opts.switch ? sw : r.device;
  const stats: MirrorStats = { ops: 0, failures: 0, outOfSync: 0, swaps: 0, records: 0, writtenNow: 0 };
  const where = () => `seed ${seed}`;
  try {
    for (let batch = 0; batch < (opts.batches ?? 60); batch++) {
      local.failRate = opts.failRate ?? 0;
      local.failReads = (opts.failReads ?? false) && rand() % 3 === 0;
      const ops: Promise<unknown>[] = [];
      const n = 1 + (rand() % 6);
      for (let i = 0; i < n; i++) {
        const off = rand() % SIZE;
        const len = 1 + (rand() % Math.min(96 * 1024, SIZE - off));
        const fua = rand() % 2 === 0;
        const k = rand() % 8;
        stats.ops++;
        // A third of them are issued a little later: they arrive while earlier ones are
        // part-way (landed on the disk, not yet logged), not only all at once.
        const wait = rand() % 3 === 0 ? rand() % 3 : -1;
        const issue = (op: () => Promise<unknown>) =>
          ops.push(wait < 0 ? op() : new Promise((res) => setTimeout(res, wait)).then(op));
        const data = k < 3 ? randomBytes(len, rand) : Buffer.alloc(0);
        if (k < 2) issue(() => dev.pwrite(data, off, { fua }));
        else if (k === 2) {
          const pieces = splitPieces(data, rand);
          issue(() => writePieces(dev, pieces, off, { fua }));
        } else if (k === 3) issue(() => dev.zero(off, len, { mayTrim: true, fua }));
        else if (k === 4) issue(() => dev.zero(off, len, { mayTrim: false, fua }));
        else if (k === 5) issue(() => dev.trim(off, len, { fua }));
        else if (k === 6) issue(() => dev.flush());
        else issue(() => dev.pwrite(Buffer.alloc(len, batch & 0xff), off));
      }
      if (opts.switch && rand() % 4 === 0) {
        // Swap to a fresh wrapper of the same disk and log while requests are in flight.
        stats.swaps++;
        ops.push(sw.swap(new ReplicatingDevice(local, r.plog, r.activity)));
      }
      const results = await Promise.allSettled(ops);
      for (const x of results)
        if (x.status === 'rejected' && (x.reason as ColoError).code !== 'EIO')
          throw new Error(`${where()}: unexpected error ${(x.reason as Error).message}`);
      local.failRate = 0;
      local.failReads = false;
      await mirror.settled();
      const [a, b] = [await readAll(local.inner), await readAll(mirror.device)];
      const diff = differences(a, b);
      if (r.plog.outOfSync) {
        stats.outOfSync++;
        const known = r.activity.exactRanges();
        for (const d of diff)
          if (!covered(d, known))
            throw new Error(
              `${where()} batch ${batch}: ${d.offset}+${d.length} differs and is not in the activity log`,
            );
        // The resync: a fresh epoch that holds data again, then the recorded ranges as writes.
        r.device.seal();
        r.plog.resumeLogging();
        for (const x of known) await r.device.resyncRange(x.offset, x.length);
        r.activity.clearExact();
        await mirror.settled();
        const again = differences(await readAll(local.inner), await readAll(mirror.device));
        if (again.length) throw new Error(`${where()}: the resync left ${again.length} ranges different`);
      } else if (diff.length)
        throw new Error(
          `${where()} batch ${batch}: the mirror differs at ${diff.map((d) => `${d.offset}+${d.length}`).join(', ')} ` +
            `and the peer is not marked out of sync`,
        );
      if (rand() % 5 === 0) r.device.seal();
    }
    stats.failures = local.failures;
    stats.writtenNow = local.writtenNow;
    stats.records = mirror.records;
    return stats;
  } finally {
    await r.cleanup();
  }
}

describe('mirror suite: the log carries every change the primary makes', () => {
  it('every mutating command, with and without FUA, overlapping and concurrent', async () => {
    let records = 0;
    let now = 0;
    for (let seed = 1; seed <= 12; seed++) {
      const s = await mirrorRun(seed, {});
      records += s.records;
      now += s.writtenNow;
    }
    expect(records).toBeGreaterThan(1000);
    expect(now, 'writes done at once (the fast path)').toBeGreaterThan(100);
  });

  it('through a SwitchDevice whose backend is swapped under load', async () => {
    let swaps = 0;
    for (let seed = 101; seed <= 108; seed++) swaps += (await mirrorRun(seed, { switch: true })).swaps;
    expect(swaps).toBeGreaterThan(10);
  });

  it('local failures part-way through a write, a zeroing or a trim are logged as what the disk holds', async () => {
    let failures = 0;
    let now = 0;
    for (let seed = 201; seed <= 212; seed++) {
      const s = await mirrorRun(seed, { failRate: 0.15 });
      failures += s.failures;
      now += s.writtenNow;
      expect(s.outOfSync, `seed ${seed}: a readable range is logged, not marked out of sync`).toBe(0);
    }
    expect(failures).toBeGreaterThan(20);
    expect(now, 'writes done at once (the fast path), some of them failing').toBeGreaterThan(50);
  });

  it('when the range cannot even be read back, the peer is marked out of sync with the range on record', async () => {
    let outOfSync = 0;
    for (let seed = 301; seed <= 310; seed++)
      outOfSync += (await mirrorRun(seed, { failRate: 0.15, failReads: true, switch: seed % 2 === 0 }))
        .outOfSync;
    expect(outOfSync).toBeGreaterThan(0);
  });

  it('every mutating NBD command in the command table, with and without FUA, reaches the log', async () => {
    const SIZE = 1 << 20;
    const r = replicating(new MemoryDevice(SIZE, { pageBytes: 4096 }));
    const mirror = new Mirror(SIZE);
    mirror.attach(r.plog);
    const server = await startServer(new SwitchDevice(r.device));
    const c = await NbdClient.connect({ port: server.port, exportName: 'disk0' });
    const rand = prng(99);
    // How to send each mutating command, in each of its flag combinations.
    const senders: Record<number, ((off: number, len: number) => Promise<void>)[]> = {
      [Cmd.WRITE]: [false, true].map((fua) => (off, len) => c.write(randomBytes(len, rand), off, { fua })),
      [Cmd.WRITE_ZEROES]: [false, true].flatMap((fua) =>
        [false, true].map((noHole) => (off: number, len: number) => c.zero(off, len, { fua, noHole })),
      ),
      [Cmd.TRIM]: [false, true].map((fua) => (off, len) => c.trim(off, len, { fua })),
    };
    let sent = 0;
    try {
      for (const [cmd, spec] of Object.entries(COMMANDS)) {
        if (!spec.mutates) continue;
        const ways = senders[Number(cmd)];
        expect(ways, `the mirror suite has no way to send mutating command ${cmd}`).toBeDefined();
        for (const send of ways)
          for (let i = 0; i < 20; i++) {
            // Fill the range with data first, so a zeroing or trim has something to change.
            const off = rand() % (SIZE - 70_000);
            const len = 1 + (rand() % 65_536);
            await c.write(randomBytes(len, rand), off);
            await send(off, len);
            sent++;
            await mirror.settled();
            const diff = differences(await readAll(r.device.local), await readAll(mirror.device));
            expect(diff, `command ${cmd} at ${off}+${len} is not on the secondary`).toEqual([]);
          }
      }
    } finally {
      await c.close();
      await server.close();
      await r.cleanup();
    }
    expect(sent).toBe(20 * (2 + 4 + 2));
  });

  it('a write in flight at a seal is logged in the next epoch, and its extent stays hot until that commits', async () => {
    const local = new MemoryDevice(64 << 20);
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const slow: BlockDevice = Object.create(local, {
      pwrite: {
        value: async (buf: Buffer, off: number) => {
          await held;
          return local.pwrite(buf, off);
        },
      },
      // Not the memory disk's write-at-once: every write here waits for `held`.
      pwritevNow: { value: () => false },
    });
    const r = replicating(slow);
    const epoch = r.plog.current;
    const w = r.device.pwrite(Buffer.alloc(4096, 7), 8 << 20);
    while (r.activity.hotRanges().length === 0) await new Promise((res) => setImmediate(res));
    const seal = r.device.seal(); // does not wait for the write
    expect(seal.e).toBe(epoch);
    expect(seal.n).toBe(0);
    // Epoch N is committed on the secondary: its extents cool, but not the one still being written.
    r.activity.cool(epoch);
    expect(r.activity.hotRanges().some((x) => x.offset <= 8 << 20 && 8 << 20 < x.offset + x.length)).toBe(
      true,
    );
    release();
    await w;
    expect(r.plog.currentEpoch.epoch).toBe(epoch + 1);
    expect(r.plog.currentEpoch.records).toBe(1);
    r.activity.cool(epoch + 1);
    expect(r.activity.hotRanges()).toEqual([]);
    await r.cleanup();
  });

  it('a record carries only the fields that say something (no FUA, no holes: no key)', async () => {
    const r = replicating(new MemoryDevice(1 << 20));
    const metas: Record<string, unknown>[] = [];
    r.plog.onAppend = (_epoch, a) => metas.push(decodeFrame(Buffer.concat(a.parts))!.meta);
    await r.device.pwrite(Buffer.alloc(4096, 1), 0);
    await r.device.pwrite(Buffer.alloc(4096, 2), 4096, { fua: true });
    await r.device.zero(8192, 4096, { mayTrim: false });
    await r.device.zero(8192, 4096, { fua: true });
    await r.device.trim(12288, 4096);
    expect(metas.map((m) => Object.keys(m).sort().join(''))).toEqual([
      'eost',
      'efost',
      'elost',
      'efhlost',
      'elost',
    ]);
    expect(metas.map((m) => m.t)).toEqual(['w', 'w', 'z', 'z', 't']);
    await r.cleanup();
  });

  it('a call outside the disk is refused before anything is logged or recorded', async () => {
    const r = replicating(new MemoryDevice(1 << 20));
    await expect(r.device.pwrite(Buffer.alloc(10), (1 << 20) - 5)).rejects.toMatchObject({
      code: 'EINTERNAL',
    });
    await expect(r.device.zero(1 << 20, 1)).rejects.toMatchObject({ code: 'EINTERNAL' });
    expect(r.plog.outOfSync).toBeNull();
    expect(r.plog.currentEpoch.records).toBe(0);
    expect(r.activity.hotBytes).toBe(0);
    await r.cleanup();
  });

  it('a failed local write is reported to the client, and the log holds what the disk holds', async () => {
    const local = new FaultyDevice(new MemoryDevice(1 << 20), prng(7));
    const r = replicating(local);
    const mirror = new Mirror(1 << 20);
    mirror.attach(r.plog);
    local.failRate = 1;
    await expect(r.device.pwrite(Buffer.alloc(65536, 0xab), 4096)).rejects.toMatchObject({ code: 'EIO' });
    local.failRate = 0;
    await mirror.settled();
    expect(local.failures).toBe(1);
    expect((await readAll(mirror.device)).equals(await readAll(local.inner))).toBe(true);
    expect(r.plog.outOfSync).toBeNull();
    await r.cleanup();
    expect(fs.existsSync(r.plog.dir)).toBe(true);
  });
});
