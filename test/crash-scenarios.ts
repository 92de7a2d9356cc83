/**
 * The crash scenarios: one entry per (victim, way of crashing). A scenario
 * says who dies, how the crash is chosen, how the processes are set up, what
 * workload runs, and which checkpoint images a recovery may produce
 * (test/crash-harness.ts runs it): the secondary driven by the test as its
 * primary, promotions (with a commit racing them), a real pair with the
 * primary killed (and restarted), and resyncs into a new secondary with either
 * side killed. To cover a new feature (re-protection after a failover, say),
 * add an entry to SCENARIOS and give it turns in DEFAULT_DECK.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { controlCall } from '../src/checkpoint/control.js';
import { scanJournal } from '../src/checkpoint/format/journal.js';
import { NbdClient } from '../src/net/client.js';
import {
  allowedFromDrive,
  CheckpointModel,
  applyMutation,
  crashEnv,
  driveEpochs,
  PrimaryDriver,
  newDriveState,
  planMutations,
  noteResyncMs,
  randomPlan,
  resyncMarks,
  runRecover,
  typicalResyncMs,
  describeDiff,
  driverHistory,
  writeHistory,
  type CrashPlan,
  type DriveState,
  type DriverEpoch,
  type Mutation,
  type PointContext,
  type Rng,
  type Scenario,
} from './crash-harness.js';
import { CLI } from './helpers.js';
import type { NodeProc } from './replication-helpers.js';
import { hashExport, waitLinkUp } from './replication-helpers.js';
import { nodeStorage } from '../src/sys/storage.js';

/** Named crash points of the secondary that a replication workload reaches (src/checkpoint/secondary-store.ts). */
export const SECONDARY_POINTS = [
  'secondary-before-durable-sync',
  'secondary-before-commit-record',
  'secondary-after-commit-record',
  'secondary-mid-apply',
  'secondary-before-applied-record',
] as const;

const MiB = 1024 * 1024;

/** Node options for crash tests: no failover of its own, and a heartbeat that a loaded machine cannot trip. */
const HEARTBEAT = ['--heartbeat-interval', '500', '--heartbeat-timeout', '15000'];

function secondaryArgs(dir: string, size: number): string[] {
  return [
    '--listen',
    '127.0.0.1:0',
    '--export',
    `disk0=${path.join(dir, 'svm.img')},size=${size}`,
    '--state',
    path.join(dir, 'svm-state'),
    '--replication-listen',
    '127.0.0.1:0',
    '--control',
    '127.0.0.1:0',
    '--failover',
    'manual',
    ...HEARTBEAT,
  ];
}

// -----------------------------------------------------------------------------
// Secondary, driven by the test as the primary

interface DriverRun {
  dir: string;
  size: number;
  node: NodeProc;
  driver: PrimaryDriver | null;
  model: CheckpointModel;
  epochs: DriverEpoch[];
  st: DriveState;
  pipelined: boolean;
}

/** Plan `count` epochs of 3-12 mutations each over a disk of `size` bytes, with their model images. */
function planEpochs(rng: Rng, size: number, count: number, model: CheckpointModel, first = 1): DriverEpoch[] {
  const out: DriverEpoch[] = [];
  for (let i = 0; i < count; i++) {
    const muts = planMutations(rng, size, rng.int(3, 12));
    model.addEpoch(muts);
    out.push({ epoch: first + i, muts });
  }
  return out;
}

async function startDriverRun(
  ctx: PointContext,
  plan: CrashPlan,
  epochs: number,
  extraArgs: string[] = [],
): Promise<DriverRun> {
  const size = ctx.rng.pick([1, 1, 2]) * MiB;
  const model = new CheckpointModel(size);
  const planned = planEpochs(ctx.rng, size, epochs, model);
  // The secondary knows the driver's generation already: the hello decides 'none' (no resync).
  writeHistory(path.join(ctx.dir, 'svm-state'), driverHistory(ctx.seed));
  const node = await ctx.startNode(
    'secondary',
    [...secondaryArgs(ctx.dir, size), ...extraArgs],
    crashEnv(plan),
  );
  ctx.victim = node;
  return {
    dir: ctx.dir,
    size,
    node,
    driver: null,
    model,
    epochs: planned,
    st: newDriveState(),
    pipelined: ctx.rng.bool(),
  };
}

/** Connect as the primary and stream the planned epochs; a random plan kills at its step of the protocol. */
async function drive(ctx: PointContext, r: DriverRun, plan: CrashPlan | null): Promise<void> {
  const epochs = r.epochs;
  const driver = await PrimaryDriver.connect(Number(r.node.info.replicationPort), {
    size: r.size,
    firstEpoch: epochs[0].epoch,
    logDir: path.join(r.dir, 'driver-log'),
    history: driverHistory(ctx.seed),
  });
  r.driver = driver;
  const total = epochs.reduce((a, e) => a + e.muts.length + 4, 0);
  const at = plan?.kind === 'random' ? 1 + Math.floor(plan.at * total) : -1;
  const outcome = await driveEpochs(driver, epochs, r.st, {
    pipelined: r.pipelined,
    onStep: (step) => {
      if (step === at && plan?.kind === 'random')
        ctx.killVictimAfter(plan.jitterMs, `at protocol step ${step} of ${total} + ${plan.jitterMs} ms`);
    },
  });
  ctx.notes.push(
    `driver (${r.pipelined ? 'pipelined' : 'lockstep'}, ${epochs.length} epochs, ${r.size / MiB} MiB): ${outcome}; ` +
      `last commit answered ${r.st.acked}, commits sent [${r.st.sentCommits.join(', ')}], durable ${r.st.durable}`,
  );
  for (const e of r.st.errors) ctx.problems.push(`unexpected answer from the secondary: ${e}`);
}

const driverTarget = (r: DriverRun) => ({
  state: path.join(r.dir, 'svm-state'),
  image: path.join(r.dir, 'svm.img'),
});

/**
 * The secondary killed while the test, as its primary, streams epochs and runs
 * checkpoints: at a named point (`point`) or at a random step of the protocol.
 */
function secondaryScenario(point: (typeof SECONDARY_POINTS)[number] | 'random'): Scenario<DriverRun> {
  return {
    name: `secondary@${point}`,
    victim: 'secondary',
    about:
      point === 'random'
        ? 'secondary killed at a random step of a replication workload'
        : `secondary killed at ${point}`,
    crash: (rng) =>
      point === 'random'
        ? randomPlan(rng)
        : { kind: 'named', point, skip: rng.int(0, point === 'secondary-mid-apply' ? 4 : 3) },
    // Every named point fires at least once per epoch, so skip + 1 epochs reach it.
    setup: (ctx, plan) =>
      startDriverRun(ctx, plan, Math.max(ctx.rng.int(3, 6), plan.kind === 'named' ? plan.skip + 1 : 0)),
    workload: (ctx, r, plan) => drive(ctx, r, plan),
    nudge: async (_ctx, r) => {
      await controlCall(r.node.control, 'POST', '/drain-apply', undefined, 5000);
    },
    afterCrash: async (_ctx, r) => r.driver?.destroy(),
    target: driverTarget,
    allowedImages: (r) => ({ model: r.model, epochs: allowedFromDrive(r.st) }),
  };
}

// -----------------------------------------------------------------------------
// Promotion (failover) of the secondary

interface PromotionRun extends DriverRun {
  /** Last checkpoint when the SVM wrote (its overlay sits on this one). */
  base: number;
  svmWrites: Mutation[];
  failover: { committed: number; generation: number } | null;
  /** The epoch whose racing commit the secondary refused (ESTALE), if it did. */
  refusedCommit: number | null;
}

type SecondaryStatus = { role: string; generation: number; committedEpoch: number };

/** `colo-blk failover --control ADDR --json`: its answer, or null if the node died first. */
async function failoverCli(
  ctx: PointContext,
  node: NodeProc,
): Promise<{ committed: number; generation: number } | null> {
  const child = ctx.own(
    spawn(process.execPath, [CLI, 'failover', '--control', `127.0.0.1:${node.control.port}`, '--json'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...crashEnv() },
    }),
  );
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const code = await new Promise<number | null>((res) => child.once('close', (c) => res(c)));
  if (code !== 0) return null;
  return JSON.parse(out) as { committed: number; generation: number };
}

