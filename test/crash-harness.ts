/**
 * Crash-point fault injection: the machinery that runs ONE crash point.
 *
 * A crash point is one SIGKILL of a real process (a secondary, a primary or
 * `colo-blk recover` itself) at a named point (COLO_BLK_CRASH_AT /
 * COLO_BLK_CRASH_SKIP, src/crash.ts) or at a seeded random moment, followed by
 * `colo-blk recover --state DIR --json` (sometimes itself killed and run again:
 * recovery of recovery) and a check that the recovered secondary image is
 * EXACTLY one allowed checkpoint image: sha256 equal to the model image of
 * checkpoint K, the last commit acknowledged to the workload, or of a later
 * checkpoint whose commit was sent but whose answer never came.
 *
 * Pieces:
 * - `Rng`, `mixSeed`: every choice of a point comes from its 32-bit seed, so a
 *   failure names (scenario, seed) and `--replay scenario:seed` runs it again
 *   (the same workload and the same crash choice; the timing of a random
 *   moment is the machine's).
 * - `CheckpointModel`: the expected image of every checkpoint, computed in the
 *   test by applying the same mutations to a Buffer.
 * - `PrimaryDriver` / `driveEpochs`: the test *is* the primary, with the real
 *   primary's log and link (PrimaryLog, PrimaryLink) in-process against a real
 *   secondary process, so it knows exactly which commits were sent and which
 *   were answered. Its hello carries a one-generation history that the
 *   secondary's history.json already holds (`driverHistory`, `writeHistory`),
 *   so the secondary decides 'none' (no resync) and takes epochs at once.
 * - `Scenario`: {name, victim, crash(), setup(), workload(), allowedImages(),
 *   check()}; `runPoint` runs one, `runCampaign` runs many concurrently until
 *   a number of crash points is reached. New scenarios (re-protection after a
 *   failover, say) are new entries in the list of test/crash-scenarios.ts.
 * - A resync target's image matches no checkpoint while its commits.journal
 *   says it is part-way through a resync (`resyncMarks`): its scenario then
 *   judges the image itself (`AllowedImages.judge`: every block old or new).
 *
 * Every process is started with track() (killed by PID in cleanup) and every
 * point works in its own directory under /dev/shm, removed afterwards.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { setImmediate as yieldTurn } from 'node:timers/promises';
import { PrimaryLink, type PeerHello } from '../src/checkpoint/link/primary-link.js';
import { PrimaryLog } from '../src/checkpoint/primary/log.js';
import { scanJournal } from '../src/checkpoint/format/journal.js';
import type { Generation } from '../src/failover/history.js';
import { CLI, prng, randomBytes, track } from './helpers.js';
import { startNode, type NodeProc } from './replication-helpers.js';
import { nodeStorage } from '../src/sys/storage.js';

// -----------------------------------------------------------------------------
// Seeds

/** A small seeded generator (xorshift32, test/helpers.ts) with the usual helpers. */
export class Rng {
  private readonly next: () => number;

  constructor(readonly seed: number) {
    this.next = prng(seed);
  }

  u32(): number {
    return this.next();
  }

  float(): number {
    return this.next() / 2 ** 32;
  }

