/**
 * One seeded scenario of the whole-system simulator: a random walk over
 * what the VMs, the operator, the disks and the network can do to a pair,
 * with the reference checks after every step, and a convergence phase at
 * the end (heal, restart, re-protect, checkpoint, compare).
 *
 * The invariants checked (see docs/INVARIANTS.md):
 * - (1, 2) after every checkpoint the primary reports done, the secondary's
 *   committed disk equals the primary's disk at the cut, byte for byte, and
 *   the SVM sees exactly that (its overlay is gone); "protected" therefore
 *   implies "equal after the next checkpoint";
 * - (3, 4, 7) a secondary that crashed comes back at a commit no older than
 *   the last one reported, holding exactly that checkpoint's image;
 * - (5) a promoted node's disk is the last commit plus the SVM's own writes;
 * - (9) no generation ever has two writers;
 * - and the disk a VM reads is what it wrote (a model of every acknowledged
 *   write, minus ranges where a write failed).
 */
import { Cluster, DISK, other, REPL_PORT, SECTOR, type NodeName, type SimOptions } from './cluster.js';
import { defaultSimOptions } from './cluster.js';
import { SimWorld } from './world.js';
import { ColoError } from '../../src/errors.js';

export class Violation extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'Violation';
  }
}

export interface ScenarioOptions {
  /** Actions in the random walk. */
  actions: number;
  sim?: Partial<SimOptions>;
  /** Probability that a mutation on a primary's own disk fails part-way (per batch with faults on). */
  diskFaults?: boolean;
}

export interface ScenarioResult {
  seed: number;
  actions: number;
  steps: number;
  crashes: number;
  cuts: number;
  /** Times a sender waited for a connection's 'drain'. */
  drains: number;
  checkpoints: number;
  failovers: number;
  reprotects: number;
  /** Episodes of a state directory refusing writes (ENOSPC). */
  fullDisks: number;
  /** Episodes of a node's disk syncing slowly. */
  slowDisks: number;
  /** Processes frozen for a while. */
  stalls: number;
  converged: boolean;
  violation: string | null;
  log: string[];
}

type Action =
  | 'pvm'
  | 'svm'
  | 'checkpoint'
  | 'busy'
  | 'phases'
  | 'crash'
  | 'restart'
  | 'replace'
  | 'recover'
  | 'failover'
  | 'decided'
  | 'reprotect'
  | 'partition'
  | 'heal'
  | 'cut'
  | 'delay'
  | 'full'
  | 'free'
  | 'slow'
  | 'fast'
  | 'stall'
  | 'wait';

/** What a node's VM must read: known bytes, and sectors a failed write may have half-changed. */
class Expected {
  unknown = new Set<number>();
  constructor(
    public data: Buffer,
    /** The secondary's commit this view was derived from (a secondary's view resets at commits). */
    public commit: number | null,
    public overlay: unknown,
  ) {}
  apply(offset: number, data: Buffer | null, length: number): void {
    if (data) data.copy(this.data, offset);
    else this.data.fill(0, offset, offset + length);
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) this.unknown.delete(s);
  }
  forget(offset: number, length: number): void {
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) this.unknown.add(s);
  }
  /** First differing known sector, or -1. */
  diff(actual: Buffer): number {
    if (this.unknown.size === 0 && actual.equals(this.data)) return -1;
    for (let s = 0; s < DISK / SECTOR; s++) {
      if (this.unknown.has(s)) continue;
      const o = s * SECTOR;
      if (actual.compare(this.data, o, o + SECTOR, o, o + SECTOR) !== 0) return s;
    }
    return -1;
  }
}

/**
 * What must survive a crash of a node that serves its disk (a primary, or a
 * promoted node), per 512-byte sector: the value it last made durable (FUA,
 * a completed FLUSH, a checkpoint: a commit is a flush barrier) and the
 * values acknowledged since, any of which may be what survived.
 */
class Durability {
  private mustHave = new Map<number, Buffer>();
  private mayHave = new Map<number, Buffer[]>();

  private *sectors(offset: number, length: number, data: Buffer | null): Generator<[number, Buffer]> {
    for (let o = offset; o < offset + length; o += SECTOR)
      yield [o / SECTOR, data ? data.subarray(o - offset, o - offset + SECTOR) : ZERO_SECTOR];
  }

  written(offset: number, length: number, data: Buffer | null, fua: boolean): void {
    for (const [s, v] of this.sectors(offset, length, data)) {
      if (fua) {
        this.mustHave.set(s, v);
        this.mayHave.delete(s);
      } else {
        const l = this.mayHave.get(s) ?? [];
        l.push(v);
        this.mayHave.set(s, l);
      }
    }
  }

  /** A write that failed (or never answered): its sectors may hold anything now. */
  unknown(offset: number, length: number): void {
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) {
      this.mustHave.delete(s);
      this.mayHave.delete(s);
    }
  }

  /** A FLUSH (or a checkpoint) completed: everything acknowledged before it is durable. */
  flushed(): void {
    for (const [s, l] of this.mayHave) this.mustHave.set(s, l[l.length - 1]);
    this.mayHave.clear();
  }

  /** After a crash and restart: the first sector whose content no durable write explains, or -1. */
  check(disk: Buffer): number {
    for (const [s, v] of this.mustHave) {
      const actual = disk.subarray(s * SECTOR, (s + 1) * SECTOR);
      if (actual.equals(v)) continue;
      if ((this.mayHave.get(s) ?? []).some((x) => actual.equals(x))) continue;
      return s;
    }
    return -1;
  }
}

const ZERO_SECTOR = Buffer.alloc(SECTOR);

export function runScenario(seed: number, opts: ScenarioOptions): Promise<ScenarioResult> {
  return SimWorld.track(() => scenario(seed, opts));
}