/** commits.journal as a list of (t, e) in order. */
function commitRecords(state: string): { t: string; e?: number; committed?: number }[] {
  const out: { t: string; e?: number; committed?: number }[] = [];
  const file = path.join(state, 'commits.journal');
  if (fs.existsSync(file))
    scanJournal<{ t: string; e?: number; committed?: number }>(nodeStorage, file, (r) => out.push(r.meta));
  return out;
}

/** Named points of a promotion: before its promote record is written, and after it is durable. */
const PROMOTE_POINTS = ['secondary-before-promote-record', 'secondary-after-promote-record'] as const;

/**
 * The secondary promoted (POST /failover, or `colo-blk failover`) after K
 * committed checkpoints, with epoch K+1 mirrored up to its records, its seal
 * or its durable answer, and SVM writes (FUA) in its overlay; killed at
 * secondary-before-promote-record (nothing of the promotion is durable: it
 * stays a secondary), secondary-after-promote-record, or at a random moment
 * around the failover. After recovery the image is checkpoint K, the promote
 * record is there if the failover got that far, and after a restart the node
 * serves checkpoint K plus the SVM's writes. With `race`, the commit of K+1
 * is sent just before or 0-3 ms after the failover request: then K+1 may
 * count (and the SVM's writes are gone with its overlay), but only if its
 * commit record precedes the promote record (a commit that arrives once the
 * promotion has started is refused).
 */
function promotionScenario(
  kind: (typeof PROMOTE_POINTS)[number] | 'random',
  race = false,
): Scenario<PromotionRun> {
  const prefix = race ? 'promotion-race' : 'promotion';
  return {
    name: `${prefix}@${kind}`,
    victim: 'secondary',
    about:
      (kind !== 'random'
        ? `secondary killed at ${kind} during a failover`
        : 'secondary killed at a random moment around a failover') +
      (race ? ', the commit of the mirrored epoch racing it' : ''),
    // With a racing commit, kills up to 40 ms in: the refusal (or the answer) of that commit can come back first.
    crash: (rng) =>
      kind !== 'random' ? { kind: 'named', point: kind, skip: 0 } : randomPlan(rng, race ? 40 : 12),
    planNote: (plan) => `${plan.jitterMs} ms after the failover is requested`,
    setup: async (ctx, plan) => {
      const k = ctx.rng.int(1, 3);
      const r = await startDriverRun(ctx, plan, k + 1);
      r.epochs[k].goal = race ? 'durable' : ctx.rng.pick(['records', 'seal', 'durable'] as const);
      return { ...r, base: 0, svmWrites: [], failover: null, refusedCommit: null };
    },
    workload: async (ctx, r, plan) => {
      // The workload up to the failover is not where this scenario kills: a random plan fires at the failover.
      await drive(ctx, r, null);
      if (r.driver!.closed) return;
      r.base = r.st.acked;
      const svm = await NbdClient.connect({ port: r.node.nbdPort, exportName: 'disk0' });
      try {
        for (const m of planMutations(ctx.rng, r.size, ctx.rng.int(0, 3)))
          if (m.t === 'w') {
            await svm.write(m.data, m.o, { fua: true });
            r.svmWrites.push(m);
          }
      } finally {
        svm.destroy();
      }
      const last = r.epochs[r.epochs.length - 1];
      // promotion-race: the commit of the mirrored epoch is sent just before the failover, or 0-3 ms after.
      const raceDelay = race ? ctx.rng.int(-1, 6) : -1;
      const commit = () => {
        if (r.driver!.closed) return;
        const answered = r.driver!.commit(last.epoch);
        r.st.sentCommits.push(last.epoch);
        void answered
          .then(() => (r.st.acked = last.epoch))
          .catch((err: Error & { code?: string }) => {
            // Refused (the promotion had started): then it must not count.
            if (err.code === 'ESTALE') {
              r.refusedCommit = last.epoch;
              ctx.notes.push(`the racing commit of epoch ${last.epoch} was refused: ${err.message}`);
            }
          });
      };
      if (race && r.st.durable >= last.epoch && raceDelay < 0) commit();
      // The operator's way (colo-blk failover --control) now and then, else the control API.
      const cli = ctx.rng.bool(0.3);
      if (plan.kind === 'random') ctx.killVictimAfter(plan.jitterMs, `${plan.jitterMs} ms into the failover`);
      if (race && r.st.durable >= last.epoch && raceDelay >= 0) setTimeout(commit, raceDelay);
      const reply = cli
        ? await failoverCli(ctx, r.node)
        : await controlCall<{ committed: number; generation: number }>(
            r.node.control,
            'POST',
            '/failover',
            undefined,
            10_000,
          ).catch(() => null);
      r.failover = reply;
      ctx.notes.push(
        `failover (${cli ? 'colo-blk failover' : 'POST /failover'}) after checkpoint ${r.base} (epoch ${last.epoch}: ${last.goal}${
          race ? `, its commit sent ${raceDelay < 0 ? 'just before' : `${raceDelay} ms after`}` : ''
        }), ${r.svmWrites.length} SVM writes: ${reply ? `answered, committed ${reply.committed}` : 'no answer'}`,
      );
    },
    afterCrash: async (_ctx, r) => r.driver?.destroy(),
    target: driverTarget,
    allowedImages: (r) => ({
      model: r.model,
      epochs: allowedFromDrive(r.st).filter((e) => e !== r.refusedCommit),
    }),
    check: async (ctx, r, c) => {
      const state = path.join(r.dir, 'svm-state');
      const records = commitRecords(state);
      const promote = records.findIndex((x) => x.t === 'promote');
      // "Epoch N counts if and only if its commit record reached commits.journal before the promote record."
      const late = promote < 0 ? [] : records.slice(promote + 1).filter((x) => x.t === 'commit');
      if (late.length)
        ctx.problems.push(
          `commit record(s) of epoch ${late.map((x) => x.e).join(', ')} were written after the promote record ` +
            `(which says committed ${records[promote].committed}); recovery counts them (checkpoint ${c})`,
        );
      const hit = ctx.crashes.some(
        (x) => x.victim === 'secondary' && x.point === 'secondary-after-promote-record',
      );
      const before = ctx.crashes.some(
        (x) => x.victim === 'secondary' && x.point === 'secondary-before-promote-record',
      );
      if (before && promote >= 0)
        ctx.problems.push(
          'killed at secondary-before-promote-record, yet commits.journal has a promote record',
        );
      if ((hit || r.failover) && promote < 0)
        ctx.problems.push(
          `the failover ${hit ? 'reached secondary-after-promote-record' : 'was answered'}, but commits.journal has no promote record`,
        );
      if (r.failover && r.failover.committed !== c)
        ctx.problems.push(
          `the failover answered "checkpoint ${r.failover.committed} plus the SVM's writes", but the recovered node holds checkpoint ${c}`,
        );
      // Restart the node: its role survives, and its disk is checkpoint c plus (if c is the
      // checkpoint the SVM wrote on) the SVM's flushed writes.
      const node = await ctx.startNode('secondary', secondaryArgs(r.dir, r.size));
      const status = await controlCall<SecondaryStatus>(node.control, 'GET', '/status');
      const role = promote >= 0 ? 'primary' : 'secondary';
      if (status.role !== role || status.committedEpoch !== c)
        ctx.problems.push(
          `after a restart the node is ${status.role} at checkpoint ${status.committedEpoch}, expected ${role} at ${c}`,
        );
      const want = Buffer.from(r.model.images[c]);
      if (c === r.base) for (const m of r.svmWrites) applyMutation(want, m);
      const client = await NbdClient.connect({ port: node.nbdPort, exportName: 'disk0' });
      const view = await client.read(0, r.size);
      await client.close();
      if (!view.equals(want))
        ctx.problems.push(
          `after a restart the node's disk is not checkpoint ${c}${c === r.base ? ` plus the ${r.svmWrites.length} SVM writes` : ''}: ${describeDiff(view, want)}`,
        );
      node.child.kill('SIGKILL');
      await node.exit;
    },
  };
}

// -----------------------------------------------------------------------------
// A promoted node, killed while the SVM (now the PVM) writes and its overlay folds