  /** An integer in [lo, hi], both included. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.float() * (hi - lo + 1));
  }

  bool(p = 0.5): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(0, items.length - 1)];
  }

  bytes(n: number): Buffer {
    return randomBytes(n, this.next);
  }
}

/** The seed of task `i` of a campaign with base seed `base` (a 32-bit hash of both). */
export function mixSeed(base: number, i: number): number {
  let h = (base ^ Math.imul(i + 1, 0x9e3779b9)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

export const hex = (n: number) => `0x${(n >>> 0).toString(16).padStart(8, '0')}`;

export function parseSeed(s: string): number {
  const n = Number(s.trim());
  if (!Number.isSafeInteger(n) || n < 0 || n > 0xffffffff) throw new Error(`not a 32-bit seed: '${s}'`);
  return n >>> 0;
}

// -----------------------------------------------------------------------------
// The model: what each checkpoint image must be

export type Mutation =
  | { t: 'w'; o: number; data: Buffer }
  | { t: 'z'; o: number; l: number; h: boolean }
  | { t: 't'; o: number; l: number };

export function applyMutation(img: Buffer, m: Mutation): void {
  if (m.t === 'w') m.data.copy(img, m.o);
  else img.fill(0, m.o, m.o + m.l);
}

export const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/**
 * `count` random mutations over a disk of `size` bytes: mostly writes, some
 * write-zeroes (with and without holes) and trims, some 4 KiB aligned, some at
 * any byte, overlapping freely. The last one is always a write, so every
 * epoch leaves data to apply (secondary-mid-apply fires at least once per
 * applied epoch).
 */
export function planMutations(rng: Rng, size: number, count: number, maxWrite = 96 * 1024): Mutation[] {
  const out: Mutation[] = [];
  for (let i = 0; i < count; i++) {
    const kind = i === count - 1 ? 'w' : rng.pick(['w', 'w', 'w', 'w', 'z', 't'] as const);
    const aligned = rng.bool(0.6);
    const max = kind === 'w' ? maxWrite : 2 * maxWrite;
    const len = aligned ? 4096 * rng.int(1, Math.max(1, max >> 12)) : rng.int(1, max);
    const o = aligned ? 4096 * rng.int(0, Math.floor((size - len) / 4096)) : rng.int(0, size - len);
    if (kind === 'w') out.push({ t: 'w', o, data: rng.bytes(len) });
    else if (kind === 'z') out.push({ t: 'z', o, l: len, h: rng.bool() });
    else out.push({ t: 't', o, l: len });
  }
  return out;
}

/** The image of every checkpoint: `images[e]` is the disk at cut e (`images[0]` is blank). */
export class CheckpointModel {
  readonly images: Buffer[];
  readonly hashes: string[];

  constructor(readonly size: number) {
    this.images = [Buffer.alloc(size)];
    this.hashes = [sha256(this.images[0])];
  }

  get last(): number {
    return this.images.length - 1;
  }

  /** Add the next checkpoint: the previous image with `muts` applied. Returns its epoch. */
  addEpoch(muts: Mutation[]): number {
    const img = Buffer.from(this.images[this.last]);
    for (const m of muts) applyMutation(img, m);
    return this.addImage(img);
  }

  addImage(img: Buffer): number {
    this.images.push(img);
    this.hashes.push(sha256(img));
    return this.last;
  }

  /** Set the image of checkpoint `epoch`; epochs skipped before it (never committed) repeat the last image. */
  setImage(epoch: number, img: Buffer): void {
    while (this.last < epoch - 1) this.addImage(this.images[this.last]);
    if (this.last >= epoch) {
      this.images[epoch] = img;
      this.hashes[epoch] = sha256(img);
    } else this.addImage(img);
  }

  /** Checkpoints whose image has this hash. */
  matching(hash: string): number[] {
    return this.hashes.flatMap((h, e) => (h === hash ? [e] : []));
  }
}

/** "N bytes differ, first at offset X" (for failure messages). */
export function describeDiff(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `sizes differ (${a.length} vs ${b.length})`;
  let n = 0;
  let first = -1;
  let last = -1;
  for (let i = 0; i < a.length; i++)
    if (a[i] !== b[i]) {
      n++;
      if (first < 0) first = i;
      last = i;
    }
  return n === 0 ? 'identical' : `${n} bytes differ in [${first}, ${last}]`;
}

/**
 * Check a recovered image against the allowed checkpoints. `committed` is what
 * recover reported as the node's last commit: the image must be exactly that
 * checkpoint's, and that checkpoint must be one of `allowed`.
 */
export function checkImage(
  image: Buffer,
  model: CheckpointModel,
  allowed: number[],
  committed: number | undefined,
): string[] {
  const problems: string[] = [];
  const hash = sha256(image);
  const matches = model.matching(hash);
  const what = matches.length
    ? `the image equals checkpoint ${matches.join(' = ')}`
    : `the image equals no checkpoint image (${allowed
        .filter((e) => e <= model.last)
        .map((e) => `vs checkpoint ${e}: ${describeDiff(image, model.images[e])}`)
        .join('; ')})`;
  if (image.length !== model.size) problems.push(`the image is ${image.length} bytes, not ${model.size}`);
  if (committed === undefined) problems.push(`recover reported no committed epoch; ${what}`);
  else if (!allowed.includes(committed))
    problems.push(
      `recover reports checkpoint ${committed} committed, but only ${allowed.join(' or ')} may be; ${what}`,
    );
  else if (committed > model.last || model.hashes[committed] !== hash)
    problems.push(`recover reports checkpoint ${committed} committed, but ${what}`);
  return problems;
}

// -----------------------------------------------------------------------------
// The test as the primary: a replication-protocol driver

/** An answer the secondary gave instead of the one wanted (its error code and message). */
export class DriverError extends Error {
  constructor(
    message: string,
    readonly code?: string,
  ) {
    super(message);
  }
}

/**
 * The test as a primary, with the real primary's protocol: an epoch log
 * (PrimaryLog, in a directory of the point) and the replication link
 * (PrimaryLink) over TCP to a secondary process. The test appends exactly the
 * records it planned and runs the checkpoint phases itself, so it knows which
 * commits were sent and which were answered. The link never reconnects once
 * it is lost (the point is over).
 */
export class PrimaryDriver {
  closed = false;

  private constructor(
    readonly plog: PrimaryLog,
    readonly link: PrimaryLink,
  ) {
    link.on('down', () => this.destroy());
  }

  /**
   * Connect as a primary of generation history `history` (the secondary
   * compares it with its own history.json: failover/history.ts decide()).
   * Resolves once the secondary accepted with decision 'none'; rejects with
   * its refusal or any other decision.
   */
  static connect(
    port: number,
    opts: { size: number; firstEpoch: number; logDir: string; history: Generation[] },
  ): Promise<PrimaryDriver> {
    const plog = new PrimaryLog(nodeStorage, opts.logDir, opts.firstEpoch, 1 << 30);
    const link = new PrimaryLink(plog, {
      host: '127.0.0.1',
      port,
      size: opts.size,
      heartbeat: { intervalMs: 150, timeoutMs: 2000 },
      handshake: () => ({ history: opts.history, needsResync: false }),
    });
    const driver = new PrimaryDriver(plog, link);
    return new Promise((resolve, reject) => {
      const refused = (why: string) => {
        driver.destroy();
        reject(new DriverError(`the secondary refused the hello: ${why}`));
      };
      link.once('deposed', refused);
      link.once('refused', refused);
      link.once('down', (why: string | null) => reject(new DriverError(`the link went down: ${why}`)));
      link.once('peer', (peer: PeerHello) => {
        if (peer.decision.action === 'none') return resolve(driver);
        driver.destroy();
        reject(
          new DriverError(
            `the secondary decided '${peer.decision.action}' at the hello (expected 'none'): ${peer.decision.reason}`,
          ),
        );
      });
      link.start();
    });
  }

  /** Ask for the commit of epoch N (the frame is written now); resolves with the answer. */
  commit(epoch: number): Promise<void> {
    return this.link.commit(epoch, 30_000).then(() => undefined);
  }

  destroy(): void {
    if (this.closed) return;
    this.closed = true;
    this.link.close();
    this.plog.close();
  }
}

/** The secondary's answer as a DriverError (a lost connection is not an answer). */
function answerOf(err: unknown): DriverError | null {
  const e = err as { code?: string; message?: string };
  if (e.code === 'ECONNECT' || e.code === 'ESHUTDOWN') return null;
  return new DriverError(String(e.message), e.code);
}

/**
 * The driver's generation history: one generation, its id derived from the
 * point's seed. A secondary whose history.json holds the same single
 * generation decides 'none' at the hello (failover/history.ts decide()), so
 * the driver streams epochs at once, with no resync.
 */
export function driverHistory(seed: number): Generation[] {
  const id = (seed >>> 0).toString(16).padStart(8, '0') + 'c0de';
  return [{ n: 1, id, by: 'd0d0d0d0d0d0', base: 0, at: 0, reason: 'test' }];
}

/** Write `<stateDir>/history.json` with `generations` (before the node first starts on it). */
export function writeHistory(stateDir: string, generations: Generation[], node = 'e1e1e1e1e1e1'): void {
  fs.mkdirSync(stateDir, { recursive: true });
  fs.writeFileSync(
    path.join(stateDir, 'history.json'),
    JSON.stringify({ version: 1, node, generations }, null, 2) + '\n',
  );
}

/** How far the driver takes an epoch. */
export type EpochGoal = 'records' | 'seal' | 'durable' | 'commit';

export interface DriverEpoch {
  epoch: number;
  muts: Mutation[];
  goal?: EpochGoal;
}

/** What the driver knows; read it when the secondary has died. */
export interface DriveState {
  seq: number;
  /** Last epoch whose 'committed' answer arrived. */
  acked: number;
  /** Epochs whose commit frame was written to the socket. */
  sentCommits: number[];
  durable: number;
  /** Protocol steps so far: frames written and answers received. */
  steps: number;
  /** Error answers (unexpected in crash scenarios). */
  errors: string[];
}

export const newDriveState = (): DriveState => ({
  seq: 0,
  acked: 0,
  sentCommits: [],
  durable: 0,
  steps: 0,
  errors: [],
});

/** Checkpoints a recovered secondary may hold given what the driver knew: K, or any later commit it sent. */
export function allowedFromDrive(st: DriveState): number[] {
  return [st.acked, ...st.sentCommits.filter((e) => e > st.acked)];
}

/**
 * Stream epochs to the secondary the way a primary does: records, then the
 * seal, wait for 'durable', send the commit, wait for 'committed'. One
 * checkpoint at a time; `pipelined` streams the next epoch's records while the
 * checkpoint of the previous one runs (as PVM writes do). Returns when done or
 * when the connection died. `onStep` is called after every record or frame
 * written and every answer received (random kills hook in there).
 */
export async function driveEpochs(
  driver: PrimaryDriver,
  epochs: DriverEpoch[],
  st: DriveState,
  opts: { pipelined: boolean; onStep?: (step: number) => void },
): Promise<'done' | 'closed'> {
  const step = () => opts.onStep?.(++st.steps);
  const { plog, link } = driver;
  let checkpoint: Promise<void> = Promise.resolve();
  let stopped = false;
  const fail = (err: unknown) => {
    stopped = true;
    const answer = answerOf(err);
    if (answer) st.errors.push(answer.message);
  };
  for (const ep of epochs) {
    const e = ep.epoch;
    if (plog.current !== e)
      throw new Error(`the plan's epoch ${e} is not the log's open epoch ${plog.current}`);
    const goal = ep.goal ?? 'commit';
    let n = 0;
    for (const m of ep.muts) {
      if (driver.closed) return 'closed';
      if (m.t === 'w') plog.append({ t: 'w', o: m.o }, m.data);
      else if (m.t === 'z') plog.append({ t: 'z', o: m.o, l: m.l, h: m.h });
      else plog.append({ t: 't', o: m.o, l: m.l });
      st.seq = plog.seq;
      step();
      if (++n % 3 === 0) await yieldTurn(); // let answers and the other side's work interleave
    }
    if (goal === 'records') continue;
    await checkpoint;
    if (stopped || driver.closed) return 'closed';
    plog.seal();
    step();
    const run = async () => {
      await link.waitDurable(e, 30_000);
      st.durable = Math.max(st.durable, e);
      step();
      if (goal !== 'commit') return;
      if (driver.closed) throw new DriverError('the replication connection closed');
      const answered = driver.commit(e);
      st.sentCommits.push(e);
      step();
      await answered;
      st.acked = Math.max(st.acked, e);
      step();
    };
    checkpoint = goal === 'seal' ? Promise.resolve() : run().catch(fail);
    if (!opts.pipelined) await checkpoint;
  }
  await checkpoint;
  return stopped || driver.closed ? 'closed' : 'done';
}

// -----------------------------------------------------------------------------
// Processes

export type Victim = 'secondary' | 'primary' | 'recover';

/** The crash chosen for the victim of a point. */
export type CrashPlan =
  | { kind: 'named'; point: string; skip: number }
  /** A random moment: `at` in [0, 1) is where in its workload the scenario arms the kill, then `jitterMs`. */
  | { kind: 'random'; at: number; jitterMs: number };

/** A random moment: where in the workload, plus a few milliseconds. */
export const randomPlan = (rng: Rng, maxJitterMs = 6): CrashPlan => ({
  kind: 'random',
  at: rng.float(),
  jitterMs: rng.int(0, maxJitterMs),
});

export interface Crash {
  victim: Victim;
  kind: 'named' | 'random';
  /** The named point, or 'random'. */
  point: string;
  /** skip n, or when the random kill landed. */
  detail: string;
}

export const crashLabel = (c: Crash) =>
  `${c.victim} killed at ${c.kind === 'named' ? c.point : 'a random moment'} (${c.detail})`;

/** Environment selecting a named crash point (or none: an inherited COLO_BLK_CRASH_AT must never leak). */
export function crashEnv(plan?: CrashPlan): NodeJS.ProcessEnv {
  if (plan?.kind === 'named')
    return { COLO_BLK_CRASH_AT: plan.point, COLO_BLK_CRASH_SKIP: String(plan.skip) };
  return { COLO_BLK_CRASH_AT: '', COLO_BLK_CRASH_SKIP: '' };
}

const alive = (c: ChildProcess) => c.exitCode === null && c.signalCode === null;

export interface RecoverRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
  /** Parsed --json report (when the run finished). */
  report?: RecoverReport;
  /** Set when this harness killed it at its random moment. */
  killedAfterMs?: number;
  /** Set when it ran past its timeout and was killed for that. */
  hung?: boolean;
}

export interface RecoverReport {
  ok: boolean;
  committedEpoch?: number;
  applied: number[];
  actions: string[];
  pending: { epoch: number; state: string }[];
  error?: { code: string; message: string };
}

/** Run `colo-blk recover --state DIR --json`; optionally SIGKILL it after `killAfterMs`. */
export function runRecover(
  ctx: PointContext,
  stateDir: string,
  opts: { env?: NodeJS.ProcessEnv; killAfterMs?: number; timeoutMs?: number } = {},
): Promise<RecoverRun> {
  const started = performance.now();
  const child = ctx.own(
    spawn(process.execPath, [CLI, 'recover', '--state', stateDir, '--json'], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...crashEnv(), ...opts.env },
    }),
  );
  let stdout = '';
  let stderr = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  let killedAfterMs: number | undefined;
  const killer =
    opts.killAfterMs === undefined
      ? null
      : setTimeout(() => {
          if (!alive(child)) return;
          killedAfterMs = Math.round(performance.now() - started);
          child.kill('SIGKILL');
        }, opts.killAfterMs);
  let hung = false;
  const watchdog = setTimeout(() => {
    if (!alive(child)) return;
    hung = true;
    child.kill('SIGKILL');
  }, opts.timeoutMs ?? 30_000);
  return new Promise((resolve) => {
    child.once('close', (code, signal) => {
      if (killer) clearTimeout(killer);
      clearTimeout(watchdog);
      const ms = performance.now() - started;
      let report: RecoverReport | undefined;
      const line = stdout.split('\n').find((l) => l.startsWith('{'));
      if (line && code !== null)
        try {
          report = JSON.parse(line) as RecoverReport;
        } catch {
          // reported by the caller as a bad report
        }
      resolve({ code, signal, stdout, stderr, ms, report, killedAfterMs, hung });
    });
  });
}

