/**
 * Hostile and broken clients, over raw TCP sockets, shaped after known NBD
 * server CVEs (unchecked lengths, offset wrap-around, unbounded buffering,
 * connection floods, crashes on early disconnect) and after the spec's error
 * rules (proto.md, proto-ext.md). After each scenario a fresh, well-behaved
 * client must still be served, no connection may leak, and the server must not
 * have hit an internal error.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdErrno } from '../src/errors.js';
import { limits, MiB, GiB } from '../src/limits.js';
import { NbdClient } from '../src/net/client.js';
import { encodeInfoRequest, encodeMetaContextRequest, encodeOption } from '../src/net/codec.js';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  EXTENDED_REQUEST_MAGIC,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  Opt,
  Rep,
  REQUEST_MAGIC,
  ReplyType,
  TxFlag,
} from '../src/net/protocol.js';
import type { Logger } from '../src/net/server.js';
import { prng, randomBytes, runOk, startServer, type RunningServer } from './helpers.js';
import {
  closeAllRaw,
  encodeRequest,
  expectHealthy,
  MODES,
  openSession,
  RawConn,
  Session,
  sleep,
  waitFor,
  type Mode,
  type RawRequest,
  type Reply,
} from './raw-nbd.js';
import { itWith } from './tools.js';

const SIZE = 64 * MiB;
const RO_SIZE = 1 * MiB;
const BIG_SIZE = 2 ** 40;

/** Internal errors the server logged (a bug of ours: "internal error, disconnecting"). */
const internalErrors: string[] = [];
const logger: Logger = {
  info() {},
  debug() {},
  warn(msg: string) {
    if (/internal error/.test(msg)) internalErrors.push(msg);
  },
};

let srv: RunningServer;
let port: number;

beforeAll(async () => {
  srv = await startServer(
    [
      { name: 'disk0', device: new MemoryDevice(SIZE) },
      { name: 'ro', device: new MemoryDevice(RO_SIZE), readOnly: true },
      { name: 'big', device: new MemoryDevice(BIG_SIZE) },
    ],
    { logger },
  );
  port = srv.port;
});

afterEach(async () => {
  closeAllRaw();
  // No connection may leak, and nothing may have thrown inside the server.
  await waitFor(() => srv.server.connectionCount === 0, 5_000, 'server connection count to return to 0');
  const errs = internalErrors.splice(0);
  expect(errs, 'server internal errors').toEqual([]);
});

afterAll(async () => {
  closeAllRaw();
  await srv?.close();
});

function errnoName(errno: number): string {
  return Object.entries(NbdErrno).find(([, v]) => v === errno)?.[0] ?? (errno === 0 ? 'OK' : `E${errno}`);
}

function expectErrno(reply: Reply, errno: number, what = ''): void {
  expect(errnoName(reply.error), `${what} (server said: ${reply.message})`).toBe(errnoName(errno));
}

/** Connect, read the greeting, send client flags. */
async function negotiating(
  p = port,
  flags: number = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES,
): Promise<RawConn> {
  const c = await RawConn.connect(p);
  const hf = await c.greeting();
  expect(hf & HandshakeFlag.FIXED_NEWSTYLE).toBeTruthy();
  c.flags(flags);
  return c;
}

/** The server closed the connection promptly and sent nothing more. */
async function expectDisconnect(c: RawConn, what: string, timeoutMs = 3_000): Promise<void> {
  expect(await c.waitClosed(timeoutMs), `${what}: server should disconnect`).toBe(true);
  expect(c.queue.length, `${what}: no reply before the disconnect`).toBe(0);
}

async function expectOptionError(c: RawConn, option: number, type: number, what: string): Promise<void> {
  const r = await c.optionReply();
  expect(r.option, what).toBe(option);
  expect(`0x${r.type.toString(16)}`, `${what}: ${r.data.toString()}`).toBe(`0x${type.toString(16)}`);
}

/** The negotiation is still usable: GO works and so does a READ. */
async function goAndRead(c: RawConn, mode: Mode = 'simple', name = 'disk0'): Promise<Session> {
  c.option(Opt.GO, encodeInfoRequest(name, []));
  const replies = await c.optionReplies(Opt.GO);
  expect(replies.map((r) => r.type).at(-1)).toBe(Rep.ACK);
  const s = new Session(c, mode);
  const r = await s.call({ type: Cmd.READ, offset: 4096, length: 512 });
  expectErrno(r, 0, 'READ after GO');
  expect(r.data!.length).toBe(512);
  return s;
}