/** Points a promoted node passes on its own writes: recording them, folding, applying folds. */
export const PROMOTED_POINTS = [
  'activity-before-sync',
  'promoted-before-fold-record',
  'secondary-after-fold-record',
  'secondary-mid-apply',
] as const;

interface PromotedRun extends DriverRun {
  /** The checkpoint the promotion kept. */
  base: number;
  /** Writes the promoted node acknowledged (each with FUA: durable on return), in order. */
  acked: Mutation[];
  /** The write in flight when the node died (it may or may not have landed). */
  inFlight: Mutation | null;
  promoted: boolean;
}

/**
 * A secondary promoted after K committed checkpoints, then written to through
 * its export with FUA, with a small fold size (a fold every 32 KiB): killed at
 * a point of its own writes (recording them in the activity log, folding the
 * overlay into a committed layer, applying folded layers) or at a random
 * write. After recovery and a restart its disk must be exactly checkpoint K
 * plus every acknowledged write: a fold never loses or reorders one.
 */
function promotedScenario(point: (typeof PROMOTED_POINTS)[number] | 'random'): Scenario<PromotedRun> {
  return {
    name: `promoted@${point}`,
    victim: 'secondary',
    about:
      point === 'random'
        ? 'a promoted node killed at a random moment of its own writes and folds'
        : `a promoted node killed at ${point} during its own writes and folds`,
    crash: (rng) =>
      point === 'random'
        ? randomPlan(rng, 4)
        : // activity-before-sync fires once per cold extent (few here); the others once per fold (the apply: per chunk).
          {
            kind: 'named',
            point,
            skip: point === 'activity-before-sync' ? 0 : rng.int(0, point === 'secondary-mid-apply' ? 2 : 1),
          },
    setup: async (ctx, plan) => {
      const r = await startDriverRun(ctx, plan, ctx.rng.int(1, 3), ['--fold-size', '32K']);
      return { ...r, base: 0, acked: [], inFlight: null, promoted: false };
    },
    workload: async (ctx, r, plan) => {
      await drive(ctx, r, null);
      if (r.driver!.closed) return;
      r.base = r.st.acked;
      r.driver!.destroy();
      const f = await controlCall<{ committed: number }>(
        r.node.control,
        'POST',
        '/failover',
        undefined,
        10_000,
      ).catch((err: Error) => err);
      if (f instanceof Error) {
        ctx.notes.push(`the failover failed: ${f.message}`);
        return;
      }
      r.promoted = true;
      const writes = planMutations(ctx.rng, r.size, ctx.rng.int(12, 24), 24 * 1024).filter(
        (m) => m.t === 'w',
      );
      // Enough bytes for at least four folds of 32 KiB, whatever the draw: a plan that names the
      // second fold must be able to reach it (a draw of five small writes once never did).
      const bytes = () => writes.reduce((n, m) => n + (m.t === 'w' ? m.data.length : 0), 0);
      for (let extra = 0; bytes() < 4 * 32 * 1024 && extra < 64; extra++)
        writes.push(...planMutations(ctx.rng, r.size, 4, 24 * 1024).filter((m) => m.t === 'w'));
      const at = plan.kind === 'random' ? Math.floor(plan.at * writes.length) : -1;
      // The node may die before the client is in (a point its background apply of the last
      // committed epoch passes just after the promotion): then no promoted write was made.
      const svm = await NbdClient.connect({ port: r.node.nbdPort, exportName: 'disk0' }).catch(
        (err: Error) => err,
      );
      if (svm instanceof Error) {
        ctx.notes.push(`promoted at checkpoint ${r.base}; the export was gone: ${svm.message}`);
        return;
      }
      try {
        for (let i = 0; i < writes.length; i++) {
          if (i === at && plan.kind === 'random')
            ctx.killVictimAfter(
              plan.jitterMs,
              `at promoted write ${i} of ${writes.length} + ${plan.jitterMs} ms`,
            );
          const m = writes[i];
          if (m.t !== 'w') continue;
          r.inFlight = m;
          await svm.write(m.data, m.o, { fua: true });
          r.acked.push(m);
          r.inFlight = null;
        }
      } catch {
        // the node died under the write: that write was not acknowledged
      } finally {
        svm.destroy();
      }
      ctx.notes.push(
        `promoted at checkpoint ${r.base}; ${r.acked.length} of ${writes.length} writes acknowledged`,
      );
    },
    afterCrash: async (_ctx, r) => r.driver?.destroy(),
    target: driverTarget,
    allowedImages: (r) =>
      r.promoted
        ? {
            model: r.model,
            epochs: [r.base],
            allowed: `checkpoint ${r.base}, with some of the promoted node's acknowledged writes folded in`,
            // The image is the checkpoint with the folded writes applied; the restart below checks it exactly.
            judge: () => [],
          }
        : // Killed before the promotion (a point it also passes as a secondary): an ordinary secondary.
          { model: r.model, epochs: allowedFromDrive(r.st) },
    check: async (ctx, r) => {
      if (!r.promoted) return;
      const node = await ctx.startNode('secondary', [...secondaryArgs(r.dir, r.size), '--fold-size', '32K']);
      const status = await controlCall<SecondaryStatus>(node.control, 'GET', '/status');
      if (r.promoted && status.role !== 'primary')
        ctx.problems.push(`after a restart the promoted node is a ${status.role}`);
      const want = Buffer.from(r.model.images[r.base]);
      for (const m of r.acked) applyMutation(want, m);
      const client = await NbdClient.connect({ port: node.nbdPort, exportName: 'disk0' });
      const view = await client.read(0, r.size);
      await client.close();
      // A write in flight at the crash may or may not be there: the disk with or without it.
      const withInFlight = Buffer.from(want);
      if (r.inFlight) applyMutation(withInFlight, r.inFlight);
      if (!view.equals(want) && !view.equals(withInFlight))
        ctx.problems.push(
          `after a restart the promoted node's disk is not checkpoint ${r.base} plus its ${r.acked.length} ` +
            `acknowledged writes: ${describeDiff(view, want)}`,
        );
      node.child.kill('SIGKILL');
      await node.exit;
    },
  };
}

// -----------------------------------------------------------------------------
// The real primary, killed while an NBD client writes and checkpoints run

const BLOCK = 4096;

interface PrimaryRun {
  dir: string;
  size: number;
  secondary: NodeProc;
  primary: NodeProc;
  client: NbdClient | null;
  model: CheckpointModel;
  /** Last checkpoint answered, and one asked for but not answered. */
  acked: number;
  inFlight: number | null;
  /** Per 4 KiB block: content of the last acknowledged mutation (null: zeroes). */
  blocks: (Buffer | null)[];
  /** Per block: content of a mutation sent but not acknowledged. */
  unacked: Map<number, Buffer | null>;
  batches: number;
}

type BlockOp = { kind: 'w' | 'z' | 't'; block: number; count: number; data?: Buffer };

/** A batch of 1-8 mutations on disjoint 4 KiB-aligned ranges (so each block has one outcome). */
function planBatch(rng: Rng, blocks: number): BlockOp[] {
  const used = new Set<number>();
  const ops: BlockOp[] = [];
  for (let i = rng.int(1, 8); i > 0; i--) {
    const count = rng.int(1, 16);
    const block = rng.int(0, blocks - count);
    let free = true;
    for (let b = block; b < block + count; b++) if (used.has(b)) free = false;
    if (!free) continue;
    for (let b = block; b < block + count; b++) used.add(b);
    const kind = rng.pick(['w', 'w', 'w', 'z', 't'] as const);
    ops.push({ kind, block, count, data: kind === 'w' ? rng.bytes(count * BLOCK) : undefined });
  }
  return ops;
}

const blockContent = (op: BlockOp, b: number): Buffer | null =>
  op.data ? op.data.subarray((b - op.block) * BLOCK, (b - op.block + 1) * BLOCK) : null;

function primaryArgs(dir: string, size: number, peerPort: number, extra: string[] = []): string[] {
  return [
    '--listen',
    '127.0.0.1:0',
    '--export',
    `disk0=${path.join(dir, 'pvm.img')},size=${size}`,
    '--state',
    path.join(dir, 'pvm-state'),
    '--peer',
    `127.0.0.1:${peerPort}`,
    '--control',
    '127.0.0.1:0',
    ...HEARTBEAT,
    ...extra,
  ];
}