/** Wall times of complete recover runs, to aim random kills of recover at its working part. */
const recoverTimes: number[] = [];
function typicalRecoverMs(): number {
  if (recoverTimes.length === 0) return 300;
  const s = [...recoverTimes].sort((a, b) => a - b);
  return s[s.length >> 1];
}

// -----------------------------------------------------------------------------
// One point

export interface PointContext {
  scenario: string;
  seed: number;
  rng: Rng;
  /** A separate stream for the recovery phase (its choices depend on the state the crash left). */
  recoverRng: Rng;
  /** This point's directory (removed afterwards). */
  dir: string;
  crashes: Crash[];
  problems: string[];
  /** Facts worth printing with a failure (what the workload knew, what recover said). */
  notes: string[];
  /** The victim process, set by the scenario's setup. */
  victim: NodeProc | null;
  /** Register a child process of this point (tracked by PID, killed in cleanup). */
  own: (c: ChildProcess) => ChildProcess;
  /** Start a node (secondary or primary) owned by this point. */
  startNode: (role: 'primary' | 'secondary', args: string[], env?: NodeJS.ProcessEnv) => Promise<NodeProc>;
  /** SIGKILL the victim after `ms` (a random moment; the first call wins); recorded when it lands. */
  killVictimAfter: (ms: number, detail: string) => void;
}

