// WRITE payloads read straight into reused buffers (Connection.directPayload,
// sys/slab-reads.ts directNextRead): the slab side hands out exactly the bytes
// asked for and no more; the server writes them byte-exact in every reply mode,
// only where the device keeps no buffer (a file, or a replicating primary, whose
// log copies the payload), and a buffer goes back to the pool only once its
// write has settled, so payloads in flight never share one.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { MemoryDevice } from '../src/block/memory.js';
import { Cmd, CmdFlag } from '../src/net/protocol.js';
import { SLAB_BYTES, Slabs } from '../src/sys/slab-reads.js';
import { scanJournal } from '../src/checkpoint/format/journal.js';
import { CHUNK_BYTES } from '../src/checkpoint/format/resend-journal.js';
import { PrimaryLog } from '../src/checkpoint/primary/log.js';
import { ReplicatingDevice } from '../src/checkpoint/primary/replicating-device.js';
import { realRandom } from '../src/sys/clock.js';
import { nodeStorage } from '../src/sys/storage.js';
import { killAll, prng, randomBytes, rmDir, startServer, tmpDir } from './helpers.js';
import { hashExport, startPair, waitLinkUp } from './replication-helpers.js';
import { closeAllRaw, MODES, openSession, serversPerTest, sleep, type Session } from './raw-nbd.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const dirs: string[] = [];
afterAll(async () => {
  await killAll();
  dirs.forEach(rmDir);
});

async function fileDevice(): Promise<{ dev: FileDevice; file: string }> {
  const dir = tmpDir('colo-blk-direct-');
  dirs.push(dir);
  const file = path.join(dir, 'disk.img');
  return { dev: await FileDevice.open(file, { size: SIZE }), file };
}

/** A stream of `n` WRITEs of about `size` bytes (each to its own `size` from `first`), encoded; and their data. */
function writeStream(
  s: Session,
  n: number,
  rand: () => number,
  size = MiB,
  first = 1,
): { bytes: Buffer; writes: Buffer[] } {
  const stream: Buffer[] = [];
  const writes: Buffer[] = [];
  for (let i = 0; i < n; i++) {
    const data = randomBytes(size - (rand() % 3) * 512, rand);
    writes.push(data);
    const offset = (first + i) * size;
    const flags = s.mode === 'extended' ? CmdFlag.PAYLOAD_LEN : 0;
    stream.push(s.encode({ type: Cmd.WRITE, flags, offset, length: data.length, payload: data }).bytes);
  }
  return { bytes: Buffer.concat(stream), writes };
}

/** Send `all` in pieces cut at random places, pausing now and then (headers and payloads straddle reads). */
async function sendCut(s: Session, all: Buffer, rand: () => number): Promise<void> {
  for (let at = 0; at < all.length;) {
    const n = Math.min(all.length - at, 1 + (rand() % (300 * KiB)));
    s.conn.send(all.subarray(at, at + n));
    at += n;
    if (rand() % 3 === 0) await sleep(1);
  }
}

/**
 * Send a WRITE's header and its payload's first `head` bytes, then, after the
 * server has read them, the rest: the server sees the payload arrive in two
 * parts, as a large one does under load.
 */
async function writeInTwo(s: Session, offset: number, data: Buffer, head: number): Promise<number> {
  const flags = s.mode === 'extended' ? CmdFlag.PAYLOAD_LEN : 0;
  const { cookie, bytes } = s.encode({ type: Cmd.WRITE, flags, offset, length: data.length, payload: data });
  const cut = bytes.length - data.length + head;
  s.conn.send(bytes.subarray(0, cut));
  await sleep(5);
  s.conn.send(bytes.subarray(cut));
  return cookie;
}

