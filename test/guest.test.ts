// The guest (src/guest/): the stand-in VM of the COLO loop. Its state and
// disk log, its incremental memory checkpoints, its deterministic bytes, and
// the connection positions a checkpoint moves; then the real process on a
// real colo-blk export.
import net from 'node:net';
import fc from 'fast-check';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/block/memory.js';
import { GuestServer } from '../src/guest/server.js';
import {
  decodeDelta,
  DeltaSender,
  deltaBytes,
  encodeDelta,
  GuestState,
  LOG_START,
  type GuestDisk,
} from '../src/guest/state.js';
import { controlCall } from '../src/checkpoint/control.js';
import { killAll, rmDir, startServer, tmpDir, type RunningServer } from './helpers.js';
import { startNode } from './replication-helpers.js';

/** A GuestDisk over a memory device (what NbdClient offers, in-process). */
function memDisk(size = 4 << 20): GuestDisk & { dev: MemoryDevice } {
  const dev = new MemoryDevice(size);
  return {
    dev,
    size,
    read: async (offset, length) => {
      const b = Buffer.alloc(length);
      await dev.pread(b, offset);
      return b;
    },
    write: (data, offset) => dev.pwrite(data, offset),
  };
}

const quiet = { info: () => {}, warn: () => {}, debug: () => {} };

/** One raw HTTP exchange on a socket: send `req`, read until `n` responses arrived. */
function exchange(port: number, reqs: string[]): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1' });
    const chunks: Buffer[] = [];
    s.on('data', (d) => chunks.push(d));
    s.on('error', reject);
    s.on('close', () => resolve(Buffer.concat(chunks)));
    s.on('connect', () => s.end(reqs.join('')));
  });
}

const put = (key: string, value: string) =>
  `PUT /kv/${key} HTTP/1.1\r\nHost: g\r\nContent-Length: ${Buffer.byteLength(value)}\r\n\r\n${value}`;
const get = (key: string) => `GET /kv/${key} HTTP/1.1\r\nHost: g\r\n\r\n`;

const servers: GuestServer[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close();
});

async function guest(disk: GuestDisk, seed: number, nondeterminism = 0) {
  const state = new GuestState(disk, { seed, nondeterminism });
  await state.recover();
  const server = new GuestServer(state, { logger: quiet });
  servers.push(server);
  const { port } = await server.listen(0, '127.0.0.1');
  return { state, server, port };
}

describe('guest state', () => {
  it('stores durably before answering, and a guest started on the disk recovers every record', async () => {
    const disk = memDisk();
    const a = new GuestState(disk, { seed: 1, nondeterminism: 0 });
    expect(await a.put('k1', Buffer.from('one'))).toBe(1);
    expect(await a.put('k2', Buffer.from('two'))).toBe(1);
    expect(await a.put('k1', Buffer.from('uno'))).toBe(2);
    const b = new GuestState(disk, { seed: 1, nondeterminism: 0 });
    expect(await b.recover()).toBe(3);
    expect(b.get('k1')).toEqual({ value: Buffer.from('uno'), version: 2 });
    expect(b.get('k2')?.value.toString()).toBe('two');
    expect(b.status().logPos).toBe(a.status().logPos);
    // A torn record at the end: the log ends before it.
    const pos = a.status().logPos;
    await a.put('k3', Buffer.alloc(1000, 7));
    await disk.dev.pwrite(Buffer.alloc(100, 0xff), pos + 600);
    const c = new GuestState(disk, { seed: 1, nondeterminism: 0 });
    expect(await c.recover()).toBe(3);
    expect(c.get('k3')).toBeUndefined();
    expect(pos).toBeGreaterThan(LOG_START);
  });

  it('memory checkpoints carry only what the primary changed, and make the secondary equal', async () => {
    const pvm = new GuestState(memDisk(), { seed: 5, nondeterminism: 0 });
    const svm = new GuestState(memDisk(), { seed: 5, nondeterminism: 0 });
    for (let i = 0; i < 2000; i++) await pvm.put(`key${i}`, Buffer.alloc(200, i & 0xff));
    svm.receive(pvm.save(true));
    svm.load();
    pvm.checkpointed();
    expect(svm.hash()).toBe(pvm.hash());
    // Both run on; each changes a few keys of its own; the checkpoint sends the primary's only.
    await pvm.put('key7', Buffer.from('primary'));
    await pvm.put('new', Buffer.from('added by the primary'));
    await svm.put('key9', Buffer.from('secondary'));
    await svm.put('svm-only', Buffer.from('gone at the checkpoint'));
    const delta = pvm.save(false);
    expect(deltaBytes(delta)).toBeLessThan(300); // two entries and the counters, not 2000 keys
    expect(deltaBytes(pvm.save(true))).toBeGreaterThan(400_000);
    expect(svm.receive(delta).entries).toBe(2);
    expect(svm.hash()).not.toBe(pvm.hash());
    svm.load();
    pvm.checkpointed();
    expect(svm.hash()).toBe(pvm.hash());
    expect(svm.get('svm-only')).toBeUndefined();
    expect(svm.get('key9')?.value).toEqual(Buffer.alloc(200, 9));
    // A failed checkpoint keeps the changes for the next one.
    await pvm.put('key1', Buffer.from('x'));
    pvm.save(false); // sent, never committed
    await pvm.put('key2', Buffer.from('y'));
    svm.receive(pvm.save(false));
    svm.load();
    expect(svm.hash()).toBe(pvm.hash());
  });
});

