// The primary's replication core (src/checkpoint/primary/core.ts) on its own:
// events in, actions out, time passed in. No sockets, no timers, no files.
import { describe, expect, it } from 'vitest';
import { PrimaryCore, resyncPlan, type PrimaryAction } from '../src/checkpoint/primary/core.js';
import type { ToPrimary } from '../src/checkpoint/link/messages.js';

const gen = { n: 1, id: 'g1', by: 'n1', base: 0, at: 0, reason: 'new disk' };

function core(loneAfterMs = 5000) {
  return new PrimaryCore({
    size: 1 << 20,
    host: 'b',
    port: 900,
    heartbeat: { intervalMs: 100, timeoutMs: 400 },
    reconnectMinMs: 100,
    reconnectMaxMs: 800,
    loneAfterMs,
  });
}

const kinds = (as: PrimaryAction[]) => as.map((a) => a.t);
const find = <T extends PrimaryAction['t']>(as: PrimaryAction[], t: T) =>
  as.find((a) => a.t === t) as Extract<PrimaryAction, { t: T }> | undefined;

/** Start, connect and accept a hello with `decision` at time 0..; returns the connection id. */
function up(c: PrimaryCore, decision: 'none' | 'resync' = 'none'): number {
  const conn = find(c.step({ t: 'start', now: 0 }), 'connect')!.conn;
  expect(kinds(c.step({ t: 'connected', now: 1, conn }))).toEqual(['hello']);
  const msg: ToPrimary = {
    t: 'hello',
    proto: 1,
    size: 1 << 20,
    seq: 0,
    durable: 3,
    committed: 3,
    history: [gen],
    decision:
      decision === 'none'
        ? { action: 'none', reason: 'same generation' }
        : { action: 'resync', mode: 'incremental', reason: 'restarted' },
    hot: [{ offset: 0, length: 4096 }],
  };
  c.step({ t: 'received', now: 2, conn, msg });
  return conn;
}