describe('the slab side: a directed read', () => {
  it('fills exactly the given buffer, then goes back to slabs; only once in bulk, one at a time', () => {
    const slabs = new Slabs();
    const target = Buffer.alloc(100 * KiB);
    expect(slabs.direct(target)).toBe(false); // not in bulk yet: the shared buffer is copied out
    slabs.took(slabs.next(), SLAB_BYTES / 2); // one large read: in bulk from now on
    expect(slabs.direct(target)).toBe(true);
    expect(slabs.direct(Buffer.alloc(10))).toBe(false); // the first is still being filled
    const first = slabs.next();
    expect(first.buffer).toBe(target.buffer);
    expect(first.length).toBe(target.length);
    const a = slabs.took(first, 30 * KiB);
    const second = slabs.next();
    expect(second.byteOffset).toBe(target.byteOffset + 30 * KiB);
    expect(second.length).toBe(70 * KiB); // never more than the rest: no byte of what follows lands here
    const b = slabs.took(second, 70 * KiB);
    expect(a.buffer).toBe(target.buffer);
    expect(b.byteOffset + b.length).toBe(target.byteOffset + target.length);
    const after = slabs.next();
    expect(after.buffer).not.toBe(target.buffer); // full: back to a slab
    expect(slabs.direct(Buffer.alloc(10))).toBe(true);
  });

  it('a direct read asked for after Node took the next buffer starts one read later; the slab bytes read meanwhile stay theirs', () => {
    // Node asks for the next buffer right after each read's callback. A direct read asked
    // for later (after a pause, from a promise) finds that buffer, a slab view, already
    // given out: the read into it is the slab's, and only the read after it fills the target.
    const slabs = new Slabs();
    slabs.took(slabs.next(), SLAB_BYTES / 2); // in bulk
    const given = slabs.next(); // Node holds this one now
    const target = Buffer.alloc(100 * KiB);
    expect(slabs.direct(target)).toBe(true);
    const a = slabs.took(given, 10 * KiB); // the read went to the slab all the same
    expect(a.buffer).toBe(given.buffer);
    const next = slabs.next();
    expect(next.buffer).toBe(target.buffer);
    expect(next.length).toBe(target.length); // the whole target, from its start
    slabs.took(next, target.length);
    const after = slabs.next();
    expect(after.buffer).toBe(given.buffer);
    expect(after.byteOffset).toBe(given.byteOffset + 10 * KiB); // never over the bytes handed out in `a`
  });
});