const isDead = (n: NodeProc) => n.child.exitCode !== null || n.child.signalCode !== null;

/** True if the node exits within `ms` (a failed request: was it killed?). */
const diesWithin = (n: NodeProc, ms: number) =>
  Promise.race([n.exit.then(() => true), new Promise<boolean>((res) => setTimeout(() => res(false), ms))]);

/** Send a batch; true if every mutation was acknowledged (the per-block record is kept up to date). */
async function sendBatch(client: NbdClient, ops: BlockOp[], r: PrimaryRun): Promise<boolean> {
  for (const op of ops)
    for (let i = op.block; i < op.block + op.count; i++) r.unacked.set(i, blockContent(op, i));
  const results = await Promise.allSettled(
    ops.map(async (op) => {
      const off = op.block * BLOCK;
      const len = op.count * BLOCK;
      if (op.kind === 'w') await client.write(op.data!, off);
      else if (op.kind === 'z') await client.zero(off, len);
      else await client.trim(off, len);
      for (let i = op.block; i < op.block + op.count; i++) {
        r.blocks[i] = blockContent(op, i);
        r.unacked.delete(i);
      }
    }),
  );
  return results.every((x) => x.status === 'fulfilled');
}

function applyBatch(img: Buffer, ops: BlockOp[]): void {
  for (const op of ops)
    if (op.data) op.data.copy(img, op.block * BLOCK);
    else img.fill(0, op.block * BLOCK, (op.block + op.count) * BLOCK);
}

async function setupPrimary(ctx: PointContext, plan: CrashPlan): Promise<PrimaryRun> {
  const size = 2 * MiB;
  const secondary = await ctx.startNode('secondary', secondaryArgs(ctx.dir, size));
  const primary = await ctx.startNode(
    'primary',
    primaryArgs(ctx.dir, size, Number(secondary.info.replicationPort)),
    crashEnv(plan),
  );
  ctx.victim = primary;
  return {
    dir: ctx.dir,
    size,
    secondary,
    primary,
    client: null,
    model: new CheckpointModel(size),
    acked: 0,
    inFlight: null,
    blocks: new Array<Buffer | null>(size / BLOCK).fill(null),
    unacked: new Map(),
    batches: 0,
  };
}

/**
 * Once the pair's first resync has committed the blank disk (checkpoint F),
 * batches of NBD writes (each acknowledged before the checkpoint that
 * follows it, so batch b is exactly epoch F + b) alternating with POST
 * /checkpoint, until the primary is killed: at its random moment (during the
 * writes or the checkpoint of a seeded batch, plus jitter) or at its named
 * point.
 */
async function primaryWorkload(ctx: PointContext, r: PrimaryRun, plan: CrashPlan): Promise<void> {
  // A new pair starts with a full resync ending in a checkpoint of its own: the blank disk, committed.
  const up = await waitLinkUp(r.primary, 20_000);
  const first = up.epoch - 1;
  r.model.setImage(first, Buffer.from(r.model.images[0]));
  r.acked = first;
  const client = await NbdClient.connect({ port: r.primary.nbdPort, exportName: 'disk0' });
  r.client = client;
  const batches = ctx.rng.int(3, 7);
  const where = plan.kind === 'random' ? plan.at * batches : -1;
  const killBatch = Math.floor(where) + 1;
  const killPhase = where - Math.floor(where) < 0.6 ? 'writes' : 'checkpoint';
  const arm = (b: number, phase: string) => {
    if (plan.kind === 'random' && b === killBatch && phase === killPhase)
      ctx.killVictimAfter(plan.jitterMs, `${plan.jitterMs} ms into the ${phase} of batch ${b} of ${batches}`);
  };
  const img = Buffer.from(r.model.images[0]);
  // The planned batches, then more until the kill has landed (its jitter may outlast them).
  for (let b = 1; b <= batches || (!isDead(r.primary) && b <= batches + 20); b++) {
    const ops = planBatch(ctx.rng, r.size / BLOCK);
    arm(b, 'writes');
    if (!(await sendBatch(client, ops, r))) return; // the primary is gone
    applyBatch(img, ops);
    const epoch = r.model.addImage(Buffer.from(img));
    r.batches = b;
    arm(b, 'checkpoint');
    r.inFlight = epoch;
    let answer: { epoch: number };
    try {
      answer = await controlCall<{ epoch: number }>(r.primary.control, 'POST', '/checkpoint', {
        timeoutMs: 10_000,
      });
    } catch (err) {
      // Killed while checkpointing (give the exit a moment to be noticed), or a real failure.
      const died = await Promise.race([
        r.primary.exit.then(() => true),
        new Promise<boolean>((res) => setTimeout(() => res(false), 2000)),
      ]);
      if (!died)
        ctx.problems.push(`checkpoint ${b} failed while the primary was alive: ${(err as Error).message}`);
      return;
    }
    if (answer.epoch !== epoch)
      ctx.problems.push(`checkpoint ${b} sealed epoch ${answer.epoch}, expected ${epoch}`);
    r.acked = epoch;
    r.inFlight = null;
  }
}

function notePrimaryWorkload(ctx: PointContext, r: PrimaryRun): void {
  r.client?.destroy();
  ctx.notes.push(
    `primary workload: ${r.batches} batches written, checkpoint ${r.acked} answered` +
      (r.inFlight !== null ? `, checkpoint ${r.inFlight} asked for` : ''),
  );
}

/**
 * The secondary outlives its primary (manual failover); kill it too, to recover its state. Right
 * after the primary's death it may still be handling the primary's last frames (a commit): then
 * this is a crash point of its own (`count`); after a finished workload it is only a stop.
 */
async function killSecondary(ctx: PointContext, r: PrimaryRun, count: boolean): Promise<void> {
  const ms = ctx.rng.int(0, 10);
  await new Promise((res) => setTimeout(res, ms));
  if (isDead(r.secondary)) {
    ctx.problems.push(`the secondary died unexpectedly: ${r.secondary.stderr().trim().split('\n').pop()}`);
    return;
  }
  r.secondary.child.kill('SIGKILL');
  await r.secondary.exit;
  if (count)
    ctx.crashes.push({
      victim: 'secondary',
      kind: 'random',
      point: 'random',
      detail: `${ms} ms after its primary was killed`,
    });
}

/** A pair that converged after its primary was restarted. */
interface Converged {
  /** Last checkpoint after the restart (the two exports compared equal there). */
  last: number;
  /** The checkpoint asked for when the secondary was killed at the end, if it was. */
  next: number | null;
}

/**
 * The end of a point whose primary was killed and restarted, once the pair
 * converged at checkpoint r.last: one more batch, then a checkpoint with the
 * secondary killed 0-15 ms after it is asked for (a crash point of its own).
 * Its recovered image is then checkpoint r.last or r.next.
 */
async function killSecondaryInCheckpoint(ctx: PointContext, r: PrimaryRun & Converged): Promise<void> {
  if (!r.last || ctx.problems.length || isDead(r.secondary) || isDead(r.primary))
    return killSecondary(ctx, r, false);
  const client = await NbdClient.connect({ port: r.primary.nbdPort, exportName: 'disk0' });
  try {
    if (!(await sendBatch(client, planBatch(ctx.rng, r.size / BLOCK), r))) {
      ctx.problems.push('a write failed after the pair converged');
      return killSecondary(ctx, r, false);
    }
  } finally {
    client.destroy();
  }
  r.next = r.last + 1;
  r.model.setImage(r.next, fs.readFileSync(path.join(r.dir, 'pvm.img')));
  const ms = ctx.rng.int(0, 15);
  const checkpoint = controlCall(r.primary.control, 'POST', '/checkpoint', { timeoutMs: 5_000 }).catch(
    () => null,
  );
  await new Promise((res) => setTimeout(res, ms));
  r.secondary.child.kill('SIGKILL');
  await r.secondary.exit;
  ctx.crashes.push({
    victim: 'secondary',
    kind: 'random',
    point: 'random',
    detail: `${ms} ms into checkpoint ${r.next}, after the pair converged`,
  });
  const answered = await checkpoint;
  ctx.notes.push(
    `the secondary killed ${ms} ms into checkpoint ${r.next}: ${answered ? 'answered' : 'not answered'}`,
  );
}

