import net from 'node:net';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdClient } from '../src/net/client.js';
import {
  BULK_READ_BYTES,
  BULK_TOTAL_BYTES,
  MIN_READ_BYTES,
  readIntoSlabs,
  SLAB_BYTES,
  slabReadStats,
  Slabs,
} from '../src/sys/slab-reads.js';
import {
  killAll,
  prng,
  ROOT,
  run,
  randomBytes,
  startCliServer,
  startServer,
  type RunningServer,
} from './helpers.js';

const MiB = 1024 * 1024;

/** A loopback server whose accepted sockets go through readIntoSlabs; `got` is every socket it made. */
async function slabServer(): Promise<{ server: net.Server; port: number; got: Promise<net.Socket> }> {
  let accepted!: (s: net.Socket) => void;
  const got = new Promise<net.Socket>((r) => (accepted = r));
  const server = net.createServer({ pauseOnConnect: true }, (s) => accepted(readIntoSlabs(s)));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { server, port: (server.address() as net.AddressInfo).port, got };
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const c = net.connect({ port, host: '127.0.0.1' }, () => resolve(c));
    c.once('error', reject);
  });
}

describe('socket reads into slabs', () => {
  it('copies reads out of a shared buffer until one is in bulk; then hands out each byte of a slab once', () => {
    const slabs = new Slabs(100_000, 30_000);
    const shared = slabs.next();
    const first = slabs.took(shared, 100); // a handshake's few bytes: copied out of the shared buffer
    expect(first.buffer).not.toBe(shared.buffer);
    expect(slabs.next().buffer).toBe(shared.buffer); // still small reads
    slabs.took(slabs.next(), BULK_READ_BYTES); // a bulk read: slabs from now on
    const a = slabs.next();
    expect(a.buffer).not.toBe(shared.buffer);
    expect(a.length).toBe(100_000);
    const va = slabs.took(a, 60_000);
    const b = slabs.next(); // 40,000 left: still this slab
    expect(b.buffer).toBe(a.buffer);
    expect(b.byteOffset).toBe(a.byteOffset + 60_000);
    expect(b.length).toBe(40_000);
    va.fill(1);
    const vb = slabs.took(b, 20_000);
    vb.fill(2);
    expect(va.every((x) => x === 1)).toBe(true); // the second read did not touch the first one's bytes
    const c = slabs.next(); // 20,000 left < 30,000: a new slab
    expect(c.buffer).not.toBe(a.buffer);
    expect(c.length).toBe(100_000);
  });

  let cleanup: (() => Promise<void> | void)[] = [];
  afterEach(async () => {
    for (const f of cleanup.reverse()) await f();
    cleanup = [];
    await killAll();
  });

  it('delivers a stream intact as views of shared slabs, which later reads never overwrite', async () => {
    const { server, port, got } = await slabServer();
    cleanup.push(() => new Promise<void>((r) => server.close(() => r())));
    const before = { ...slabReadStats };
    const client = await connect(port);
    const sock = await got;
    const chunks: Buffer[] = [];
    const ended = new Promise<void>((r) => sock.on('end', r));
    sock.on('data', (c: Buffer) => chunks.push(c)); // kept, not copied: later reads must not change them
    const rand = prng(7);
    const sent = randomBytes(12 * MiB + 12345, rand);
    for (let at = 0; at < sent.length;) {
      const n = Math.min(sent.length - at, 1 + Math.floor(rand() * 300_000));
      client.write(sent.subarray(at, at + n));
      at += n;
    }
    client.end();
    await ended;
    expect(Buffer.concat(chunks).equals(sent)).toBe(true);
    // After the first bulk reads: views of 1 MiB slabs, not one buffer per read.
    let seen = 0;
    const bulk = chunks.filter((c) => (seen += c.length) > BULK_TOTAL_BYTES + SLAB_BYTES);
    expect(bulk.length).toBeGreaterThan(0);
    const slabsUsed = new Set(bulk.map((c) => c.buffer));
    for (const ab of slabsUsed) expect(ab.byteLength).toBe(SLAB_BYTES);
    expect(slabsUsed.size).toBeLessThanOrEqual(Math.ceil(sent.length / (SLAB_BYTES - MIN_READ_BYTES)) + 1);
    expect(slabReadStats.sockets).toBe(before.sockets + 1);
    expect(slabReadStats.bytes - before.bytes).toBe(sent.length);
    expect(slabReadStats.reads - before.reads).toBe(chunks.length);
  });

  it('an idle or handshaking connection holds no slab; one reading in bulk takes its own', async () => {
    const server = net.createServer({ pauseOnConnect: true }, (s) => readIntoSlabs(s).on('data', () => {}));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    cleanup.push(() => new Promise<void>((r) => server.close(() => r())));
    const port = (server.address() as net.AddressInfo).port;
    const before = slabReadStats.slabs;
    const clients = await Promise.all(Array.from({ length: 64 }, () => connect(port)));
    cleanup.push(() => clients.forEach((c) => c.destroy()));
    const reads = slabReadStats.reads;
    clients.forEach((c) => c.write(Buffer.alloc(300, 1)));
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error('the small writes were not all read')), 10_000);
      const check = setInterval(() => {
        if (slabReadStats.reads - reads >= clients.length) {
          clearTimeout(t);
          clearInterval(check);
          resolve();
        }
      }, 5);
    });
    expect(slabReadStats.slabs).toBe(before);
    clients[0].write(Buffer.alloc(4 * MiB, 2));
    await new Promise((r) => setTimeout(r, 300));
    expect(slabReadStats.slabs).toBeGreaterThan(before);
    expect(slabReadStats.slabs - before).toBeLessThanOrEqual(
      Math.ceil((4 * MiB) / (SLAB_BYTES - MIN_READ_BYTES)) + 1,
    );
  });

  it('pause() stops the reads (TCP backpressure) and resume() restarts them', async () => {
    const { server, port, got } = await slabServer();
    cleanup.push(() => new Promise<void>((r) => server.close(() => r())));
    const client = await connect(port);
    cleanup.push(() => void client.destroy());
    const sock = await got;
    let received = 0;
    sock.on('data', (c: Buffer) => {
      received += c.length;
      sock.pause();
    });
    const total = 64 * MiB;
    const block = Buffer.alloc(MiB, 0x5a);
    for (let i = 0; i < total / MiB; i++) client.write(block);
    await new Promise((r) => setTimeout(r, 300));
    // Paused after the first read: the rest stays in the kernel's buffers and the client's queue.
    expect(received).toBeGreaterThan(0);
    expect(received).toBeLessThanOrEqual(SLAB_BYTES);
    expect(client.writableLength).toBeGreaterThan(0);
    sock.removeAllListeners('data');
    sock.on('data', (c: Buffer) => (received += c.length));
    sock.resume();
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(
        () => reject(new Error(`only ${received} of ${total} bytes after resume`)),
        20_000,
      );
      const check = setInterval(() => {
        if (received === total) {
          clearTimeout(t);
          clearInterval(check);
          resolve();
        }
      }, 10);
    });
  });

  it("moves the server's connection count with the socket: close() finishes once the client has gone", async () => {
    const { server, port, got } = await slabServer();
    const client = await connect(port);
    const sock = await got;
    sock.on('data', () => {});
    const closedSock = new Promise<void>((r) => sock.on('close', () => r()));
    let serverClosed = false;
    const closing = new Promise<void>((r) => server.close(() => r())).then(() => (serverClosed = true));
    await new Promise((r) => setTimeout(r, 100));
    expect(serverClosed).toBe(false); // one connection still open
    client.end();
    await closedSock;
    await closing;
    expect(serverClosed).toBe(true);
  });

  describe('the NBD server', () => {
    let s: RunningServer | null = null;
    afterEach(async () => {
      await s?.close();
      s = null;
    });

    it('reads its clients into slabs', async () => {
      s = await startServer(new MemoryDevice(16 * MiB));
      const before = slabReadStats.bytes;
      const c = await NbdClient.connect({ port: s.port, exportName: 'disk0' });
      const data = randomBytes(3 * MiB, prng(11));
      await c.write(data, 4096);
      expect((await c.read(4096, data.length)).equals(data)).toBe(true);
      await c.close();
      expect(slabReadStats.bytes - before).toBeGreaterThan(data.length);
    });

    it('serves as before with slab reads turned off (COLO_BLK_NO_SLAB_READS=1)', async () => {
      const env = { ...process.env, COLO_BLK_NO_SLAB_READS: '1' };
      const probe = await run(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          `import { slabReadsEnabled } from '${pathToFileURL(path.join(ROOT, 'dist/src/sys/slab-reads.js')).href}'; console.log(slabReadsEnabled)`,
        ],
        { env },
      );
      expect(probe.stdout.trim()).toBe('false');
      const srv = await startCliServer(['--export', 'disk0=:memory:,size=16M'], 20_000, env);
      cleanup.push(async () => void (await srv.stop()));
      const c = await NbdClient.connect({ port: srv.port, exportName: 'disk0' });
      const data = randomBytes(3 * MiB + 512, prng(12));
      await c.write(data, 512);
      expect((await c.read(512, data.length)).equals(data)).toBe(true);
      await c.close();
    });
  });
});