describe('the NBD server: WRITE payloads read into reused buffers', () => {
  const track = serversPerTest();

  for (const mode of MODES)
    it(`writes payloads that arrive in parts byte-exact, into buffers it uses again (${mode})`, async () => {
      const { dev, file } = await fileDevice();
      const s = track(await startServer([{ name: 'disk0', device: dev }]));
      const stats = s.server.exports.get('disk0')!.stats;
      const session = await openSession(s.port, { mode });
      const rand = prng(41 + mode.length);
      const expected = Buffer.alloc(SIZE);
      // A large write sent at once puts the connection in bulk.
      const warm = randomBytes(MiB, rand);
      expect(
        (await session.call({ type: Cmd.WRITE, offset: 0, length: warm.length, payload: warm })).error,
      ).toBe(0);
      warm.copy(expected, 0);
      const sizes = [64 * KiB + 1, 256 * KiB, MiB, MiB + 4097, 4 * MiB, 4 * MiB + 512 * KiB];
      for (let round = 0; round < 3; round++)
        for (const size of sizes) {
          const offset = (rand() % (SIZE / 512 - size / 512 - 1)) * 512;
          const data = randomBytes(size, rand);
          const cookie = await writeInTwo(session, offset, data, rand() % 4096);
          const reply = await session.reply();
          expect(reply.cookieLo).toBe(cookie);
          expect(reply.error).toBe(0);
          data.copy(expected, offset);
        }
      expect(fs.readFileSync(file).equals(expected)).toBe(true);
      // Every write whose rest was 64 KiB to 4 MiB went the direct way (the 4.5 MiB ones did
      // not; the warm-up may have), and the pool handed its buffers out again.
      expect(stats.writesReceivedDirect).toBeGreaterThanOrEqual(3 * (sizes.length - 2));
      expect(stats.writesReceivedDirect).toBeLessThanOrEqual(3 * (sizes.length - 1) + 1);
      expect(s.server.payloadBuffers.reused).toBeGreaterThan(0);
    });

  it('keeps payloads in flight apart: many large writes pipelined on one connection, split anywhere', async () => {
    const { dev, file } = await fileDevice();
    const s = track(await startServer([{ name: 'disk0', device: dev }]));
    const stats = s.server.exports.get('disk0')!.stats;
    const session = await openSession(s.port, { mode: 'structured' });
    const rand = prng(97);
    const expected = Buffer.alloc(SIZE);
    const warm = randomBytes(MiB, rand);
    await session.call({ type: Cmd.WRITE, offset: 0, length: warm.length, payload: warm });
    warm.copy(expected, 0);
    // Rounds of 48 writes of 1 MiB to distinct places, each round sent before any reply is read
    // (a buffer reused too early shows as another write's bytes; more rounds, more chances).
    for (let round = 0; round < 4; round++) {
      const { bytes, writes } = writeStream(session, 48, rand);
      writes.forEach((d, i) => d.copy(expected, (1 + i) * MiB));
      await sendCut(session, bytes, rand);
      for (let i = 0; i < 48; i++) expect((await session.reply()).error).toBe(0);
      expect(fs.readFileSync(file).equals(expected), `round ${round}`).toBe(true);
    }
    expect(stats.writesReceivedDirect).toBeGreaterThan(0);
    expect(s.server.payloadBuffers.reused).toBeGreaterThan(0);
  });

  it('reads the header after a large payload alone, so pipelined large writes sent in one piece go direct too', async () => {
    // A server behind its client finds whole requests waiting; read into slabs, each
    // payload would be fresh memory. After the first, each header is read by itself
    // and the payload behind it into a pooled buffer.
    const { dev, file } = await fileDevice();
    const s = track(await startServer([{ name: 'disk0', device: dev }]));
    const stats = s.server.exports.get('disk0')!.stats;
    const rand = prng(2024);
    const expected = Buffer.alloc(SIZE);
    for (const mode of ['simple', 'extended'] as const) {
      const session = await openSession(s.port, { mode });
      const before = stats.writesReceivedDirect;
      const { bytes, writes } = writeStream(session, 24, rand);
      writes.forEach((d, i) => d.copy(expected, (1 + i) * MiB));
      // Small requests behind them: the header read alone is followed by a small one.
      const small = randomBytes(4096, rand);
      small.copy(expected, 0);
      const flags = mode === 'extended' ? CmdFlag.PAYLOAD_LEN : 0;
      const tail = session.encode({
        type: Cmd.WRITE,
        flags,
        offset: 0,
        length: small.length,
        payload: small,
      }).bytes;
      session.conn.send(Buffer.concat([bytes, tail]));
      for (let i = 0; i < 25; i++) expect((await session.reply()).error).toBe(0);
      expect(fs.readFileSync(file).equals(expected), mode).toBe(true);
      expect(stats.writesReceivedDirect - before, mode).toBeGreaterThanOrEqual(22);
    }
  });

  it('gives the buffer back after a refused write too, and a device that may keep buffers never gets one', async () => {
    const { dev } = await fileDevice();
    const mem = new MemoryDevice(SIZE);
    const s = track(
      await startServer([
        { name: 'disk0', device: dev, readOnly: true },
        { name: 'mem', device: mem },
      ]),
    );
    const ro = await openSession(s.port, { mode: 'simple' });
    const rand = prng(5);
    const warm = randomBytes(MiB, rand);
    expect(
      (await ro.call({ type: Cmd.WRITE, offset: 0, length: warm.length, payload: warm })).error,
    ).not.toBe(0);
    for (let i = 0; i < 4; i++) {
      await writeInTwo(ro, i * MiB, randomBytes(MiB, rand), 100);
      expect((await ro.reply()).error).not.toBe(0); // EPERM: read-only, yet the payload was consumed
    }
    // Read into pooled buffers all the same (the data must be consumed), and each given back.
    // (the warm-up may have gone that way too, depending on how much of it the first read took)
    expect(s.server.exports.get('disk0')!.stats.writesReceivedDirect).toBeGreaterThanOrEqual(4);
    expect(s.server.payloadBuffers.reused).toBeGreaterThanOrEqual(3);
    expect(s.server.payloadBuffers.idleByteCount).toBeGreaterThanOrEqual(MiB - 100);
    const m = await openSession(s.port, { mode: 'simple', exportName: 'mem' });
    await m.call({ type: Cmd.WRITE, offset: 0, length: warm.length, payload: warm });
    const data = randomBytes(2 * MiB, rand);
    await writeInTwo(m, MiB, data, 100);
    expect((await m.reply()).error).toBe(0);
    const back = Buffer.alloc(data.length);
    await mem.pread(back, MiB);
    expect(back.equals(data)).toBe(true);
    expect(s.server.exports.get('mem')!.stats.writesReceivedDirect).toBe(0);
  });

  it('a replicating primary takes payloads into pooled buffers too: its log holds every write byte-exact, in memory and past it', async () => {
    // The buffers go back to the pool as each write settles and are read into again at
    // once; the log must have copied them (its memory chunks, or a copy for its file part).
    const { dev, file } = await fileDevice();
    const dir = tmpDir('colo-blk-direct-log-');
    dirs.push(dir);
    const plog = new PrimaryLog(nodeStorage, dir, 1, 1 << 30, realRandom, 2 * CHUNK_BYTES);
    const rdev = new ReplicatingDevice(dev, plog);
    expect(rdev.releasesWrites).toBe(true);
    const s = track(await startServer([{ name: 'disk0', device: rdev }]));
    const stats = s.server.exports.get('disk0')!.stats;
    const session = await openSession(s.port, { mode: 'structured' });
    const rand = prng(404);
    const byOffset = new Map<number, Buffer>();
    const warm = randomBytes(MiB, rand);
    await session.call({ type: Cmd.WRITE, offset: 0, length: warm.length, payload: warm });
    byOffset.set(0, warm);
    // Payloads under the journal's flush size: a frame in its file part waits for a later turn.
    const size = 192 * KiB;
    for (let round = 0; round < 4; round++) {
      const { bytes, writes } = writeStream(session, 40, rand, size, 6 + round * 40);
      writes.forEach((d, i) => byOffset.set((6 + round * 40 + i) * size, d));
      await sendCut(session, bytes, rand);
      for (let i = 0; i < 40; i++) expect((await session.reply()).error).toBe(0);
    }
    expect(stats.writesReceivedDirect).toBeGreaterThan(0);
    expect(s.server.payloadBuffers.reused).toBeGreaterThan(0);
    const journal = plog.epoch(1).journal!;
    expect(journal.spilled).toBe(true);
    let records = 0;
    const scan = scanJournal<{ t: string; o: number }>(
      nodeStorage,
      journal.path,
      (rec) => {
        records++;
        const want = byOffset.get(rec.meta.o);
        expect(rec.data?.equals(want!), `the record of the write at ${rec.meta.o}`).toBe(true);
      },
      { withData: true, file: journal.asFile() },
    );
    expect(scan.corruption).toBeNull();
    expect(records).toBe(byOffset.size);
    const image = fs.readFileSync(file);
    for (const [o, d] of byOffset) expect(image.subarray(o, o + d.length).equals(d)).toBe(true);
    plog.close();
  });

  it('a replicating primary and its secondary end equal after pipelined large writes cut anywhere, past the resend memory', async () => {
    const dir = tmpDir('colo-blk-direct-pair-');
    dirs.push(dir);
    const pair = await startPair(dir, '64M');
    try {
      await waitLinkUp(pair.primary);
      const session = await openSession(pair.primary.nbdPort, { mode: 'structured' });
      const rand = prng(321);
      const warm = randomBytes(MiB, rand);
      await session.call({ type: Cmd.WRITE, offset: 0, length: warm.length, payload: warm });
      // 180 MiB in one epoch: more than the primary's 128 MiB of resend memory.
      for (let round = 0; round < 3; round++) {
        const { bytes } = writeStream(session, 60, rand);
        await sendCut(session, bytes, rand);
        for (let i = 0; i < 60; i++) expect((await session.reply()).error).toBe(0);
      }
      // The epoch outgrew the resend memory: its tail is in a journal file.
      const spilled = fs
        .readdirSync(path.join(dir, 'pvm-state', 'epochs'))
        .filter((f) => f.endsWith('.journal'));
      expect(spilled.length).toBeGreaterThan(0);
      await pair.checkpoint();
      expect(await hashExport(pair.secondary.nbdPort)).toBe(await hashExport(pair.primary.nbdPort));
    } finally {
      closeAllRaw();
      await pair.stop();
    }
  });
});
