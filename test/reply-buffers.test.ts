import { afterEach, describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdClient } from '../src/net/client.js';
import { ReplyBuffers } from '../src/net/reply-buffers.js';
import { prng, randomBytes, startServer, type RunningServer } from './helpers.js';

const MiB = 1024 * 1024;

describe('read reply buffers', () => {
  it('hands a given-back buffer out again, only its own, only once, up to the idle cap', () => {
    const pool = new ReplyBuffers(3 * MiB);
    const a = pool.take(MiB + 40);
    expect(a.length).toBe(MiB + 40);
    pool.give(a);
    pool.give(a); // twice: kept once
    const b = pool.take(MiB + 40);
    expect(b.buffer).toBe(a.buffer);
    const c = pool.take(MiB + 40); // the only idle one is b's: a new one
    expect(c.buffer).not.toBe(a.buffer);
    expect(pool.reused).toBe(1);
    // Not ours: never taken back.
    const foreign = Buffer.allocUnsafe(MiB + 40);
    pool.give(foreign);
    expect(pool.take(MiB + 40).buffer).not.toBe(foreign.buffer);
    // Small ones are not pooled.
    const small = pool.take(4096);
    pool.give(small);
    expect(pool.idleByteCount).toBe(0);
    // The cap: three 1.0625 MiB buffers do not fit in 3 MiB idle.
    const many = [pool.take(MiB + 40), pool.take(MiB + 40), pool.take(MiB + 40)];
    many.forEach((m) => pool.give(m));
    expect(pool.idleByteCount).toBeLessThanOrEqual(3 * MiB);
    expect(pool.idleByteCount).toBe(2 * (MiB + 64 * 1024));
  });

  let s: RunningServer | null = null;
  afterEach(async () => {
    await s?.close();
    s = null;
  });

  it('many large reads in flight on several connections each get their own bytes, and buffers are reused', async () => {
    const size = 32 * MiB;
    const dev = new MemoryDevice(size);
    const content = randomBytes(size, prng(5));
    await dev.pwrite(content, 0);
    s = await startServer(dev);
    const clients = await Promise.all(
      [0, 1, 2].map(() => NbdClient.connect({ port: s!.port, exportName: 'disk0' })),
    );
    const rnd = prng(6);
    for (let round = 0; round < 8; round++) {
      const reads = [];
      for (let i = 0; i < 24; i++) {
        const len = [64 * 1024, 256 * 1024 + 512, MiB][rnd() % 3];
        const off = (rnd() % (size - len)) & ~511;
        const client = clients[i % clients.length];
        reads.push(client.read(off, len).then((got) => ({ got, off, len })));
      }
      for (const { got, off, len } of await Promise.all(reads))
        expect(got.equals(content.subarray(off, off + len)), `read ${len} at ${off}`).toBe(true);
    }
    expect(s.server.replyBuffers.reused).toBeGreaterThan(0);
    await Promise.all(clients.map((c) => c.close()));
  });
});