/**
 * The primary's own disk is authoritative: every block holds its last
 * acknowledged write, or the one in flight when the primary died.
 */
function checkPrimaryDisk(
  ctx: PointContext,
  img: Buffer,
  r: Pick<PrimaryRun, 'blocks' | 'unacked'>,
  what: string,
): boolean {
  const zero = Buffer.alloc(BLOCK);
  for (let b = 0; b < r.blocks.length; b++) {
    const have = img.subarray(b * BLOCK, (b + 1) * BLOCK);
    const acked = r.blocks[b] ?? zero;
    const pending = r.unacked.has(b) ? (r.unacked.get(b) ?? zero) : null;
    if (!have.equals(acked) && !(pending && have.equals(pending))) {
      ctx.problems.push(
        `${what}: block ${b} (offset ${b * BLOCK}) holds neither its last acknowledged write` +
          `${pending ? ' nor the unacknowledged one' : ''}: ${describeDiff(have, acked)}`,
      );
      return false;
    }
  }
  return true;
}

const primaryTarget = (r: PrimaryRun) => ({
  state: path.join(r.dir, 'svm-state'),
  image: path.join(r.dir, 'svm.img'),
});

const primaryScenario: Scenario<PrimaryRun> = {
  name: 'primary@random',
  victim: 'primary',
  about: 'primary killed at a random moment while an NBD client writes and checkpoints run',
  crash: (rng) => randomPlan(rng, 15),
  setup: setupPrimary,
  workload: primaryWorkload,
  afterCrash: async (ctx, r) => {
    notePrimaryWorkload(ctx, r);
    await killSecondary(ctx, r, true);
  },
  target: primaryTarget,
  allowedImages: (r) => ({
    model: r.model,
    epochs: r.inFlight !== null && r.inFlight <= r.model.last ? [r.acked, r.inFlight] : [r.acked],
  }),
  check: async (ctx, r) => {
    checkPrimaryDisk(ctx, fs.readFileSync(path.join(r.dir, 'pvm.img')), r, 'pvm.img');
    if (ctx.rng.bool()) return; // half the time: the primary's own recover (it only cuts torn tails)
    const rec = await runRecover(ctx, path.join(r.dir, 'pvm-state'));
    if (rec.code !== 0 || !rec.report?.ok)
      ctx.problems.push(
        `recover of the primary's state failed (${rec.code ?? rec.signal}): ${rec.stderr.trim()}`,
      );
  },
};

interface RestartRun extends PrimaryRun, Converged {
  /** What the secondary held when the restarted primary connected. */
  held: { durable: number; committed: number } | null;
}

/** Where primary-restart kills the primary: a random moment, or after a local write not yet logged. */
type RestartKill = 'random' | 'primary-after-local-write';

/**
 * The restarted primary (same state, same image) carries on with its secondary:
 * wait until it reports the secondary protected (a restarted primary
 * resynchronises what its activity log says it may have written), write 0-2
 * batches, run at least one checkpoint, and compare the two exports. Sets
 * r.last and the model image of that checkpoint to the primary's disk.
 */
async function restartPrimaryAndConverge(
  ctx: PointContext,
  r: PrimaryRun & { last: number },
  peerPort: number,
  extraArgs: string[] = [],
  env: NodeJS.ProcessEnv = {},
): Promise<void> {
  const primary = await ctx.startNode('primary', primaryArgs(r.dir, r.size, peerPort, extraArgs), env);
  r.primary = primary;
  const t0 = performance.now();
  const up = await waitLinkUp(primary, 30_000);
  const synced = Math.round(performance.now() - t0);
  const st = await controlCall<{ peerDecision: { action: string; mode?: string } | null }>(
    primary.control,
    'GET',
    '/status',
  );
  const client = await NbdClient.connect({ port: primary.nbdPort, exportName: 'disk0' });
  try {
    // Nothing wrote since the restart: the disk is the crashed primary's (every acknowledged write in it).
    // (Read from the image file: the primary's export is that file, page cache and all.)
    const disk = fs.readFileSync(path.join(r.dir, 'pvm.img'));
    checkPrimaryDisk(ctx, disk, r, "the restarted primary's disk");
    const batches = ctx.rng.int(0, 2);
    for (let b = 1; b <= Math.max(1, batches); b++) {
      if (b <= batches && !(await sendBatch(client, planBatch(ctx.rng, r.size / BLOCK), r))) {
        ctx.problems.push('the restarted primary failed a write');
        return;
      }
      const answer = await controlCall<{ epoch: number }>(primary.control, 'POST', '/checkpoint', {
        timeoutMs: 15_000,
      }).catch((err: Error) => err);
      if (answer instanceof Error) {
        ctx.problems.push(`checkpoint ${b} of the restarted primary failed: ${answer.message}`);
        return;
      }
      r.last = answer.epoch;
    }
    const final = fs.readFileSync(path.join(r.dir, 'pvm.img'));
    checkPrimaryDisk(ctx, final, r, "the restarted primary's disk after its checkpoints");
    r.model.setImage(r.last, final);
    ctx.notes.push(
      `restarted primary: protected after ${synced} ms (decision ${st.peerDecision?.action ?? '?'}` +
        `${st.peerDecision?.mode ? ` ${st.peerDecision.mode}` : ''}, epoch ${up.epoch}); ${batches} batches, ` +
        `last checkpoint ${r.last}`,
    );
  } finally {
    client.destroy();
  }
}

/**
 * The primary killed (at a random moment, or right after a local write that
 * is not yet in its log), then restarted on the same state while its
 * secondary keeps running: a new session. The secondary drops what the dead
 * session never made durable; the restarted primary resynchronises what its
 * activity log says it may have written (its disk may hold writes the
 * secondary never saw). After one checkpoint the two exports are equal; then
 * the secondary is killed during one more checkpoint (a crash point of its
 * own), and its recovered image is exactly the primary's disk at one of the
 * two.
 */
function primaryRestartScenario(kill: RestartKill): Scenario<RestartRun> {
  return {
    name: `primary-restart@${kill}`,
    victim: 'primary',
    about:
      kill === 'random'
        ? 'primary killed at a random moment and restarted while the secondary keeps running'
        : `primary killed at ${kill} and restarted while the secondary keeps running`,
    crash: (rng) =>
      kill === 'random' ? randomPlan(rng, 15) : { kind: 'named', point: kill, skip: rng.int(0, 12) },
    setup: async (ctx, plan) => ({ ...(await setupPrimary(ctx, plan)), held: null, last: 0, next: null }),
    workload: primaryWorkload,
    afterCrash: async (ctx, r) => {
      notePrimaryWorkload(ctx, r);
      if (isDead(r.secondary)) return killSecondary(ctx, r, false);
      const s = await controlCall<{ durableEpoch: number; committedEpoch: number }>(
        r.secondary.control,
        'GET',
        '/status',
      );
      r.held = { durable: s.durableEpoch, committed: s.committedEpoch };
      ctx.notes.push(`the secondary held durable ${s.durableEpoch}, committed ${s.committedEpoch}`);
      await restartPrimaryAndConverge(ctx, r, Number(r.secondary.info.replicationPort));
      if (r.last && ctx.problems.length === 0) {
        const [hp, hs] = await Promise.all([hashExport(r.primary.nbdPort), hashExport(r.secondary.nbdPort)]);
        if (hp !== hs)
          ctx.problems.push(
            `after checkpoint ${r.last} the two exports differ (primary ${hp}, secondary ${hs})`,
          );
      }
      await killSecondaryInCheckpoint(ctx, r);
    },
    target: primaryTarget,
    allowedImages: (r) => ({ model: r.model, epochs: r.next ? [r.last, r.next] : [r.last] }),
  };
}

// -----------------------------------------------------------------------------
// Resynchronisation: a primary with data meets a new secondary (a full resync)

/** A resync commits every MiB it sends, so a small disk has partial commits to crash around. */
const RESYNC_ENV = { COLO_BLK_RESYNC_COMMIT_BYTES: String(MiB) };
/** The primary starts without a secondary: it must not go on alone while the test sets up. */
const NO_LONE = ['--lone-after', '600000'];
const RESYNC_SIZE = 8 * MiB;
/** The activity log's extent (1 MiB for a disk this small): a write to a cold one syncs the bitmap. */
const EXTENT = MiB;
const RESYNC_BLOCK = 64 * 1024;