export interface AllowedImages {
  model: CheckpointModel;
  /** Checkpoints the recovered image may be. */
  epochs: number[];
  /**
   * Instead of the checkpoint comparison: the problems with the recovered
   * image (a resync target, whose image may be part old, part new while its
   * commits.journal says it is part-way through a resync). `allowed` is then
   * a description for the notes.
   */
  judge?: (image: Buffer, report: RecoverReport) => string[];
  allowed?: string;
}

/** What a secondary's commits.journal says about resynchronisation (SecondaryStore's reading of it). */
export interface ResyncMarks {
  /** A resync started here (a 'rebase' record). */
  rebased: boolean;
  /** Commits with a 'partial' sync mark. */
  partial: number;
  /** A commit with a 'done' sync mark. */
  done: boolean;
  /** Part-way through a resync: a 'rebase' or 'partial' record not followed by a 'done' commit (never promotable). */
  syncing: boolean;
}

export function resyncMarks(stateDir: string): ResyncMarks {
  const m: ResyncMarks = { rebased: false, partial: 0, done: false, syncing: false };
  const file = path.join(stateDir, 'commits.journal');
  if (!fs.existsSync(file)) return m;
  scanJournal<{ t: string; sync?: { state: string } }>(nodeStorage, file, (r) => {
    if (r.meta.t === 'rebase') {
      // From the rebase on, the epoch numbers name the primary's checkpoints, which this disk
      // holds only once the resync's 'done' commit lands.
      m.rebased = true;
      m.syncing = true;
    }
    if (r.meta.t !== 'commit' || !r.meta.sync) return;
    if (r.meta.sync.state === 'partial') {
      m.partial++;
      m.syncing = true;
    } else if (r.meta.sync.state === 'done') {
      m.done = true;
      m.syncing = false;
    }
  });
  return m;
}

