// The secondary's replication core (src/checkpoint/secondary/core.ts) on its
// own: events in, actions out, the node's durable state read through a view.
import { describe, expect, it } from 'vitest';
import { LINK_PROTOCOL, type PrimaryHello } from '../src/checkpoint/link/messages.js';
import { SecondaryCore, type SecondaryAction, type SecondaryView } from '../src/checkpoint/secondary/core.js';
import type { Generation } from '../src/failover/history.js';

const g1: Generation = { n: 1, id: 'g1', by: 'a', base: 0, at: 0, reason: 'new disk' };
const g2: Generation = { n: 2, id: 'g2', by: 'b', base: 5, at: 1, reason: 'promoted' };
const g2x: Generation = { n: 2, id: 'g2x', by: 'a', base: 5, at: 1, reason: 'lone' };

function setup(opts: { history?: Generation[]; promoted?: boolean; failover?: 'auto' | 'manual' } = {}) {
  const state = { history: opts.history ?? [g1], promoted: opts.promoted ?? false };
  const view: SecondaryView = {
    size: 1 << 20,
    history: () => state.history,
    syncing: () => null,
    promoted: () => (state.promoted ? { generation: 2 } : null),
  };
  const core = new SecondaryCore(
    {
      heartbeat: { intervalMs: 100, timeoutMs: 400 },
      failover: opts.failover ?? 'auto',
      failoverGraceMs: 500,
    },
    view,
  );
  return { core, state };
}

const hello = (history: Generation[], extra: Partial<PrimaryHello> = {}): PrimaryHello => ({
  t: 'hello',
  proto: LINK_PROTOCOL,
  size: 1 << 20,
  epoch: 6,
  session: 's',
  history,
  needsResync: false,
  ...extra,
});

const kinds = (as: SecondaryAction[]) => as.map((a) => a.t);
const sent = (as: SecondaryAction[]) =>
  as.filter((a): a is Extract<SecondaryAction, { t: 'send' }> => a.t === 'send').map((a) => a.msg);

/** Accept connection `conn` and take its hello up to the welcome. */
function connect(core: SecondaryCore, conn = 1, now = 0) {
  core.step({ t: 'accepted', now, conn, peer: 'a:1' });
  const start = core.step({ t: 'hello', now, conn, msg: hello([g1]) });
  expect(kinds(start)).toEqual(['startSession']);
  return core.step({ t: 'sessionStarted', now, conn, error: null });
}