/** Named points of the secondary that a resync into it reaches. */
export const RESYNC_SECONDARY_POINTS = [
  'secondary-after-rebase',
  'secondary-after-partial-sync-commit',
  'journal-before-fdatasync',
  'secondary-mid-apply',
] as const;
/** Named points of the primary that a resync it runs reaches (with PVM writes going on). */
export const RESYNC_PRIMARY_POINTS = [
  'primary-mid-resync',
  'activity-before-sync',
  'primary-after-local-write',
] as const;
/** Points that also fire on the NBD writes made before the secondary exists: their skip counts those too. */
const FIRES_IN_SETUP = new Set(['activity-before-sync', 'primary-after-local-write']);

interface ResyncRun extends PrimaryRun, Converged {
  /** Bytes written before the secondary existed. */
  data: number;
  /** NBD writes before the secondary existed (each one to a cold extent: one bitmap sync each). */
  setupWrites: number;
  /** The primary's disk when the resync started (every write acknowledged). */
  initial: Buffer;
  /** PVM writes during the resync: sent, acknowledged. */
  pvmWrites: { sent: number; acked: number };
  /** Milliseconds from the reprotect to 'protected', if the resync completed before the crash. */
  synced: number | null;
}

/** `colo-blk ARGS` as a child process of the point: its exit code and output. */
async function cli(
  ctx: PointContext,
  args: string[],
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = ctx.own(
    spawn(process.execPath, [CLI, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...crashEnv() },
    }),
  );
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((res) => child.once('close', (c) => res(c)));
  return { code, stdout, stderr };
}

/** A secondary part-way through a resync matches no checkpoint: `colo-blk failover` must refuse (exit 1). */
async function expectFailoverRefused(
  ctx: PointContext,
  node: NodeProc,
  when: string,
  state: string,
): Promise<void> {
  const f = await cli(ctx, ['failover', '--control', `127.0.0.1:${node.control.port}`]);
  // The primary may have reconnected and finished the resync meanwhile: then the promotion is
  // right, and its record follows the 'done' mark in commits.journal.
  const records = commitRecords(state) as { t: string; sync?: { state: string } }[];
  const done = records.findIndex((c) => c.t === 'commit' && c.sync?.state === 'done');
  const promote = records.findIndex((c) => c.t === 'promote');
  if (f.code === 0 && done >= 0 && promote > done)
    ctx.notes.push(`${when}: the resync finished before the failover, which then promoted the node`);
  else if (f.code !== 1 || !/part-way through a resync/.test(f.stderr))
    ctx.problems.push(
      `${when}: the secondary is part-way through a resync, but colo-blk failover exited ${f.code}: ` +
        `${(f.stderr || f.stdout).trim().split('\n').pop()}`,
    );
  else ctx.notes.push(`${when}: colo-blk failover refused (part-way through a resync)`);
}

/**
 * The data written before the secondary exists: 2-3 writes of random bytes,
 * 64 KiB aligned, write i starting in extent 2i (cold, so each costs exactly
 * one bitmap sync, and extents 6 and 7 stay cold). Every 4 MiB range the
 * resync compares holds more than 16 differing 64 KiB blocks, so the resync
 * sends them whole, all of them (Resync.compareChunk looks closer, and may
 * find blocks equal that the log brought meanwhile, only when few differ):
 * the bytes sent, and so the partial commits (one per MiB), are the data's.
 * At least `minBytes` in all.
 */
function planSetupWrites(rng: Rng, minBytes: number): BlockOp[] {
  const count = minBytes > 2 * MiB ? 3 : rng.int(2, 3);
  const blocks = Array.from({ length: count }, (_, i) => rng.int(i < 2 ? 9 : 17, 24));
  for (let i = 0; blocks.reduce((a, b) => a + b, 0) * RESYNC_BLOCK < minBytes && i < count; i++)
    blocks[i] = 24;
  return blocks.map((n, i) => {
    const offset = 2 * i * EXTENT + RESYNC_BLOCK * rng.int(0, 8);
    const len = n * RESYNC_BLOCK;
    return { kind: 'w', block: offset / BLOCK, count: len / BLOCK, data: rng.bytes(len) };
  });
}

/** Bytes of setup data a secondary point needs before it can fire (partial commits come every MiB). */
function minDataFor(plan: CrashPlan): number {
  if (plan.kind !== 'named') return MiB;
  if (plan.point === 'secondary-after-partial-sync-commit') return (plan.skip + 1) * MiB;
  // One sync for the rebase, then a seal and a commit per checkpoint (partial ones and the last).
  if (plan.point === 'journal-before-fdatasync') return Math.max(1, Math.ceil((plan.skip - 2) / 2)) * MiB;
  return MiB;
}

/**
 * A primary with data and no secondary (NBD writes while its peer is
 * unreachable), and a new secondary. The victim gets the crash plan; a
 * primary point that also fires on the setup writes has its skip raised by
 * their number.
 */
async function setupResync(
  ctx: PointContext,
  plan: CrashPlan,
  victim: 'primary' | 'secondary',
): Promise<ResyncRun> {
  const size = RESYNC_SIZE;
  const writes = planSetupWrites(ctx.rng, minDataFor(plan));
  let primaryEnv: NodeJS.ProcessEnv = { ...RESYNC_ENV };
  if (victim === 'primary') {
    const shift = plan.kind === 'named' && FIRES_IN_SETUP.has(plan.point) ? writes.length : 0;
    primaryEnv = {
      ...primaryEnv,
      ...crashEnv(plan.kind === 'named' ? { ...plan, skip: plan.skip + shift } : plan),
    };
    if (shift)
      ctx.notes.push(
        `the primary's COLO_BLK_CRASH_SKIP is ${plan.kind === 'named' ? plan.skip + shift : 0}: ${shift} setup writes first`,
      );
  }
  // A log budget the setup data goes past (it is at least 1 MiB), so the log cannot carry it to the
  // new secondary (hash requests wait for the records logged before them): the resync must send it.
  const primary = await ctx.startNode(
    'primary',
    primaryArgs(ctx.dir, size, 1, [...NO_LONE, '--budget', '1M']),
    primaryEnv,
  );
  const r: ResyncRun = {
    dir: ctx.dir,
    size,
    secondary: null as unknown as NodeProc,
    primary,
    client: null,
    model: new CheckpointModel(size),
    acked: 0,
    inFlight: null,
    blocks: new Array<Buffer | null>(size / BLOCK).fill(null),
    unacked: new Map(),
    batches: 0,
    data: writes.reduce((a, w) => a + w.count * BLOCK, 0),
    setupWrites: writes.length,
    initial: Buffer.alloc(size),
    pvmWrites: { sent: 0, acked: 0 },
    synced: null,
    last: 0,
    next: null,
  };
  const client = await NbdClient.connect({ port: primary.nbdPort, exportName: 'disk0' });
  for (const w of writes) if (!(await sendBatch(client, [w], r))) throw new Error('a setup write failed');
  client.destroy();
  applyBatch(r.initial, writes);
  r.secondary = await ctx.startNode(
    'secondary',
    secondaryArgs(ctx.dir, size),
    victim === 'secondary' ? { ...RESYNC_ENV, ...crashEnv(plan) } : RESYNC_ENV,
  );
  ctx.victim = victim === 'primary' ? primary : r.secondary;
  ctx.notes.push(
    `${writes.length} writes (${r.data} bytes) on the primary before the secondary exists: ` +
      writes.map((w) => `${w.block * BLOCK}+${w.count * BLOCK}`).join(', '),
  );
  return r;
}

/** Wait until the primary reports its secondary protected, or the victim died (at most `ms`). */
async function protectedOrDead(ctx: PointContext, r: ResyncRun, ms: number): Promise<number | null> {
  const start = performance.now();
  const victim = ctx.victim!;
  while (performance.now() - start < ms && !isDead(victim) && !isDead(r.primary)) {
    const st = await controlCall<{ peerState: string; link: { state: string } }>(
      r.primary.control,
      'GET',
      '/status',
    ).catch(() => null);
    if (st?.peerState === 'protected' && st.link.state === 'connected') return performance.now() - start;
    await new Promise((res) => setTimeout(res, 25));
  }
  return null;
}

