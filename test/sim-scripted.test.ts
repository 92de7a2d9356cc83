// Scripted runs on the simulator (test/sim/): each reproduces, step by step,
// a divergence the seeded simulator found (or the issue reported), and checks
// that the two disks are equal by the end. In-process and deterministic.
import { describe, expect, it } from 'vitest';
import { Cluster, defaultSimOptions, DISK, REPL_PORT, type NodeName } from './sim/cluster.js';
import { SimWorld } from './sim/world.js';
import { ColoError } from '../src/errors.js';
import type { Tunables } from '../src/limits.js';

const KiB = 1024;

/** A protected pair: `a` the primary, `b` its secondary (with these tunables, and a socket buffer of `highWater`). */
async function pair(
  seed: number,
  opts: { tunables?: Partial<Tunables>; highWater?: number } = {},
): Promise<{ world: SimWorld; c: Cluster }> {
  const world = new SimWorld(seed);
  const c = new Cluster(world, {
    ...defaultSimOptions,
    tunables: { ...defaultSimOptions.tunables, ...opts.tunables },
  });
  if (opts.highWater !== undefined) c.net.highWater = opts.highWater;
  expect(await c.startSecondary('b')).toBe(true);
  expect(await c.startPrimary('a')).toBe(true);
  expect(await world.runUntil(() => c.nodes.a.primary?.peerState === 'protected', 10_000)).toBe(true);
  return { world, c };
}

async function write(c: Cluster, name: NodeName, offset: number, length: number, fill: number) {
  const r = await c.world.await(c.nodes[name].device!.pwrite(Buffer.alloc(length, fill), offset), 5000);
  return r?.ok ?? false;
}

async function flush(c: Cluster, name: NodeName) {
  expect((await c.world.await(c.nodes[name].device!.flush(), 5000))?.ok).toBe(true);
}

/** A checkpoint on `p`, then the secondary's committed disk must equal `p`'s disk. */
async function checkpointEqual(c: Cluster, p: NodeName, s: NodeName) {
  const cut = await c.read(p);
  const r = await c.world.await(c.nodes[p].primary!.checkpoint(4000), 15_000);
  expect(r?.ok, r && !r.ok ? r.error.message : 'no answer').toBe(true);
  const committed = await c.committedView(s);
  expect(committed!.equals(cut!), `the committed disk of ${s} differs from ${p}'s`).toBe(true);
}

const waitProtected = (c: Cluster, p: NodeName) =>
  c.world.runUntil(() => c.nodes[p].primary?.peerState === 'protected', 30_000);