describe('guest state captured for an early resume', () => {
  it('a capture sends the state as it was taken while the primary runs on; changes since go in the next checkpoint, and a failed one loses nothing', async () => {
    const pvm = new GuestState(memDisk(), { seed: 6, nondeterminism: 0 });
    const svm = new GuestState(memDisk(), { seed: 6, nondeterminism: 0 });
    for (let i = 0; i < 50; i++) await pvm.put(`key${i}`, Buffer.alloc(100, i));
    pvm.capture(true);
    const atCapture = pvm.hash();
    const diskAtCapture = await pvm.diskHash(false, true);
    // It runs again before the send: a change to a captured key, and a new key.
    await pvm.put('key3', Buffer.from('after the capture'));
    await pvm.put('late', Buffer.from('after the capture too'));
    expect(pvm.hash(true), 'the hash of the captured state').toBe(atCapture);
    expect(pvm.hash()).not.toBe(atCapture);
    expect(await pvm.diskHash(false, true), 'the log as the capture left it').toEqual(diskAtCapture);
    svm.receive(pvm.takeCaptured(true));
    expect(() => pvm.takeCaptured(true), 'a capture is sent once').toThrow(/nothing was captured/);
    svm.load();
    pvm.checkpointed();
    expect(svm.hash()).toBe(atCapture);
    expect(svm.hash(true), 'an SVM hashes its own state').toBe(atCapture);
    expect(svm.get('key3')?.value).toEqual(Buffer.alloc(100, 3));
    expect(svm.get('late')).toBeUndefined();
    // The next checkpoint carries what changed since the capture: the two keys.
    expect(pvm.status().dirtyKeys).toBe(2);
    pvm.capture(false);
    await pvm.put('key4', Buffer.from('during a checkpoint that fails'));
    pvm.takeCaptured(false); // sent, never committed: the SVM discards it
    // The one after carries the failed one's keys and the change made since.
    expect(pvm.status().dirtyKeys).toBe(3);
    pvm.capture(false);
    const second = pvm.hash(true);
    svm.receive(pvm.takeCaptured(false));
    svm.load();
    pvm.checkpointed();
    expect(svm.hash()).toBe(second);
    expect(svm.hash()).toBe(pvm.hash());
    // Kept paused (no capture): the state now, and a commit leaves nothing changed.
    await pvm.put('key5', Buffer.from('paused checkpoint'));
    svm.receive(pvm.save(false));
    svm.load();
    pvm.checkpointed();
    expect(pvm.status().dirtyKeys).toBe(0);
    expect(svm.hash()).toBe(pvm.hash(true));
  });
});