/**
 * POST /reprotect {peer} on the primary starts the resync; a random plan
 * kills the victim somewhere in a typical resync's duration. When the primary
 * is the victim, the PVM writes meanwhile: 2-4 writes, the first two into cold
 * extents (7, then 6), so the activity log syncs for them.
 */
async function resyncWorkload(ctx: PointContext, r: ResyncRun, plan: CrashPlan): Promise<void> {
  const started = performance.now();
  const asked = await controlCall(r.primary.control, 'POST', '/reprotect', {
    peer: `127.0.0.1:${r.secondary.info.replicationPort}`,
  }).catch((err: Error) => err);
  if (asked instanceof Error) {
    if (ctx.victim === r.primary && (await diesWithin(r.primary, 2000))) return; // its named point fired
    throw asked;
  }
  if (plan.kind === 'random') {
    const typical = typicalResyncMs();
    const ms = Math.round(plan.at * 1.25 * typical) + plan.jitterMs;
    ctx.killVictimAfter(ms, `${ms} ms after the reprotect (a resync takes about ${Math.round(typical)} ms)`);
  }
  const waiting = protectedOrDead(ctx, r, 20_000);
  if (ctx.victim === r.primary) {
    const client = await NbdClient.connect({ port: r.primary.nbdPort, exportName: 'disk0' }).catch(
      async (err: Error) => {
        // Killed at its random moment before the PVM got connected.
        if (!(await diesWithin(r.primary, 2000))) throw err;
        return null;
      },
    );
    if (!client) return void (await waiting);
    r.client = client;
    const n = ctx.rng.int(2, 4);
    for (let i = 0; i < n && !isDead(r.primary); i++) {
      await new Promise((res) => setTimeout(res, ctx.rng.int(0, 30)));
      const count = ctx.rng.int(1, 16);
      const block =
        i < 2
          ? ((7 - i) * EXTENT) / BLOCK + ctx.rng.int(0, EXTENT / BLOCK - count)
          : ctx.rng.int(0, r.size / BLOCK - count);
      r.pvmWrites.sent++;
      const op: BlockOp = { kind: 'w', block, count, data: ctx.rng.bytes(count * BLOCK) };
      if (!(await sendBatch(client, [op], r))) break;
      r.pvmWrites.acked++;
    }
  }
  const synced = await waiting;
  if (synced !== null) {
    r.synced = Math.round(performance.now() - started);
    noteResyncMs(r.synced);
  }
}

/** Note how far the resync got, from the primary's status (if it is alive). */
async function noteResync(ctx: PointContext, r: ResyncRun): Promise<void> {
  r.client?.destroy();
  r.client = null;
  const st = isDead(r.primary)
    ? null
    : await controlCall<{
        peerState: string;
        resync: { state: string; sentBytes: number; checkpoints: number } | null;
      }>(r.primary.control, 'GET', '/status').catch(() => null);
  ctx.notes.push(
    `resync: ${r.synced !== null ? `completed in ${r.synced} ms` : 'not completed'} before the crash; ` +
      `${r.pvmWrites.acked} of ${r.pvmWrites.sent} PVM writes acknowledged` +
      (st
        ? `; the primary: ${st.peerState}, ` +
          (st.resync
            ? `resync ${st.resync.state} (${st.resync.sentBytes} bytes sent, ${st.resync.checkpoints} checkpoints)`
            : 'no resync started')
        : ''),
  );
}

/**
 * Re-run the resync into `secondary` (POST /reprotect {peer} on the primary,
 * wait for 'protected'), write a little now and then, run one checkpoint,
 * and compare the two exports by hash (and the primary's with what was
 * acknowledged).
 */
async function resyncAgainAndCompare(ctx: PointContext, r: ResyncRun, secondary: NodeProc): Promise<void> {
  const t0 = performance.now();
  await controlCall(r.primary.control, 'POST', '/reprotect', {
    peer: `127.0.0.1:${secondary.info.replicationPort}`,
  });
  await waitLinkUp(r.primary, 30_000);
  const ms = Math.round(performance.now() - t0);
  noteResyncMs(ms);
  const client = await NbdClient.connect({ port: r.primary.nbdPort, exportName: 'disk0' });
  try {
    if (ctx.rng.bool() && !(await sendBatch(client, planBatch(ctx.rng, r.size / BLOCK), r)))
      ctx.problems.push('a write failed after the resync');
    const ck = await controlCall<{ epoch: number }>(r.primary.control, 'POST', '/checkpoint', {
      timeoutMs: 15_000,
    });
    r.last = ck.epoch;
    checkPrimaryDisk(ctx, fs.readFileSync(path.join(r.dir, 'pvm.img')), r, "the primary's disk");
  } finally {
    client.destroy();
  }
  const [hp, hs] = await Promise.all([hashExport(r.primary.nbdPort), hashExport(secondary.nbdPort)]);
  if (hp !== hs)
    ctx.problems.push(
      `after the resync ran again and checkpoint ${r.last}, the exports differ (primary ${hp}, secondary ${hs})`,
    );
  ctx.notes.push(
    `the resync ran again: protected after ${ms} ms, checkpoint ${r.last}, exports equal: ${hp === hs}`,
  );
}

/**
 * (a) The secondary killed during a full resync into it: at its rebase
 * record, after a partial commit, between a journal write and its fdatasync,
 * in the apply of a resync epoch, or at a random moment. After recover its
 * image is the blank disk (no partial commit yet), the primary's disk (the
 * 'done' commit made it), or — part-way, as commits.journal says — a mix in
 * which every 4 KiB block is either. Restarted, it reports the same; while
 * part-way, `colo-blk failover` refuses. The resync is run again, and after
 * one checkpoint the two exports are equal.
 */
function resyncSecondaryScenario(
  point: (typeof RESYNC_SECONDARY_POINTS)[number] | 'random',
): Scenario<ResyncRun> {
  return {
    name: `resync-secondary@${point}`,
    victim: 'secondary',
    about:
      point === 'random'
        ? 'a new secondary killed at a random moment of the full resync into it'
        : `a new secondary killed at ${point} during the full resync into it`,
    crash: (rng) =>
      point === 'random'
        ? randomPlan(rng, 10)
        : {
            kind: 'named',
            point,
            skip:
              point === 'secondary-after-rebase'
                ? 0
                : point === 'secondary-after-partial-sync-commit'
                  ? rng.int(0, 2)
                  : point === 'journal-before-fdatasync'
                    ? rng.int(0, 6)
                    : rng.int(0, 2),
          },
    planNote: (plan) =>
      `${(plan.at * 125).toFixed(0)}% of a typical resync after the reprotect + ${plan.jitterMs} ms`,
    setup: (ctx, plan) => setupResync(ctx, plan, 'secondary'),
    workload: resyncWorkload,
    nudge: async (_ctx, r) => {
      await controlCall(r.secondary.control, 'POST', '/drain-apply', undefined, 5000);
    },
    afterCrash: noteResync,
    target: (r) => ({ state: path.join(r.dir, 'svm-state'), image: path.join(r.dir, 'svm.img') }),
    allowedImages: (r) => ({
      model: r.model,
      epochs: [],
      allowed:
        "the blank disk, the primary's disk, or (part-way through the resync) a block-wise mix of both",
      judge: (image) => {
        const m = resyncMarks(path.join(r.dir, 'svm-state'));
        const blank = Buffer.alloc(r.size);
        if (m.syncing) {
          const zero = Buffer.alloc(BLOCK);
          let bad = 0;
          let first = -1;
          for (let b = 0; b < r.size / BLOCK; b++) {
            const have = image.subarray(b * BLOCK, (b + 1) * BLOCK);
            if (have.equals(zero) || have.equals(r.initial.subarray(b * BLOCK, (b + 1) * BLOCK))) continue;
            bad++;
            if (first < 0) first = b;
          }
          return bad
            ? [
                `part-way through the resync (${m.partial} partial commits), ${bad} blocks are neither blank nor the primary's, first at ${first * BLOCK}`,
              ]
            : [];
        }
        if (m.done)
          return image.equals(r.initial)
            ? []
            : [
                `the resync was committed 'done', but the image is not the primary's disk: ${describeDiff(image, r.initial)}`,
              ];
        return image.equals(blank)
          ? []
          : [
              `no resync commit happened (rebase: ${m.rebased}), but the image is not blank: ${describeDiff(image, blank)}`,
            ];
      },
    }),
    check: async (ctx, r) => {
      const m = resyncMarks(path.join(r.dir, 'svm-state'));
      const again = await ctx.startNode('secondary', secondaryArgs(r.dir, r.size), RESYNC_ENV);
      const st = await controlCall<{ syncing: unknown; consistent: boolean }>(
        again.control,
        'GET',
        '/status',
      );
      ctx.notes.push(
        `commits.journal: rebase ${m.rebased}, ${m.partial} partial commits, done ${m.done}; restarted: syncing ${JSON.stringify(st.syncing)}`,
      );
      if (Boolean(st.syncing) !== m.syncing)
        ctx.problems.push(
          `restarted, the secondary says syncing ${JSON.stringify(st.syncing)}, but its commits.journal says ${m.syncing ? 'part-way' : 'not part-way'}`,
        );
      // The journal is the truth: whatever the node says, a part-way node must not be promoted.
      if (st.syncing || m.syncing)
        await expectFailoverRefused(ctx, again, 'restarted mid-resync', path.join(r.dir, 'svm-state'));
      if (ctx.problems.length) return;
      await resyncAgainAndCompare(ctx, r, again);
    },
  };
}