describe('scripted simulator runs', () => {
  it('promote, SVM writes, crash of the promoted node, restart, re-protect: both disks equal', () =>
    SimWorld.track(async () => {
      const { c } = await pair(1);
      await checkpointEqual(c, 'a', 'b');
      c.crash('a');
      expect((await c.world.await(c.nodes.b.secondary!.promote('test'), 5000))?.ok).toBe(true);
      // Regions nobody wrote before, in different activity extents.
      expect(await write(c, 'b', 640 * KiB, 64 * KiB, 0x41)).toBe(true);
      expect(await write(c, 'b', 900 * KiB, 32 * KiB, 0x42)).toBe(true);
      expect(await write(c, 'b', 64 * KiB, 4 * KiB, 0x43)).toBe(true);
      await flush(c, 'b');
      c.crash('b', 'lose-unsynced');
      expect(await c.startSecondary('b')).toBe(true); // still the promoted node
      expect(c.nodes.b.secondary!.store.promoted).not.toBeNull();
      expect(await c.startSecondary('a')).toBe(true); // the old primary returns
      await c.world.await(c.nodes.b.secondary!.reprotect(`a:${REPL_PORT}`), 5000);
      expect(await waitProtected(c, 'b')).toBe(true);
      await checkpointEqual(c, 'b', 'a');
      const a = await c.committedView('a');
      expect(a!.subarray(640 * KiB, 704 * KiB).equals(Buffer.alloc(64 * KiB, 0x41))).toBe(true);
    }));

  it('a write that fails part-way on the primary disk still leaves both disks equal', () =>
    SimWorld.track(async () => {
      const { c } = await pair(2);
      c.nodes.a.proc!.image.failRate = 1;
      expect(await write(c, 'a', 128 * KiB, 64 * KiB, 0x77)).toBe(false);
      c.nodes.a.proc!.image.failRate = 0;
      expect(c.nodes.a.proc!.image.failures).toBe(1);
      await checkpointEqual(c, 'a', 'b');
    }));

  it("the primary's unflushed writes that the secondary committed survive its power cut (a commit is a flush barrier)", () =>
    SimWorld.track(async () => {
      const { c } = await pair(3);
      expect(await write(c, 'a', 300 * KiB, 16 * KiB, 0x5a)).toBe(true); // never flushed by the VM
      // Enough checkpoints that the region's activity extent cools.
      for (let i = 0; i < 6; i++) await checkpointEqual(c, 'a', 'b');
      c.crash('a', 'lose-unsynced');
      expect(await c.startPrimary('a')).toBe(true);
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      const disk = await c.read('a');
      expect(disk!.subarray(300 * KiB, 316 * KiB).equals(Buffer.alloc(16 * KiB, 0x5a))).toBe(true);
    }));

  it('--discard-my-data on a node that was promoted makes it a plain secondary again', () =>
    SimWorld.track(async () => {
      const { c } = await pair(4);
      await checkpointEqual(c, 'a', 'b');
      c.crash('a');
      expect((await c.world.await(c.nodes.b.secondary!.promote('test'), 5000))?.ok).toBe(true);
      expect(await write(c, 'b', 0, 8 * KiB, 0x0b)).toBe(true);
      c.crash('b');
      // The old primary comes back alone and writes: split brain.
      expect(await c.startPrimary('a')).toBe(true);
      await c.world.runFor(c.opts.loneAfterMs + 500);
      expect(c.nodes.a.primary!.peerState).toBe('lone');
      expect(await write(c, 'a', 0, 8 * KiB, 0x0a)).toBe(true);
      // The operator keeps a's data: b restarts with --discard-my-data and is fully resynchronised.
      expect(await c.startSecondary('b', { discardMyData: true })).toBe(true);
      expect(c.nodes.b.secondary!.store.promoted).toBeNull();
      c.nodes.a.primary!.reprotect(`b:${REPL_PORT}`);
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      expect((await c.read('b'))!.subarray(0, 8 * KiB).equals(Buffer.alloc(8 * KiB, 0x0a))).toBe(true);
    }));

  it('a folded overlay is made durable before it is applied (a crash never re-applies an older version over the image)', () =>
    SimWorld.track(async () => {
      const { c } = await pair(6);
      await checkpointEqual(c, 'a', 'b');
      c.crash('a');
      expect((await c.world.await(c.nodes.b.secondary!.promote('test'), 5000))?.ok).toBe(true);
      // X, made durable in the overlay; then Y over the same range, which pushes the overlay past
      // the fold size: the overlay is folded with Y still unsynced, and applied into the image.
      const store = c.nodes.b.secondary!.store;
      expect(await write(c, 'b', 256 * KiB, 16 * KiB, 0x58)).toBe(true);
      await flush(c, 'b');
      const overlay = store.overlayLayer;
      expect(await write(c, 'b', 256 * KiB, 16 * KiB, 0x59)).toBe(true);
      expect(await write(c, 'b', 512 * KiB, 40 * KiB, 0x5a)).toBe(true);
      expect(await c.world.runUntil(() => store.overlayLayer !== overlay, 5000)).toBe(true); // folded
      await c.world.await(store.drainApply(), 5000);
      await flush(c, 'b');
      c.crash('b', 'lose-unsynced');
      expect(await c.startSecondary('b')).toBe(true);
      const disk = await c.read('b');
      expect(disk!.subarray(256 * KiB, 272 * KiB).equals(Buffer.alloc(16 * KiB, 0x59))).toBe(true);
    }));

  it('an epoch sealed before a resync is not committed as that checkpoint after it', () =>
    SimWorld.track(async () => {
      const { c } = await pair(7);
      const p = c.nodes.a.primary!;
      expect(await write(c, 'a', 0, 8 * KiB, 0x31)).toBe(true);
      const sealed = await c.world.await(p.seal(4000), 5000);
      expect(sealed?.ok).toBe(true);
      const n = (sealed as { value: { epoch: number } }).value.epoch;
      // The log can no longer carry the secondary: it is resynchronised (and moves past epoch n).
      p.plog.markOutOfSync('test: over budget');
      expect(await c.world.runUntil(() => p.peerState === 'syncing', 5000)).toBe(true);
      expect(await waitProtected(c, 'a')).toBe(true);
      const r = await c.world.await(p.commit(n, 4000), 5000);
      expect(r?.ok).toBe(false);
      expect((r as { error: Error }).error.message).toMatch(/resynchronised since it was sealed/);
      await checkpointEqual(c, 'a', 'b');
    }));

  it('the same seed replays exactly', () =>
    SimWorld.track(async () => {
      const run = async () => {
        const { world, c } = await pair(5);
        for (let i = 0; i < 5; i++) {
          await write(c, 'a', world.rng.int(DISK / 4096) * 4096, 4096, i);
          await c.world.await(c.nodes.a.primary!.checkpoint(4000), 15_000);
        }
        return { t: world.t, steps: world.steps, log: c.log.join('\n') };
      };
      const [x, y] = [await run(), await run()];
      expect(y).toEqual(x);
    }));
});