function u32be(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

/** Record the largest Buffer allocation made while the spy is active. */
function trackAllocations(): { max: () => number; stop: () => void } {
  const sizes: number[] = [];
  const spies = (['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const).map((m) => {
    const orig = Buffer[m].bind(Buffer) as (n: number, ...rest: unknown[]) => Buffer;
    return vi.spyOn(Buffer, m).mockImplementation(((n: number, ...rest: unknown[]) => {
      sizes.push(n);
      return orig(n, ...rest);
    }) as never);
  });
  return {
    max: () => Math.max(0, ...sizes),
    stop: () => spies.forEach((s) => s.mockRestore()),
  };
}

// ===========================================================================

describe('handshake', () => {
  it('unknown client flag bits: disconnect', async () => {
    for (const flags of [1 << 2, ClientFlag.FIXED_NEWSTYLE | (1 << 2), 1 << 31, 0xffffffff, 0x10003]) {
      const c = await negotiating(port, flags);
      await expectDisconnect(c, `client flags 0x${flags.toString(16)}`);
    }
    await expectHealthy(port);
  });

  it('bad option magic: disconnect', async () => {
    for (const magic of [0n, IHAVEOPT ^ 1n, 0x4e42444d41474943n]) {
      const c = await negotiating();
      const opt = encodeOption(Opt.GO, encodeInfoRequest('disk0', []));
      opt.writeBigUInt64BE(magic, 0);
      c.send(opt);
      await expectDisconnect(c, `option magic 0x${magic.toString(16)}`);
    }
    // Bad magic on a later option, after a good one.
    const c = await negotiating();
    c.option(0x1234);
    await expectOptionError(c, 0x1234, Rep.ERR_UNSUP, 'unknown option');
    c.send(Buffer.from('IHAVEOPX\0\0\0\x07\0\0\0\0', 'latin1'));
    await expectDisconnect(c, 'second option with bad magic');
    await expectHealthy(port);
  });

  it('option length 0xFFFFFFFF or > maxOptionBytes: disconnect at the header, without buffering the payload', async () => {
    for (const length of [0xffffffff, 0x80000000, limits.maxOptionBytes + 1]) {
      for (const option of [Opt.GO, Opt.INFO, Opt.SET_META_CONTEXT, 0x4242]) {
        const c = await negotiating();
        const hdr = Buffer.alloc(16);
        hdr.writeBigUInt64BE(IHAVEOPT, 0);
        hdr.writeUInt32BE(option, 8);
        hdr.writeUInt32BE(length, 12);
        // Only the header (and a few payload bytes): the server must not wait for the rest.
        c.send(Buffer.concat([hdr, Buffer.alloc(100)]));
        await expectDisconnect(c, `option ${option} claiming ${length} bytes`, 2_000);
      }
    }
    // The boundary itself is fine: exactly maxOptionBytes is read and answered.
    const c = await negotiating();
    c.option(0x4242, randomBytes(limits.maxOptionBytes, prng(1)));
    await expectOptionError(c, 0x4242, Rep.ERR_UNSUP, 'unknown option of maxOptionBytes');
    c.option(
      Opt.INFO,
      Buffer.concat([encodeInfoRequest('disk0', []), Buffer.alloc(limits.maxOptionBytes - 11)]),
    );
    await expectOptionError(c, Opt.INFO, Rep.ERR_INVALID, 'INFO padded to maxOptionBytes');
    await goAndRead(c);
    await expectHealthy(port);
  });

  for (const option of [Opt.INFO, Opt.GO]) {
    const name = option === Opt.GO ? 'GO' : 'INFO';
    it(`${name}: name length beyond the option, or 0xFFFFFFFF -> ERR_INVALID, connection stays usable`, async () => {
      const c = await negotiating();
      const cases: [string, Buffer][] = [
        ['name length 100 with 3 bytes', Buffer.concat([u32be(100), Buffer.from('abc'), Buffer.alloc(2)])],
        ['name length 0xFFFFFFFF', Buffer.concat([u32be(0xffffffff), Buffer.from('disk0'), Buffer.alloc(2)])],
        ['name length 0x80000000', Buffer.concat([u32be(0x80000000), Buffer.alloc(2)])],
        ['name length = rest (no room for the count)', Buffer.concat([u32be(5), Buffer.from('disk0')])],
        ['name length only', u32be(0)],
        ['empty payload', Buffer.alloc(0)],
        [
          'info count 5 with 1 info',
          Buffer.concat([encodeInfoRequest('disk0', [Info.NAME]).subarray(0, 9), Buffer.from([0, 5, 0, 1])]),
        ],
        [
          'info count 0xFFFF with none',
          Buffer.concat([u32be(5), Buffer.from('disk0'), Buffer.from([0xff, 0xff])]),
        ],
        ['trailing byte', Buffer.concat([encodeInfoRequest('disk0', [Info.NAME]), Buffer.from([0])])],
        ['name of maxStringBytes + 1', encodeInfoRequest('x'.repeat(limits.maxStringBytes + 1), [])],
      ];
      for (const [what, payload] of cases) {
        c.option(option, payload);
        await expectOptionError(c, option, Rep.ERR_INVALID, `${name} ${what}`);
      }
      await goAndRead(c);
    });
  }

  it('unknown export: ERR_UNKNOWN from INFO and GO; a following GO works', async () => {
    const c = await negotiating();
    for (const option of [Opt.INFO, Opt.GO])
      for (const nm of ['nope', 'disk00', 'DISK0', 'disk0\0', 'é']) {
        c.option(option, encodeInfoRequest(nm, [Info.NAME]));
        await expectOptionError(c, option, Rep.ERR_UNKNOWN, `option ${option} export '${nm}'`);
      }
    // INFO on a good export answers without entering transmission.
    c.option(Opt.INFO, encodeInfoRequest('ro', [Info.NAME]));
    const info = await c.optionReplies(Opt.INFO);
    expect(info.at(-1)!.type).toBe(Rep.ACK);
    const exp = info.find((r) => r.data.readUInt16BE(0) === Info.EXPORT)!;
    const flags = exp.data.readUInt16BE(10);
    expect(flags & TxFlag.READ_ONLY).toBeTruthy();
    expect(flags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES)).toBe(0);
    await goAndRead(c);
  });

  it('unknown export in EXPORT_NAME: disconnect; a known one works with and without NO_ZEROES', async () => {
    for (const nm of ['nope', 'disk0\0', 'x'.repeat(5000)]) {
      const c = await negotiating();
      c.option(Opt.EXPORT_NAME, Buffer.from(nm));
      await expectDisconnect(c, `EXPORT_NAME '${nm.slice(0, 20)}'`);
    }
    for (const noZeroes of [true, false]) {
      const c = await negotiating(port, ClientFlag.FIXED_NEWSTYLE | (noZeroes ? ClientFlag.NO_ZEROES : 0));
      c.option(Opt.EXPORT_NAME, Buffer.from('disk0'));
      const reply = await c.read(noZeroes ? 10 : 134);
      expect(reply.readBigUInt64BE(0)).toBe(BigInt(SIZE));
      const s = new Session(c, 'simple');
      const r = await s.call({ type: Cmd.READ, offset: 0, length: 4096 });
      expectErrno(r, 0, 'READ after EXPORT_NAME');
      expect(r.data!.length).toBe(4096);
    }
    await expectHealthy(port);
  });

  it('STARTTLS and unknown options: ERR_UNSUP, connection stays usable', async () => {
    const c = await negotiating();
    const opts: [number, Buffer][] = [
      [Opt.STARTTLS, Buffer.alloc(0)],
      [Opt.STARTTLS, Buffer.from('data')],
      [Opt.PEEK_EXPORT, Buffer.alloc(0)],
      [12, Buffer.alloc(0)],
      [0x7fffffff, Buffer.from('x')],
      [0xffffffff, Buffer.alloc(1000)],
      [0, Buffer.alloc(0)],
    ];
    for (const [option, payload] of opts) {
      c.option(option, payload);
      await expectOptionError(c, option, Rep.ERR_UNSUP, `option ${option}`);
    }
    await goAndRead(c);
  });

  it('STRUCTURED_REPLY / EXTENDED_HEADERS with data: ERR_INVALID and the mode is not changed', async () => {
    const c = await negotiating();
    c.option(Opt.STRUCTURED_REPLY, Buffer.from('x'));
    await expectOptionError(c, Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, 'STRUCTURED_REPLY with data');
    c.option(Opt.EXTENDED_HEADERS, Buffer.alloc(4));
    await expectOptionError(c, Opt.EXTENDED_HEADERS, Rep.ERR_INVALID, 'EXTENDED_HEADERS with data');
    c.option(Opt.LIST, Buffer.from('x'));
    await expectOptionError(c, Opt.LIST, Rep.ERR_INVALID, 'LIST with data');
    // Still simple replies (Session checks the reply form).
    await goAndRead(c, 'simple');
  });

  it('SET/LIST_META_CONTEXT before structured replies: ERR_INVALID', async () => {
    const c = await negotiating();
    for (const option of [Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT]) {
      c.option(option, encodeMetaContextRequest('disk0', [BASE_ALLOCATION]));
      await expectOptionError(c, option, Rep.ERR_INVALID, `option ${option} before STRUCTURED_REPLY`);
    }
    const s = await goAndRead(c);
    // And nothing was selected: BLOCK_STATUS is refused.
    expectErrno(
      await s.call({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4096 }),
      NbdErrno.EINVAL,
      'BLOCK_STATUS',
    );
  });

  it('metadata queries: huge query count, name/query lengths 0xFFFFFFFF, trailing bytes -> ERR_INVALID', async () => {
    const c = await negotiating();
    c.option(Opt.STRUCTURED_REPLY);
    expect((await c.optionReply()).type).toBe(Rep.ACK);
    const name = Buffer.concat([u32be(5), Buffer.from('disk0')]);
    const cases: [string, Buffer][] = [
      ['query count 0xFFFFFFFF', Buffer.concat([name, u32be(0xffffffff)])],
      ['query count 0x40000000', Buffer.concat([name, u32be(0x40000000), Buffer.alloc(64)])],
      [
        'query count over the limit',
        Buffer.concat([
          name,
          u32be(limits.maxMetaQueries + 1),
          Buffer.alloc(4 * (limits.maxMetaQueries + 1)),
        ]),
      ],
      [
        'query count 2 with 1 query',
        Buffer.concat([name, u32be(2), encodeMetaContextRequest('', [BASE_ALLOCATION]).subarray(8)]),
      ],
      ['name length 0xFFFFFFFF', Buffer.concat([u32be(0xffffffff), u32be(0)])],
      ['query length 0xFFFFFFFF', Buffer.concat([name, u32be(1), u32be(0xffffffff), Buffer.from('base:')])],
      [
        'trailing bytes',
        Buffer.concat([encodeMetaContextRequest('disk0', [BASE_ALLOCATION]), Buffer.alloc(3)]),
      ],
      ['short payload', Buffer.alloc(3)],
    ];
    for (const option of [Opt.SET_META_CONTEXT, Opt.LIST_META_CONTEXT])
      for (const [what, payload] of cases) {
        c.option(option, payload);
        await expectOptionError(c, option, Rep.ERR_INVALID, `option ${option}: ${what}`);
      }
    c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('nope', [BASE_ALLOCATION]));
    await expectOptionError(c, Opt.SET_META_CONTEXT, Rep.ERR_UNKNOWN, 'SET_META_CONTEXT unknown export');
    await goAndRead(c, 'structured');
  });

  it('a failed SET_META_CONTEXT replaces the earlier selection (proto.md: "including when this command fails")', async () => {
    const c = await negotiating();
    c.option(Opt.STRUCTURED_REPLY);
    expect((await c.optionReply()).type).toBe(Rep.ACK);
    c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('disk0', [BASE_ALLOCATION]));
    expect((await c.optionReplies(Opt.SET_META_CONTEXT)).map((r) => r.type)).toEqual([
      Rep.META_CONTEXT,
      Rep.ACK,
    ]);
    c.option(Opt.SET_META_CONTEXT, Buffer.concat([u32be(5), Buffer.from('disk0'), u32be(0xffffffff)]));
    await expectOptionError(c, Opt.SET_META_CONTEXT, Rep.ERR_INVALID, 'second SET_META_CONTEXT');
    const s = await goAndRead(c, 'structured');
    // No context is selected any more, so BLOCK_STATUS must be refused rather than answered.
    expectErrno(
      await s.call({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4096 }),
      NbdErrno.EINVAL,
      'BLOCK_STATUS',
    );
  });

  it('ABORT: ACK, then the server closes', async () => {
    const c = await negotiating();
    c.option(Opt.ABORT);
    const r = await c.optionReply();
    expect([r.option, r.type, r.data.length]).toEqual([Opt.ABORT, Rep.ACK, 0]);
    expect(await c.waitClosed(3_000)).toBe(true);
    expect(c.queue.length).toBe(0);
    // ABORT with data, then immediately dropping the connection without reading (proto.md: handle gracefully).
    const d = await negotiating();
    d.option(Opt.ABORT, Buffer.from('bye'));
    d.destroy();
    await expectHealthy(port);
  });

  it('LIST: one SERVER reply per export, then ACK; the connection stays usable', async () => {
    const c = await negotiating();
    c.option(Opt.LIST);
    const replies = await c.optionReplies(Opt.LIST);
    expect(replies.at(-1)!.type).toBe(Rep.ACK);
    const names = replies
      .filter((r) => r.type === Rep.SERVER)
      .map((r) => r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)));
    expect(names.sort()).toEqual(['big', 'disk0', 'ro']);
    await goAndRead(c);
    const listed = await NbdClient.list({ port });
    expect(listed.map((e) => e.name).sort()).toEqual(['big', 'disk0', 'ro']);
  });

  it(`more than maxOptionsPerHandshake (${limits.maxOptionsPerHandshake}) options: disconnect`, async () => {
    const N = limits.maxOptionsPerHandshake;
    // N - 1 options, then GO as the N-th: allowed.
    const ok = await negotiating();
    ok.send(Buffer.concat(Array.from({ length: N - 1 }, () => encodeOption(0x4242))));
    for (let i = 0; i < N - 1; i++) await expectOptionError(ok, 0x4242, Rep.ERR_UNSUP, `option ${i + 1}`);
    await goAndRead(ok);
    ok.destroy();
    // N options answered, the (N + 1)-th ends the connection without a reply.
    const c = await negotiating();
    c.send(Buffer.concat(Array.from({ length: N }, () => encodeOption(Opt.LIST))));
    for (let i = 0; i < N; i++) {
      const replies = await c.optionReplies(Opt.LIST);
      expect(replies.at(-1)!.type).toBe(Rep.ACK);
    }
    c.option(Opt.GO, encodeInfoRequest('disk0', []));
    await expectDisconnect(c, `option ${N + 1}`);
    await expectHealthy(port);
  });
});