describe('PrimaryCore', () => {
  it('connects, sends its hello, and on "none" is protected and resends from what the secondary holds', () => {
    const c = core();
    const conn = find(c.step({ t: 'start', now: 0 }), 'connect')!.conn;
    c.step({ t: 'connected', now: 1, conn });
    const as = c.step({
      t: 'received',
      now: 2,
      conn,
      msg: {
        t: 'hello',
        proto: 1,
        size: 1 << 20,
        durable: 7,
        committed: 6,
        decision: { action: 'none', reason: 'r' },
      },
    });
    expect(find(as, 'linkUp')).toMatchObject({ release: 7, resync: false });
    expect(kinds(as)).toContain('protected');
    expect(c.peerState).toBe('protected');
    expect(c.durableEpoch).toBe(7);
    expect(c.committedEpoch).toBe(6);
  });

  it('on "resync" asks for one with the peer\'s hot ranges, and releases everything sealed', () => {
    const c = core();
    up(c, 'resync');
    expect(c.peerState).toBe('syncing');
    const c2 = core();
    const conn = find(c2.step({ t: 'start', now: 0 }), 'connect')!.conn;
    c2.step({ t: 'connected', now: 1, conn });
    const as = c2.step({
      t: 'received',
      now: 2,
      conn,
      msg: {
        t: 'hello',
        proto: 1,
        size: 1 << 20,
        decision: { action: 'resync', mode: 'full', reason: 'new node' },
        hot: [{ offset: 8192, length: 4096 }],
      },
    });
    expect(find(as, 'resync')).toEqual({
      t: 'resync',
      mode: 'full',
      peerHot: [{ offset: 8192, length: 4096 }],
    });
    expect(find(as, 'linkUp')!.resync).toBe(true);
  });

  it('beats when idle, declares the peer lost after the timeout, and not when this process was frozen', () => {
    const c = core();
    const conn = up(c);
    expect(kinds(c.step({ t: 'tick', now: 110 }))).toEqual(['beat']);
    c.step({ t: 'rx', now: 200, conn });
    expect(kinds(c.step({ t: 'tick', now: 300 }))).toEqual(['beat']);
    // Silence of 450 ms, with ticks all along: lost.
    expect(kinds(c.step({ t: 'tick', now: 400 }))).toEqual(['beat']);
    const lost = c.step({ t: 'tick', now: 651 });
    expect(find(lost, 'close')?.reason).toMatch(/heartbeat timeout: nothing from the secondary for 451 ms/);
    // A process frozen for a second sees a long gap between ticks: the silence is its own.
    const d = core();
    const conn2 = up(d);
    d.step({ t: 'rx', now: 5, conn: conn2 });
    expect(kinds(d.step({ t: 'tick', now: 2000 }))).toEqual(['beat']);
  });

  it('reconnects with a backoff that doubles up to the maximum, and resets once up', () => {
    const c = core(Infinity);
    let conn = find(c.step({ t: 'start', now: 0 }), 'connect')!.conn;
    const delays: number[] = [];
    let now = 0;
    for (let i = 0; i < 5; i++) {
      c.step({ t: 'closed', now, conn, error: 'ECONNREFUSED' });
      const at = c.nextDeadline()!;
      delays.push(at - now);
      now = at;
      conn = find(c.step({ t: 'tick', now }), 'connect')!.conn;
    }
    expect(delays).toEqual([100, 200, 400, 800, 800]);
    expect(c.reconnects).toBe(5);
    expect(c.lastError).toBe('ECONNREFUSED');
  });

  it('goes on alone after the secondary has been unreachable long enough, but not once deposed', () => {
    const c = core(5000);
    const conn = up(c);
    c.step({ t: 'closed', now: 10, conn, error: 'reset' });
    expect(c.peerState).toBe('down');
    const retry = find(c.step({ t: 'tick', now: 200 }), 'connect')!.conn;
    c.step({ t: 'closed', now: 300, conn: retry, error: 'ECONNREFUSED' });
    const lone = find(c.step({ t: 'tick', now: 5010 }), 'lone');
    expect(lone?.reason).toMatch(/unreachable for 5000 ms/);
    expect(c.peerState).toBe('lone');

    const d = core(5000);
    const dc = up(d);
    const as = d.step({
      t: 'received',
      now: 5,
      conn: dc,
      msg: { t: 'error', code: 'ESTALE', message: 'promoted' },
    });
    expect(kinds(as)).toEqual(expect.arrayContaining(['fence', 'close']));
    d.step({ t: 'closed', now: 6, conn: dc, error: null });
    expect(d.nextDeadline()).toBeNull(); // no reconnect, no lone timer: deposed for good
    expect(d.peerState).toBe('deposed');
  });

  it('waits: settled by the answers, refused when unusable, rejected by a timeout or an error about the epoch', () => {
    const c = core();
    const conn = up(c); // durable 3, committed 3
    expect(
      c.step({ t: 'wait', now: 3, id: 1, kind: 'durable', epoch: 3, timeoutMs: 1000, resync: false }),
    ).toEqual([{ t: 'resolve', id: 1, epoch: 3 }]);
    expect(
      c.step({ t: 'wait', now: 3, id: 2, kind: 'durable', epoch: 4, timeoutMs: 1000, resync: false }),
    ).toEqual([]);
    expect(c.step({ t: 'received', now: 4, conn, msg: { t: 'durable', e: 4 } })).toEqual([
      { t: 'resolve', id: 2, epoch: 4 },
      { t: 'release', epoch: 4, keepSpilled: true },
    ]);
    // A commit request goes out as soon as its wait is admitted.
    const commit = c.step({
      t: 'wait',
      now: 5,
      id: 3,
      kind: 'commit',
      epoch: 4,
      timeoutMs: 1000,
      resync: false,
    });
    expect(commit).toEqual([{ t: 'commit', conn, epoch: 4, sync: undefined }]);
    const answered = c.step({
      t: 'received',
      now: 6,
      conn,
      msg: { t: 'committed', e: 4, overlayDiscarded: { records: 2, bytes: 1024 } },
    });
    expect(answered).toEqual([
      { t: 'resolve', id: 3, epoch: 4, overlayDiscarded: { records: 2, bytes: 1024 } },
      { t: 'release', epoch: 4 },
    ]);
    c.step({ t: 'wait', now: 7, id: 4, kind: 'durable', epoch: 5, timeoutMs: 100, resync: false });
    c.step({ t: 'wait', now: 7, id: 5, kind: 'durable', epoch: 6, timeoutMs: 1000, resync: false });
    const timedOut = find(c.step({ t: 'tick', now: 107 }), 'reject');
    expect(timedOut).toMatchObject({ id: 4, error: { code: 'EIO' } });
    expect(timedOut!.error.message).toMatch(
      /timed out after 100 ms waiting for the secondary to make durable epoch 5/,
    );
    const err = c.step({
      t: 'received',
      now: 108,
      conn,
      msg: { t: 'error', code: 'ENOSPC', message: 'disk full', e: 6 },
    });
    expect(find(err, 'reject')).toMatchObject({ id: 5, error: { code: 'ENOSPC' } });
    // Out of sync: nothing can be waited for except by the resync itself.
    c.step({ t: 'outOfSync', now: 109, reason: 'over budget' });
    expect(
      find(
        c.step({ t: 'wait', now: 110, id: 6, kind: 'durable', epoch: 9, timeoutMs: 100, resync: false }),
        'reject',
      )!.error.code,
    ).toBe('EIO');
    expect(
      c.step({ t: 'wait', now: 110, id: 7, kind: 'durable', epoch: 9, timeoutMs: 100, resync: true }),
    ).toEqual([]);
    // The link goes down: every wait fails with ECONNECT.
    expect(find(c.step({ t: 'closed', now: 111, conn, error: 'reset' }), 'reject')!.error.code).toBe(
      'ECONNECT',
    );
  });

  it('refuses a secondary of another size, and a failed resync with the link up reconnects', () => {
    const c = core();
    const conn = find(c.step({ t: 'start', now: 0 }), 'connect')!.conn;
    c.step({ t: 'connected', now: 1, conn });
    const as = c.step({ t: 'received', now: 2, conn, msg: { t: 'hello', proto: 1, size: 4096 } });
    expect(find(as, 'close')?.reason).toMatch(/4096 bytes but the primary's is 1048576/);
    const d = core();
    const dc = up(d, 'resync');
    expect(find(d.step({ t: 'resyncFailed', now: 3, error: 'commit refused' }), 'close')).toMatchObject({
      conn: dc,
      reason: 'resync failed: commit refused',
    });
  });

  it('plans a resync: full compares everything; incremental sends what it knows and compares what either side may have written', () => {
    const known = {
      exact: [{ offset: 0, length: 4096 }],
      hot: [
        { offset: 0, length: 1 << 20 },
        { offset: 6 << 20, length: 1 << 20 },
      ],
      // The hot extent at 6 MiB holds only exact blocks: sending them is all it needs.
      unknown: [{ offset: 0, length: 1 << 20 }],
      peerHot: [{ offset: 1 << 20, length: 1 << 20 }],
      pending: [],
    };
    expect(resyncPlan('full', 8 << 20, known)).toEqual({
      mode: 'full',
      send: [],
      compare: [{ offset: 0, length: 8 << 20 }],
    });
    expect(resyncPlan('incremental', 8 << 20, known)).toEqual({
      mode: 'incremental',
      send: [{ offset: 0, length: 4096 }],
      compare: [{ offset: 0, length: 2 << 20 }],
    });
    // After an interruption everything is compared again, every hot extent included; nothing is sent blind.
    expect(
      resyncPlan('incremental', 8 << 20, { ...known, pending: [{ offset: 4 << 20, length: 4096 }] }),
    ).toEqual({
      mode: 'incremental',
      send: [],
      compare: [
        { offset: 0, length: 2 << 20 },
        { offset: 4 << 20, length: 4096 },
        { offset: 6 << 20, length: 1 << 20 },
      ],
    });
  });
});