/**
 * Wall times of complete resyncs (reprotect to 'protected'), to aim random
 * kills at a resync in progress; shared by the resync scenarios.
 */
const resyncTimes: number[] = [];
export function noteResyncMs(ms: number): void {
  resyncTimes.push(ms);
  if (resyncTimes.length > 50) resyncTimes.shift();
}
export function typicalResyncMs(): number {
  if (resyncTimes.length === 0) return 400;
  const s = [...resyncTimes].sort((a, b) => a - b);
  return s[s.length >> 1];
}

/**
 * A crash scenario: who is killed, how (named points it may pick, or random
 * moments), how to set it up, what workload runs, and which images are
 * allowed afterwards. `runPoint` does the rest: wait for the victim's death,
 * recover (perhaps killing recover too), compare the image, run `check`.
 */
export interface Scenario<S = unknown> {
  name: string;
  victim: 'secondary' | 'primary';
  /** One line for the summary. */
  about: string;
  /** Choose this point's crash from its seed. */
  crash(rng: Rng): CrashPlan;
  /** Where a random plan kills, in words (default: "x% into the workload + j ms"). */
  planNote?(plan: CrashPlan & { kind: 'random' }): string;
  /** Start the processes; the victim gets crashEnv(plan). Sets ctx.victim. */
  setup(ctx: PointContext, plan: CrashPlan): Promise<S>;
  /** Drive the workload until it is done or the victim died. Random kills are armed from here. */
  workload(ctx: PointContext, s: S, plan: CrashPlan): Promise<void>;
  /** A named point not yet reached when the workload ended: make the node get there (e.g. drain the apply). */
  nudge?(ctx: PointContext, s: S): Promise<void>;
  /** After the victim died: stop the other processes (not counted as crash points). */
  afterCrash?(ctx: PointContext, s: S): Promise<void>;
  /** The secondary state directory and image to recover and check. */
  target(s: S): { state: string; image: string };
  /** What the recovered image may be, from what the workload knew when the victim died. */
  allowedImages(s: S): AllowedImages;
  /** Checks after recovery (the primary's own image, the SVM's view after a promotion...). */
  check?(ctx: PointContext, s: S, recoveredEpoch: number): Promise<void>;
}