// ===========================================================================

describe('disconnect at every byte of a handshake transcript', () => {
  it('every prefix, closed gracefully or reset, leaves no connection behind', async () => {
    const mode: Mode = 'structured';
    const handshake = Buffer.concat([
      Buffer.from([0, 0, 0, ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES]),
      encodeOption(Opt.STRUCTURED_REPLY),
      encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest('disk0', [BASE_ALLOCATION])),
      encodeOption(Opt.GO, encodeInfoRequest('disk0', [])),
    ]);
    const transcript = Buffer.concat([
      handshake,
      encodeRequest(mode, { type: Cmd.READ, offset: 0, length: 4096 }, 1, 1),
      encodeRequest(
        mode,
        { type: Cmd.WRITE, offset: 8192, length: 64, payload: Buffer.alloc(64, 0xab) },
        1,
        2,
      ),
      encodeRequest(mode, { type: Cmd.BLOCK_STATUS, offset: 0, length: 65536 }, 1, 3),
    ]);
    const variants: { prefix: number; readGreeting: boolean; reset: boolean }[] = [];
    for (let n = 0; n <= transcript.length; n++)
      for (const reset of [false, true])
        variants.push({ prefix: n, readGreeting: (n + (reset ? 1 : 0)) % 2 === 0, reset });
    const BATCH = 24;
    for (let i = 0; i < variants.length; i += BATCH) {
      await Promise.all(
        variants.slice(i, i + BATCH).map(async (v) => {
          const c = await RawConn.connect(port);
          if (v.readGreeting) await c.greeting();
          if (v.prefix > 0) c.send(transcript.subarray(0, v.prefix));
          if (v.reset) c.reset();
          else {
            c.socket.end();
            // Half-closed: the server may still answer what it got, then must close too.
            expect(await c.waitClosed(3_000), `prefix ${v.prefix}: server closes after our FIN`).toBe(true);
          }
        }),
      );
    }
    await waitFor(() => srv.server.connectionCount === 0, 5_000, 'all transcript connections to be gone');
    await expectHealthy(port);
    // The whole transcript really is a working session.
    const c = await RawConn.connect(port);
    await c.greeting();
    c.send(handshake);
    const s = new Session(c, mode);
    await c.optionReply(); // STRUCTURED_REPLY ack
    await c.optionReplies(Opt.SET_META_CONTEXT);
    expect((await c.optionReplies(Opt.GO)).at(-1)!.type).toBe(Rep.ACK);
    const r = await s.call({ type: Cmd.BLOCK_STATUS, offset: 0, length: 65536 });
    expectErrno(r, 0, 'BLOCK_STATUS');
    expect(r.extents?.size).toBe(1);
  });
});

// ===========================================================================