/** Writes to state files whose path contains `which` fail with ENOSPC, as on a full disk, until freed. */
function fill(c: Cluster, name: NodeName, which: string): () => void {
  let refused = 0;
  c.nodes[name].disk.faults = (path) => {
    if (!path.includes(which)) return;
    refused++;
    throw new ColoError('ENOSPC', `${path}: no space left on device (test)`);
  };
  return () => {
    c.nodes[name].disk.faults = null;
    expect(refused, `no write to ${which} was refused: the test tested nothing`).toBeGreaterThan(0);
  };
}

/** The generations a node's history.json holds on disk. */
function historyOnDisk(c: Cluster, name: NodeName): { n: number; id: string; reason: string }[] {
  const raw = c.nodes[name].disk.read('/state/history.json');
  return raw
    ? (JSON.parse(raw.toString('utf8')) as { generations: { n: number; id: string; reason: string }[] })
        .generations
    : [];
}

describe('a slow disk', () => {
  it("a write that waits out a resync's last commit keeps its extent hot: a crash after it still resynchronises that region", () =>
    SimWorld.track(async () => {
      const { world, c } = await pair(21);
      await checkpointEqual(c, 'a', 'b');
      // Enough for a resync of several commits (one every 128 KiB here), so several seals: the
      // restarted primary cannot resend its log, it resynchronises its hot extents.
      for (let i = 0; i < 4; i++) expect(await write(c, 'a', i * 64 * KiB, 64 * KiB, 0x31 + i)).toBe(true);
      await flush(c, 'a');
      c.crash('a', 'lose-unsynced');
      expect(await c.startPrimary('a')).toBe(true);
      expect(await world.runUntil(() => c.nodes.a.primary!.peerState === 'syncing', 5000)).toBe(true);
      // Only the activity log's syncs are slow: a write to a region nothing wrote before waits
      // 400 ms for its record, while the resync runs at full speed through its last commit.
      c.nodes.a.disk.slowSyncs = [400, 400];
      c.nodes.a.disk.slowOnly = 'activity';
      const late = c.nodes.a.device!.pwrite(Buffer.alloc(8 * KiB, 0x77), 960 * KiB);
      expect(await waitProtected(c, 'a')).toBe(true);
      expect((await world.await(late, 5000))?.ok).toBe(true);
      await flush(c, 'a'); // on a's disk for good; no checkpoint has carried it to b yet
      const hot = c.nodes.a.primary!.activity.hotRanges();
      expect(
        hot.some((r) => r.offset <= 960 * KiB && 968 * KiB <= r.offset + r.length),
        `the extent of a write no commit covers yet went cold: hot ${JSON.stringify(hot)}`,
      ).toBe(true);
      // The primary dies before any checkpoint carries that write (once its bitmap, as it now
      // stands, is on disk); restarted, it must resend it.
      await world.runFor(1000);
      c.nodes.a.disk.slowSyncs = null;
      c.crash('a', 'lose-unsynced');
      expect(await c.startPrimary('a')).toBe(true);
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
    }));
});