describe('guest memory checkpoint encoding', () => {
  it('round-trips a delta from pieces cut anywhere, encodes the values by reference, and refuses anything else with EPROTO', () => {
    const d = {
      full: false,
      ops: 7,
      rng: [1, 2, 3, 4] as [number, number, number, number],
      logPos: 8192,
      logSeq: 3,
      entries: [
        ['a', Buffer.from('x'), 1],
        ['ключ', Buffer.alloc(70_000, 9), 4],
        ['empty', Buffer.alloc(0), 2],
      ] as [string, Buffer, number][],
    };
    const parts = encodeDelta(d);
    // The values go out as they are: the large one is a part of its own, the same memory.
    expect(parts).toContain(d.entries[1][1]);
    const b = Buffer.concat(parts);
    expect(deltaBytes(parts)).toBe(b.length);
    expect(decodeDelta(b)).toEqual(d);
    expect(decodeDelta(parts)).toEqual(d);
    // As a socket would deliver it: pieces of any size, an entry's fields split across them.
    let seed = 7;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n) + 1;
    for (let round = 0; round < 50; round++) {
      const pieces: Buffer[] = [];
      for (let at = 0; at < b.length;) {
        const n = Math.min(b.length - at, round % 2 ? rand(40) : rand(20_000));
        pieces.push(b.subarray(at, at + n));
        at += n;
      }
      if (round % 5 === 0) pieces.splice(1, 0, Buffer.alloc(0));
      // Equal to the original once encoded again (a byte compare: toEqual on 70 kB values is slow).
      expect(Buffer.concat(encodeDelta(decodeDelta(pieces))).equals(b)).toBe(true);
    }
    const empty = { ...d, entries: [] };
    expect(decodeDelta(encodeDelta(empty))).toEqual(empty);
    // A preloaded state: sent whole at a pairing, only its changes later.
    const big = new GuestState(memDisk(), { seed: 3, nondeterminism: 0 });
    expect(big.preload(8 * 1024 * 1024)).toBe(2048);
    expect(deltaBytes(big.save(true))).toBeGreaterThan(8 * 1024 * 1024);
    expect(deltaBytes(big.save(false))).toBeLessThan(200);
    for (const junk of [
      Buffer.alloc(0),
      Buffer.from('hello world'),
      b.subarray(0, b.length - 1),
      Buffer.concat([b, Buffer.alloc(1)]),
    ]) {
      expect(() => decodeDelta(junk)).toThrow(expect.objectContaining({ code: 'EPROTO' }));
      expect(() => decodeDelta([junk.subarray(0, 5), junk.subarray(5)])).toThrow(
        expect.objectContaining({ code: 'EPROTO' }),
      );
    }
  });
});

describe('guest memory checkpoint sending', () => {
  it('joins the parts into few pieces, into one kept buffer when it is free, and never changes what a send holds', async () => {
    const sender = new DeltaSender();
    const parts = (n: number, size: number) =>
      Array.from({ length: n }, (_, i) => Buffer.alloc(size, (i * 7 + size) & 255));
    const small = parts(513, 2048);
    let first: Buffer | null = null;
    await sender.send(small, async (pieces) => {
      expect(pieces).toHaveLength(1);
      expect(pieces[0].equals(Buffer.concat(small))).toBe(true);
      first = pieces[0];
      // A second send while the first still holds its buffer gets buffers of its own.
      const other = parts(3, 100);
      await sender.send(other, async (p2) => {
        expect(p2[0].buffer).not.toBe(first!.buffer);
        expect(Buffer.concat(p2).equals(Buffer.concat(other))).toBe(true);
      });
      expect(pieces[0].equals(Buffer.concat(small))).toBe(true);
    });
    // Released: the next send reuses the same memory.
    await sender.send(parts(2, 10), async (pieces) => expect(pieces[0].buffer).toBe(first!.buffer));
    // Larger than a piece (4 MiB): several pieces, in order, nothing lost; an empty delta is one empty piece.
    const big = parts(9, 1024 * 1024 + 3);
    await sender.send(big, async (pieces) => {
      expect(pieces.length).toBe(3);
      expect(pieces.every((p) => p.length <= 4 * 1024 * 1024)).toBe(true);
      expect(Buffer.concat(pieces).equals(Buffer.concat(big))).toBe(true);
    });
    await sender.send([], async (pieces) => expect(deltaBytes(pieces)).toBe(0));
    // A failed send gives the buffer back too.
    await expect(sender.send(small, async () => Promise.reject(new Error('peer gone')))).rejects.toThrow(
      'peer gone',
    );
    await sender.send(parts(2, 10), async (pieces) => expect(pieces[0].buffer).toBe(first!.buffer));
  });
});