describe('connection floods', () => {
  itWith(
    ['qemu-img', 'nbdinfo'],
    '2000 idle connections do not starve real clients (qemu-img info, NbdClient)',
    async () => {
      const s = await startServer(new MemoryDevice(SIZE), {
        handshakeTimeoutMs: 120_000,
        maxConnectionsPerAddress: 4096,
        logger,
      });
      try {
        const idle: RawConn[] = [];
        for (let i = 0; i < 2000; i += 250)
          idle.push(
            ...(await Promise.all(Array.from({ length: 250 }, () => RawConn.connect(s.port, 10_000)))),
          );
        await waitFor(() => s.server.connectionCount === 2000, 20_000, '2000 connections admitted');
        const t0 = Date.now();
        const info = await runOk('qemu-img', ['info', s.uri('disk0')], { timeoutMs: 30_000 });
        expect(info.stdout).toMatch(/virtual size: 64 MiB \(67108864 bytes\)/);
        await expectHealthy(s.port);
        const nbdinfo = await runOk('nbdinfo', ['--size', s.uri('disk0')], { timeoutMs: 30_000 });
        expect(nbdinfo.stdout.trim()).toBe(String(SIZE));
        expect(Date.now() - t0, 'real clients served promptly').toBeLessThan(20_000);
        // The idle ones were all still there: the real clients were served alongside them.
        await waitFor(() => s.server.connectionCount === 2000, 5_000, 'the real clients to leave');
        expect(idle.every((c) => !c.closed)).toBe(true);
        for (const c of idle) c.destroy();
        await waitFor(() => s.server.connectionCount === 0, 15_000, 'idle connections to be gone');
      } finally {
        closeAllRaw();
        await s.close();
      }
    },
  );

  it('with a short handshakeTimeoutMs, idle and slow negotiations are dropped; a negotiated client is not', async () => {
    const TIMEOUT = 300;
    const s = await startServer(new MemoryDevice(SIZE), { handshakeTimeoutMs: TIMEOUT, logger });
    try {
      const good = await NbdClient.connect({ port: s.port, exportName: 'disk0' });
      const idle = await Promise.all(Array.from({ length: 200 }, () => RawConn.connect(s.port)));
      const partial = await Promise.all(Array.from({ length: 30 }, () => RawConn.connect(s.port)));
      partial.forEach((c, i) => {
        c.flags();
        if (i % 3 >= 1) c.option(Opt.STRUCTURED_REPLY);
        if (i % 3 === 2) c.send(encodeOption(Opt.GO, encodeInfoRequest('disk0', [])).subarray(0, 20));
      });
      // A slowloris: a valid option, one byte every 40 ms, never finishing in time.
      const slow = await RawConn.connect(s.port);
      const slowBytes = Buffer.concat([
        Buffer.from([0, 0, 0, 3]),
        encodeOption(Opt.GO, encodeInfoRequest('disk0', [Info.NAME, Info.DESCRIPTION])),
      ]);
      const drip = (async () => {
        for (let i = 0; i < slowBytes.length && !slow.closed; i++) {
          slow.send(slowBytes.subarray(i, i + 1));
          await sleep(40);
        }
      })();
      const all = [...idle, ...partial, slow];
      await waitFor(() => all.every((c) => c.closed), 5_000, 'unfinished handshakes to be dropped');
      await drip;
      for (const c of all)
        expect(c.closedAt - c.openedAt, 'not dropped before the timeout').toBeGreaterThanOrEqual(
          TIMEOUT - 50,
        );
      expect(slow.received, 'the slowloris got only the greeting').toBe(18);
      await waitFor(() => s.server.connectionCount === 1, 3_000, 'only the negotiated client left');
      // The negotiated client outlived the handshake timeout and still works.
      const data = randomBytes(8192, prng(7));
      await good.write(data, 12288);
      expect((await good.read(12288, 8192)).equals(data)).toBe(true);
      await good.close();
      await expectHealthy(s.port);
    } finally {
      closeAllRaw();
      await s.close();
    }
  });

  it('with maxConnections N full of negotiated clients, the (N+1)-th is refused and a slot frees once one closes', async () => {
    const N = 5;
    const s = await startServer(new MemoryDevice(SIZE), { maxConnections: N, logger });
    try {
      const clients: NbdClient[] = [];
      for (let i = 0; i < N; i++)
        clients.push(await NbdClient.connect({ port: s.port, exportName: 'disk0' }));
      expect(s.server.connectionCount).toBe(N);
      const extra = await RawConn.connect(s.port);
      expect(await extra.waitClosed(3_000), 'the (N+1)-th is closed').toBe(true);
      expect(extra.received, 'the (N+1)-th gets no greeting').toBe(0);
      expect(s.server.rejectedConnections).toBe(1);
      await expect(NbdClient.connect({ port: s.port, timeoutMs: 3_000 })).rejects.toThrow();
      expect(s.server.rejectedConnections).toBe(2);
      expect(s.server.evictedConnections, 'negotiated clients are never evicted').toBe(0);
      expect(s.server.connectionCount).toBe(N);
      await clients[0].close();
      await waitFor(() => s.server.connectionCount === N - 1, 3_000, 'a slot to free');
      await expectHealthy(s.port);
      await waitFor(() => s.server.connectionCount === N - 1, 3_000, 'the healthy client to leave');
      const again = await RawConn.connect(s.port);
      expect(await again.greeting()).toBeGreaterThan(0);
      expect(s.server.connectionCount).toBe(N);
      for (const c of clients.slice(1)) await c.close();
    } finally {
      closeAllRaw();
      await s.close();
    }
  });

  it("with maxConnections N full of unfinished handshakes, a new client takes the oldest one's slot", async () => {
    const N = 5;
    const s = await startServer(new MemoryDevice(SIZE), { maxConnections: N, logger });
    try {
      const idle: RawConn[] = [];
      for (let i = 0; i < N; i++) {
        const c = await RawConn.connect(s.port);
        await c.greeting();
        idle.push(c);
      }
      // A real client gets in: the oldest idle connection is dropped for it.
      const c = await NbdClient.connect({ port: s.port, exportName: 'disk0', timeoutMs: 3_000 });
      expect(await idle[0].waitClosed(3_000)).toBe(true);
      expect(idle.slice(1).every((r) => !r.closed)).toBe(true);
      expect(s.server.evictedConnections).toBe(1);
      expect(s.server.rejectedConnections).toBe(0);
      const data = randomBytes(4096, prng(3));
      await c.write(data, 0);
      expect((await c.read(0, 4096)).equals(data)).toBe(true);
      await c.close();
    } finally {
      closeAllRaw();
      await s.close();
    }
  });

  it('with maxConnectionsPerAddress N, an address past N is refused while others are admitted', async () => {
    const N = 3;
    const s = await startServer(new MemoryDevice(SIZE), { maxConnectionsPerAddress: N, logger });
    try {
      const mine: RawConn[] = [];
      for (let i = 0; i < N; i++) {
        const c = await RawConn.connect(s.port, 5_000, '127.0.0.2');
        await c.greeting();
        mine.push(c);
      }
      const over = await RawConn.connect(s.port, 5_000, '127.0.0.2');
      expect(await over.waitClosed(3_000)).toBe(true);
      expect(over.received).toBe(0);
      expect(s.server.rejectedConnections).toBe(1);
      // Another address is not affected, and a slot of the first frees when one leaves.
      await expectHealthy(s.port);
      mine[0].destroy();
      await waitFor(() => s.server.connectionCount === N - 1, 3_000, 'a slot to free');
      const again = await RawConn.connect(s.port, 5_000, '127.0.0.2');
      expect(await again.greeting()).toBeGreaterThan(0);
    } finally {
      closeAllRaw();
      await s.close();
    }
  });
});

// ===========================================================================