describe('a full state directory, then space freed', () => {
  it("the secondary's commit record could not be written: that checkpoint fails, the next ones succeed once space is freed", () =>
    SimWorld.track(async () => {
      const { c } = await pair(11);
      await checkpointEqual(c, 'a', 'b');
      const free = fill(c, 'b', 'commits.journal');
      expect(await write(c, 'a', 64 * KiB, 8 * KiB, 0x31)).toBe(true);
      const failed = await c.world.await(c.nodes.a.primary!.checkpoint(4000), 15_000);
      expect(failed?.ok, 'a commit was reported that the secondary could not record').toBe(false);
      expect(failed && !failed.ok && failed.error.message).toMatch(/no space/);
      free();
      // The journal's writer failed once; the secondary must not stay unable to commit.
      expect(await waitProtected(c, 'a')).toBe(true);
      expect(await write(c, 'a', 96 * KiB, 8 * KiB, 0x32)).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      await checkpointEqual(c, 'a', 'b');
    }));

  it('a promotion on a full disk fails and changes nothing; once space is freed it succeeds, one new generation', () =>
    SimWorld.track(async () => {
      const { c } = await pair(12);
      expect(await write(c, 'a', 200 * KiB, 4 * KiB, 0x41)).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      const before = historyOnDisk(c, 'b');
      c.crash('a');
      const b = c.nodes.b.secondary!;
      let free = fill(c, 'b', 'commits.journal');
      const r1 = await c.world.await(b.promote('test: disk full'), 5000);
      expect(r1?.ok, 'promoted without a promote record').toBe(false);
      expect(b.store.promoted).toBeNull();
      free();
      // The promote record is written, history.json is not: the promotion is real, not finished.
      free = fill(c, 'b', 'history.json');
      const r2 = await c.world.await(b.promote('test: disk full'), 5000);
      expect(r2?.ok).toBe(false);
      free();
      const r3 = await c.world.await(b.promote('test: space freed'), 5000);
      expect(r3?.ok, r3 && !r3.ok ? r3.error.message : 'no answer').toBe(true);
      const after = historyOnDisk(c, 'b');
      expect(after.length, 'exactly one new generation on disk').toBe(before.length + 1);
      expect(b.store.promoted!.generation).toBe(after.at(-1)!.n);
      expect(after.at(-1)!.n).toBe((before.at(-1)?.n ?? 0) + 1);
      expect(b.history.generations.map((g) => g.id)).toEqual(after.map((g) => g.id));
      // The promoted node serves writes; after a restart it is still that generation.
      expect(await write(c, 'b', 300 * KiB, 4 * KiB, 0x42)).toBe(true);
      c.crash('b');
      expect(await c.startSecondary('b')).toBe(true);
      expect(c.nodes.b.secondary!.store.promoted!.generation).toBe(after.at(-1)!.n);
      expect(historyOnDisk(c, 'b').map((g) => g.id)).toEqual(after.map((g) => g.id));
    }));

  it("a resync's last commit cannot write history.json: the commit stands, and a promotion numbers its generation after the primary's", () =>
    SimWorld.track(async () => {
      const world = new SimWorld(14);
      const c = new Cluster(world);
      expect(await c.startSecondary('b')).toBe(true);
      const free = fill(c, 'b', 'history.json');
      expect(await c.startPrimary('a')).toBe(true);
      await world.runFor(2000); // the resync's 'done' commit carries a's history; b cannot write it
      const primaryGen = c.nodes.a.proc!.kind === 'primary' ? c.nodes.a.proc!.replica.history.last! : null;
      expect(primaryGen).not.toBeNull();
      c.crash('a');
      free();
      const r = await world.await(c.nodes.b.secondary!.promote('test'), 5000);
      expect(r?.ok, r && !r.ok ? r.error.message : 'no answer').toBe(true);
      const gens = historyOnDisk(c, 'b');
      expect(
        gens.map((g) => g.id),
        "b's history must hold the primary's generation",
      ).toContain(primaryGen!.id);
      expect(c.nodes.b.secondary!.store.promoted!.generation, 'a generation number used twice').toBe(
        primaryGen!.n + 1,
      );
    }));

  it("the primary's resend buffer, in files only, cannot be written out when a resend reads it: the secondary is resynchronised once space is freed", () =>
    SimWorld.track(async () => {
      const { world, c } = await pair(15, { tunables: { resendMemoryBytes: 0 } });
      await checkpointEqual(c, 'a', 'b');
      // The link stalls; what the PVM writes meanwhile waits in the epoch's file for the resend.
      c.net.partition('a', 'b');
      for (let i = 0; i < 4; i++) expect(await write(c, 'a', i * 64 * KiB, 16 * KiB, 0x60 + i)).toBe(true);
      await world.runFor(1000);
      const free = fill(c, 'a', '.journal');
      expect(await write(c, 'a', 320 * KiB, 16 * KiB, 0x70)).toBe(true); // appended, not written out
      c.net.heal('a', 'b');
      await world.runFor(2000); // the resend reads the file: it must write out first, and cannot
      expect(c.nodes.a.proc, 'the primary is gone').not.toBeNull();
      free();
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
    }));

  it("a promoted node's log in files that cannot be written out, resent to the re-protected node when a socket's 'drain' resumes the resend: a full resync, no crash", () =>
    SimWorld.track(async () => {
      // A socket buffer of 1 KiB: any frame of data fills it, and the sender waits for 'drain'.
      const { world, c } = await pair(17, { tunables: { resendMemoryBytes: 0 }, highWater: 1024 });
      await checkpointEqual(c, 'a', 'b');
      c.crash('a');
      expect((await c.world.await(c.nodes.b.secondary!.promote('test'), 5000))?.ok).toBe(true);
      // What the promoted node's VM writes is logged for the next secondary; its file cannot grow.
      const free = fill(c, 'b', 'epochs-primary');
      for (let i = 0; i < 4; i++) expect(await write(c, 'b', i * 64 * KiB, 16 * KiB, 0x60 + i)).toBe(true);
      expect(await c.startSecondary('a')).toBe(true);
      const drains = c.net.drains;
      // The resend's first frame fills the socket; the 'drain' resumes it, and it reads the file.
      await c.world.await(c.nodes.b.secondary!.reprotect(`a:${REPL_PORT}`), 5000);
      await world.runFor(2000);
      expect(c.net.drains, "no 'drain' came: the test tested nothing").toBeGreaterThan(drains);
      expect(c.nodes.b.proc, 'the promoted node is gone').not.toBeNull();
      free();
      expect(await waitProtected(c, 'b')).toBe(true);
      await checkpointEqual(c, 'b', 'a');
    }));

  it('a primary restarted as a secondary on a full disk fails to start, and can start as the primary it was once space is freed', () =>
    SimWorld.track(async () => {
      const { c } = await pair(16);
      expect(await write(c, 'a', 64 * KiB, 8 * KiB, 0x81)).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      c.crash('a');
      const free = fill(c, 'a', 'node.json');
      expect(await c.startSecondary('a'), 'started although node.json could not be written').toBe(false);
      free();
      // node.json still says primary: the half-made secondary store is leftovers, not a secondary's data.
      expect(await c.startPrimary('a'), c.log.slice(-3).join('\n')).toBe(true);
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
    }));

  it('a primary that goes on alone and cannot record it refuses writes (it does not crash), and serves them once it can', () =>
    SimWorld.track(async () => {
      const { c } = await pair(13);
      await checkpointEqual(c, 'a', 'b');
      const free = fill(c, 'a', 'history.json');
      c.crash('b');
      const p = c.nodes.a.primary!;
      expect(await c.world.runUntil(() => p.peerState === 'lone', 20_000), 'never went on alone').toBe(true);
      expect(
        await write(c, 'a', 128 * KiB, 4 * KiB, 0x51),
        'a write acknowledged under an unrecorded generation',
      ).toBe(false);
      expect(c.nodes.a.proc, 'the primary is gone').not.toBeNull();
      const gens = historyOnDisk(c, 'a').length;
      expect(c.nodes.a.proc!.kind === 'primary' && c.nodes.a.proc!.replica.history.generations.length).toBe(
        gens,
      );
      free();
      await c.world.runFor(600);
      expect(await write(c, 'a', 128 * KiB, 4 * KiB, 0x52)).toBe(true);
      const on = historyOnDisk(c, 'a');
      expect(on.length).toBe(gens + 1);
      expect(on.at(-1)!.reason).toMatch(/^lone/);
    }));

  it('--discard-my-data on a secondary whose primary has an unrelated history (a rebuilt node) forgets its history for good, and is resynchronised', () =>
    SimWorld.track(async () => {
      const { c } = await pair(21);
      await checkpointEqual(c, 'a', 'b');
      // a's disk is replaced; the operator restores it and starts it as the primary: a new history.
      c.crash('a');
      c.replaceDisk('a', 'all');
      expect(await c.startPrimary('a')).toBe(true);
      expect(await write(c, 'a', 0, 8 * KiB, 0x0a)).toBe(true);
      await c.world.runFor(1000);
      expect(c.nodes.a.primary!.peerState).toBe('refused'); // b holds generation 1, which a never had
      // The operator keeps a's data: b restarts with --discard-my-data. Its history must stay
      // forgotten, through a restart without the flag too (the old code adopted it again from its
      // commit records, and b refused the primary as before, forever).
      c.crash('b');
      c.net.partition('a', 'b');
      expect(await c.startSecondary('b', { discardMyData: true })).toBe(true);
      expect(c.nodes.b.secondary!.history.last).toBeUndefined();
      c.crash('b');
      expect(await c.startSecondary('b')).toBe(true);
      const b = c.nodes.b.secondary!;
      expect(b.history.last).toBeUndefined();
      expect(b.store.syncing?.mode).toBe('full');
      expect(b.status().consistent).toBe(false);
      const refused = await c.world.await(b.promote('test'), 5000);
      expect(refused?.ok).toBe(false);
      expect(refused && !refused.ok && refused.error.message).toMatch(/data was discarded/);
      c.net.heal('a', 'b');
      c.nodes.a.primary!.reprotect(`b:${REPL_PORT}`);
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      expect(c.nodes.b.secondary!.status().consistent).toBe(true);
      expect(c.log.join('\n')).toMatch(/resync \(full\): the secondary's data was discarded/);
      expect((await c.read('b'))!.subarray(0, 8 * KiB).equals(Buffer.alloc(8 * KiB, 0x0a))).toBe(true);
    }));

  it('a new secondary that never received anything is not consistent and refuses promotion; it can start as the primary', () =>
    SimWorld.track(async () => {
      const world = new SimWorld(22);
      const c = new Cluster(world, defaultSimOptions);
      expect(await c.startSecondary('b')).toBe(true);
      const b = c.nodes.b.secondary!;
      expect(b.status().consistent).toBe(false);
      // The old code promoted it: its empty disk became the pair's, and the primary, back, was
      // refused as a split brain ("diverging from no generation").
      const r = await world.await(b.promote('test'), 5000);
      expect(r?.ok).toBe(false);
      expect(r && !r.ok && r.error.message).toMatch(/never been synchronised.*colo-blk primary/s);
      // As the refusal says: its disk is the one to serve, so it starts as the primary.
      c.crash('b');
      expect(await c.startPrimary('b')).toBe(true);
      expect(await c.startSecondary('a')).toBe(true);
      expect(await waitProtected(c, 'b')).toBe(true);
      await checkpointEqual(c, 'b', 'a');
      expect(c.nodes.a.secondary!.status().consistent).toBe(true);
    }));

  it('failover --force promotes a node part-way through a resync whose primary is lost for good; a node that rejoins it is resynchronised in full', () =>
    SimWorld.track(async () => {
      const { c } = await pair(23);
      for (let i = 0; i < 8; i++) expect(await write(c, 'a', i * 96 * KiB, 32 * KiB, 0x30 + i)).toBe(true);
      await checkpointEqual(c, 'a', 'b');
      // The primary restarts (its log is gone): b is resynchronised at the same generation, and
      // the primary dies for good as soon as that resync has begun.
      c.crash('a');
      expect(await c.startPrimary('a')).toBe(true);
      const b = c.nodes.b.secondary!;
      expect(await c.world.runUntil(() => b.store.syncing !== null, 5000)).toBe(true);
      c.crash('a');
      const refused = await c.world.await(b.promote('test'), 5000);
      expect(refused?.ok).toBe(false);
      expect(refused && !refused.ok && refused.error.message).toMatch(/part-way through a resync.*--force/s);
      const forced = await c.world.await(b.promote('test', undefined, true), 5000);
      expect(forced?.ok, forced && !forced.ok ? forced.error.message : '').toBe(true);
      expect(b.store.syncing).toBeNull();
      expect(b.history.last).toMatchObject({ forced: true });
      const served = await c.read('b');
      // a comes back as a secondary; b protects it: a full resync, whatever a's history says.
      expect(await c.startSecondary('a')).toBe(true);
      await c.world.await(b.reprotect(`a:${REPL_PORT}`), 5000);
      expect(await waitProtected(c, 'b')).toBe(true);
      expect(c.log.join('\n')).toMatch(
        /resync \(full\): the primary's generation \d+ \([0-9a-f]+\) was forced/,
      );
      await checkpointEqual(c, 'b', 'a');
      expect((await c.read('b'))!.equals(served!)).toBe(true);
    }));

  it('a record a killed process wrote but never synced is made durable by the next process before it acts on it (a fold: a FLUSH after it survives a power cut)', () =>
    SimWorld.track(async () => {
      const { c } = await pair(24);
      await checkpointEqual(c, 'a', 'b');
      c.crash('a');
      expect((await c.world.await(c.nodes.b.secondary!.promote('test'), 5000))?.ok).toBe(true);
      // The overlay passes the fold size: the fold record is written, its fdatasync slow; the
      // process is killed then (SIGKILL, the machine up): the record is in the page cache only.
      const disk = c.nodes.b.disk;
      disk.slowSyncs = [4000, 4000];
      disk.slowOnly = 'commits.journal';
      expect(await write(c, 'b', 128 * KiB, 64 * KiB, 0x61)).toBe(true);
      await c.world.runFor(200);
      c.kill('b');
      disk.slowSyncs = null;
      disk.slowOnly = null;
      // The next process reads the fold record and writes into the next overlay; a FLUSH there is
      // acknowledged. The old code never synced the record, and the power cut took it, and with it
      // the overlay the FLUSH had made durable.
      expect(await c.startSecondary('b')).toBe(true);
      expect(await write(c, 'b', 512 * KiB, 8 * KiB, 0x62)).toBe(true);
      await flush(c, 'b');
      c.crash('b', 'lose-unsynced');
      expect(await c.startSecondary('b')).toBe(true);
      const d = await c.read('b');
      expect(d!.subarray(512 * KiB, 520 * KiB).equals(Buffer.alloc(8 * KiB, 0x62))).toBe(true);
    }));

  it('a commit under way when a resync begins is not reported done: the secondary then holds a later state, not that checkpoint', () =>
    SimWorld.track(async () => {
      const { c } = await pair(25, { tunables: { resendMemoryBytes: 0 } });
      const p = c.nodes.a.primary!;
      expect(await write(c, 'a', 0, 16 * KiB, 0x71)).toBe(true);
      const sealed = await c.world.await(p.seal(2000), 5000);
      expect(sealed?.ok).toBe(true);
      const epoch = sealed!.ok ? sealed!.value.epoch : 0;
      // Durable on the secondary (not asked through /durable: the commit flushes this image itself).
      expect(await c.world.runUntil(() => p.status().link.durableEpoch >= epoch, 5000)).toBe(true);
      // The commit first flushes the primary's image, slowly. Meanwhile the primary cannot write its
      // epoch log (a full disk): the secondary is out of sync, and the next connection resyncs it,
      // renumbering its epochs past this one.
      const disk = c.nodes.a.disk;
      disk.slowSyncs = [3000, 3000];
      disk.slowOnly = 'disk.img';
      const commit = p.commit(epoch, 8000);
      commit.catch(() => {});
      disk.faults = (path) => {
        if (path.includes('/epochs'))
          throw new ColoError('ENOSPC', `${path}: no space left on device (simulated)`);
      };
      await write(c, 'a', 64 * KiB, 16 * KiB, 0x72);
      disk.faults = null;
      expect(p.status().outOfSync).not.toBeNull();
      const r = await c.world.await(commit, 10_000);
      // The old code answered done: the resync's renumbered epochs looked like "committed through N".
      expect(r?.ok).toBe(false);
      expect(r && !r.ok && r.error.message).toMatch(/resynchronised/);
      disk.slowSyncs = null;
      disk.slowOnly = null;
      expect(await waitProtected(c, 'a')).toBe(true);
      await checkpointEqual(c, 'a', 'b');
    }));
});