export interface PointResult {
  scenario: string;
  seed: number;
  crashes: Crash[];
  problems: string[];
  notes: string[];
  recoveredEpoch?: number;
  allowed?: number[];
  ms: number;
  /** Milliseconds spent in each phase. */
  phases: Record<string, number>;
}

export interface PointOptions {
  /** Root directory for point directories. */
  root: string;
  /** Keep the directory of a failed point (for debugging). */
  keepFailed?: boolean;
  timeoutMs?: number;
}

/** Wait for a child's exit, at most `ms`. */
async function exited(proc: NodeProc, ms: number): Promise<boolean> {
  if (!alive(proc.child)) return true;
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    proc.exit.then(() => true),
    new Promise<boolean>((r) => (timer = setTimeout(() => r(false), ms))),
  ]);
  clearTimeout(timer);
  return r;
}

const tail = (s: string, lines = 12) => s.trim().split('\n').slice(-lines).join('\n');

/** Run one crash point of `scenario` with `seed`. Never throws: problems are in the result. */
export async function runPoint(scenario: Scenario, seed: number, opts: PointOptions): Promise<PointResult> {
  const started = performance.now();
  const dir = path.join(opts.root, `${scenario.name.replace(/[^a-z0-9-]/gi, '_')}-${hex(seed)}`);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  const children: ChildProcess[] = [];
  let armed = false;
  const phases: Record<string, number> = {};
  let phaseStart = performance.now();
  const phase = (name: string) => {
    const now = performance.now();
    phases[name] = Math.round(now - phaseStart);
    phaseStart = now;
  };
  const ctx: PointContext = {
    scenario: scenario.name,
    seed,
    rng: new Rng(seed),
    recoverRng: new Rng(mixSeed(seed, 0x5eed)),
    dir,
    crashes: [],
    problems: [],
    notes: [],
    victim: null,
    own: (c) => {
      children.push(track(c));
      return c;
    },
    startNode: async (role, args, env = {}) => {
      const node = await startNode(role, args, { ...crashEnv(), ...env });
      children.push(node.child);
      return node;
    },
    killVictimAfter: (ms, detail) => {
      const v = ctx.victim;
      if (!v || armed) return;
      armed = true;
      setTimeout(() => {
        if (!alive(v.child)) return;
        v.child.kill('SIGKILL');
        ctx.crashes.push({ victim: scenario.victim, kind: 'random', point: 'random', detail });
      }, ms);
    },
  };
  let recoveredEpoch: number | undefined;
  let allowed: number[] | undefined;
  const body = async () => {
    const plan = scenario.crash(ctx.rng);
    ctx.notes.push(
      plan.kind === 'named'
        ? `crash plan: ${scenario.victim} at ${plan.point} (COLO_BLK_CRASH_SKIP=${plan.skip})`
        : `crash plan: ${scenario.victim} at a random moment (${
            scenario.planNote?.(plan) ??
            `${(plan.at * 100).toFixed(1)}% into the workload + ${plan.jitterMs} ms`
          })`,
    );
    const s = await scenario.setup(ctx, plan);
    phase('setup');
    const victim = ctx.victim as NodeProc | null;
    if (!victim) throw new Error('the scenario set up no victim');
    await scenario.workload(ctx, s, plan);
    // A random moment the workload did not reach (it ended early): now, at its end.
    if (plan.kind === 'random' && !armed)
      ctx.killVictimAfter(plan.jitterMs, `after the workload + ${plan.jitterMs} ms`);
    // The victim must die: by its named point, or by the random kill armed in the workload.
    if (
      !(await exited(victim, plan.kind === 'named' ? 1500 : 3000)) &&
      plan.kind === 'named' &&
      scenario.nudge
    )
      await scenario.nudge(ctx, s).catch(() => {});
    let killedAtEnd = false;
    // Generous: on a loaded machine a named point late in the workload (a fold) can take seconds to come.
    if (!(await exited(victim, 10_000))) {
      killedAtEnd = true;
      if (plan.kind === 'named')
        ctx.problems.push(
          `the named point ${plan.point} (skip ${plan.skip}) was never reached; killed at the end instead`,
        );
      victim.child.kill('SIGKILL');
      await victim.exit;
      ctx.crashes.push({
        victim: scenario.victim,
        kind: 'random',
        point: 'random',
        detail: 'at the end of the workload',
      });
    }
    const died = await victim.exit;
    phase('workload+death');
    if (plan.kind === 'named' && !killedAtEnd && died.signal === 'SIGKILL')
      ctx.crashes.push({
        victim: scenario.victim,
        kind: 'named',
        point: plan.point,
        detail: `skip ${plan.skip}`,
      });
    if (died.signal !== 'SIGKILL')
      ctx.problems.push(
        `the ${scenario.victim} exited with ${died.code ?? died.signal} instead of being killed:\n${tail(victim.stderr())}`,
      );
    await scenario.afterCrash?.(ctx, s);
    const target = scenario.target(s);
    const allowedImages = scenario.allowedImages(s);
    allowed = allowedImages.epochs;
    ctx.notes.push(
      `allowed after the crash: ${allowedImages.allowed ?? `checkpoint ${allowed.join(' or ')}`}`,
    );
    const rec = await recoverWithCrashes(ctx, target.state);
    phase('recover');
    if (!rec) return;
    recoveredEpoch = rec.committedEpoch;
    const image = fs.readFileSync(target.image);
    const bad = allowedImages.judge
      ? allowedImages.judge(image, rec)
      : checkImage(image, allowedImages.model, allowed, rec.committedEpoch);
    for (const p of bad) ctx.problems.push(`bad recovery: ${p}`);
    const unapplied = rec.pending.filter((p) => p.state === 'committed');
    if (unapplied.length)
      ctx.problems.push(
        `recover left committed epochs unapplied: ${unapplied.map((p) => p.epoch).join(', ')}`,
      );
    // Now and then: recovery is idempotent (a second run finds nothing to do, the image is unchanged).
    if (ctx.recoverRng.bool(0.1) && ctx.problems.length === 0) {
      const again = await runRecover(ctx, target.state);
      if (again.code !== 0 || !again.report?.ok)
        ctx.problems.push(`a second recover failed (${again.code ?? again.signal}): ${tail(again.stderr)}`);
      else if (again.report.applied.length || again.report.actions.length)
        ctx.problems.push(`a second recover still did something: ${again.report.actions.join('; ')}`);
      else if (sha256(fs.readFileSync(target.image)) !== sha256(image))
        ctx.problems.push('a second recover changed the image');
    }
    if (recoveredEpoch !== undefined && ctx.problems.length === 0)
      await scenario.check?.(ctx, s, recoveredEpoch);
    phase('check');
  };
  let timer: NodeJS.Timeout | undefined;
  try {
    await Promise.race([
      body(),
      new Promise<never>(
        (_, reject) =>
          (timer = setTimeout(
            () => reject(new Error(`the point took more than ${opts.timeoutMs ?? 45_000} ms`)),
            opts.timeoutMs ?? 45_000,
          )),
      ),
    ]);
  } catch (err) {
    ctx.problems.push(`harness error: ${(err as Error).stack ?? String(err)}`);
  } finally {
    clearTimeout(timer);
    for (const c of children)
      if (alive(c)) {
        c.kill('SIGKILL');
        await new Promise<void>((r) => (alive(c) ? c.once('exit', () => r()) : r()));
      }
    if (ctx.problems.length === 0 || !opts.keepFailed) fs.rmSync(dir, { recursive: true, force: true });
    else ctx.notes.push(`kept ${dir}`);
  }
  return {
    scenario: scenario.name,
    seed,
    crashes: ctx.crashes,
    problems: ctx.problems,
    notes: ctx.notes,
    recoveredEpoch,
    allowed,
    ms: performance.now() - started,
    phases,
  };
}