/**
 * (b) The primary killed during the full resync it runs into a new secondary
 * (with the PVM writing meanwhile): at a resync send, before the activity
 * log's sync, after a local write not yet logged, or at a random moment.
 * While the secondary is part-way, `colo-blk failover` refuses; the
 * restarted primary resumes the resync, and after one checkpoint the exports
 * are equal; the secondary is then killed during one more checkpoint, and its
 * recovered image is exactly the primary's disk at one of the two.
 */
function resyncPrimaryScenario(
  point: (typeof RESYNC_PRIMARY_POINTS)[number] | 'random',
): Scenario<ResyncRun> {
  return {
    name: `resync-primary@${point}`,
    victim: 'primary',
    about:
      point === 'random'
        ? 'the primary killed at a random moment of a full resync into a new secondary'
        : `the primary killed at ${point} during a full resync into a new secondary`,
    crash: (rng) =>
      point === 'random'
        ? randomPlan(rng, 10)
        : { kind: 'named', point, skip: point === 'primary-mid-resync' ? rng.int(0, 12) : rng.int(0, 1) },
    planNote: (plan) =>
      `${(plan.at * 125).toFixed(0)}% of a typical resync after the reprotect + ${plan.jitterMs} ms`,
    setup: (ctx, plan) => setupResync(ctx, plan, 'primary'),
    workload: resyncWorkload,
    afterCrash: async (ctx, r) => {
      await noteResync(ctx, r);
      if (isDead(r.secondary)) {
        ctx.problems.push(`the secondary died: ${r.secondary.stderr().trim().split('\n').pop()}`);
        return;
      }
      checkPrimaryDisk(ctx, fs.readFileSync(path.join(r.dir, 'pvm.img')), r, 'pvm.img after the crash');
      const st = await controlCall<{ syncing: unknown }>(r.secondary.control, 'GET', '/status');
      // (The operator's command is checked in resync-secondary; here the control API it calls.)
      if (st.syncing) {
        const f = await controlCall(r.secondary.control, 'POST', '/failover').catch((err: Error) => err);
        if (!(f instanceof Error) || !/part-way through a resync/.test(f.message))
          ctx.problems.push(
            `the secondary is part-way through a resync, but POST /failover answered ${f instanceof Error ? f.message : JSON.stringify(f)}`,
          );
        else
          ctx.notes.push('its primary dead mid-resync: POST /failover refused (part-way through a resync)');
      }
      if (ctx.rng.bool(0.3)) {
        const rec = await runRecover(ctx, path.join(r.dir, 'pvm-state'));
        if (rec.code !== 0 || !rec.report?.ok)
          ctx.problems.push(
            `recover of the primary's state failed (${rec.code ?? rec.signal}): ${rec.stderr.trim()}`,
          );
      }
      await restartPrimaryAndConverge(ctx, r, Number(r.secondary.info.replicationPort), NO_LONE, RESYNC_ENV);
      if (r.last && ctx.problems.length === 0) {
        const [hp, hs] = await Promise.all([hashExport(r.primary.nbdPort), hashExport(r.secondary.nbdPort)]);
        if (hp !== hs)
          ctx.problems.push(
            `after checkpoint ${r.last} the two exports differ (primary ${hp}, secondary ${hs})`,
          );
      }
      await killSecondaryInCheckpoint(ctx, r);
    },
    target: (r) => ({ state: path.join(r.dir, 'svm-state'), image: path.join(r.dir, 'svm.img') }),
    allowedImages: (r) => ({ model: r.model, epochs: r.next ? [r.last, r.next] : [r.last] }),
  };
}

// -----------------------------------------------------------------------------

export const SCENARIOS: Scenario[] = [
  ...SECONDARY_POINTS.map((p) => secondaryScenario(p)),
  secondaryScenario('random'),
  ...PROMOTE_POINTS.map((p) => promotionScenario(p)),
  promotionScenario('random'),
  // A commit racing the promotion: refused once the promotion has started.
  ...PROMOTE_POINTS.map((p) => promotionScenario(p, true)),
  promotionScenario('random', true),
  primaryScenario,
  // A restarted primary: a new session, and an incremental resync of what it may have written.
  primaryRestartScenario('random'),
  primaryRestartScenario('primary-after-local-write'),
  ...RESYNC_SECONDARY_POINTS.map((p) => resyncSecondaryScenario(p)),
  resyncSecondaryScenario('random'),
  ...RESYNC_PRIMARY_POINTS.map((p) => resyncPrimaryScenario(p)),
  resyncPrimaryScenario('random'),
  ...PROMOTED_POINTS.map((p) => promotedScenario(p)),
  promotedScenario('random'),
] as Scenario[];

/**
 * Turns of the default campaign, in two rounds (a 200-point run goes through
 * about one and a half): in each, every named point of the secondary twice,
 * random moments three times, the real primary three times, a promotion;
 * then, split between the two rounds, the other promotion points, the
 * promotion with a racing commit, the restarted primary and the resync
 * points of either side (about twice as costly per crash point: more
 * processes), so a default run has every scenario at least once. Recovery-of-recovery crashes come on
 * top, inside every point.
 */
const OLD_ROUND = (promotion: string) => [
  ...SECONDARY_POINTS.map((p) => `secondary@${p}`),
  'secondary@random',
  'primary@random',
  'secondary@random',
  promotion,
  'primary@random',
  ...SECONDARY_POINTS.map((p) => `secondary@${p}`),
  'secondary@random',
  'primary@random',
];

/** Put `extra` turns evenly between the turns of `round`. */
function interleave(round: string[], extra: string[]): string[] {
  const out: string[] = [];
  const every = round.length / extra.length;
  let next = 0;
  round.forEach((t, i) => {
    out.push(t);
    while (next < extra.length && i + 1 >= (next + 1) * every - every / 2) out.push(extra[next++]);
  });
  return [...out, ...extra.slice(next)];
}

export const DEFAULT_DECK: string[] = [
  ...interleave(OLD_ROUND('promotion@secondary-after-promote-record'), [
    'resync-secondary@secondary-after-rebase',
    'resync-primary@primary-mid-resync',
    'promotion-race@secondary-after-promote-record',
    'resync-secondary@secondary-after-partial-sync-commit',
    'primary-restart@random',
    'resync-primary@activity-before-sync',
    'resync-secondary@journal-before-fdatasync',
    'promotion@secondary-before-promote-record',
    'promoted@promoted-before-fold-record',
    'promoted@activity-before-sync',
  ]),
  ...interleave(OLD_ROUND('promotion@random'), [
    'resync-primary@primary-after-local-write',
    'resync-secondary@secondary-mid-apply',
    'promotion-race@random',
    'resync-primary@random',
    'primary-restart@primary-after-local-write',
    'resync-secondary@random',
    'promotion-race@secondary-before-promote-record',
    'promoted@secondary-after-fold-record',
    'promoted@secondary-mid-apply',
    'promoted@random',
  ]),
];
