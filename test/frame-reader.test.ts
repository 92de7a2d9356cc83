// The link's frame reader over a real TCP socket read into slabs (sys/net.ts
// tcpNet): large frames are read into reused buffers (FrameReader `buffers`),
// the header after a large frame alone, and a buffer is given back only once
// the turn that handled its frame has ended, so a journal that keeps the
// pieces until its end-of-turn flush (JournalWriter.appendRaw, as the
// secondary's store does) writes every frame byte-exact.
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decodeFrame, encodeFrame } from '../src/checkpoint/format/frame.js';
import { JournalWriter, scanJournal } from '../src/checkpoint/format/journal.js';
import { FrameReader, send, writable } from '../src/checkpoint/link/transport.js';
import { ReplyBuffers } from '../src/net/reply-buffers.js';
import { tcpNet, type Conn } from '../src/sys/net.js';
import { nodeStorage } from '../src/sys/storage.js';
import { prng, randomBytes, rmDir, tmpDir } from './helpers.js';

const KiB = 1024;
const dirs: string[] = [];
afterAll(() => dirs.forEach(rmDir));

/**
 * Frames of `n` writes: mostly 64 KiB to 900 KiB (large, and under the journal's
 * flush size, so it keeps their pieces until the end of the turn), some small,
 * and a resync's 4 MiB chunk now and then.
 */
function frames(rand: () => number, n: number): { meta: { t: string; o: number }; data: Buffer }[] {
  return Array.from({ length: n }, (_, i) => {
    const len =
      i % 17 === 16 ? 4096 * KiB : i % 5 === 0 ? 1 + (rand() % 8192) : 64 * KiB + (rand() % (836 * KiB));
    return { meta: { t: 'w', o: i * 8192 * KiB }, data: randomBytes(len, rand) };
  });
}

describe('the link frame reader: large frames into reused buffers', () => {
  for (const pooled of [true, false])
    it(`hands every frame on byte-exact to a handler whose journal flushes at the end of the turn (${pooled ? 'with' : 'without'} a pool)`, async () => {
      const dir = tmpDir('colo-blk-frame-reader-');
      dirs.push(dir);
      const journal = JournalWriter.open(nodeStorage, path.join(dir, 'j.journal'), 0);
      const buffers = new ReplyBuffers();
      const rand = prng(pooled ? 11 : 12);
      const sent = frames(rand, 120);
      let handled = 0;
      let failure: Error | null = null;
      let done!: () => void;
      const all = new Promise<void>((r) => (done = r));
      const listener = await tcpNet.listen('127.0.0.1', 0, (conn: Conn) => {
        new FrameReader<{ t: string; o: number }>(
          conn,
          (m) => m as { t: string; o: number },
          (_msg, frame, data) => {
            let dataLength = 0;
            for (const d of data) dataLength += d.length;
            journal.appendRaw(frame, dataLength);
            // Now and then the handler waits, as the store does behind a running hash request.
            if (++handled === sent.length) setImmediate(done);
            if (handled % 5 === 0) return new Promise<void>((r) => setTimeout(r, 1));
          },
          (err) => {
            failure = err;
            done();
          },
          () => {},
          pooled ? buffers : null,
        );
      });
      const client = net.connect(listener.port, '127.0.0.1');
      await new Promise<void>((r) => client.once('connect', () => r()));
      // Pipelined: the first half cut anywhere with pauses (frames straddle reads), the
      // rest at once (the server reads on and on in one turn, into the buffers it reuses).
      const stream = Buffer.concat(sent.map((f) => Buffer.concat(encodeFrame(f.meta, f.data))));
      let at = 0;
      while (at < stream.length / 2) {
        const n = 1 + (rand() % (3 * 1024 * KiB));
        client.write(stream.subarray(at, at + n));
        at += n;
        if (rand() % 4 === 0) await new Promise((r) => setTimeout(r, 1));
      }
      client.write(stream.subarray(at));
      await all;
      await new Promise((r) => setImmediate(r));
      expect(failure).toBeNull();
      journal.flush();
      let i = 0;
      const scan = scanJournal<{ t: string; o: number }>(
        nodeStorage,
        journal.path,
        (rec) => {
          expect(rec.meta.o, `frame ${i}`).toBe(sent[i].meta.o);
          expect(rec.data!.equals(sent[i].data), `frame ${i}'s data`).toBe(true);
          i++;
        },
        { withData: true },
      );
      expect(scan.corruption).toBeNull();
      expect(i).toBe(sent.length);
      // With a pool, its buffers were used, and used again.
      if (pooled) expect(buffers.reused).toBeGreaterThan(10);
      else expect(buffers.reused).toBe(0);
      client.destroy();
      journal.close();
      await listener.close();
    });
});

describe('the link writer: nothing after the end', () => {
  // The secondary answers a store error with an error frame, then ends its side while
  // the primary is still streaming. A frame it sent after end() (a flow-control count
  // for the very frame that failed) made Node destroy the socket: a reset, and the
  // primary, writing, got EPIPE before it had read the error frame, so the checkpoint
  // failed saying "write EPIPE" instead of "no space left on device".
  it('send() after end() writes nothing; the peer, still writing, reads the error and a clean end', async () => {
    const serverErrors: string[] = [];
    const listener = await tcpNet.listen('127.0.0.1', 0, (conn) => {
      conn.on('error', (e) => serverErrors.push(e.message));
      conn.on('data', () => {}); // keeps reading: what the peer still sends is drained, not left to a reset
      conn.resume();
      send(conn, { t: 'error', code: 'ENOSPC', message: 'disk full' });
      conn.end();
      send(conn, { t: 'got', n: 1 });
      expect(writable(conn)).toBe(false);
    });
    try {
      const client = net.connect(listener.port, '127.0.0.1');
      let received = Buffer.alloc(0);
      const clientErrors: string[] = [];
      client.on('data', (d: Buffer) => (received = Buffer.concat([received, d])));
      client.on('error', (e) => clientErrors.push(e.message));
      let ended = false;
      client.on('end', () => (ended = true));
      // Stream as the primary does, until the peer's end is read.
      const chunk = Buffer.alloc(256 * KiB, 7);
      await new Promise<void>((resolve) => {
        client.on('close', () => resolve());
        const pump = () => {
          while (!ended && !client.destroyed && client.write(chunk));
          if (!ended && !client.destroyed) client.once('drain', pump);
        };
        client.on('connect', pump);
      });
      expect(clientErrors, 'the connection was reset').toEqual([]);
      expect(ended, 'no end of stream').toBe(true);
      const first = decodeFrame(received);
      expect(first?.meta, 'the error frame').toEqual({ t: 'error', code: 'ENOSPC', message: 'disk full' });
      expect(received.length, 'nothing after the error frame').toBe(first!.bytes);
      expect(serverErrors).toEqual([]);
    } finally {
      await listener.close();
    }
  });
});