/** Named points that fire inside `colo-blk recover` (it applies committed epochs with the same code). */
export const RECOVER_POINTS = ['secondary-mid-apply', 'secondary-before-applied-record'] as const;

/**
 * Does the state directory hold committed epochs not yet applied? (commits.journal
 * says what is committed; an epoch journal still on disk at or below it is
 * applied on recovery.) Decides whether a named point inside recover can fire.
 */
function hasApplyWork(stateDir: string): boolean {
  const commits = path.join(stateDir, 'commits.journal');
  if (!fs.existsSync(commits)) return false;
  let committed = 0;
  scanJournal<{ t: string; e?: number }>(nodeStorage, commits, (r) => {
    if (r.meta.t === 'commit') committed = Math.max(committed, Number(r.meta.e));
  });
  const epochs = path.join(stateDir, 'epochs');
  return (
    fs.existsSync(epochs) &&
    fs.readdirSync(epochs).some((f) => /^\d+\.journal$/.test(f) && parseInt(f) <= committed)
  );
}

/**
 * Recover the secondary's state directory. Seeded: 0 to 2 runs of recover are
 * killed first (at a named point inside the apply when there is apply work,
 * else at a random moment aimed at its working part), then a run to the end.
 * Returns the report of the run that finished, or null (problems recorded).
 */