describe('guest server', () => {
  it('answers the same bytes for the same requests and seed; noisy responses differ, at the fraction asked', async () => {
    const reqs = [put('a', 'alpha'), get('a'), put('b', 'beta'), get('zz'), get('a')];
    const [x, y] = [await guest(memDisk(), 42), await guest(memDisk(), 42)];
    const [rx, ry] = [await exchange(x.port, reqs), await exchange(y.port, reqs)];
    expect(rx.equals(ry)).toBe(true);
    expect(rx.toString()).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    expect(rx.toString()).not.toMatch(/Date:/);
    expect(rx.toString()).toContain('404 Not Found');
    // 100 %: every response differs; 10 %: about one in ten.
    const [n1, n2] = [await guest(memDisk(), 7, 1), await guest(memDisk(), 7, 1)];
    const many = Array.from({ length: 200 }, (_, i) => get(`k${i}`));
    const [a, b] = [await exchange(n1.port, many), await exchange(n2.port, many)];
    expect(a.equals(b)).toBe(false);
    expect(a.toString().split('X-Noise:').length - 1).toBe(200);
    const [t1] = [await guest(memDisk(), 9, 0.1)];
    const noisy = (await exchange(t1.port, many)).toString().split('X-Noise:').length - 1;
    expect(noisy).toBeGreaterThan(5);
    expect(noisy).toBeLessThan(45);
  });

  it('bad input is answered and closes only its own connection', async () => {
    const g = await guest(memDisk(), 1);
    const bad = await exchange(g.port, ['GARBAGE\r\n\r\n']);
    expect(bad.toString()).toMatch(/^HTTP\/1\.1 400 Bad Request/);
    const chunked = await exchange(g.port, ['PUT /kv/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n']);
    expect(chunked.toString()).toMatch(/^HTTP\/1\.1 411/);
    // A client that sends half a request and never more does not stall the others.
    const half = net.connect({ port: g.port, host: '127.0.0.1' });
    half.write('PUT /kv/slow HTTP/1.1\r\nContent-Length: 100\r\n\r\nabc');
    const ok = await exchange(g.port, [put('fine', 'yes'), get('fine')]);
    expect(ok.toString()).toContain('yes');
    half.destroy();
    // A key that is not valid percent-encoding: 400 (it used to reject the answer's promise, which
    // ends a Node process; in COLO both guests take the same request at once).
    for (const key of ['%zz', '%', 'a%E0%A4%A', '%C0%AF'])
      for (const req of [get(key), put(key, 'v')]) {
        const r = (await exchange(g.port, [req, get('fine')])).toString();
        expect(r, key).toMatch(/^HTTP\/1\.1 400 Bad Request/);
        expect(r).toContain('not a valid percent-encoded');
        expect(r).toContain('yes'); // the connection goes on
      }
  });

  it('seeded requests of every shape: each connection gets an answer, and the guest keeps serving', async () => {
    const g = await guest(memDisk(), 5);
    const piece = fc.constantFrom(
      'a',
      '/',
      '%',
      '%zz',
      '%41',
      '%E0%A4',
      '?',
      '#',
      '..',
      ' ',
      '\t',
      'é',
      '%00',
      'kv',
    );
    const target = fc.oneof(
      fc.array(piece, { maxLength: 6 }).map((p) => '/kv/' + p.join('')),
      fc.array(piece, { maxLength: 6 }).map((p) => '/' + p.join('')),
      fc.string({ maxLength: 12 }),
    );
    const request = fc.record({
      method: fc.constantFrom('GET', 'PUT', 'POST', 'DELETE', 'HEAD', 'get', ''),
      target,
      version: fc.constantFrom('HTTP/1.1', 'HTTP/1.0', 'HTTP/2', ''),
      length: fc.oneof(fc.constant<number | null>(null), fc.integer({ min: -1, max: 40 })),
      body: fc.string({ maxLength: 32 }),
      close: fc.boolean(),
    });
    await fc.assert(
      fc.asyncProperty(request, async (r) => {
        const head = [
          `${r.method} ${r.target} ${r.version}`.trim(),
          'Host: g',
          ...(r.length === null ? [] : [`Content-Length: ${r.length}`]),
          ...(r.close ? ['Connection: close'] : []),
        ].join('\r\n');
        // The body as long as the header says where it can be, so that every request is whole.
        const body =
          r.length !== null && r.length >= 0 ? r.body.padEnd(r.length, 'x').slice(0, r.length) : '';
        const answer = (await exchange(g.port, [`${head}\r\n\r\n${body}`])).toString();
        expect(answer, JSON.stringify(r)).toMatch(/^HTTP\/1\.1 [1-5]\d\d /);
      }),
      { numRuns: 300, seed: 0x6e57, endOnFailure: true },
    );
    const ok = (await exchange(g.port, [put('after', 'still'), get('after')])).toString();
    expect(ok).toContain('still');
  });

  it("pause drains requests in flight and reports positions; align moves a connection to the primary's position", async () => {
    const g = await guest(memDisk(), 3);
    const s = net.connect({ port: g.port, host: '127.0.0.1' });
    await new Promise((r) => s.once('connect', r));
    const got: Buffer[] = [];
    s.on('data', (d) => got.push(d));
    const id = String(s.localPort);
    const r1 = put('k', 'v1');
    const r2 = get('k');
    s.write(r1);
    await new Promise((r) => setTimeout(r, 50));
    let pos = await g.server.pause();
    expect(pos[id].consumed).toBe(Buffer.byteLength(r1));
    const written = pos[id].written;
    // While paused, a request waits.
    s.write(r2);
    await new Promise((r) => setTimeout(r, 50));
    expect((await g.server.pause())[id]).toEqual({ consumed: Buffer.byteLength(r1), written });
    // The primary had taken r1 and r2: this side skips r2 (its effects come with the state).
    g.server.align({ [id]: Buffer.byteLength(r1) + Buffer.byteLength(r2) });
    g.server.resume();
    await new Promise((r) => setTimeout(r, 50));
    pos = g.server.positions();
    expect(pos[id]).toEqual({ consumed: Buffer.byteLength(r1 + r2), written });
    // This side takes r3; the primary had not when it paused: this side takes r3 again after the load.
    const r3 = put('k', 'v3');
    s.write(r3);
    await new Promise((r) => setTimeout(r, 50));
    pos = await g.server.pause();
    expect(pos[id].consumed).toBe(Buffer.byteLength(r1 + r2 + r3));
    const before = pos[id].written;
    g.server.align({ [id]: Buffer.byteLength(r1 + r2) });
    expect(g.server.positions()[id].consumed).toBe(Buffer.byteLength(r1 + r2));
    g.server.resume();
    await new Promise((r) => setTimeout(r, 50));
    pos = g.server.positions();
    expect(pos[id].consumed).toBe(Buffer.byteLength(r1 + r2 + r3));
    expect(pos[id].written).toBeGreaterThan(before); // r3 answered once more
    // Before the last checkpoint there is nothing to take again.
    expect(() => g.server.align({ [id]: 0 })).toThrow(/before the last checkpoint/);
    s.destroy();
  });

  it('a connection answered and closed before a pause is still reported, with its final positions, until a checkpoint forgets it', async () => {
    const g = await guest(memDisk(), 3);
    // A client that half-closes after its request: the guest answers, then closes.
    const s = net.connect({ port: g.port, host: '127.0.0.1', allowHalfOpen: true });
    await new Promise((r) => s.once('connect', r));
    const id = String(s.localPort);
    const got: Buffer[] = [];
    s.on('data', (d) => got.push(d));
    const req = put('h', 'half');
    s.end(req);
    await new Promise((r) => s.once('close', r));
    const answer = Buffer.concat(got);
    expect(answer.toString()).toMatch(/^HTTP\/1\.1 200/);
    // Without it a checkpoint would release none of that answer and have the other side take the request again.
    expect((await g.server.pause())[id]).toEqual({
      consumed: Buffer.byteLength(req),
      written: answer.length,
    });
    g.server.resume();
    g.server.checkpointed(); // that pause reported it: forgotten
    expect((await g.server.pause())[id]).toBeUndefined();
    g.server.resume();
  });
});