describe('SecondaryCore', () => {
  it('starts the session the decision asks for, then welcomes the primary', () => {
    const { core } = setup();
    expect(core.accepting(1)).toBe(false);
    const as = connect(core);
    expect(kinds(as)).toEqual(['welcome', 'log', 'primaryConnected']);
    expect(as[0]).toMatchObject({ decision: { action: 'none' } });
    expect(core.accepting(1)).toBe(true);
    expect(core.connected).toBe(true);
    // A primary one generation ahead: an incremental resync.
    const { core: c2 } = setup();
    c2.step({ t: 'accepted', now: 0, conn: 1, peer: 'a:1' });
    const start = c2.step({ t: 'hello', now: 0, conn: 1, msg: hello([g1, g2]) });
    expect(start[0]).toMatchObject({
      t: 'startSession',
      decision: { action: 'resync', mode: 'incremental' },
    });
  });

  it('refuses a stale primary, a split brain, a mismatched disk and an old protocol, saying why', () => {
    const cases: [Generation[], Partial<PrimaryHello>, Generation[], string, RegExp][] = [
      [[g1], {}, [g1, g2], 'ESTALE', /older than the secondary's generation 2/],
      [[g1, g2x], {}, [g1, g2], 'ESPLIT', /split brain/],
      [[g1], { size: 4096 }, [g1], 'EUSAGE', /4096 bytes but this secondary's image is 1048576/],
      [[g1], { proto: 1 }, [g1], 'EPROTO', /link protocol 1 is not 2/],
    ];
    for (const [theirs, extra, ours, code, why] of cases) {
      const { core } = setup({ history: ours });
      core.step({ t: 'accepted', now: 0, conn: 1, peer: 'a:1' });
      const as = core.step({ t: 'hello', now: 0, conn: 1, msg: hello(theirs, extra) });
      const err = sent(as).find((m) => m.t === 'error');
      expect(err, code).toMatchObject({ code });
      expect((err as { message: string }).message).toMatch(why);
      expect(as.at(-1)).toMatchObject({ t: 'close', graceful: true });
      expect(kinds(as)).not.toContain('startSession');
    }
    // A promoted node serves its own writes: it refuses any primary.
    const { core } = setup({ promoted: true });
    core.step({ t: 'accepted', now: 0, conn: 1, peer: 'a:1' });
    const as = core.step({ t: 'hello', now: 0, conn: 1, msg: hello([g1]) });
    expect(sent(as).find((m) => m.t === 'error')).toMatchObject({ code: 'ESTALE' });
    expect(core.refusal?.code).toBe('ESTALE');
  });

  it("a session the store cannot start is refused with the store's reason", () => {
    const { core } = setup();
    core.step({ t: 'accepted', now: 0, conn: 1, peer: 'a:1' });
    core.step({ t: 'hello', now: 0, conn: 1, msg: hello([g1]) });
    const as = core.step({
      t: 'sessionStarted',
      now: 1,
      conn: 1,
      error: { code: 'EUSAGE', message: 'older primary' },
    });
    expect(sent(as).find((m) => m.t === 'error')).toMatchObject({ code: 'EUSAGE', message: 'older primary' });
    expect(core.connected).toBe(false);
  });

  it('beats, and declares the primary lost after the timeout unless it was busy handling a frame', () => {
    const { core } = setup({ failover: 'manual' });
    connect(core);
    expect(sent(core.step({ t: 'tick', now: 100 }))).toEqual([{ t: 'beat' }]);
    core.step({ t: 'busy', conn: 1, busy: true });
    expect(kinds(core.step({ t: 'tick', now: 450 }))).not.toContain('close');
    expect(kinds(core.step({ t: 'tick', now: 800 }))).not.toContain('close');
    core.step({ t: 'busy', conn: 1, busy: false });
    // Ticks every 50 ms (a longer gap would read as this process having been frozen).
    for (let now = 850; now < 1250; now += 50)
      expect(kinds(core.step({ t: 'tick', now }))).not.toContain('close');
    const as = core.step({ t: 'tick', now: 1250 });
    expect(as.find((a) => a.t === 'close')).toMatchObject({
      reason: expect.stringMatching(/heartbeat timeout/),
    });
    expect(kinds(as)).toContain('primaryLost');
    expect(core.primaryLost?.reason).toMatch(/heartbeat timeout: nothing from the primary for 450 ms/);
  });

  it('automatic failover: promotes after the grace period, unless the primary comes back first', () => {
    const { core } = setup({ failover: 'auto' });
    connect(core);
    core.step({ t: 'closed', now: 1000, conn: 1, error: 'reset' });
    expect(core.failoverPending).toBe(true);
    expect(core.nextDeadline()).toBe(1500);
    expect(kinds(core.step({ t: 'tick', now: 1499 }))).not.toContain('promote');
    expect(core.step({ t: 'tick', now: 1500 }).find((a) => a.t === 'promote')).toMatchObject({
      reason: 'automatic failover: primary lost (reset)',
    });
    // Back within the grace period: no promotion.
    const { core: c2 } = setup({ failover: 'auto' });
    connect(c2);
    c2.step({ t: 'closed', now: 1000, conn: 1, error: 'reset' });
    connect(c2, 2, 1200);
    expect(c2.failoverPending).toBe(false);
    expect(kinds(c2.step({ t: 'tick', now: 2000 }))).not.toContain('promote');
    // Manual mode never promotes by itself; an operator's failover cancels a pending one.
    const { core: c3 } = setup({ failover: 'manual' });
    connect(c3);
    c3.step({ t: 'closed', now: 1000, conn: 1, error: 'reset' });
    expect(c3.failoverPending).toBe(false);
    const { core: c4 } = setup({ failover: 'auto' });
    connect(c4);
    c4.step({ t: 'closed', now: 1000, conn: 1, error: 'reset' });
    c4.step({ t: 'cancelFailover', now: 1001 });
    expect(kinds(c4.step({ t: 'tick', now: 2000 }))).not.toContain('promote');
  });

  it('the newest connection wins; frames are taken only once the handshake is done', () => {
    const { core } = setup({ failover: 'manual' });
    connect(core, 1);
    const as = core.step({ t: 'accepted', now: 5, conn: 2, peer: 'a:2' });
    expect(as.find((a) => a.t === 'close')).toMatchObject({ conn: 1, reason: 'replaced' });
    expect(core.accepting(1)).toBe(false);
    expect(core.accepting(2)).toBe(false);
    // A second hello on an accepted connection is a protocol error.
    connect(core, 3, 6);
    const again = core.step({ t: 'hello', now: 7, conn: 3, msg: hello([g1]) });
    expect(sent(again).find((m) => m.t === 'error')).toMatchObject({ code: 'EPROTO' });
  });
});