async function recoverWithCrashes(ctx: PointContext, stateDir: string): Promise<RecoverReport | null> {
  // More kills when committed epochs wait to be applied: then named points inside recover can fire.
  const attempts = hasApplyWork(stateDir)
    ? ctx.recoverRng.pick([1, 1, 2, 2, 2, 3])
    : ctx.recoverRng.pick([0, 1, 1, 2]);
  for (let i = 0; i <= attempts; i++) {
    const last = i === attempts;
    let env: NodeJS.ProcessEnv | undefined;
    let killAfterMs: number | undefined;
    let label = 'to the end';
    if (!last) {
      if (hasApplyWork(stateDir) && ctx.recoverRng.bool(0.7)) {
        const point = ctx.recoverRng.pick(RECOVER_POINTS);
        const skip = point === 'secondary-mid-apply' ? ctx.recoverRng.int(0, 2) : 0;
        env = crashEnv({ kind: 'named', point, skip });
        label = `named ${point} skip ${skip}`;
      } else {
        // Its first ~60% is loading modules: aim at the part that touches the state.
        killAfterMs = Math.round(typicalRecoverMs() * (0.6 + 0.45 * ctx.recoverRng.float()));
        label = `random after ${killAfterMs} ms`;
      }
    }
    const r = await runRecover(ctx, stateDir, { env, killAfterMs });
    if (r.hung) {
      ctx.problems.push(
        `recover (${label}) hung and was killed after ${Math.round(r.ms)} ms: ${tail(r.stderr)}`,
      );
      return null;
    }
    if (r.signal === 'SIGKILL') {
      ctx.crashes.push(
        env
          ? {
              victim: 'recover',
              kind: 'named',
              point: env.COLO_BLK_CRASH_AT!,
              detail: `skip ${env.COLO_BLK_CRASH_SKIP}`,
            }
          : {
              victim: 'recover',
              kind: 'random',
              point: 'random',
              detail: `after ${r.killedAfterMs ?? '?'} ms`,
            },
      );
      ctx.notes.push(`recover run ${i + 1} (${label}) was killed`);
      if (last) {
        ctx.problems.push(`the final recover run was killed: ${tail(r.stderr)}`);
        return null;
      }
      continue;
    }
    if (r.code !== 0 || !r.report?.ok) {
      ctx.problems.push(
        `recover (${label}) failed with ${r.code ?? r.signal}: ${tail(r.stderr)}${r.report?.error ? ` (${r.report.error.code})` : ''}`,
      );
      return null;
    }
    if (!env && killAfterMs === undefined) recoverTimes.push(r.ms);
    if (recoverTimes.length > 50) recoverTimes.shift();
    ctx.notes.push(
      `recover run ${i + 1} (${label}) finished: committed ${r.report.committedEpoch}, applied [${r.report.applied.join(', ')}]`,
    );
    return r.report;
  }
  return null;
}

// -----------------------------------------------------------------------------
// A campaign: many points, concurrently, until enough crash points ran

export interface CampaignOptions {
  scenarios: Scenario[];
  /** The order in which scenarios take turns (names; repeated names weigh more). */
  deck: string[];
  seed: number;
  /** Stop starting points once this many crash points ran (or are expected from points in flight). */
  target: number;
  concurrency: number;
  root: string;
  keepFailed?: boolean;
  /** Run exactly this point instead. */
  replay?: { scenario: string; seed: number };
  onResult?: (r: PointResult, done: number) => void;
}

export interface CampaignResult {
  results: PointResult[];
  crashes: number;
  bad: PointResult[];
  ms: number;
}

export async function runCampaign(opts: CampaignOptions): Promise<CampaignResult> {
  const started = performance.now();
  const byName = new Map(opts.scenarios.map((s) => [s.name, s]));
  const results: PointResult[] = [];
  let crashes = 0;
  const run = async (name: string, seed: number) => {
    const sc = byName.get(name);
    if (!sc) throw new Error(`no scenario '${name}' (known: ${[...byName.keys()].join(', ')})`);
    const r = await runPoint(sc, seed, { root: opts.root, keepFailed: opts.keepFailed });
    results.push(r);
    crashes += r.crashes.length;
    opts.onResult?.(r, results.length);
  };
  if (opts.replay) await run(opts.replay.scenario, opts.replay.seed);
  else {
    let next = 0;
    let inFlight = 0;
    const worker = async () => {
      while (crashes + inFlight < opts.target) {
        const i = next++;
        inFlight++;
        try {
          await run(opts.deck[i % opts.deck.length], mixSeed(opts.seed, i));
        } finally {
          inFlight--;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, opts.concurrency) }, worker));
  }
  return {
    results,
    crashes,
    bad: results.filter((r) => r.problems.length > 0),
    ms: performance.now() - started,
  };
}

/** Counts per victim and point, for the summary line. */
export function summarize(results: PointResult[]): string {
  const counts = new Map<string, number>();
  for (const r of results)
    for (const c of r.crashes) {
      const k = `${c.victim} ${c.kind === 'named' ? c.point : 'random'}`;
      counts.set(k, (counts.get(k) ?? 0) + 1);
    }
  return [...counts.entries()]
    .sort((a, b) => a[0].localeCompare(b[0]))
    .map(([k, n]) => `${k}: ${n}`)
    .join(', ');
}

/** A failed point, with everything needed to replay it. */
export function describeFailure(r: PointResult): string {
  return [
    `scenario ${r.scenario}, seed ${hex(r.seed)}` +
      (r.crashes.length ? `: ${r.crashes.map(crashLabel).join('; then ')}` : ': no crash happened'),
    ...r.problems.map((p) => `  PROBLEM: ${p}`),
    ...r.notes.map((n) => `  note: ${n}`),
    `  replay: npm run test:crash -- --replay ${r.scenario}:${hex(r.seed)}`,
  ].join('\n');
}
