// The replication link's messages are validated where they enter
// (src/checkpoint/messages.ts): every field a receiver uses is checked, and
// anything else is a protocol error (EPROTO), never a cast.
import { describe, expect, it } from 'vitest';
import { decodeFrame, encodeFrameBuffer } from '../src/checkpoint/format/frame.js';
import { parseToPrimary, parseToSecondary } from '../src/checkpoint/link/messages.js';

const gen = { n: 1, id: 'abc123', by: 'node1', base: 0, at: 1700000000000, reason: 'new disk' };
/** As the receiver sees it: encoded as a frame and decoded again. */
const wire = (m: object) => decodeFrame(encodeFrameBuffer(m))!.meta;

describe('link messages', () => {
  it('accepts every well-formed message in each direction, typed', () => {
    const toSecondary = [
      { t: 'hello', proto: 1, size: 4096, epoch: 3, session: 's1', history: [gen], needsResync: true },
      {
        t: 'hello',
        proto: 2,
        size: 4096,
        epoch: 3,
        session: 's1',
        history: [],
        needsResync: false,
        window: 1 << 21,
      },
      { t: 'beat' },
      { t: 'w', e: 3, s: 7, o: 512, f: true },
      { t: 'z', e: 3, s: 8, o: 0, l: 4096, h: true },
      { t: 't', e: 3, s: 9, o: 0, l: 4096 },
      { t: 'seal', e: 3, n: 3, b: 512 },
      { t: 'commit', e: 3, sync: { state: 'done', target: 'abc123', mode: 'full', history: [gen] } },
      { t: 'hash?', id: 1, o: 0, l: 65536, bs: 4096 },
      { t: 'hash?', id: 2, o: 0, l: 65536, bs: 4096, alg: 'blake3' },
      { t: 'hash?', id: 3, o: 0, l: 65536, bs: 4096, alg: 'sha256' },
    ];
    for (const m of toSecondary) expect(parseToSecondary(wire(m))).toEqual(m);
    const toPrimary = [
      { t: 'hello', proto: 1, size: 4096 },
      {
        t: 'hello',
        proto: 1,
        size: 4096,
        seq: 0,
        durable: 2,
        committed: 2,
        history: [gen],
        decision: { action: 'resync', mode: 'incremental', reason: 'r', common: gen },
        hot: [{ offset: 0, length: 1 << 20 }],
        hashes: ['blake3', 'sha256'],
      },
      { t: 'got', n: 3 << 20 },
      { t: 'durable', e: 3 },
      { t: 'committed', e: 3, overlayDiscarded: { records: 1, bytes: 512 } },
      { t: 'hash', id: 1 },
      { t: 'error', code: 'ESTALE', message: 'promoted', e: 4 },
    ];
    for (const m of toPrimary) expect(parseToPrimary(wire(m))).toEqual(m);
  });

  it('a secondary may name digests this node does not know: they are left out', () => {
    const m = parseToPrimary(wire({ t: 'hello', proto: 2, size: 1, hashes: ['k12', 'blake3', 'sha256'] }));
    expect(m).toMatchObject({ t: 'hello', hashes: ['blake3', 'sha256'] });
  });

  it('refuses malformed messages with EPROTO, saying what is wrong', () => {
    const bad: [(m: unknown) => unknown, object, RegExp][] = [
      [parseToSecondary, { t: 'nope' }, /unknown message type 'nope'/],
      [parseToSecondary, { t: 'w', e: 1, s: -1, o: 0 }, /w' record.s is not a non-negative integer/],
      [parseToSecondary, { t: 'z', e: 1, s: 1, o: 0 }, /l is not a non-negative integer/],
      [parseToSecondary, { t: 'seal', e: '1', n: 0, b: 0 }, /e is not a non-negative integer/],
      [parseToSecondary, { t: 'hello', proto: 1, size: 1, epoch: 1, session: 5 }, /session is not a string/],
      [parseToSecondary, { t: 'hello', proto: 1, size: 1, epoch: 1, session: 's', history: 'x' }, /history/],
      [
        parseToSecondary,
        { t: 'commit', e: 1, sync: { state: 'half', target: 'a', mode: 'full' } },
        /sync.state/,
      ],
      [parseToSecondary, { t: 'hash?', id: 1, o: 0, l: 1.5, bs: 4096 }, /l is not/],
      [
        parseToSecondary,
        { t: 'hash?', id: 1, o: 0, l: 4096, bs: 4096, alg: 'md5' },
        /hash\?\.alg is not a digest this node knows \(md5\)/,
      ],
      [parseToPrimary, { t: 'hello', proto: 1, size: 1, hashes: 'blake3' }, /hello.hashes is not a list/],
      [parseToPrimary, { t: 'hello', proto: 1, size: 1, hashes: [7] }, /hello.hashes is not a list/],
      [
        parseToPrimary,
        { t: 'error', code: 'EWHATEVER', message: 'm' },
        /EWHATEVER' is not one colo-blk knows/,
      ],
      [
        parseToPrimary,
        { t: 'hello', proto: 1, size: 1, decision: { action: 'merge', reason: 'r' } },
        /decision.action/,
      ],
      [parseToPrimary, { t: 'hello', proto: 1, size: 1, hot: [{ offset: 0 }] }, /length/],
      [parseToPrimary, { t: 'durable' }, /durable.e/],
      [parseToPrimary, { t: 'got', n: -1 }, /got.n is not a non-negative integer/],
      [
        parseToSecondary,
        { t: 'hello', proto: 2, size: 1, epoch: 1, session: 's', window: 'big' },
        /hello.window/,
      ],
      [parseToPrimary, [1, 2], /not a map/],
    ];
    for (const [parse, m, why] of bad) {
      let err: (Error & { code?: string }) | null = null;
      try {
        parse(wire(m));
      } catch (e) {
        err = e as Error & { code?: string };
      }
      expect(err, JSON.stringify(m)).not.toBeNull();
      expect(err!.code).toBe('EPROTO');
      expect(err!.message).toMatch(why);
    }
  });
});