describe('transmission', () => {
  for (const mode of MODES) {
    describe(`${mode} replies`, () => {
      const structured = mode !== 'simple';
      const extended = mode === 'extended';

      it('reply forms: a success without payload is a simple reply unless extended headers forbid it; READ and errors are chunks once negotiated', async () => {
        const s = await openSession(port, { mode });
        const payload = Buffer.alloc(4096, 0x33);
        const w = extended ? CmdFlag.PAYLOAD_LEN : 0;
        const acks: RawRequest[] = [
          { type: Cmd.WRITE, flags: w, offset: 8192, length: payload.length, payload },
          { type: Cmd.WRITE, flags: w | CmdFlag.FUA, offset: 8192, length: payload.length, payload },
          { type: Cmd.FLUSH, offset: 0, length: 0 },
          { type: Cmd.TRIM, offset: 8192, length: 4096 },
          { type: Cmd.WRITE_ZEROES, offset: 8192, length: 4096 },
          { type: Cmd.CACHE, offset: 0, length: 4096 },
        ];
        for (const req of acks) {
          const r = await s.call(req);
          expectErrno(r, 0, `command ${req.type}`);
          // A client reads 16 bytes before it can tell a simple reply from a 20-byte chunk: one read, not two.
          expect(
            r.chunks.map((c) => c.kind),
            `command ${req.type}`,
          ).toEqual(extended ? ['chunk'] : ['simple']);
        }
        const read = await s.call({ type: Cmd.READ, offset: 0, length: 4096 });
        expectErrno(read, 0, 'READ');
        expect(read.chunks.every((c) => c.kind === (structured ? 'chunk' : 'simple'))).toBe(true);
        const bad = await s.call({ type: Cmd.TRIM, offset: SIZE, length: 4096 });
        expectErrno(bad, NbdErrno.EINVAL, 'TRIM beyond the end');
        expect(bad.chunks[0].kind).toBe(structured ? 'chunk' : 'simple');
        if (structured) expect(bad.message).toMatch(/end|beyond|outside/);
      });

      it('unknown commands: EINVAL, and the stream stays in sync', async () => {
        const s = await openSession(port, { mode });
        for (const type of [Cmd.RESIZE, 9, 10, 100, 0x7fff, 0x8000, 0xffff]) {
          const r = await s.call({ type, offset: 0, length: 4096 });
          expectErrno(r, NbdErrno.EINVAL, `command ${type}`);
        }
        expectErrno(await s.call({ type: Cmd.READ, offset: 0, length: 512 }), 0, 'READ afterwards');
      });

      it('unknown and inapplicable command flags: EINVAL (write payloads still consumed)', async () => {
        const s = await openSession(port, { mode });
        const bad: [number, number][] = [
          [Cmd.READ, 1 << 6],
          [Cmd.READ, 1 << 15],
          [Cmd.READ, CmdFlag.REQ_ONE],
          [Cmd.READ, CmdFlag.NO_HOLE],
          [Cmd.READ, CmdFlag.FAST_ZERO],
          [Cmd.FLUSH, CmdFlag.REQ_ONE],
          [Cmd.FLUSH, CmdFlag.DF],
          [Cmd.TRIM, CmdFlag.NO_HOLE],
          [Cmd.CACHE, CmdFlag.DF],
          [Cmd.WRITE_ZEROES, CmdFlag.REQ_ONE],
          [Cmd.WRITE_ZEROES, CmdFlag.DF],
          [Cmd.BLOCK_STATUS, CmdFlag.NO_HOLE],
          [Cmd.BLOCK_STATUS, 0xff00],
        ];
        if (!extended) bad.push([Cmd.READ, CmdFlag.PAYLOAD_LEN], [Cmd.FLUSH, CmdFlag.PAYLOAD_LEN]);
        for (const [type, flags] of bad) {
          const r = await s.call({ type, flags, offset: 0, length: 4096 });
          expectErrno(r, NbdErrno.EINVAL, `command ${type} flags 0x${flags.toString(16)}`);
        }
        const payload = Buffer.alloc(4096, 0x5a);
        for (const flags of [CmdFlag.NO_HOLE, CmdFlag.DF, CmdFlag.REQ_ONE, 1 << 9, 1 << 15]) {
          const f = extended ? flags | CmdFlag.PAYLOAD_LEN : flags;
          const r = await s.call({ type: Cmd.WRITE, flags: f, offset: 0, length: payload.length, payload });
          expectErrno(r, NbdErrno.EINVAL, `WRITE flags 0x${flags.toString(16)}`);
        }
        const r = await s.call({ type: Cmd.READ, offset: 0, length: 4096 });
        expectErrno(r, 0, 'READ afterwards');
        expect(r.data!.includes(0x5a), 'refused writes were not applied').toBe(false);
      });

      it('FUA is accepted on every command once SEND_FUA is advertised (proto.md: "MUST accept all commands with this bit set")', async () => {
        const s = await openSession(port, { mode });
        expect(s.txFlags & TxFlag.SEND_FUA).toBeTruthy();
        for (const [type, length] of [
          [Cmd.READ, 4096],
          [Cmd.FLUSH, 0],
          [Cmd.CACHE, 4096],
        ] as const) {
          const r = await s.call({ type, flags: CmdFlag.FUA, offset: 0, length });
          expectErrno(r, 0, `command ${type} with FUA`);
        }
      });

      it('read beyond the end (including 64-bit wrap-around offsets): EINVAL', async () => {
        const s = await openSession(port, { mode });
        const cases: RawRequest[] = [
          { type: Cmd.READ, offset: SIZE - 512, length: 1024 },
          { type: Cmd.READ, offset: SIZE, length: 1 },
          { type: Cmd.READ, offset: SIZE + 4096, length: 4096 },
          { type: Cmd.READ, offset: 2 ** 53 - 1, length: 1 },
          { type: Cmd.READ, rawOffset: 2n ** 64n - 1n, length: 1 },
          { type: Cmd.READ, rawOffset: 2n ** 64n - 512n, length: 1024 }, // wraps to 512 in 64-bit arithmetic
          { type: Cmd.READ, rawOffset: 2n ** 63n, length: 4096 },
          { type: Cmd.TRIM, offset: SIZE - 512, length: 1024 },
          { type: Cmd.TRIM, rawOffset: 2n ** 64n - 512n, length: 1024 },
          { type: Cmd.CACHE, offset: SIZE, length: 4096 },
          { type: Cmd.BLOCK_STATUS, offset: SIZE, length: 4096 },
        ];
        for (const req of cases) {
          const r = await s.call(req);
          expectErrno(r, NbdErrno.EINVAL, `${req.type} at ${req.offset ?? req.rawOffset}+${req.length}`);
        }
        expectErrno(await s.call({ type: Cmd.READ, offset: SIZE - 512, length: 512 }), 0, 'last sector');
      });

      if (extended) {
        it('extended replies echo the request offset exactly, even at or above 2^53 (proto-ext.md: "MUST match the request")', async () => {
          const s = await openSession(port, { mode });
          for (const rawOffset of [2n ** 53n - 1n, 2n ** 53n, 2n ** 53n + 1n, 2n ** 63n, 2n ** 64n - 1n]) {
            const r = await s.call({ type: Cmd.READ, rawOffset, length: 512 });
            expectErrno(r, NbdErrno.EINVAL, `READ at 0x${rawOffset.toString(16)}`);
            for (const c of r.chunks)
              expect(`0x${c.echoedOffset!.toString(16)}`, 'echoed offset').toBe(
                `0x${rawOffset.toString(16)}`,
              );
          }
        });
      }

      it('write beyond the end: ENOSPC, nothing written, payload consumed', async () => {
        const s = await openSession(port, { mode });
        const before = (await s.call({ type: Cmd.READ, offset: SIZE - 4096, length: 4096 })).data!;
        // Each payload is a valid request header: if it were not consumed the server would answer an unknown cookie.
        const trap = Buffer.alloc(1024);
        for (let p = 0; p + 32 <= trap.length; p += 32)
          encodeRequest(mode, { type: Cmd.FLUSH }, 0xc0ffee00, 999).copy(trap, p);
        const cases: RawRequest[] = [
          { type: Cmd.WRITE, offset: SIZE - 512, length: 1024, payload: trap },
          { type: Cmd.WRITE, offset: SIZE, length: 1024, payload: trap },
          { type: Cmd.WRITE, rawOffset: 2n ** 64n - 512n, length: 1024, payload: trap },
          { type: Cmd.WRITE, offset: 2 ** 53 - 1, length: 1024, payload: trap },
          { type: Cmd.WRITE_ZEROES, offset: SIZE - 512, length: 1024 },
          { type: Cmd.WRITE_ZEROES, rawOffset: 2n ** 64n - 512n, length: 1024 },
        ];
        for (const req of cases)
          expectErrno(await s.call(req), NbdErrno.ENOSPC, `${req.type} at ${req.offset ?? req.rawOffset}`);
        const after = (await s.call({ type: Cmd.READ, offset: SIZE - 4096, length: 4096 })).data!;
        expect(after.equals(before), 'a refused write changed nothing').toBe(true);
      });

      it('write, trim and write-zeroes on a read-only export: EPERM, payload consumed', async () => {
        const s = await openSession(port, { mode, exportName: 'ro' });
        expect(s.txFlags & TxFlag.READ_ONLY).toBeTruthy();
        const trap = Buffer.alloc(4096);
        for (let p = 0; p + 32 <= trap.length; p += 32)
          encodeRequest(mode, { type: Cmd.FLUSH }, 0xc0ffee00, 999).copy(trap, p);
        for (let i = 0; i < 3; i++) {
          expectErrno(
            await s.call({ type: Cmd.WRITE, offset: 0, length: trap.length, payload: trap }),
            NbdErrno.EPERM,
            'WRITE',
          );
          expectErrno(
            await s.call({
              type: Cmd.WRITE,
              offset: 512,
              length: 512,
              payload: trap.subarray(0, 512),
              ...(extended ? { flags: CmdFlag.PAYLOAD_LEN | CmdFlag.FUA } : { flags: CmdFlag.FUA }),
            }),
            NbdErrno.EPERM,
            'WRITE+FUA',
          );
          expectErrno(await s.call({ type: Cmd.TRIM, offset: 0, length: 4096 }), NbdErrno.EPERM, 'TRIM');
          expectErrno(
            await s.call({ type: Cmd.WRITE_ZEROES, offset: 0, length: 4096 }),
            NbdErrno.EPERM,
            'WRITE_ZEROES',
          );
        }
        const r = await s.call({ type: Cmd.READ, offset: 0, length: 4096 });
        expectErrno(r, 0, 'READ');
        expect(r.data!.every((b) => b === 0)).toBe(true);
        expectErrno(await s.call({ type: Cmd.FLUSH }), 0, 'FLUSH on read-only');
      });

      it(`read larger than 32 MiB: ${structured ? 'EOVERFLOW' : 'EINVAL'}, without allocating it`, async () => {
        const want = structured ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL;
        const s = await openSession(port, { mode });
        const big = await openSession(port, { mode, exportName: 'big' });
        const alloc = trackAllocations();
        try {
          expectErrno(await s.call({ type: Cmd.READ, offset: 0, length: 48 * MiB }), want, '48 MiB READ');
          expectErrno(
            await s.call({ type: Cmd.READ, offset: 0, length: 32 * MiB + 1 }),
            want,
            '32 MiB + 1 READ',
          );
          expectErrno(await big.call({ type: Cmd.READ, offset: 0, length: 0xffffffff }), want, '4 GiB READ');
          if (structured)
            expectErrno(
              await big.call({ type: Cmd.READ, flags: CmdFlag.DF, offset: 4096, length: 0x80000000 }),
              want,
              '2 GiB READ with DF',
            );
          if (extended) {
            expectErrno(await big.call({ type: Cmd.READ, offset: 0, length: 2 ** 33 }), want, '8 GiB READ');
            expectErrno(await big.call({ type: Cmd.READ, offset: 0, length: BIG_SIZE }), want, '1 TiB READ');
          }
          expect(alloc.max(), 'largest allocation').toBeLessThan(1 * MiB);
        } finally {
          alloc.stop();
        }
        // Exactly the maximum payload is served.
        const r = await s.call({ type: Cmd.READ, offset: SIZE - 32 * MiB, length: 32 * MiB }, 20_000);
        expectErrno(r, 0, '32 MiB READ');
        expect(r.data!.length).toBe(32 * MiB);
      });

      it('a WRITE header claiming 0xFFFFFFFF bytes (or > 32 MiB): disconnect, no big allocation', async () => {
        const claims = extended
          ? [0xffffffff, 32 * MiB + 1, 2 ** 40, 2 ** 53 - 1]
          : [0xffffffff, 0x80000000, 32 * MiB + 1];
        const junk = randomBytes(1 * MiB, prng(3));
        for (const length of claims) {
          const s = await openSession(port, { mode });
          const m0 = process.memoryUsage();
          const alloc = trackAllocations();
          try {
            s.send({ type: Cmd.WRITE, flags: extended ? CmdFlag.PAYLOAD_LEN : 0, offset: 0, length });
            s.conn.send(junk);
            expect(await s.conn.waitClosed(3_000), `WRITE claiming ${length} bytes: disconnect`).toBe(true);
            expect(s.conn.queue.length, 'no reply').toBe(0);
            expect(alloc.max(), 'largest allocation').toBeLessThan(2 * MiB);
          } finally {
            alloc.stop();
          }
          const m1 = process.memoryUsage();
          expect(m1.arrayBuffers - m0.arrayBuffers, 'arrayBuffers growth').toBeLessThan(256 * MiB);
          expect(m1.rss - m0.rss, 'rss growth').toBeLessThan(1 * GiB);
        }
        await expectHealthy(port);
      });

      it('BLOCK_STATUS without a negotiated context: EINVAL', async () => {
        const s = await openSession(port, { mode, meta: false });
        for (const flags of [0, CmdFlag.REQ_ONE])
          expectErrno(
            await s.call({ type: Cmd.BLOCK_STATUS, flags, offset: 0, length: 65536 }),
            NbdErrno.EINVAL,
            'BLOCK_STATUS',
          );
        if (structured) {
          // A context selected for another export does not carry over (proto.md: "the same export name").
          const c = await negotiating();
          c.option(extended ? Opt.EXTENDED_HEADERS : Opt.STRUCTURED_REPLY);
          expect((await c.optionReply()).type).toBe(Rep.ACK);
          c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest('ro', [BASE_ALLOCATION]));
          expect((await c.optionReplies(Opt.SET_META_CONTEXT)).at(-1)!.type).toBe(Rep.ACK);
          const t = await goAndRead(c, mode, 'disk0');
          expectErrno(
            await t.call({ type: Cmd.BLOCK_STATUS, offset: 0, length: 65536 }),
            NbdErrno.EINVAL,
            'BLOCK_STATUS, context of another export',
          );
          // With a context it works, and 0-length is refused.
          const u = await openSession(port, { mode });
          const ok = await u.call({ type: Cmd.BLOCK_STATUS, offset: 0, length: 1 * MiB });
          expectErrno(ok, 0, 'BLOCK_STATUS');
          expect([...ok.extents!.values()][0].reduce((a, e) => a + e.length, 0)).toBeGreaterThan(0);
          expect(ok.chunks[0].type).toBe(extended ? ReplyType.BLOCK_STATUS_EXT : ReplyType.BLOCK_STATUS);
        }
      });

      if (!structured) {
        it('DF without structured replies: EINVAL', async () => {
          const s = await openSession(port, { mode });
          expect(s.txFlags & TxFlag.SEND_DF).toBe(0);
          expectErrno(
            await s.call({ type: Cmd.READ, flags: CmdFlag.DF, offset: 0, length: 4096 }),
            NbdErrno.EINVAL,
            'READ+DF',
          );
          expectErrno(await s.call({ type: Cmd.READ, offset: 0, length: 4096 }), 0, 'READ afterwards');
        });
      }

      it('bad request magic: disconnect', async () => {
        const magics = [0, 0x12345678, 0xffffffff, extended ? REQUEST_MAGIC : EXTENDED_REQUEST_MAGIC];
        for (const magic of magics) {
          const s = await openSession(port, { mode });
          expectErrno(await s.call({ type: Cmd.READ, offset: 0, length: 512 }), 0, 'READ');
          const { bytes } = s.encode({ type: Cmd.READ, offset: 0, length: 512 });
          bytes.writeUInt32BE(magic, 0);
          s.conn.send(Buffer.concat([bytes, Buffer.alloc(64)]));
          await expectDisconnect(s.conn, `request magic 0x${magic.toString(16)}`);
        }
        await expectHealthy(port);
      });

      it('zero-length READ, WRITE, TRIM, WRITE_ZEROES and CACHE succeed', async () => {
        const s = await openSession(port, { mode });
        for (const offset of [0, 4096, SIZE]) {
          const r = await s.call({ type: Cmd.READ, offset, length: 0 });
          expectErrno(r, 0, `READ 0 bytes at ${offset}`);
          for (const type of [Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE])
            expectErrno(
              await s.call({ type, offset, length: 0 }),
              0,
              `command ${type}, 0 bytes at ${offset}`,
            );
          if (extended) {
            // proto-ext.md calls a PAYLOAD_LEN length "(nonzero)": EINVAL is also a fair answer, but never EIO.
            const w = await s.call({ type: Cmd.WRITE, flags: CmdFlag.PAYLOAD_LEN, offset, length: 0 });
            expect(
              [0, NbdErrno.EINVAL],
              `WRITE 0 bytes at ${offset}: ${errnoName(w.error)} ${w.message}`,
            ).toContain(w.error);
          } else {
            expectErrno(
              await s.call({ type: Cmd.WRITE, offset, length: 0, payload: Buffer.alloc(0) }),
              0,
              `WRITE 0 bytes at ${offset}`,
            );
          }
        }
        expectErrno(await s.call({ type: Cmd.READ, offset: 0, length: 512 }), 0, 'READ afterwards');
      });

      if (extended) {
        it('WRITE without PAYLOAD_LEN: EINVAL, and no payload is expected', async () => {
          const s = await openSession(port, { mode });
          for (const length of [512, 4096, 2 ** 40]) {
            const r = await s.call({ type: Cmd.WRITE, flags: 0, offset: 0, length });
            expectErrno(r, NbdErrno.EINVAL, `WRITE length ${length} without PAYLOAD_LEN`);
          }
          const r = await s.call({ type: Cmd.READ, offset: 0, length: 512 });
          expectErrno(r, 0, 'READ afterwards');
        });

        it('non-WRITE commands with PAYLOAD_LEN and a small payload: EINVAL, payload consumed', async () => {
          const s = await openSession(port, { mode });
          const trap = Buffer.alloc(256);
          for (let p = 0; p + 32 <= trap.length; p += 32)
            encodeRequest(mode, { type: Cmd.FLUSH }, 0xc0ffee00, 999).copy(trap, p);
          for (const type of [
            Cmd.READ,
            Cmd.FLUSH,
            Cmd.TRIM,
            Cmd.CACHE,
            Cmd.WRITE_ZEROES,
            Cmd.BLOCK_STATUS,
            50,
          ]) {
            for (const len of [1, 32, 256]) {
              const r = await s.call({
                type,
                flags: CmdFlag.PAYLOAD_LEN,
                offset: 0,
                length: len,
                payload: trap.subarray(0, len),
              });
              expectErrno(r, NbdErrno.EINVAL, `command ${type} with a ${len}-byte payload`);
            }
          }
          expectErrno(await s.call({ type: Cmd.READ, offset: 0, length: 512 }), 0, 'READ afterwards');
        });

        it('64-bit effect lengths beyond the export: errors, not disconnects', async () => {
          const s = await openSession(port, { mode });
          const cases: [RawRequest, number][] = [
            [{ type: Cmd.TRIM, offset: 0, rawLength: 2n ** 64n - 1n }, NbdErrno.EINVAL],
            [{ type: Cmd.TRIM, offset: 4096, length: 2 ** 53 - 1 }, NbdErrno.EINVAL],
            [{ type: Cmd.WRITE_ZEROES, offset: 0, rawLength: 2n ** 63n }, NbdErrno.ENOSPC],
            [{ type: Cmd.CACHE, offset: 0, length: 2 ** 40 }, NbdErrno.EINVAL],
            [{ type: Cmd.BLOCK_STATUS, offset: 0, rawLength: 2n ** 64n - 1n }, NbdErrno.EINVAL],
            [{ type: Cmd.READ, offset: 512, rawLength: 2n ** 64n - 512n }, NbdErrno.EINVAL],
          ];
          for (const [req, errno] of cases)
            expectErrno(await s.call(req), errno, `${req.type} length ${req.length ?? req.rawLength}`);
          // Large in-range effect lengths are fine.
          const b = await openSession(port, { mode, exportName: 'big' });
          const st = await b.call({ type: Cmd.BLOCK_STATUS, offset: 0, length: BIG_SIZE });
          expectErrno(st, 0, 'BLOCK_STATUS over 1 TiB');
          const first = [...st.extents!.values()][0][0];
          expect(first.length).toBeGreaterThan(0);
          expect(first.length).toBeLessThanOrEqual(BIG_SIZE);
        });
      }

      it('NBD_CMD_DISC with requests in flight: every one is answered before the close', async () => {
        const s = await openSession(port, { mode });
        const parts: Buffer[] = [];
        const cookies = new Set<number>();
        const add = (req: RawRequest) => {
          const { cookie, bytes } = s.encode(req);
          cookies.add(cookie);
          parts.push(bytes);
        };
        const payload = randomBytes(65536, prng(11));
        for (let i = 0; i < 20; i++) {
          add({ type: Cmd.READ, offset: i * MiB, length: 256 * 1024 });
          add({
            type: Cmd.WRITE,
            flags: extended ? CmdFlag.PAYLOAD_LEN : 0,
            offset: 40 * MiB + i * 65536,
            length: payload.length,
            payload,
          });
          add({ type: Cmd.FLUSH });
          if (structured) add({ type: Cmd.BLOCK_STATUS, offset: 0, length: 8 * MiB });
          add({ type: Cmd.TRIM, offset: 48 * MiB + i * 65536, length: 65536 });
        }
        const disc = s.encode({ type: Cmd.DISC });
        s.forget(disc.cookie);
        s.conn.send(Buffer.concat([...parts, disc.bytes]));
        const answered = new Set<number>();
        while (answered.size < cookies.size) {
          const r = await s.reply(10_000);
          expectErrno(r, 0, `request ${r.cookieLo}`);
          expect(answered.has(r.cookieLo), 'one reply per request').toBe(false);
          answered.add(r.cookieLo);
        }
        expect([...answered].sort()).toEqual([...cookies].sort());
        expect(await s.conn.waitClosed(3_000), 'server closes after DISC').toBe(true);
        expect(s.conn.queue.length).toBe(0);
        // The writes landed.
        const c = await NbdClient.connect({ port, exportName: 'disk0' });
        try {
          expect((await c.read(40 * MiB + 19 * 65536, 65536)).equals(payload)).toBe(true);
        } finally {
          await c.close();
        }
      });
    });
  }

  it('pipelined 32 MiB READs whose replies are never read: server memory stays bounded', async () => {
    const s = await openSession(port, { mode: 'simple' });
    // The client does not read: replies pile up on the server side.
    s.conn.socket.pause();
    const COUNT = 16;
    const batch = Buffer.concat(
      Array.from({ length: COUNT }, () => s.encode({ type: Cmd.READ, offset: 0, length: 32 * MiB }).bytes),
    );
    const base = process.memoryUsage().arrayBuffers;
    let peak = 0;
    s.conn.send(batch);
    const until = Date.now() + 1_500;
    while (Date.now() < until) {
      peak = Math.max(peak, process.memoryUsage().arrayBuffers - base);
      await sleep(20);
    }
    s.conn.destroy();
    // limits.maxInflightBytes is 64 MiB; allow one more maximal reply and some slack.
    expect(
      peak / MiB,
      `peak growth ${(peak / MiB).toFixed(0)} MiB for ${COUNT} x 32 MiB unread replies`,
    ).toBeLessThan((limits.maxInflightBytes + limits.maxPayloadBytes) / MiB + 64);
    await waitFor(() => srv.server.connectionCount === 0, 5_000, 'the flooding connection to go');
    await expectHealthy(port);
  });
});