async function scenario(seed: number, opts: ScenarioOptions): Promise<ScenarioResult> {
  const world = new SimWorld(seed);
  const rng = world.rng;
  const sim = { ...defaultSimOptions, ...opts.sim };
  // Half the runs keep the primary's resend buffer in files only (no memory): that path too meets
  // crashes, cuts and full disks.
  if (opts.sim?.tunables?.resendMemoryBytes === undefined && rng.chance(0.5))
    sim.tunables = { ...sim.tunables, resendMemoryBytes: 0 };
  const c = new Cluster(world, sim);
  // Half the runs give connections a small send buffer: the link, the hash requests and the
  // secondary's answers then wait for 'drain' (window and frames larger than what a socket holds).
  if (rng.chance(0.5)) c.net.highWater = rng.pick([1024, 8 * 1024, 32 * 1024]);
  c.note(`resend memory ${sim.tunables.resendMemoryBytes ?? 'default'}, socket buffer ${c.net.highWater}`);
  const res: ScenarioResult = {
    seed,
    actions: 0,
    steps: 0,
    crashes: 0,
    cuts: 0,
    drains: 0,
    checkpoints: 0,
    failovers: 0,
    reprotects: 0,
    fullDisks: 0,
    slowDisks: 0,
    stalls: 0,
    converged: false,
    violation: null,
    log: c.log,
  };
  const expected: Record<NodeName, Expected | null> = { a: null, b: null };
  /** Cuts of checkpoints reported done, by epoch (for the secondary that took them). */
  const cuts = new Map<number, { secondary: NodeName; data: Buffer }>();
  const reported: Record<NodeName, number> = { a: 0, b: 0 };
  const promotedSeen: Record<NodeName, boolean> = { a: false, b: false };
  const genWriter = new Map<string, NodeName>();
  /** Durability models of the nodes that serve their disk (see Durability). */
  const durability: Record<NodeName, Durability | null> = { a: null, b: null };
  const serving = (n: NodeName) =>
    c.nodes[n].up && c.nodes[n].serving && c.nodes[n].primary?.peerState !== 'deposed';
  const diskFaults = opts.diskFaults ?? rng.chance(0.5);
  const fail = (msg: string): never => {
    throw new Violation(`seed ${seed}: ${msg}`);
  };

  /**
   * No process used a file after closing it (the OS would answer EBADF, or act on another file),
   * and no promise of a node was rejected with no one to handle it (Node ends the process).
   */
  const checkDescriptors = () => {
    for (const n of ['a', 'b'] as const) {
      const m = c.nodes[n].disk.misuse;
      if (m.length) fail(`${n} used a closed file: ${m.slice(0, 3).join('; ')}`);
    }
    if (unhandled.length)
      fail(
        `a rejection no one handled (a process would have died): ${unhandled[0].stack ?? unhandled[0].message}`,
      );
  };
  const unhandled: Error[] = [];
  const onUnhandled = (reason: unknown) =>
    unhandled.push(reason instanceof Error ? reason : new Error(String(reason)));
  process.on('unhandledRejection', onUnhandled);

  /** Reset a node's expected view to what it reads now (after a restart, a resync, a crash). */
  const resetExpected = async (name: NodeName) => {
    const data = await c.read(name);
    const s = c.nodes[name].secondary;
    expected[name] = data
      ? new Expected(data, s && !s.store.promoted ? s.store.lastCommitted : null, s?.store.overlayLayer)
      : null;
  };

  /** A secondary's view resets at every commit and at a resync's rollback: forget ours if one happened behind our back. */
  const trackSecondaryViews = () => {
    for (const name of ['a', 'b'] as const) {
      if (c.nodes[name].up && !serving(name)) durability[name] = null;
      const s = c.nodes[name].secondary;
      if (c.nodes[name].up && (!s || s.store.promoted)) {
        // Commits reported while this node was a secondary say nothing about it any more.
        reported[name] = 0;
        for (const [k, v] of [...cuts]) if (v.secondary === name) cuts.delete(k);
      }
      if (s && !s.store.promoted) promotedSeen[name] = false;
      const e = expected[name];
      if (!s || (s.store.promoted && promotedSeen[name])) continue;
      if (s.store.lastCommitted < reported[name]) {
        // A resync restarted this node's numbering (rebase): older reports and cuts no longer apply.
        reported[name] = 0;
        for (const [k, v] of [...cuts]) if (v.secondary === name) cuts.delete(k);
      }
      if (e && (e.commit !== s.store.lastCommitted || e.overlay !== s.store.overlayLayer))
        expected[name] = null;
    }
  };

  /** Invariant 5: a node just promoted serves the last commit plus the SVM's own writes. */
  const checkPromotions = async () => {
    trackSecondaryViews();
    for (const name of ['a', 'b'] as const) {
      const s = c.nodes[name].secondary;
      if (!s?.store.promoted || promotedSeen[name]) continue;
      promotedSeen[name] = true;
      res.failovers++;
      reported[name] = 0;
      for (const [k, v] of [...cuts]) if (v.secondary === name) cuts.delete(k);
      const e = expected[name];
      const actual = await c.read(name);
      if (e && actual) {
        const d = e.diff(actual);
        if (d >= 0)
          fail(
            `${name} was promoted, but its disk differs at sector ${d} from the last commit plus the SVM's writes`,
          );
      }
      expected[name] = actual ? new Expected(actual, null, null) : null;
    }
  };

  const checkpoint = async (name: NodeName) => {
    const p = c.nodes[name].primary;
    if (!p) return;
    const cut = await c.read(name);
    if (cut && expected[name]) {
      const d = expected[name]!.diff(cut);
      if (d >= 0) fail(`the disk of ${name} differs from what its VM wrote, at sector ${d}`);
    }
    // Now and then the three phases apart, as a COLO coordinator runs them around the memory
    // checkpoint, with the PVM writing again (epoch N+1) between the seal and the commit.
    const split = rng.chance(0.3);
    const r = await world.await(split ? splitCheckpoint(name) : p.checkpoint(4000), 15_000);
    if (!r || !r.ok) {
      c.note(`checkpoint on ${name} failed: ${r ? r.error.message : 'no answer'}`);
      return;
    }
    res.checkpoints++;
    durability[name]?.flushed(); // a commit is a flush barrier on the primary too
    const n = r.value.epoch;
    const sName = other(name);
    const s = c.nodes[sName].secondary;
    c.note(`checkpoint ${n} done on ${name}`);
    if (!s || s.store.promoted)
      fail(`checkpoint ${n} reported done on ${name}, but ${sName} is no secondary`);
    if (!cut) return;
    // Invariants 1 and 2: the committed image is the cut, and the SVM sees nothing of its old overlay.
    const committed = (await c.committedView(sName))!;
    if (!committed.equals(cut)) {
      let s0 = 0;
      while (
        s0 < DISK / SECTOR &&
        committed.compare(cut, s0 * SECTOR, (s0 + 1) * SECTOR, s0 * SECTOR, (s0 + 1) * SECTOR) === 0
      )
        s0++;
      fail(
        `checkpoint ${n} reported done on ${name} (peer ${p.peerState}), but ${sName}'s committed disk differs ` +
          `from the cut at sector ${s0} (offset ${s0 * SECTOR})`,
      );
    }
    const svm = await c.read(sName);
    if (svm && !svm.equals(cut)) fail(`after commit ${n}, the SVM on ${sName} does not see exactly the cut`);
    cuts.set(n, { secondary: sName, data: cut });
    for (const k of [...cuts.keys()]) if (k < n - 3) cuts.delete(k);
    reported[sName] = Math.max(reported[sName], n);
    expected[sName] = new Expected(Buffer.from(cut), s!.store.lastCommitted, s!.store.overlayLayer);
  };

  /** seal, (writes), durable, (a pause), commit: the coordinator's way. */
  const splitCheckpoint = async (name: NodeName): Promise<{ epoch: number }> => {
    const p = c.nodes[name].primary!;
    const { epoch } = await p.seal();
    if (rng.chance(0.5)) await mutate(name, 'pvm');
    await p.waitDurable(epoch, 4000);
    if (rng.chance(0.5)) await world.runFor(rng.range(1, 50));
    await p.commit(epoch, 4000);
    return { epoch };
  };

  /**
   * A checkpoint while the PVM's writes are in flight (a disk checkpoint
   * under continuous I/O, as the benchmark runs it, or writes queued when a
   * coordinator seals), and now and then the SVM's too. Which of them epoch N
   * holds is up to the seal: each one is in N or in N+1, whole. Checked here:
   * outside the ranges of those writes the committed disk is exactly the
   * disk before them; the next quiet checkpoint checks the rest (the replicas
   * equal).
   */
  const busyCheckpoint = async (name: NodeName) => {
    const p = c.nodes[name].primary!;
    const sName = other(name);
    const before = leftovers ? null : await c.read(name);
    const m = startMutation(name, 'pvm');
    const sv = c.nodes[sName].secondary;
    const svm =
      sv && !sv.store.promoted && c.nodes[sName].up && rng.chance(0.3)
        ? startMutation(sName, 'svm', false)
        : null;
    const delay = rng.pick([0, 0, 1, 3]);
    c.note(
      `checkpoint on ${name} with ${m?.ops.length ?? 0} writes in flight${svm ? ' and the SVM writing' : ''}`,
    );
    const cp = new Promise<void>((resolve) => world.schedule(delay, resolve)).then(() => p.checkpoint(4000));
    const r = await world.await(Promise.allSettled([cp, m?.all, svm?.all]), 15_000);
    const [cr, mr, sr] = r?.ok ? r.value : [null, null, null];
    if (cr?.status === 'fulfilled') {
      // A commit is a flush barrier for what was acknowledged before it began: everything but this batch.
      durability[name]?.flushed();
    }
    m?.finish(
      mr?.status === 'fulfilled' ? { ok: true, value: mr.value as PromiseSettledResult<void>[] } : null,
    );
    svm?.finish(
      sr?.status === 'fulfilled' ? { ok: true, value: sr.value as PromiseSettledResult<void>[] } : null,
    );
    if (cr?.status !== 'fulfilled') {
      c.note(`checkpoint on ${name} failed: ${cr ? (cr.reason as Error).message : 'no answer'}`);
      return;
    }
    res.checkpoints++;
    const n = cr.value.epoch;
    c.note(`checkpoint ${n} done on ${name}`);
    const s = c.nodes[sName].secondary;
    if (!s || s.store.promoted)
      fail(`checkpoint ${n} reported done on ${name}, but ${sName} is no secondary`);
    reported[sName] = Math.max(reported[sName], n);
    expected[sName] = null; // its view is the cut, which holds some of the batch
    if (!before || !m) return;
    const committed = (await c.committedView(sName))!;
    const touched = (sector: number) =>
      m.ops.some((o) => o.offset <= sector * SECTOR && sector * SECTOR < o.offset + o.length);
    for (let sec = 0; sec < DISK / SECTOR; sec++) {
      const o = sec * SECTOR;
      if (touched(sec) || committed.compare(before, o, o + SECTOR, o, o + SECTOR) === 0) continue;
      fail(
        `checkpoint ${n} (writes in flight) reported done on ${name}, but ${sName}'s committed disk differs ` +
          `from the disk before those writes at sector ${sec}, which none of them touched`,
      );
    }
  };

  /**
   * A coordinator's three phases, several checkpoints at a time and out of
   * order: one to three seals (the PVM writing between them), then commits
   * of some of them in any order, some without asking /durable first (as
   * two coordinators, or an operator beside one, could). Every commit that
   * answers done must leave the secondary's committed disk at a cut it was
   * told to commit: the one of its last commit.
   */
  const phases = async (name: NodeName) => {
    const p = c.nodes[name].primary!;
    const sName = other(name);
    const sealed: { epoch: number; cut: Buffer | null }[] = [];
    for (let i = rng.range(1, 3); i > 0; i--) {
      const cut = leftovers ? null : await c.read(name);
      const r = await world.await(p.seal(2000), 5000);
      if (!r?.ok) {
        c.note(`phases on ${name}: no seal (${r ? r.error.message : 'no answer'})`);
        break;
      }
      sealed.push({ epoch: r.value.epoch, cut });
      if (rng.chance(0.6)) await mutate(name, 'pvm');
    }
    const order = [...sealed];
    for (let i = order.length - 1; i > 0; i--) {
      const j = rng.int(i + 1);
      [order[i], order[j]] = [order[j], order[i]];
    }
    c.note(
      `phases on ${name}: sealed ${sealed.map((x) => x.epoch).join(', ')}; commits ${order.map((x) => x.epoch).join(', ')}`,
    );
    for (const x of order) {
      if (rng.chance(0.2)) continue;
      if (rng.chance(0.7)) {
        const d = await world.await(p.waitDurable(x.epoch, 3000), 6000);
        if (!d?.ok) c.note(`  durable ${x.epoch}: ${d ? d.error.message : 'no answer'}`);
      }
      const r = await world.await(p.commit(x.epoch, 3000), 6000);
      c.note(`  commit ${x.epoch}: ${r ? (r.ok ? 'done' : r.error.message) : 'no answer'}`);
      if (!r?.ok) continue;
      res.checkpoints++;
      const s = c.nodes[sName].secondary;
      if (!s || s.store.promoted)
        return fail(`commit ${x.epoch} reported done on ${name}, but ${sName} is no secondary`);
      const last = s.store.lastCommitted;
      if (last < x.epoch)
        fail(`commit ${x.epoch} reported done on ${name}, but ${sName} committed only ${last}`);
      reported[sName] = Math.max(reported[sName], x.epoch);
      const cut = sealed.find((y) => y.epoch === last)?.cut ?? null;
      expected[sName] = null;
      if (!cut) continue;
      const committed = (await c.committedView(sName))!;
      if (!committed.equals(cut))
        fail(
          `commit ${x.epoch} reported done on ${name}, but ${sName}'s committed disk is not the cut of its commit ${last}`,
        );
      const svm = await c.read(sName);
      if (svm && !svm.equals(cut))
        fail(`after commit ${x.epoch}, the SVM on ${sName} does not see exactly cut ${last}`);
      cuts.set(last, { secondary: sName, data: cut });
      expected[sName] = new Expected(Buffer.from(cut), last, s.store.overlayLayer);
    }
  };

  /**
   * A COLO coordinator's failover after the cut: epoch N was sealed and made
   * durable, its output released; then the primary side dies before the
   * commit reaches the secondary, which is promoted with `commitThrough: N`.
   * Invariants 1 and 5: the promoted disk is exactly the cut (epoch N
   * committed, the SVM's overlay discarded, later PVM writes dropped).
   */
  const decidedFailover = async (name: NodeName) => {
    const sName = other(name);
    const s = c.nodes[sName].secondary;
    const p = c.nodes[name].primary;
    if (!p || !s || s.store.promoted || !c.nodes[sName].up) return;
    const cut = await c.read(name);
    const sealed = await world.await(p.seal(2000), 5000);
    if (!sealed?.ok) return c.note(`decided failover on ${name}: no seal (${sealed?.error.message})`);
    const n = sealed.value.epoch;
    if (rng.chance(0.5)) await mutate(name, 'pvm'); // epoch N+1: never to be seen
    const durable = await world.await(p.waitDurable(n, 2000), 5000);
    if (!durable?.ok) return c.note(`decided failover on ${name}: epoch ${n} not durable, nothing decided`);
    c.note(`decided failover: epoch ${n} durable on ${sName}; ${name} dies before its commit`);
    c.crash(name);
    let r = await world.await(s.promote('sim: coordinator after the cut', n), 5000);
    if (!r?.ok && c.nodes[sName].disk.faults && r?.error.message.includes('no space')) {
      // As an operator would: free space, promote again. Nothing may have changed meanwhile.
      c.note(`promoting ${sName} failed (${r.error.message}); space freed, promoting again`);
      c.nodes[sName].disk.faults = null;
      r = await world.await(s.promote('sim: coordinator after the cut', n), 5000);
    }
    if (!r?.ok) fail(`promoting ${sName} with epoch ${n} decided failed: ${r?.error.message ?? 'no answer'}`);
    promotedSeen[sName] = true;
    res.failovers++;
    reported[sName] = 0;
    for (const [k, v] of [...cuts]) if (v.secondary === sName) cuts.delete(k);
    if (s.store.lastCommitted < n)
      fail(`${sName} promoted with epoch ${n} decided, but committed ${s.store.lastCommitted}`);
    const actual = await c.read(sName);
    if (cut && actual && !actual.equals(cut)) {
      let d = 0;
      while (
        d < DISK / SECTOR &&
        actual.compare(cut, d * SECTOR, (d + 1) * SECTOR, d * SECTOR, (d + 1) * SECTOR) === 0
      )
        d++;
      fail(`${sName} promoted with epoch ${n} decided, but its disk differs from that cut at sector ${d}`);
    }
    expected[sName] = actual ? new Expected(actual, null, null) : null;
  };

  /** Invariants 3, 4, 7: a restarted secondary is at a commit no older than reported, holding exactly its cut. */
  const checkRestartedSecondary = async (name: NodeName) => {
    const s = c.nodes[name].secondary;
    if (!s || s.store.promoted || s.store.syncing) return;
    const l = s.store.lastCommitted;
    const cut = cuts.get(l);
    if (l < reported[name])
      fail(`${name} restarted at commit ${l}, but commit ${reported[name]} had been reported done`);
    if (cut && cut.secondary === name) {
      const committed = (await c.committedView(name))!;
      if (!committed.equals(cut.data))
        fail(`${name} restarted at commit ${l}, but its committed disk is not that checkpoint's image`);
    }
  };

  /** Set once a batch of mutations outlived its wait: writes of an earlier step may still be in flight. */
  let leftovers = false;

  /**
   * Issue a batch of one to four mutations on a node's disk, as a VM's
   * queue would (all in flight at once), and return them with `finish`,
   * which records how they ended in the models. Usually disjoint ranges
   * clustered in four quarters of the disk; now and then ranges that overlap
   * each other, which the device runs in arrival order (its range lock) on
   * both sides: the models apply them in that order.
   */
  const startMutation = (name: NodeName, vm: 'pvm' | 'svm', withReads = true) => {
    const node = c.nodes[name];
    const dev = node.device;
    if (!dev) return null;
    const e = expected[name];
    const gen = vm === 'pvm' ? node.generationId : null;
    const faults = vm === 'pvm' && diskFaults && node.proc?.kind === 'primary' && rng.chance(0.3);
    if (faults) node.proc!.image.failRate = 0.2;
    const overlap = rng.chance(0.25);
    // A primary runs overlapping mutations in arrival order (so its log has their order), and so does a
    // promoted node that re-protects (its export swapped to a primary's device before `primary` is set);
    // a promoted node's own disk, like any disk, need not (NBD leaves their order open).
    const ordered = node.primary !== null;
    const base = Math.min(DISK - 64 * 1024, rng.int(4) * (DISK / 4) + rng.int(DISK / 4 / 4096) * 4096);
    const used: [number, number][] = [];
    const ops: { offset: number; length: number; data: Buffer | null; fua: boolean; p: Promise<void> }[] = [];
    // Reads among them: outside the batch's ranges they must see what was there before it, whatever
    // runs meanwhile in the background (an apply, a fold, a resync's writes).
    const reads: { offset: number; buf: Buffer; ok: boolean }[] = [];
    const readPs: Promise<void>[] = [];
    const read = () => {
      const length = rng.range(1, 64) * SECTOR;
      const x = {
        offset: rng.int((DISK - length) / SECTOR + 1) * SECTOR,
        buf: Buffer.alloc(length),
        ok: false,
      };
      reads.push(x);
      readPs.push(dev.pread(x.buf, x.offset).then(() => void (x.ok = true)));
    };
    for (let i = rng.range(1, 4); i > 0; i--) {
      if (withReads && e && rng.chance(0.25)) read();
      const length = rng.range(1, 32) * SECTOR;
      let offset: number;
      if (overlap) offset = base + rng.int(32) * SECTOR;
      else {
        const hot = rng.int(4) * (DISK / 4);
        offset = Math.min(DISK - length, hot + rng.int(DISK / 4 / 4096) * 4096);
        if (used.some(([a, b]) => offset < b && a < offset + length)) continue;
      }
      used.push([offset, offset + length]);
      const fua = rng.chance(0.2);
      const k = rng.int(10);
      const data = k < 7 ? rng.data(length) : null;
      const p =
        k < 7
          ? dev.pwrite(data!, offset, { fua })
          : k < 9
            ? dev.zero(offset, length, { fua, mayTrim: rng.chance(0.5) })
            : dev.trim(offset, length, { fua });
      ops.push({ offset, length, data, fua, p });
    }
    if (withReads && e && rng.chance(0.3)) read();
    const all = Promise.all([Promise.allSettled(ops.map((o) => o.p)), Promise.allSettled(readPs)]).then(
      ([w]) => w,
    );
    const checkReads = () => {
      const sv = node.secondary;
      if (!e || expected[name] !== e || leftovers) return;
      if (
        sv &&
        !sv.store.promoted &&
        (e.commit !== sv.store.lastCommitted || e.overlay !== sv.store.overlayLayer)
      )
        return; // the view was reset meanwhile (a resync's rollback)
      for (const x of reads) {
        if (!x.ok) continue;
        for (let at = x.offset; at < x.offset + x.buf.length; at += SECTOR) {
          if (e.unknown.has(at / SECTOR) || ops.some((o) => o.offset <= at && at < o.offset + o.length))
            continue;
          const got = x.buf.subarray(at - x.offset, at - x.offset + SECTOR);
          if (!got.equals(e.data.subarray(at, at + SECTOR)))
            fail(`a read on ${name} (${vm}) returned at sector ${at / SECTOR} what no write left there`);
        }
      }
    };
    const finish = (r: { ok: true; value: PromiseSettledResult<void>[] } | { ok: false } | null) => {
      if (faults) node.proc!.image.failRate = 0;
      if (r?.ok) checkReads();
      const d = serving(name) ? (durability[name] ??= new Durability()) : null;
      if (!r?.ok) {
        leftovers = true;
        for (const o of ops) {
          e?.forget(o.offset, o.length);
          d?.unknown(o.offset, o.length);
        }
        return;
      }
      // In arrival order: overlapping mutations ran in that order.
      r.value.forEach((x, i) => {
        const o = ops[i];
        c.note(
          `  ${vm} ${o.data ? 'write' : 'zero/trim'} ${o.offset}+${o.length}${o.fua ? ' fua' : ''}: ` +
            (x.status === 'fulfilled' ? 'ok' : (x.reason as Error).message),
        );
        if (x.status !== 'fulfilled') d?.unknown(o.offset, o.length);
        else d?.written(o.offset, o.length, o.data, o.fua);
        if (x.status === 'fulfilled') {
          e?.apply(o.offset, o.data, o.length);
          if (gen) {
            const w = genWriter.get(gen);
            if (w && w !== name) fail(`generation ${gen} has two writers: ${w} and ${name}`);
            genWriter.set(gen, name);
          }
        } else e?.forget(o.offset, o.length);
      });
      if (overlap && !ordered) {
        // Where two of them overlap, either may have landed last.
        for (let s = 0; s < DISK / SECTOR; s++) {
          const at = s * SECTOR;
          if (ops.filter((o) => o.offset <= at && at < o.offset + o.length).length < 2) continue;
          e?.forget(at, SECTOR);
          d?.unknown(at, SECTOR);
        }
      }
    };
    if (overlap) c.note(`  (overlapping ranges from ${base}${ordered ? '' : ', in any order'})`);
    return { ops, all, finish };
  };

  const mutate = async (name: NodeName, vm: 'pvm' | 'svm') => {
    const m = startMutation(name, vm);
    if (!m) return;
    const r = await world.await(m.all, 10_000);
    m.finish(r);
    const d = serving(name) ? durability[name] : null;
    const dev = c.nodes[name].device;
    if (r?.ok && dev && rng.chance(0.3)) {
      const f = await world.await(dev.flush(), 5000);
      if (f?.ok) d?.flushed();
    }
  };

  /** What `colo-blk` would be started as on a stopped node (as an operator would choose). */
  const restart = async (name: NodeName, converge = false) => {
    const node = c.nodes[name];
    const peer = c.nodes[other(name)];
    const file = node.disk.read('/state/node.json');
    let role: string | null = null;
    try {
      role = file ? (JSON.parse(file.toString()) as { role: string }).role : null;
    } catch {
      // a torn node.json: the operator goes by what they last started
    }
    const peerServes = peer.serving;
    let ok: boolean;
    if (role === 'promoted') {
      const how = converge
        ? peerServes
          ? 'rejoin'
          : 'secondary'
        : rng.weighted<'secondary' | 'primary' | 'rejoin'>([
            ['secondary', 3],
            ['primary', 2],
            ['rejoin', peerServes ? 2 : 0],
          ]);
      ok =
        how === 'primary'
          ? await c.startPrimary(name)
          : await c.startSecondary(name, { rejoin: how === 'rejoin' });
    } else if (role === 'primary' || (role === null && node.lastStart === 'primary')) {
      const asSecondary = peerServes && (converge || rng.chance(0.8));
      ok = asSecondary ? await c.startSecondary(name, { rejoin: false }) : await c.startPrimary(name);
    } else ok = await c.startSecondary(name, { autoFailover: !converge && rng.chance(0.3) });
    if (ok) {
      await resetExpected(name);
      await checkRestartedSecondary(name);
    }
  };

  /** Does a stopped node's state directory hold a secondary's store (`colo-blk recover` applies)? */
  const hasStore = (name: NodeName) => {
    const f = c.nodes[name].disk.read('/state/node.json');
    try {
      return (
        f !== null && ['secondary', 'promoted'].includes((JSON.parse(f.toString()) as { role: string }).role)
      );
    } catch {
      return false;
    }
  };

  const choose = (): Action => {
    const a = c.nodes.a;
    const b = c.nodes.b;
    const up = [a, b].filter((n) => n.up);
    const servers = up.filter((n) => n.device && n.serving);
    const secondaries = up.filter((n) => n.secondary && !n.secondary.store.promoted);
    const promoted = up.filter((n) => n.secondary?.store.promoted);
    return rng.weighted<Action>([
      ['pvm', servers.length ? 10 : 0],
      ['svm', secondaries.length ? 4 : 0],
      ['checkpoint', up.some((n) => n.primary) ? 6 : 0],
      ['phases', servers.some((n) => n.primary && n.primary.peerState !== 'deposed') ? 1.5 : 0],
      ['busy', servers.some((n) => n.primary && n.primary.peerState !== 'deposed') ? 2 : 0],
      ['crash', up.length ? 2 : 0],
      ['restart', up.length < 2 ? 5 : 0],
      ['replace', up.length < 2 ? 0.4 : 0],
      ['recover', (['a', 'b'] as const).some((n) => !c.nodes[n].up && hasStore(n)) ? 1 : 0],
      ['failover', secondaries.length ? 1.5 : 0],
      ['decided', servers.some((n) => n.primary) && secondaries.length ? 1 : 0],
      ['reprotect', promoted.length && secondaries.length ? 4 : 0],
      ['partition', 0.7],
      ['heal', 1],
      ['cut', 1],
      ['delay', 0.7],
      ['full', diskFaults && [a, b].some((n) => !n.disk.faults) ? 0.6 : 0],
      ['free', [a, b].some((n) => n.disk.faults) ? 1.5 : 0],
      ['slow', [a, b].some((n) => !n.disk.slowSyncs) ? 0.6 : 0],
      ['fast', [a, b].some((n) => n.disk.slowSyncs) ? 1.5 : 0],
      ['stall', up.length ? 0.6 : 0],
      ['wait', 3],
    ]);
  };

  const act = async (action: Action) => {
    const names = (['a', 'b'] as const).filter((n) => c.nodes[n].up);
    switch (action) {
      case 'pvm': {
        const n = rng.pick(names.filter((x) => c.nodes[x].serving && c.nodes[x].device));
        c.note(`pvm writes on ${n}`);
        return mutate(n, 'pvm');
      }
      case 'svm': {
        const n = rng.pick(
          names.filter((x) => c.nodes[x].secondary && !c.nodes[x].secondary!.store.promoted),
        );
        c.note(`svm writes on ${n}`);
        return mutate(n, 'svm');
      }
      case 'checkpoint':
        return checkpoint(rng.pick(names.filter((x) => c.nodes[x].primary)));
      case 'phases': {
        const candidates = names.filter((x) => c.nodes[x].primary && serving(x));
        return candidates.length ? phases(rng.pick(candidates)) : undefined;
      }
      case 'busy': {
        const candidates = names.filter((x) => c.nodes[x].primary && serving(x));
        return candidates.length ? busyCheckpoint(rng.pick(candidates)) : undefined;
      }
      case 'crash': {
        // Mostly a power cut with it; now and then SIGKILL alone (what the process wrote stays in
        // the page cache, unsynced, for the next one to find).
        const n = rng.pick(names);
        return rng.chance(0.3) ? c.kill(n) : c.crash(n);
      }
      case 'restart':
        return restart(rng.pick((['a', 'b'] as const).filter((n) => !c.nodes[n].up)));
      case 'recover': {
        // The operator runs `colo-blk recover` on a stopped secondary (or promoted node), now and
        // then cut by a power failure, and starts it again (or not yet).
        const n = rng.pick((['a', 'b'] as const).filter((x) => !c.nodes[x].up && hasStore(x)));
        c.note(`recover on ${n}`);
        await c.recover(n, rng.chance(0.3) ? rng.range(0, 20) : null);
        return rng.chance(0.7) ? restart(n) : undefined;
      }
      case 'replace': {
        // What the node held is gone (its VM's view, what it made durable, the commits it reported).
        const n = rng.pick((['a', 'b'] as const).filter((x) => !c.nodes[x].up));
        c.replaceDisk(n, rng.pick(['all', 'state'] as const));
        expected[n] = null;
        durability[n] = null;
        reported[n] = 0;
        promotedSeen[n] = false;
        for (const [k, v] of [...cuts]) if (v.secondary === n) cuts.delete(k);
        return restart(n);
      }
      case 'failover': {
        const n = rng.pick(
          names.filter((x) => c.nodes[x].secondary && !c.nodes[x].secondary!.store.promoted),
        );
        c.note(`failover on ${n}`);
        const r = await world.await(c.nodes[n].secondary!.promote('sim: operator'), 5000);
        if (r && !r.ok) c.note(`failover refused: ${r.error.message}`);
        if (r && !r.ok && /--force/.test(r.error.message) && rng.chance(0.3)) {
          // The operator judges the primary lost for good: this disk is served as it is.
          const f = await world.await(c.nodes[n].secondary!.promote('sim: operator', undefined, true), 5000);
          c.note(`failover --force on ${n}: ${f ? (f.ok ? 'promoted' : f.error.message) : 'no answer'}`);
        }
        return;
      }
      case 'decided': {
        const candidates = names.filter((x) => c.nodes[x].primary && serving(x));
        return candidates.length ? decidedFailover(rng.pick(candidates)) : undefined;
      }
      case 'reprotect': {
        const n = rng.pick(names.filter((x) => c.nodes[x].secondary?.store.promoted));
        if (!c.nodes[other(n)].secondary || c.nodes[other(n)].secondary!.store.promoted) return;
        c.note(`reprotect: ${n} protects ${other(n)}`);
        res.reprotects++;
        const r = await world.await(c.nodes[n].secondary!.reprotect(`${other(n)}:${REPL_PORT}`), 5000);
        if (r && !r.ok) c.note(`reprotect refused: ${r.error.message}`);
        return world.runFor(rng.range(50, 1500));
      }
      case 'partition':
        c.note('partition a|b');
        c.net.partition('a', 'b');
        return world.runFor(rng.range(50, 1200));
      case 'delay': {
        const ms = rng.range(5, 250);
        c.note(`delay a|b ${ms} ms`);
        c.net.delays.set('a|b', ms);
        return world.runFor(rng.range(50, 1500));
      }
      case 'heal':
        c.net.heal('a', 'b');
        c.net.delays.clear();
        return world.runFor(rng.range(10, 500));
      case 'cut': {
        const n = c.net.cutBetween('a', 'b', rng.int(rng.chance(0.5) ? 64 : 256 * 1024));
        if (n) c.note(`cut ${n} connections`);
        return world.runFor(rng.range(10, 300));
      }
      case 'full': {
        // The node's state directory fills up: its writes fail with ENOSPC (some, or all) until freed.
        const n = rng.pick((['a', 'b'] as const).filter((x) => !c.nodes[x].disk.faults));
        const p = rng.pick([0.05, 0.3, 1]);
        c.note(`disk full on ${n} (${p * 100} % of writes fail)`);
        res.fullDisks++;
        c.nodes[n].disk.faults = (path) => {
          if (rng.chance(p)) throw new ColoError('ENOSPC', `${path}: no space left on device (simulated)`);
        };
        return world.runFor(rng.range(10, 500));
      }
      case 'free':
        for (const n of ['a', 'b'] as const) c.nodes[n].disk.faults = null;
        c.note('disk space freed');
        return world.runFor(rng.range(10, 500));
      case 'slow': {
        // The node's disk slows down: every sync takes this long, until a later step makes it fast.
        const n = rng.pick((['a', 'b'] as const).filter((x) => !c.nodes[x].disk.slowSyncs));
        const slow = rng.pick<[number, number]>([
          [5, 50],
          [50, 400],
          [300, 1500],
        ]);
        c.note(`disk slow on ${n} (syncs take ${slow[0]}-${slow[1]} ms)`);
        res.slowDisks++;
        c.nodes[n].disk.slowSyncs = slow;
        return world.runFor(rng.range(10, 1000));
      }
      case 'fast':
        for (const n of ['a', 'b'] as const) c.nodes[n].disk.slowSyncs = null;
        c.note('disks fast again');
        return world.runFor(rng.range(10, 500));
      case 'stall': {
        // A process freezes (stopped, its host paused) while the other goes on; then it thaws and
        // finds the timers, completions and bytes that waited for it. Nothing is asked of it meanwhile.
        const n = rng.pick(names);
        const ms = rng.pick([
          () => rng.range(20, 300),
          () => rng.range(300, 1500),
          () => rng.range(1500, 6000),
        ])();
        const owner = c.nodes[n].proc?.owner;
        if (!owner) return;
        c.note(`${n} frozen for ${ms} ms`);
        res.stalls++;
        owner.stalledUntil = world.t + ms;
        return world.runFor(ms + rng.range(0, 300));
      }
      case 'wait':
        return world.runFor(rng.range(10, 2000));
    }
  };

  /** Bring the pair back together as an operator would, and check equality at a final checkpoint. */
  const converge = async () => {
    const names = ['a', 'b'] as const;
    const isDeposed = (n: NodeName) => c.nodes[n].primary?.peerState === 'deposed';
    const asSecondary = async (n: NodeName, discardMyData: boolean) => {
      c.note(`converge: ${n} restarts as a secondary${discardMyData ? ' and discards its data' : ''}`);
      const rejoin = !!c.nodes[n].secondary?.store.promoted;
      c.crash(n);
      if (!(await c.startSecondary(n, { discardMyData, rejoin }))) return false;
      await resetExpected(n);
      return true;
    };
    c.net.heal('a', 'b');
    c.net.delays.clear();
    for (const n of names) c.nodes[n].disk.faults = null;
    for (const n of names) c.nodes[n].disk.slowSyncs = null;
    for (const n of names) if (!c.nodes[n].up) await restart(n, true);
    for (let round = 0; round < 3; round++) {
      await world.runFor(500);
      await checkPromotions();
      for (const n of names) if (isDeposed(n) && !(await asSecondary(n, false))) return;
      let servers = names.filter((n) => c.nodes[n].serving);
      if (servers.length === 0) {
        const fresh: NodeName[] = [];
        let promotedOne = false;
        for (const n of names) {
          const sec = c.nodes[n].secondary;
          if (!sec) continue;
          c.note(`converge: failover on ${n}`);
          const r = await world.await(sec.promote('sim: converge'), 5000);
          if (r?.ok) {
            promotedOne = true;
            break;
          }
          c.note(`converge: failover on ${n} refused: ${r ? r.error.message : 'no answer'}`);
          if (r?.error.message.includes('never been synchronised')) fresh.push(n);
        }
        if (!promotedOne && !fresh.length) {
          // Neither can be promoted and neither is new (both part-way through a resync, or
          // discarded): the operator forces one, whose disk is served as it is.
          for (const n of names) {
            const sec = c.nodes[n].secondary;
            if (!sec || sec.store.promoted) continue;
            const r = await world.await(sec.promote('sim: converge', undefined, true), 5000);
            c.note(
              `converge: failover --force on ${n}: ${r ? (r.ok ? 'promoted' : r.error.message) : 'no answer'}`,
            );
            if (r?.ok) {
              promotedOne = true;
              break;
            }
          }
        }
        if (!promotedOne && fresh.length) {
          // Neither node can be promoted, and one is new (its state directory was lost; its
          // image may be the latest there is): as its refusal says, it starts as the primary.
          const n = rng.pick(fresh);
          c.note(`converge: neither node can be promoted; ${n} restarts as the primary`);
          c.crash(n);
          if (await c.startPrimary(n)) await resetExpected(n);
        }
        await checkPromotions();
      } else if (servers.length === 2) {
        // Split brain: the operator keeps one side's data and discards the other's.
        if (!(await asSecondary(rng.pick(servers), true))) return;
      }
      servers = names.filter((n) => c.nodes[n].serving);
      if (servers.length !== 1) continue;
      const p = servers[0];
      const s = other(p);
      const pn = c.nodes[p];
      const protectedNow = () => pn.primary?.peerState === 'protected';
      if (!(await world.runUntil(protectedNow, 3000))) {
        try {
          if (pn.secondary && !pn.primary)
            await world.await(pn.secondary.reprotect(`${s}:${REPL_PORT}`), 5000);
          else pn.primary?.reprotect(`${s}:${REPL_PORT}`);
        } catch (err) {
          c.note(`converge: reprotect failed: ${(err as Error).message}`);
          continue;
        }
        if (!(await world.runUntil(protectedNow, 30_000))) {
          // Refused (split brain as the roles stand): the secondary's data goes.
          const sn = c.nodes[s];
          if (sn.secondary && !sn.secondary.store.promoted && sn.secondary.link.refusal)
            await asSecondary(s, true);
          continue;
        }
      }
      await world.runFor(100);
      const before = res.checkpoints;
      await checkpoint(p);
      res.converged = res.checkpoints > before;
      return;
    }
  };

  // Invariant 10: a restarted node still holds every write it acknowledged as durable.
  c.afterOpen = async (name, read) => {
    const d = durability[name];
    durability[name] = null;
    if (!d) return;
    const disk = await read();
    const bad = d.check(disk);
    if (bad >= 0)
      fail(
        `${name} restarted without a write it had made durable (FUA, FLUSH or a checkpoint): sector ${bad} ` +
          `(offset ${bad * SECTOR})`,
      );
  };
  try {
    await c.startSecondary('b', { autoFailover: rng.chance(0.3) });
    await c.startPrimary('a');
    await resetExpected('a');
    await resetExpected('b');
    await world.runUntil(() => c.nodes.a.primary?.peerState === 'protected', 10_000);
    for (let i = 0; i < opts.actions; i++) {
      const action = choose();
      res.actions++;
      await act(action);
      await world.settle();
      await checkPromotions();
      checkDescriptors();
    }
    await converge();
    checkDescriptors();
  } catch (err) {
    // Anything else thrown out of a step is as bad: an exception out of a timer, a socket's or a
    // disk's callback ends a real process (or the simulator itself is wrong). Either way: which seed.
    res.violation =
      err instanceof Violation
        ? err.message
        : `seed ${seed}: an exception escaped (a process would have died): ${(err as Error).stack ?? String(err)}`;
  } finally {
    process.off('unhandledRejection', onUnhandled);
    // Stop every process so nothing of this world runs on.
    for (const n of ['a', 'b'] as const) {
      const proc = c.nodes[n].proc;
      if (proc) proc.owner.alive = false;
    }
  }
  res.steps = world.steps;
  res.crashes = c.crashes;
  res.cuts = c.net.cuts;
  res.drains = c.net.drains;
  return res;
}