describe('colo-blk guest (process)', () => {
  let nbd: RunningServer | null = null;
  const dir = tmpDir('colo-blk-guest-');
  afterAll(async () => {
    await nbd?.close();
    await killAll();
    rmDir(dir);
  });

  it('serves PUT/GET on an NBD disk, recovers after a restart, and answers its control API', async () => {
    nbd = await startServer(new MemoryDevice(8 << 20));
    const args = ['--listen', '127.0.0.1:0', '--control', '127.0.0.1:0', '--disk', nbd.uri(), '--seed', '4'];
    let g = await startNode('guest', args);
    const port = Number(g.info.port);
    const out = await exchange(port, [put('city', 'Lyon'), get('city')]);
    expect(out.toString()).toContain('{"version":1}');
    expect(out.toString()).toContain('Lyon');
    const ctl = { host: '127.0.0.1', port: Number(g.info.controlPort) };
    const st = await controlCall<{ keys: number; dirtyKeys: number }>(ctl, 'GET', '/status');
    expect(st).toMatchObject({ keys: 1, dirtyKeys: 1 });
    const { hash } = await controlCall<{ hash: string }>(ctl, 'GET', '/hash');
    g.child.kill('SIGKILL');
    await g.exit;
    g = await startNode('guest', args);
    expect((await exchange(Number(g.info.port), [get('city')])).toString()).toContain('Lyon');
    const again = await controlCall<{ keys: number }>(
      { host: '127.0.0.1', port: Number(g.info.controlPort) },
      'GET',
      '/status',
    );
    expect(again.keys).toBe(1);
    expect(hash).toMatch(/^[0-9a-f]{64}$/);
    // A load with nothing received is refused, unless it repeats the last load (its answer lost).
    const ctl2 = { host: '127.0.0.1', port: Number(g.info.controlPort) };
    await expect(controlCall(ctl2, 'POST', '/mem/load', { checkpoint: 'c1' })).rejects.toThrow(
      /no memory checkpoint was received/,
    );
    const from = await startNode('guest', args);
    try {
      const fromCtl = { host: '127.0.0.1', port: Number(from.info.controlPort) };
      await controlCall(fromCtl, 'POST', '/mem/pause', {});
      await controlCall(fromCtl, 'POST', '/mem/send', { to: `127.0.0.1:${ctl2.port}`, full: true });
      expect(await controlCall(ctl2, 'POST', '/mem/load', { checkpoint: 'c1' })).toMatchObject({
        entries: 1,
      });
      expect(await controlCall(ctl2, 'POST', '/mem/load', { checkpoint: 'c1' })).toEqual({
        entries: 0,
        again: true,
      });
      await expect(controlCall(ctl2, 'POST', '/mem/load', { checkpoint: 'c2' })).rejects.toThrow(
        /no memory checkpoint was received/,
      );
    } finally {
      from.child.kill('SIGKILL');
      await from.exit;
    }
    g.child.kill('SIGKILL');
    await g.exit;
  });

  it('refuses bad options with exit code 2 and a clear message', async () => {
    const r = await startNode('guest', [
      '--disk',
      'http://nope',
      '--listen',
      '127.0.0.1:0',
      '--control',
      '127.0.0.1:0',
    ]).catch((e: Error) => e);
    expect((r as Error).message).toMatch(
      /bad NBD address 'http:\/\/nope': expected nbd:\/\/HOST:PORT\/EXPORT/,
    );
  });
});