// ===========================================================================

describe('garbage fuzz', () => {
  const ERRNOS = new Set<number>(Object.values(NbdErrno));
  const pick = <T>(r: () => number, xs: readonly T[]): T => xs[r() % xs.length];
  /** What the fuzz actually exercised, so that it cannot pass vacuously. */
  const seen = { ok: 0, errors: 0, open: 0, disconnect: 0, disc: 0, stall: 0, garbageDisconnects: 0 };

  function pickOffset(r: () => number): Pick<RawRequest, 'offset' | 'rawOffset'> {
    switch (r() % 9) {
      case 0:
        return { offset: 0 };
      case 1:
        return { offset: SIZE - 1 - (r() % 8192) };
      case 2:
        return { offset: SIZE + (r() % 3) };
      case 3:
        return { offset: 2 ** 53 - 1 };
      case 4:
        return { rawOffset: 2n ** 64n - 1n - BigInt(r() % 4096) };
      case 5:
        return { rawOffset: (BigInt(r()) << 32n) | BigInt(r()) };
      default:
        return { offset: r() % SIZE };
    }
  }

  function pickLength(r: () => number, extended: boolean): Pick<RawRequest, 'length' | 'rawLength'> {
    switch (r() % 12) {
      case 0:
        return { length: 0 };
      case 1:
        return { length: 0xffffffff };
      case 2:
        return { length: SIZE };
      case 3:
        return { length: r() % (32 * MiB + 2) };
      case 4:
        return extended ? { rawLength: (BigInt(r()) << 32n) | BigInt(r()) } : { length: r() >>> 0 };
      case 5:
        return { length: limits.maxPayloadBytes };
      default:
        return { length: r() % 8192 };
    }
  }

  /** One random, valid-looking request; `stop` when nothing sensible can follow it. */
  function randomRequest(
    r: () => number,
    mode: Mode,
  ): { req: RawRequest; expect: 'reply' | 'disconnect' | 'disc' | 'stall' } {
    const extended = mode === 'extended';
    let req: RawRequest;
    if (r() % 2) {
      // Plausible: a command this export offers, flags it allows, an in-range span (so many succeed).
      const type = pick(r, [
        Cmd.READ,
        Cmd.WRITE,
        Cmd.FLUSH,
        Cmd.TRIM,
        Cmd.CACHE,
        Cmd.WRITE_ZEROES,
        Cmd.BLOCK_STATUS,
      ]);
      const allowed = {
        [Cmd.READ]: mode === 'simple' ? 0 : CmdFlag.DF,
        [Cmd.WRITE]: CmdFlag.FUA,
        [Cmd.TRIM]: CmdFlag.FUA,
        [Cmd.WRITE_ZEROES]: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
        [Cmd.BLOCK_STATUS]: CmdFlag.REQ_ONE,
      }[type as number];
      let flags = (allowed ?? 0) & r();
      if (extended && type === Cmd.WRITE) flags |= CmdFlag.PAYLOAD_LEN;
      const length = type === Cmd.FLUSH ? 0 : 1 + (r() % 65536);
      req = { type, flags, offset: type === Cmd.FLUSH ? 0 : r() % (SIZE - length), length };
    } else {
      // Hostile: any type, any flags, offsets and lengths at and beyond the edges.
      const type = r() % 10 < 8 ? r() % 9 : r() % 2 ? 9 + (r() % 20) : r() & 0xffff;
      let flags = r() % 4 ? r() & 0x3f & (r() | r()) : r() & 0xffff;
      if (extended && type === Cmd.WRITE && r() % 4) flags |= CmdFlag.PAYLOAD_LEN;
      if (!extended && r() % 2) flags &= ~CmdFlag.PAYLOAD_LEN;
      req = { type, flags, ...pickOffset(r), ...pickLength(r, extended) };
    }
    const { type, flags = 0 } = req;
    // Keep big successful reads rare: they are slow and prove nothing new.
    if (type === Cmd.READ && req.length !== undefined && req.length > 1 * MiB && r() % 4)
      req.length = r() % 65536;
    const len =
      req.rawLength !== undefined
        ? req.rawLength >= 2n ** 53n
          ? Infinity
          : Number(req.rawLength)
        : req.length!;
    const payloadLen = extended ? (flags & CmdFlag.PAYLOAD_LEN ? len : 0) : type === Cmd.WRITE ? len : 0;
    if (payloadLen > limits.maxPayloadBytes) return { req, expect: 'disconnect' };
    if (payloadLen > 65536) return { req, expect: 'stall' }; // payload not sent: the server waits for it
    if (payloadLen > 0) req.payload = randomBytes(payloadLen, r);
    if (type === Cmd.DISC) return { req, expect: 'disc' };
    return { req, expect: 'reply' };
  }

  async function fuzzHeaders(seed: number): Promise<void> {
    const r = prng(seed);
    const mode = MODES[seed % 3];
    const s = await openSession(port, { mode, meta: mode !== 'simple' && r() % 4 !== 0 });
    const count = 1 + (r() % 8);
    const sent = new Map<number, RawRequest>();
    let ending: 'open' | 'disconnect' | 'disc' | 'stall' = 'open';
    const parts: Buffer[] = [];
    for (let i = 0; i < count && ending === 'open'; i++) {
      const { req, expect: outcome } = randomRequest(r, mode);
      const { cookie, bytes } = s.encode(req);
      parts.push(bytes);
      if (outcome === 'reply') sent.set(cookie, req);
      else {
        s.forget(cookie);
        ending = outcome;
      }
    }
    s.conn.send(Buffer.concat(parts));
    const what = `seed ${seed} (${mode})`;
    const answered = new Set<number>();
    while (answered.size < sent.size) {
      // A hard disconnect (oversized payload) may drop replies still in flight; the others must all arrive.
      if (ending === 'disconnect' && s.conn.closed && s.conn.queue.length === 0) break;
      const reply = await s.reply(10_000).catch((err: Error) => {
        if (ending === 'disconnect' && s.conn.closed) return null;
        throw new Error(`${what}: ${err.message}; answered ${answered.size} of ${sent.size}`);
      });
      if (!reply) break;
      expect(sent.has(reply.cookieLo), `${what}: reply for a request we sent`).toBe(true);
      expect(answered.has(reply.cookieLo), `${what}: one reply per request`).toBe(false);
      answered.add(reply.cookieLo);
      if (reply.error) seen.errors++;
      else seen.ok++;
      if (reply.error) expect(ERRNOS.has(reply.error), `${what}: errno ${reply.error}`).toBe(true);
      const req = sent.get(reply.cookieLo)!;
      if (req.type === Cmd.READ && reply.error === 0)
        expect(reply.data?.length ?? 0, `${what}: read length`).toBe(req.length ?? Number(req.rawLength));
    }
    seen[ending]++;
    if (ending === 'disconnect' || ending === 'disc') {
      expect(await s.conn.waitClosed(3_000), `${what}: connection ends (${ending})`).toBe(true);
    } else if (ending === 'open') {
      // The stream is still in sync.
      const ok = await s.call({ type: Cmd.READ, offset: 0, length: 512 });
      expect(ok.error, `${what}: READ after the fuzz`).toBe(0);
    }
    s.conn.destroy();
  }

  async function fuzzBytes(seed: number): Promise<void> {
    const r = prng(seed);
    const mode = MODES[seed % 3];
    const s = await openSession(port, { mode });
    const hdrBytes = mode === 'extended' ? 32 : 28;
    const garbage = randomBytes(1 + (r() % 200), r);
    const magicOk = garbage.length >= 4 && r() % 2 === 0;
    if (magicOk) garbage.writeUInt32BE(mode === 'extended' ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, 0);
    s.conn.send(garbage);
    if (!magicOk && garbage.length >= hdrBytes && garbage.readUInt32BE(0) !== REQUEST_MAGIC) {
      // Not a request: the server must hang up without answering.
      await expectDisconnect(s.conn, `seed ${seed} (${mode}) garbage`);
      seen.garbageDisconnects++;
    } else {
      await s.conn.waitClosed(100);
    }
    s.conn.destroy();
  }

  it('random bytes after a proper handshake', async () => {
    const SEEDS = 150;
    for (let base = 1; base <= SEEDS; base += 15) {
      await Promise.all(Array.from({ length: 15 }, (_, i) => fuzzBytes(1000 + base + i)));
      await expectHealthy(port);
    }
    expect(seen.garbageDisconnects).toBeGreaterThan(30);
  });

  it('random valid-looking headers with random fields', async () => {
    const SEEDS = 300;
    for (let base = 1; base <= SEEDS; base += 20) {
      await Promise.all(Array.from({ length: 20 }, (_, i) => fuzzHeaders(5000 + base + i)));
      await expectHealthy(port);
    }
    expect(srv.server.address().port).toBe(port);
    expect(seen.ok, JSON.stringify(seen)).toBeGreaterThan(200);
    expect(seen.errors, JSON.stringify(seen)).toBeGreaterThan(200);
    for (const k of ['open', 'disconnect', 'disc', 'stall'] as const)
      expect(seen[k], `${k}: ${JSON.stringify(seen)}`).toBeGreaterThan(3);
  });
});
