// Read replies sent straight from the image file (src/net/file-replies.ts):
// byte-exact in every reply mode, in order when the socket is full, zeroes past
// the end of a shortened file, and the device chain that says where a range
// lies (a file device under a replicating primary under a switch).
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { MemoryDevice } from '../src/block/memory.js';
import { native } from '../src/block/native.js';
import { SwitchDevice } from '../src/block/switch.js';
import { PrimaryLog } from '../src/checkpoint/primary/log.js';
import { ReplicatingDevice } from '../src/checkpoint/primary/replicating-device.js';
import { ActivityLog } from '../src/failover/activity.js';
import { FILE_REPLY_MIN_BYTES, fileReplyStats } from '../src/net/file-replies.js';
import { Cmd } from '../src/net/protocol.js';
import { nodeStorage } from '../src/sys/storage.js';
import { prng, randomBytes, rmDir, startServer, tmpDir } from './helpers.js';
import { MODES, openSession, serversPerTest } from './raw-nbd.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const dirs: string[] = [];
afterAll(() => dirs.forEach(rmDir));

/** A file device of SIZE bytes of seeded random data; returns it, its path and the data. */
async function filledDevice(
  seed: number,
  size = SIZE,
): Promise<{ dev: FileDevice; file: string; data: Buffer }> {
  const dir = tmpDir('colo-blk-file-replies-');
  dirs.push(dir);
  const file = path.join(dir, 'disk.img');
  const data = randomBytes(size, prng(seed));
  fs.writeFileSync(file, data);
  return { dev: await FileDevice.open(file), file, data };
}

describe.runIf(native?.sendFileReply)('read replies sent from the file', () => {
  const track = serversPerTest();

  for (const mode of MODES)
    it(`answers large reads from the file, byte-exact (${mode} replies); small ones from a buffer`, async () => {
      const { dev, data } = await filledDevice(1);
      const s = track(await startServer([{ name: 'disk0', device: dev }]));
      const stats = s.server.exports.get('disk0')!.stats;
      const session = await openSession(s.port, { mode });
      const reads = [
        { offset: 0, length: FILE_REPLY_MIN_BYTES },
        { offset: 12_345, length: MiB + 4096 },
        { offset: SIZE - 4 * MiB, length: 4 * MiB },
      ];
      for (const r of reads) {
        const reply = await session.call({ type: Cmd.READ, ...r });
        expect(reply.error).toBe(0);
        expect(reply.data!.equals(data.subarray(r.offset, r.offset + r.length))).toBe(true);
      }
      expect(stats.readsSentFromFile).toBe(reads.length);
      const small = await session.call({ type: Cmd.READ, offset: 4096, length: FILE_REPLY_MIN_BYTES - 4096 });
      expect(small.data!.equals(data.subarray(4096, FILE_REPLY_MIN_BYTES))).toBe(true);
      expect(stats.readsSentFromFile).toBe(reads.length);
      expect(stats.reads).toBe(reads.length + 1);
    });

  it('queues the rest of a reply the full socket did not take at once, before any other reply', async () => {
    const { dev, data } = await filledDevice(2);
    const s = track(await startServer([{ name: 'disk0', device: dev }]));
    const session = await openSession(s.port, { mode: 'structured' });
    const before = fileReplyStats.partial;
    // The client stops reading: the server's sends fill the socket buffers part-way through a reply.
    session.conn.socket.pause();
    const next = prng(3);
    const rand = () => next() / 2 ** 32;
    const sent = new Map<number, { offset: number; length: number }>();
    for (let i = 0; i < 24; i++) {
      const length = FILE_REPLY_MIN_BYTES + Math.floor(rand() * 3 * MiB);
      const offset = Math.floor(rand() * (SIZE - length));
      sent.set(session.send({ type: Cmd.READ, offset, length }), { offset, length });
    }
    await new Promise((r) => setTimeout(r, 300));
    session.conn.socket.resume();
    for (let i = 0; i < sent.size; i++) {
      const reply = await session.reply(20_000);
      const r = sent.get(reply.cookieLo)!;
      expect(reply.error).toBe(0);
      expect(reply.data!.equals(data.subarray(r.offset, r.offset + r.length))).toBe(true);
    }
    expect(fileReplyStats.partial).toBeGreaterThan(before);
  });

  it('sends zeroes past the end of a file shortened behind its back', async () => {
    const { dev, file, data } = await filledDevice(4);
    const s = track(await startServer([{ name: 'disk0', device: dev }]));
    fs.truncateSync(file, MiB + 100);
    const session = await openSession(s.port, { mode: 'simple' });
    const reply = await session.call({ type: Cmd.READ, offset: MiB - 4096, length: MiB });
    expect(reply.error).toBe(0);
    const want = Buffer.concat([data.subarray(MiB - 4096, MiB + 100), Buffer.alloc(MiB - 4196)]);
    expect(reply.data!.equals(want)).toBe(true);
  });
});

describe('where a device says a range lies in a file', () => {
  it('a file device under a replicating primary under a switch: its own file, none once closed', async () => {
    const { dev, data, file } = await filledDevice(5);
    const dir = path.dirname(file);
    const plog = new PrimaryLog(nodeStorage, path.join(dir, 'epochs'), 1, 1 << 30);
    const activity = ActivityLog.open(nodeStorage, path.join(dir, 'activity.bitmap'), dev.size);
    const top = new SwitchDevice(new ReplicatingDevice(dev, plog, activity));
    const where = top.fileRange(3 * MiB + 7, MiB)!;
    expect(where.offset).toBe(3 * MiB + 7);
    const got = Buffer.alloc(MiB);
    fs.readSync(where.fd, got, 0, MiB, where.offset);
    expect(got.equals(data.subarray(3 * MiB + 7, 4 * MiB + 7))).toBe(true);
    // A backend without a file (memory) answers none; so does a closed file device.
    await top.swap(new MemoryDevice(dev.size));
    expect(top.fileRange(0, MiB)).toBeNull();
    await dev.close();
    expect(dev.fileRange(0, MiB)).toBeNull();
    plog.close();
    await activity.close();
  });

  it('none while a switch waits for requests in flight on the old backend', async () => {
    const { dev } = await filledDevice(6);
    const top = new SwitchDevice(dev);
    let release!: () => void;
    const slow = new MemoryDevice(dev.size);
    const held = new Promise<void>((r) => (release = r));
    const origRead = dev.pread.bind(dev);
    dev.pread = async (buf, off) => {
      await held;
      return origRead(buf, off);
    };
    const reading = top.pread(Buffer.alloc(4096), 0);
    const swapping = top.swap(slow);
    await new Promise((r) => setTimeout(r, 20));
    expect(top.fileRange(0, MiB)).toBeNull(); // the switch is under way: the reader must wait for it
    release();
    await reading;
    await swapping;
    await dev.close();
  });
});
