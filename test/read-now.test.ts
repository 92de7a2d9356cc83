// The NBD connection's read path (Connection.read): a READ that the device
// does on this thread (its preadNow) is answered with no promise; one it
// declines (false) is read the usual way (pread), one that fails gets the NBD
// error and the connection goes on.
import { afterEach, describe, expect, it } from 'vitest';
import type { BlockDevice } from '../src/block/device.js';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdClient } from '../src/net/client.js';
import { prng, randomBytes, startServer, type RunningServer } from './helpers.js';

const SIZE = 8 * 1024 * 1024;

/** A memory disk that counts its reads by path, and whose preadNow may decline or fail (and declines 256 KiB and up, as a file does in `--io auto`). */
function counting(mode: () => 'now' | 'decline' | 'fail') {
  const inner = new MemoryDevice(SIZE);
  const counts = { now: 0, declined: 0, failed: 0, pread: 0 };
  const dev = Object.create(inner) as BlockDevice & { preadNow(buf: Buffer, offset: number): boolean };
  dev.pread = (buf, offset) => {
    counts.pread++;
    return inner.pread(buf, offset);
  };
  dev.preadNow = (buf, offset) => {
    const m = buf.length >= 256 * 1024 ? 'decline' : mode();
    if (m === 'decline') {
      counts.declined++;
      return false;
    }
    if (m === 'fail') {
      counts.failed++;
      throw Object.assign(new Error('injected read failure'), { code: 'EIO' });
    }
    counts.now++;
    return inner.preadNow(buf, offset);
  };
  return { inner, dev, counts };
}

let server: RunningServer | null = null;
let client: NbdClient | null = null;
afterEach(async () => {
  await client?.close().catch(() => {});
  await server?.close();
  client = null;
  server = null;
});

describe('reads done on the connection’s turn where the device reads there (preadNow)', () => {
  it('answers from preadNow, falls back to pread when it declines, and reports its failure as an NBD error', async () => {
    let mode: 'now' | 'decline' | 'fail' = 'now';
    const { inner, dev, counts } = counting(() => mode);
    const data = randomBytes(SIZE, prng(7));
    await inner.pwrite(data, 0);
    server = await startServer(dev);
    client = await NbdClient.connect({ port: server.port, exportName: 'disk0' });

    const at = [0, 4096, 65536 + 512, SIZE - 4096];
    for (const o of at) expect((await client.read(o, 4096)).equals(data.subarray(o, o + 4096))).toBe(true);
    expect(counts).toMatchObject({ now: at.length, pread: 0 });

    mode = 'decline';
    for (const o of at) expect((await client.read(o, 4096)).equals(data.subarray(o, o + 4096))).toBe(true);
    expect(counts).toMatchObject({ now: at.length, declined: at.length, pread: at.length });

    mode = 'fail';
    await expect(client.read(8192, 4096)).rejects.toThrow(/EIO|injected/);
    expect(counts.failed).toBe(1);
    mode = 'now'; // the connection is still good
    expect((await client.read(8192, 100)).equals(data.subarray(8192, 8292))).toBe(true);

    // A read the device does not do on this thread (here: a large one) goes to its pread.
    const before = { ...counts };
    expect((await client.read(0, 1024 * 1024)).equals(data.subarray(0, 1024 * 1024))).toBe(true);
    expect(counts).toMatchObject({ now: before.now, declined: before.declined + 1, pread: before.pread + 1 });
    expect(server.server.exports.get('disk0')!.stats.reads).toBeGreaterThanOrEqual(2 * at.length + 2);
  });
});
