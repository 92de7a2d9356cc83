// A secondary answers hash requests as of their point in the stream, though
// it runs them at once: a later write into a request's range waits for it,
// a write elsewhere does not change what it reads. A real secondary process,
// spoken to frame by frame over TCP.
import { createHash } from 'node:crypto';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { decodeFrame, encodeFrameBuffer, peekFrameBytes } from '../src/checkpoint/format/frame.js';
import { FRAME_HEADER_BYTES } from '../src/checkpoint/format/frame.js';
import { killAll, rmDir, tmpDir } from './helpers.js';
import { RawConn } from './raw-nbd.js';
import { secondaryArgs, startNode, type NodeProc } from './replication-helpers.js';

const dirs: string[] = [];
const procs: NodeProc[] = [];
afterEach(async () => {
  for (const p of procs.splice(0)) if (p.child.exitCode === null) p.child.kill('SIGKILL');
  await killAll();
});
afterAll(() => dirs.forEach(rmDir));

const SIZE = 8 << 20;
const KiB = 1024;

/** The next frame from the secondary: its metadata and data. */
async function nextFrame(c: RawConn): Promise<{ meta: Record<string, unknown>; data: Buffer }> {
  await c.need(FRAME_HEADER_BYTES);
  const total = peekFrameBytes(c.queue.peek(FRAME_HEADER_BYTES))!;
  await c.need(total);
  const f = decodeFrame(c.queue.take(total))!;
  return { meta: f.meta, data: f.data };
}

const sha = (b: Buffer) => createHash('sha256').update(b).digest().subarray(0, 16);

/** A real secondary process and a raw connection to its link, past the hello (a full resync decided). */
async function connectResyncing(): Promise<RawConn> {
  const dir = tmpDir('colo-blk-link-hashes-');
  dirs.push(dir);
  const s = await startNode(
    'secondary',
    secondaryArgs(path.join(dir, 'svm.img'), '8M', path.join(dir, 'state')),
  );
  procs.push(s);
  const c = await RawConn.connect(Number(s.info.replicationPort));
  c.send(
    encodeFrameBuffer({
      t: 'hello',
      proto: 2,
      size: SIZE,
      epoch: 1,
      session: 'raw',
      history: [{ n: 1, id: 'a1b2c3d4e5f6', by: 'raw-primary', base: 0, at: Date.now(), reason: 'new disk' }],
      needsResync: true,
      window: 1 << 21,
    }),
  );
  const hello = await nextFrame(c);
  expect(hello.meta, s.stderr()).toMatchObject({ t: 'hello', decision: { action: 'resync', mode: 'full' } });
  return c;
}

describe('hash requests on the replication link', () => {
  it('answer as of their point in the stream: a later write into the range waits, one elsewhere does not matter', async () => {
    const c = await connectResyncing();
    const block = (v: number) => Buffer.alloc(64 * KiB, v);
    // Rounds of: a write, a hash of its range (1 MiB around it, so it reads a while), a write over
    // that range and one far away, all in one TCP write: the secondary has them all at once.
    const frames: Buffer[] = [];
    const want = new Map<number, Buffer>();
    const disk = Buffer.alloc(SIZE);
    let seq = 0;
    let id = 0;
    const write = (o: number, v: number) => {
      frames.push(encodeFrameBuffer({ t: 'w', e: 1, s: ++seq, o }, block(v)));
      block(v).copy(disk, o);
    };
    for (let round = 0; round < 24; round++) {
      const base = (round % 6) << 20;
      write(base + 64 * KiB, 1 + round);
      const hid = ++id;
      frames.push(encodeFrameBuffer({ t: 'hash?', id: hid, o: base, l: 1 << 20, bs: 64 * KiB }));
      const hashes: Buffer[] = [];
      for (let b = 0; b < 16; b++) {
        const piece = disk.subarray(base + b * 64 * KiB, base + (b + 1) * 64 * KiB);
        hashes.push(piece.equals(Buffer.alloc(64 * KiB)) ? Buffer.alloc(16) : sha(piece));
      }
      want.set(hid, Buffer.concat(hashes));
      write(base + 64 * KiB, 101 + round); // into the range just asked about
      write((7 << 20) + (round % 16) * 64 * KiB, 201 + round); // far from it (hashes ask for 0-6 MiB)
    }
    c.send(Buffer.concat(frames));
    const got = new Map<number, Buffer>();
    while (got.size < want.size) {
      const f = await nextFrame(c);
      if (f.meta.t === 'got' || f.meta.t === 'beat') continue;
      expect(f.meta.t, JSON.stringify(f.meta)).toBe('hash');
      got.set(f.meta.id as number, f.data);
    }
    for (const [hid, h] of want) expect(got.get(hid)!.equals(h), `hash request ${hid}`).toBe(true);
  }, 30_000);

  it('a request that fails is answered with an error frame, then the stream ends while the primary still sends (no reset)', async () => {
    const c = await connectResyncing();
    // A primary keeps streaming after the secondary's end until it reads it: half-open, as the link.
    c.socket.allowHalfOpen = true;
    let endedAt = 0;
    let reset: string | null = null;
    c.socket.on('end', () => (endedAt = Date.now()));
    c.socket.on('error', (err) => (reset ??= err.message));
    let seq = 0;
    const record = () =>
      encodeFrameBuffer({ t: 'w', e: 1, s: ++seq, o: (seq % 64) * 64 * KiB }, Buffer.alloc(64 * KiB, seq));
    // A request past the end of the disk fails; records follow it, before and after the answer.
    c.send(
      Buffer.concat([
        encodeFrameBuffer({ t: 'hash?', id: 1, o: SIZE - 64 * KiB, l: 1 << 20, bs: 64 * KiB }),
        record(),
      ]),
    );
    let error: Record<string, unknown> | null = null;
    for (let i = 0; i < 1000 && !error; i++) {
      const f = await nextFrame(c);
      if (f.meta.t === 'error') error = f.meta;
    }
    expect(error).toMatchObject({ t: 'error', code: 'EINVAL' });
    expect(String(error!.message)).toMatch(/^hashing .*beyond the disk/);
    // Go on sending for a while after the end: a connection that was destroyed answers with a reset.
    for (let i = 0; i < 100 && !reset && (!endedAt || Date.now() - endedAt < 300); i++) {
      if (!c.socket.destroyed) c.socket.write(record());
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(reset, 'the secondary reset the connection instead of ending it').toBeNull();
    expect(endedAt).toBeGreaterThan(0);
    c.socket.destroy();
  }, 30_000);
});
