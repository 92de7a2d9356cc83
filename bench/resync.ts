/**
 * Scenarios of re-protection and crash recovery, side by side with those in
 * scenarios.ts (same shape: each starts its own processes on tmpfs, drives
 * them through NBD and the control API, stops every node by PID and verifies
 * the data before it reports):
 *
 *   resync   — incremental resync of a returning old primary after a failover
 *              (data sent ÷ out-of-sync data), and a full sync of two identical
 *              disks (hashes only)
 *   recovery — `colo-blk recover` on a secondary killed while applying 1 GiB
 */
import { Buffer } from 'node:buffer';
import process from 'node:process';
import { createHash, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { controlCall } from '../src/checkpoint/control.js';
import { hashInline, localHashAlgs, type HashAlg } from '../src/failover/reprotect/hash-pool.js';
import { NbdClient } from '../src/net/client.js';
import { fillRandom } from './image.js';
import {
  checkpoint,
  cpuSecondsOrNaN,
  HOST,
  pollStatus,
  startNode,
  startPair,
  status,
  type NodeHandle,
  type Status,
} from './pair.js';
import { lastLine, runCommand } from './proc.js';
import type { BenchContext, ScenarioDef, ScenarioReport, Table, Target } from './types.js';

const KiB = 1024;
const MiB = 2 ** 20;
const GiB = 2 ** 30;
/** The activity log's exact granularity for a disk of up to 1 TiB, and the unit of the out-of-sync count. */
const BLOCK = 4 * KiB;
/** First-level hash block of a resync (src/failover/hash.ts) and the bytes of one block hash. */
const HASH_BLOCK = 64 * KiB;
const HASH_BYTES = 16;
const IN_FLIGHT = 16;
const SEND_RATIO_LIMIT = 1.05;
const RECOVERY_LIMIT_S = 10;

const diskSize = (ctx: BenchContext) => (ctx.quick ? 256 * MiB : GiB);
const sizeName = (bytes: number) => (bytes >= GiB ? `${bytes / GiB} GiB` : `${bytes / MiB} MiB`);
const fmtBytes = (b: number) =>
  b >= GiB
    ? `${(b / GiB).toFixed(2)} GiB`
    : b >= MiB
      ? `${(b / MiB).toFixed(1)} MiB`
      : `${(b / KiB).toFixed(1)} KiB`;
const fmtS = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
const rate = (bytes: number, ms: number) => bytes / 1e6 / (ms / 1000);
const fmtRate = (bytes: number, ms: number) => {
  const r = rate(bytes, ms);
  return r >= 1000 ? `${(r / 1000).toFixed(2)} GB/s` : `${r.toFixed(0)} MB/s`;
};
const fmtBps = (bytesPerSecond: number) => fmtRate(bytesPerSecond, 1000);
const round2 = (x: number) => Math.round(x * 100) / 100;
/** The secondary's decision at the hello, as the primary's status shows it. */
function decisionText(d: unknown): string {
  const x = d as { action?: string; mode?: string; reason?: string } | null;
  return x ? `${x.action}${x.mode ? ` (${x.mode})` : ''}, “${x.reason}”` : 'none reported';
}
const cpuText = (c: { promoted: number; secondary: number }) =>
  `${c.promoted} s (promoted node) + ${c.secondary} s (secondary)`;

/** Random data that writes are sliced from (4 MiB, so neighbouring writes differ). */
let pool: Buffer | null = null;
function dataPool(): Buffer {
  if (!pool) pool = randomFillSync(Buffer.allocUnsafe(4 * MiB));
  return pool;
}

/**
 * Every 4 KiB block written carries a stamp unique in this process in its first 8 bytes, so that
 * no two writes ever hold the same data (a block rewritten with what it held already would not
 * be out of sync, and would make the out-of-sync count wrong).
 */
let lastStamp = 0;

/** A pool slice with the stamp over its first 8 bytes. */
function stamped(from: number, stamp: number): Buffer {
  const b = Buffer.from(dataPool().subarray(from, from + BLOCK));
  b.writeUInt32LE(stamp % 2 ** 32, 0);
  b.writeUInt32LE(Math.floor(stamp / 2 ** 32), 4);
  return b;
}

/**
 * What the benchmark expects a disk to hold where it wrote: per 4 KiB block, the offset of its
 * content in the data pool and its stamp. Blocks never written are zero (sparse images).
 */
type Model = Map<number, { from: number; stamp: number }>;

interface WriteSpec {
  bytes: number;
  /** Write size, a multiple of BLOCK; offsets are aligned to it. */
  size: number;
  exportSize: number;
  /** 'random': offsets drawn with replacement; 'cover': every slot of the export once, in random order. */
  order: 'random' | 'cover';
  /** Filled with the 4 KiB blocks written. */
  blocks?: Set<number>;
  /** Updated with what each written block holds now. */
  model?: Model;
}

/** Writes through NBD, IN_FLIGHT at a time; returns the wall time in ms. */
async function writeBlocks(client: NbdClient, w: WriteSpec): Promise<number> {
  const t = performance.now();
  const src = dataPool();
  const slots = Math.floor(w.exportSize / w.size);
  const poolSlots = src.length / w.size;
  const count = w.order === 'cover' ? slots : Math.ceil(w.bytes / w.size);
  let order: Uint32Array | null = null;
  if (w.order === 'cover') {
    order = new Uint32Array(slots);
    for (let i = 0; i < slots; i++) order[i] = i;
    for (let i = slots - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [order[i], order[j]] = [order[j], order[i]];
    }
  }
  let issued = 0;
  const worker = async () => {
    while (issued < count) {
      const k = issued++;
      const slot = order ? order[k] : Math.floor(Math.random() * slots);
      const from = Math.floor(Math.random() * poolSlots) * w.size;
      const offset = slot * w.size;
      const data = Buffer.from(src.subarray(from, from + w.size));
      for (let b = 0; b < w.size / BLOCK; b++) {
        const stamp = ++lastStamp;
        data.writeUInt32LE(stamp % 2 ** 32, b * BLOCK);
        data.writeUInt32LE(Math.floor(stamp / 2 ** 32), b * BLOCK + 4);
        w.blocks?.add(offset / BLOCK + b);
        w.model?.set(offset / BLOCK + b, { from: from + b * BLOCK, stamp });
      }
      await client.write(data, offset);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  return performance.now() - t;
}

/** sha256 of a whole export read over NBD (4 MiB reads, 4 in flight); returns the digest and the time. */
async function hashExport(port: number, exportName: string): Promise<{ sha256: string; ms: number }> {
  const t = performance.now();
  const c = await NbdClient.connect({ port, exportName });
  try {
    const h = createHash('sha256');
    const chunk = 4 * MiB;
    const size = c.info.size;
    const reads: Promise<Buffer>[] = [];
    let next = 0;
    const issue = () => {
      if (next < size) {
        reads.push(c.read(next, Math.min(chunk, size - next)));
        next += chunk;
      }
    };
    for (let i = 0; i < 4; i++) issue();
    for (let i = 0; i < reads.length; i++) {
      h.update(await reads[i]);
      issue();
    }
    return { sha256: h.digest('hex'), ms: performance.now() - t };
  } finally {
    await c.close().catch(() => {});
  }
}

/** sha256 of a file. */
function hashFile(file: string): string {
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(16 * MiB);
  const fd = fs.openSync(file, 'r');
  try {
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
    }
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/**
 * Read every block of `model` and of `zeroed` (blocks that must read as zero unless the model
 * says otherwise) from an export and compare with what they must hold; returns the mismatches.
 */
async function checkBlocks(port: number, exportName: string, model: Model, zeroed: Set<number>) {
  const c = await NbdClient.connect({ port, exportName });
  const zero = Buffer.alloc(BLOCK);
  const blocks = [...new Set([...model.keys(), ...zeroed])].sort((a, b) => a - b);
  const bad: number[] = [];
  let i = 0;
  try {
    const worker = async () => {
      while (i < blocks.length) {
        const b = blocks[i++];
        const got = await c.read(b * BLOCK, BLOCK);
        const m = model.get(b);
        const want = m === undefined ? zero : stamped(m.from, m.stamp);
        if (!got.equals(want)) bad.push(b);
      }
    };
    await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  } finally {
    await c.close().catch(() => {});
  }
  return { checked: blocks.length, bad };
}

/** A secondary on a given state directory and image: a returning old primary, or a new node. */
function secondaryArgs(ctx: BenchContext, stateDir: string, image: string, size: number): string[] {
  return [
    '--listen',
    `${HOST}:0`,
    '--export',
    // An existing image keeps its size; a missing one is created sparse.
    fs.existsSync(image) ? `${ctx.exportName}=${image}` : `${ctx.exportName}=${image},size=${size}`,
    '--state',
    stateDir,
    '--replication-listen',
    `${HOST}:0`,
    '--control',
    `${HOST}:0`,
    '--failover',
    'manual',
  ];
}

/** A node's last log line, for error messages. */
function said(nodes: (NodeHandle | null)[]): string {
  return nodes
    .filter((n): n is NodeHandle => n !== null)
    .map((n) => [n, lastLine(n.stderr(), 300)] as const)
    .filter(([, line]) => line)
    .map(([n, line]) => `${n.role} ${n.pid} said: ${line}`)
    .join('; ');
}

interface ReprotectResult {
  /** The promoted node's status once it reported the secondary protected. */
  final: Status;
  /** POST /reprotect until `peerState` 'protected', as seen by polling. */
  wallMs: number;
  /** The resync's own start and end (ms, Date.now() on the node). */
  resyncMs: number;
  /** CPU seconds (user + system) each node used from POST /reprotect until protected. */
  cpuS: { promoted: number; secondary: number };
  /**
   * Resync attempts seen while polling (a failed attempt is retried with every range turned into a
   * compare range, and `status.resync` then shows only the last one): per attempt its last progress.
   */
  attempts: {
    startedAt: number;
    state: string;
    sentBytes: number;
    hashBytes: number;
    error: string | null;
  }[];
  /** What the promoted node logged about the resync meanwhile (interruptions and their reasons). */
  resyncLog: string[];
  /** What the secondary logged about its link meanwhile (why a link dropped, from its side). */
  secondaryLinkLog: string[];
}

/** POST /reprotect {peer} on a promoted node and poll until it reports the secondary protected. */
async function reprotect(
  ctx: BenchContext,
  promoted: NodeHandle,
  secondary: NodeHandle,
  timeoutMs: number,
): Promise<ReprotectResult> {
  const peer = `${HOST}:${Number(secondary.info.replicationPort)}`;
  const cpu0 = { promoted: cpuSecondsOrNaN(promoted.pid), secondary: cpuSecondsOrNaN(secondary.pid) };
  const logFrom = promoted.logLines.length;
  const secondaryLogFrom = secondary.logLines.length;
  const attempts = new Map<number, ReprotectResult['attempts'][number]>();
  const t = performance.now();
  await controlCall(promoted.control, 'POST', '/reprotect', { peer });
  let lastLog = performance.now();
  const final = await pollStatus(
    promoted,
    (s) => {
      const gone = secondary.exited();
      if (gone) throw new Error(gone);
      if (s.peerState === 'refused' || s.peerState === 'deposed')
        throw new Error(`re-protection failed (${s.peerState}): ${s.refused ?? s.deposed}`);
      if (s.resync) {
        const r = s.resync;
        attempts.set(r.startedAt, {
          startedAt: r.startedAt,
          state: r.state,
          sentBytes: r.sentBytes,
          hashBytes: r.hashBytes,
          error: r.error,
        });
      }
      if (performance.now() - lastLog > 5000 && s.resync) {
        lastLog = performance.now();
        const r = s.resync;
        ctx.log(
          `      resync ${r.mode} ${r.state}: ${fmtBytes(r.doneBytes)} of ${fmtBytes(r.totalBytes)}, ` +
            `sent ${fmtBytes(r.sentBytes)}, peer ${s.peerState}`,
        );
      }
      return s.peerState === 'protected' && s.resync?.state === 'done';
    },
    're-protection (peerState protected)',
    timeoutMs,
    10,
  );
  const wallMs = performance.now() - t;
  const cpuS = {
    promoted: round2(cpuSecondsOrNaN(promoted.pid) - cpu0.promoted),
    secondary: round2(cpuSecondsOrNaN(secondary.pid) - cpu0.secondary),
  };
  const r = final.resync;
  const resyncLog = promoted.logLines
    .slice(logFrom)
    .map((l) => l.line)
    .filter((l) => /resync|resynchronis/i.test(l))
    .map((l) => l.replace(/^\S+ \w+ /, ''));
  const secondaryLinkLog = secondary.logLines
    .slice(secondaryLogFrom)
    .map((l) => l.line)
    .filter((l) => / (warn|error) |link: (?!primary connected)/.test(l))
    .map((l) => l.replace(/^\S+ /, ''))
    .slice(0, 10);
  return {
    final,
    wallMs,
    resyncMs: r.finishedAt - r.startedAt,
    cpuS,
    attempts: [...attempts.values()].sort((a, b) => a.startedAt - b.startedAt),
    resyncLog,
    secondaryLinkLog,
  };
}

/**
 * Data the resync sent over all its attempts. An attempt that failed and was retried is seen in
 * the polls (its last progress) and in the node's log ("resync interrupted: ..."); if the log shows
 * more interruptions than the polls saw attempts, the total is not known and `exact` is false.
 */
function resyncTotals(r: ReprotectResult) {
  const interrupted = r.resyncLog.filter((l) => /resync interrupted/.test(l));
  const failedSeen = r.attempts.filter((a) => a.state === 'failed').length;
  const sentBytes = r.attempts.reduce((a, x) => a + x.sentBytes, 0);
  const hashBytes = r.attempts.reduce((a, x) => a + x.hashBytes, 0);
  return {
    attempts: r.attempts.length,
    interruptions: interrupted,
    secondaryLinkLog: interrupted.length ? r.secondaryLinkLog : [],
    exact: interrupted.length <= failedSeen,
    sentBytes: Math.max(sentBytes, r.final.resync.sentBytes),
    hashBytes: Math.max(hashBytes, r.final.resync.hashBytes),
  };
}

const interruptedText = (r: ReprotectResult) => {
  const t = resyncTotals(r);
  return t.interruptions.length
    ? `; ${t.interruptions.length} attempt(s) INTERRUPTED (${t.interruptions[0]}); sent over all attempts ` +
        `${t.exact ? '' : '≥ '}${fmtBytes(t.sentBytes)}; the secondary logged: ${t.secondaryLinkLog.join(' | ') || 'nothing'}`
    : '';
};

// ---------------------------------------------------------------- resync

interface IncrementalSample {
  writeSize: number;
  /** Written on the promoted node after the failover (4 KiB blocks, distinct). */
  promotedBytes: number;
  /** The promoted node's status.unprotected.exactBytes just before POST /reprotect. */
  exactBytes: number;
  hotBytes: number;
  /** Written by the old primary after its last checkpoint (dropped at the promotion; rolled back). */
  rolledBackBytes: number;
  /** Blocks that differ between the two disks: the union of the two sets above. */
  outOfSyncBytes: number;
  decision: unknown;
  resync: Status;
  wireBytes: number;
  wallMs: number;
  resyncMs: number;
  cpuS: { promoted: number; secondary: number };
  totals: ReturnType<typeof resyncTotals>;
  verify: { equal: boolean; hashMs: number; checked: number; bad: number };
}

async function incrementalRound(ctx: BenchContext, writeSize: number): Promise<IncrementalSample> {
  const size = diskSize(ctx);
  const written = ctx.quick ? 16 * MiB : 64 * MiB;
  const uncommitted = ctx.quick ? 1 * MiB : 4 * MiB;
  const dir = path.join(ctx.workDir, `resync-incremental-${writeSize / KiB}k`);
  const pair = await startPair(ctx, {
    dir,
    primaryImage: path.join(dir, 'pvm.img'),
    size,
    exportName: ctx.exportName,
  });
  let back: NodeHandle | null = null;
  const clients: NbdClient[] = [];
  try {
    ctx.log(
      `    ${writeSize / KiB} KiB writes: pair up (primary pid ${pair.primary.pid}, secondary pid ${pair.secondary.pid}; ` +
        `first sync ${fmtS(pair.initialSync.waitedMs)})`,
    );
    const model: Model = new Map();
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: ctx.exportName });
    clients.push(pvm);
    // Committed data on both disks, then writes of the old primary that no checkpoint covers.
    await writeBlocks(pvm, { bytes: 16 * MiB, size: writeSize, exportSize: size, order: 'random', model });
    await checkpoint(pair.primary, 30_000);
    const rolledBack = new Set<number>();
    await writeBlocks(pvm, {
      bytes: uncommitted,
      size: writeSize,
      exportSize: size,
      order: 'random',
      blocks: rolledBack,
    });
    await pollStatus(pair.primary, (s) => s.lag.unsentBytes === 0, 'the primary shipping its log', 60_000);
    pvm.destroy();
    process.kill(pair.primary.pid, 'SIGKILL');
    await pollStatus(pair.secondary, () => pair.primary.exited() !== null, 'the primary dying', 10_000);
    const promoted = await controlCall<{ generation: number; droppedEpochs: number[] }>(
      pair.secondary.control,
      'POST',
      '/failover',
    );
    if (promoted.generation !== 2)
      throw new Error(`the promoted node minted generation ${promoted.generation}, not 2`);
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: ctx.exportName });
    clients.push(svm);
    const promotedBlocks = new Set<number>();
    const writeMs = await writeBlocks(svm, {
      bytes: written,
      size: writeSize,
      exportSize: size,
      order: 'random',
      blocks: promotedBlocks,
      model,
    });
    const before = await status(pair.secondary);
    const outOfSync = new Set([...promotedBlocks, ...rolledBack]);
    ctx.log(
      `      promoted (generation 2, dropped epochs ${promoted.droppedEpochs.join(', ') || 'none'}); wrote ` +
        `${sizeName(written)} in ${fmtS(writeMs)}; exactBytes ${fmtBytes(before.unprotected.exactBytes)}, ` +
        `rolled back ${fmtBytes(rolledBack.size * BLOCK)}, out of sync ${fmtBytes(outOfSync.size * BLOCK)}`,
    );
    // The old primary comes back as a secondary, on its own state directory and image.
    back = await startNode(
      ctx,
      'secondary',
      secondaryArgs(ctx, path.join(dir, 'pvm-state'), path.join(dir, 'pvm.img'), size),
    );
    const r = await reprotect(ctx, pair.secondary, back, 300_000);
    const res = r.final.resync;
    ctx.log(
      `      re-protected in ${fmtS(r.wallMs)} (resync ${fmtS(r.resyncMs)}, ${res.mode}): sent ${fmtBytes(res.sentBytes)}, ` +
        `hashes ${fmtBytes(res.hashBytes)}, wire ${fmtBytes(r.final.link.bytesSent)}; CPU ${cpuText(r.cpuS)}` +
        interruptedText(r),
    );
    // Verify: one more write and a checkpoint on the re-protected pair, then both exports must be
    // equal, and hold what was written (the old primary's uncommitted writes rolled back).
    const last = { from: 0, stamp: ++lastStamp };
    await svm.write(stamped(last.from, last.stamp), 0);
    model.set(0, last);
    await checkpoint(pair.secondary, 30_000);
    const [ha, hb] = await Promise.all([
      hashExport(pair.secondary.nbdPort, ctx.exportName),
      hashExport(back.nbdPort, ctx.exportName),
    ]);
    const blocks = await checkBlocks(back.nbdPort, ctx.exportName, model, rolledBack);
    const verify = {
      equal: ha.sha256 === hb.sha256,
      hashMs: Math.max(ha.ms, hb.ms),
      checked: blocks.checked,
      bad: blocks.bad.length,
    };
    ctx.log(
      `      verified: exports ${verify.equal ? 'equal' : 'DIFFER'} (sha256 of ${sizeName(size)} each, ${fmtS(verify.hashMs)}); ` +
        `${blocks.checked} written blocks checked on the returned node, ${blocks.bad.length} wrong`,
    );
    return {
      writeSize,
      promotedBytes: promotedBlocks.size * BLOCK,
      exactBytes: before.unprotected.exactBytes,
      hotBytes: before.unprotected.hotBytes,
      rolledBackBytes: rolledBack.size * BLOCK,
      outOfSyncBytes: outOfSync.size * BLOCK,
      decision: r.final.peerDecision,
      resync: res,
      wireBytes: r.final.link.bytesSent,
      wallMs: r.wallMs,
      resyncMs: r.resyncMs,
      cpuS: r.cpuS,
      totals: resyncTotals(r),
      verify,
    };
  } catch (err) {
    const why = said([pair.primary, pair.secondary, back]);
    throw new Error(
      `incremental resync, ${writeSize / KiB} KiB writes: ${(err as Error).message}${why ? ` (${why})` : ''}`,
    );
  } finally {
    for (const c of clients) c.destroy();
    await back?.stop();
    await pair.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

interface FullSample {
  size: number;
  /** The new pair's own first sync of the same identical images (primary process). */
  initial: Status;
  initialMs: number;
  resync: Status;
  wireBytes: number;
  wallMs: number;
  resyncMs: number;
  cpuS: { promoted: number; secondary: number };
  totals: ReturnType<typeof resyncTotals>;
  decision: unknown;
  verify: { equal: boolean; hashMs: number };
  limits: HashLimits;
  /** The first sync of the same images by a pair with each node on its own core (taskset), as on two hosts. */
  pinned: { resync: Status; ms: number } | null;
}

/** What this machine can do at best, measured in the benchmark process before the pair starts. */
interface HashLimits {
  /** A plain sequential read of the image (1 MiB reads), bytes per second. */
  readBps: number;
  /** Each digest of 64 KiB blocks on one thread (as the resync hashes them), bytes per second. */
  digestBps: Record<HashAlg, number>;
  /**
   * Reading the image and hashing it, one thread doing both (as a hashing worker does: 1 MiB read,
   * then its 64 KiB blocks), with each digest: what one core can compare, bytes per second.
   */
  readHashBps: Record<HashAlg, number>;
}

function measureLimits(image: string): HashLimits {
  const buf = Buffer.allocUnsafe(MiB);
  const fd = fs.openSync(image, 'r');
  let t = performance.now();
  let bytes = 0;
  try {
    for (let n; (n = fs.readSync(fd, buf, 0, MiB, bytes)) > 0;) bytes += n;
  } finally {
    fs.closeSync(fd);
  }
  const readBps = bytes / ((performance.now() - t) / 1000);
  const digestBps = { sha256: 0, blake3: 0 };
  for (const alg of localHashAlgs) {
    let hashed = 0;
    t = performance.now();
    while (performance.now() - t < 300) {
      hashInline(buf, 64 * KiB, 16, alg);
      hashed += buf.length;
    }
    digestBps[alg] = hashed / ((performance.now() - t) / 1000);
  }
  const readHashBps = { sha256: 0, blake3: 0 };
  const fd2 = fs.openSync(image, 'r');
  try {
    for (const alg of localHashAlgs) {
      let done = 0;
      t = performance.now();
      while (done < bytes && performance.now() - t < 1000) {
        const n = fs.readSync(fd2, buf, 0, MiB, done);
        if (n <= 0) break;
        hashInline(buf.subarray(0, n), 64 * KiB, 16, alg);
        done += n;
      }
      readHashBps[alg] = done / ((performance.now() - t) / 1000);
    }
  } finally {
    fs.closeSync(fd2);
  }
  return { readBps, digestBps, readHashBps };
}

/** A new pair in `dir` whose two images hold the same random data (every block is data, none a hole). */
function identicalPair(ctx: BenchContext, dir: string, pin?: { primary: string; secondary: string }) {
  const size = diskSize(ctx);
  return startPair(ctx, {
    dir,
    primaryImage: path.join(dir, 'pvm.img'),
    size,
    exportName: ctx.exportName,
    prepare: (d) => {
      fillRandom(path.join(d, 'pvm.img'), size);
      fs.copyFileSync(path.join(d, 'pvm.img'), path.join(d, 'svm.img'));
    },
    pin,
  });
}

/** CPUs for a pair measured as if on two hosts: the primary on one, the secondary on another. */
const PIN = { primary: '0', secondary: '1' };

/**
 * A new pair's first sync of two identical images of random data, the nodes on CPUs of their own
 * (none when the machine has one CPU).
 */
async function pinnedFirstSync(ctx: BenchContext): Promise<{ resync: Status; ms: number } | null> {
  if (os.availableParallelism() < 2) return null;
  const dir = path.join(ctx.workDir, 'resync-full-pinned');
  const pair = await identicalPair(ctx, dir, PIN);
  try {
    const r = pair.initialSync.resync;
    const ms = r.finishedAt - r.startedAt;
    ctx.log(
      `    identical images, each node on its own CPU: first sync (${r.mode}, ${r.hashAlg ?? 'sha256'}) ` +
        `${fmtS(ms)}, sent ${fmtBytes(r.sentBytes)}`,
    );
    return { resync: r, ms };
  } finally {
    await pair.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function fullRound(ctx: BenchContext): Promise<FullSample> {
  const size = diskSize(ctx);
  const dir = path.join(ctx.workDir, 'resync-full');
  let t = performance.now();
  const pair = await identicalPair(ctx, dir);
  let fresh: NodeHandle | null = null;
  try {
    const limits = measureLimits(path.join(dir, 'pvm.img'));
    const initial = pair.initialSync.resync;
    ctx.log(
      `    identical images: pair up in ${fmtS(performance.now() - t)} (two ${sizeName(size)} images of random data; ` +
        `its first sync, ${initial?.mode}: ${fmtS(initial.finishedAt - initial.startedAt)}, sent ${fmtBytes(initial.sentBytes)}, ` +
        `hashes ${fmtBytes(initial.hashBytes)})`,
    );
    process.kill(pair.primary.pid, 'SIGKILL');
    await pollStatus(pair.secondary, () => pair.primary.exited() !== null, 'the primary dying', 10_000);
    await controlCall(pair.secondary.control, 'POST', '/failover');
    await controlCall(pair.secondary.control, 'POST', '/drain-apply', {}, 120_000);
    // A new node whose image is a byte copy of the promoted node's (which nothing writes to now).
    t = performance.now();
    fs.copyFileSync(path.join(dir, 'svm.img'), path.join(dir, 'new.img'));
    ctx.log(`      copied the promoted node's image in ${fmtS(performance.now() - t)}`);
    fresh = await startNode(
      ctx,
      'secondary',
      secondaryArgs(ctx, path.join(dir, 'new-state'), path.join(dir, 'new.img'), size),
    );
    const r = await reprotect(ctx, pair.secondary, fresh, 300_000);
    const res = r.final.resync;
    ctx.log(
      `      re-protected in ${fmtS(r.wallMs)} (resync ${fmtS(r.resyncMs)}, ${res.mode}): sent ${fmtBytes(res.sentBytes)}, ` +
        `hashes ${fmtBytes(res.hashBytes)}, equal ${fmtBytes(res.equalBytes)}, wire ${fmtBytes(r.final.link.bytesSent)}; ` +
        `CPU ${cpuText(r.cpuS)}` +
        interruptedText(r),
    );
    await checkpoint(pair.secondary, 30_000);
    const [ha, hb] = await Promise.all([
      hashExport(pair.secondary.nbdPort, ctx.exportName),
      hashExport(fresh.nbdPort, ctx.exportName),
    ]);
    const verify = { equal: ha.sha256 === hb.sha256, hashMs: Math.max(ha.ms, hb.ms) };
    ctx.log(`      verified: exports ${verify.equal ? 'equal' : 'DIFFER'} (${fmtS(verify.hashMs)})`);
    return {
      size,
      initial,
      initialMs: initial.finishedAt - initial.startedAt,
      resync: res,
      wireBytes: r.final.link.bytesSent,
      wallMs: r.wallMs,
      resyncMs: r.resyncMs,
      cpuS: r.cpuS,
      totals: resyncTotals(r),
      decision: r.final.peerDecision,
      verify,
      limits,
      pinned: null,
    };
  } catch (err) {
    const why = said([pair.primary, pair.secondary, fresh]);
    throw new Error(`full sync of identical images: ${(err as Error).message}${why ? ` (${why})` : ''}`);
  } finally {
    await fresh?.stop();
    await pair.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export const resyncScenario: ScenarioDef = {
  id: 'resync',
  title: 'Re-protection (resync)',
  method: (ctx) => {
    const size = sizeName(diskSize(ctx));
    return (
      `Two measurements, each on fresh processes with ${size} images and state directories on tmpfs (every ` +
      'new pair first synchronises its disks by hash; the benchmark waits for the primary’s `peerState` ' +
      '`protected` before it starts). **Incremental**, once with 4 KiB and once with 64 KiB writes (random ' +
      `aligned offsets, ${IN_FLIGHT} in flight, through colo-blk’s NBD client): a pair; 16 MiB written and ` +
      `checkpointed; ${ctx.quick ? '1 MiB' : '4 MiB'} more written on the primary and shipped but not committed; ` +
      'the primary killed (SIGKILL); `POST /failover` on the secondary (generation 2; it drops the uncommitted ' +
      `epoch); ${ctx.quick ? '16' : '64'} MiB written through the promoted node’s export; the old primary ` +
      'restarted as a secondary on its own state directory and image (`colo-blk secondary --state <old ' +
      'primary state> --export disk0=<its image>`); `POST /reprotect {peer}` on the promoted node, and its ' +
      '`GET /status` polled every 10 ms until `peerState` is `protected`. Every 4 KiB block written carries a ' +
      'unique stamp, so no write ever repeats what a block held. Out of sync = the 4 KiB blocks ' +
      'written on the promoted node since the failover (its `unprotected.exactBytes`) united with those the old ' +
      'primary wrote uncommitted (they must be rolled back); sent = `resync.sentBytes`; wire = the link’s ' +
      '`bytesSent` (the log bytes the new link streamed: write records with their frame headers and the ' +
      'seal records; control frames — hash requests, commits, heartbeats — are not counted in it), summed ' +
      'over the resync’s attempts if one was interrupted and retried. **Full sync of identical disks**: a pair whose two images hold the same ' +
      `${size} of random data (written to the file, then copied), the primary killed, the secondary promoted, ` +
      'a byte copy of its image given to a new node with an empty state directory, and that node re-protected ' +
      'as above (the decision is a full sync: it has no history); then a new pair on two such images with ' +
      'the primary on CPU 0 and the secondary on CPU 1 (`taskset`), as on two hosts, its first sync timed. ' +
      'Every measurement is verified: after one ' +
      'more write and a checkpoint, both exports are read whole over NBD and their sha256 compared, and (incremental) ' +
      'every block the benchmark wrote is read back from the returned node: what the promoted node wrote ' +
      'last, or the committed content where only the old primary had written.'
    );
  },
  tmpfsBytes: (ctx) => 3 * diskSize(ctx) + 512 * MiB,
  async run(ctx) {
    const incremental: IncrementalSample[] = [];
    for (const ws of [4 * KiB, 64 * KiB]) incremental.push(await incrementalRound(ctx, ws));
    const full = await fullRound(ctx);
    full.pinned = await pinnedFirstSync(ctx);
    return resyncReport(incremental, full);
  },
};

/** Data sent ÷ out-of-sync data, with bounds when an attempt of the resync went unseen. */
function sendRatio(t: IncrementalSample['totals'], wireBytes: number, outOfSync: number) {
  const low = t.sentBytes / outOfSync;
  // An unseen attempt sent at most what went over the wire.
  const high = t.exact ? low : Math.max(low, wireBytes / outOfSync);
  return { low, high, text: t.exact ? `${low.toFixed(3)}×` : `${low.toFixed(3)}–${high.toFixed(3)}×` };
}

const attemptsText = (t: IncrementalSample['totals']) =>
  t.interruptions.length === 0 && t.attempts <= 1
    ? '1'
    : `${Math.max(t.attempts, t.interruptions.length + 1)} (${t.interruptions.length} interrupted)`;

function resyncReport(inc: IncrementalSample[], full: FullSample): ScenarioReport {
  const incTable: Table = {
    columns: [
      'Writes',
      'Out of sync',
      'exactBytes',
      'Sent',
      'Sent ÷ out of sync',
      'Hashes',
      'On the wire',
      'Attempts',
      'Resync time (last attempt)',
      'Reprotect → protected',
      'Out of sync ÷ that',
      'CPU s: promoted + returning',
      'Verified',
    ],
    rows: inc.map((s) => [
      `${s.writeSize / KiB} KiB`,
      fmtBytes(s.outOfSyncBytes),
      fmtBytes(s.exactBytes),
      (s.totals.exact ? '' : '≥ ') + fmtBytes(s.totals.sentBytes),
      sendRatio(s.totals, s.wireBytes, s.outOfSyncBytes).text,
      fmtBytes(s.totals.hashBytes),
      fmtBytes(s.wireBytes),
      attemptsText(s.totals),
      fmtS(s.resyncMs),
      fmtS(s.wallMs),
      fmtRate(s.outOfSyncBytes, s.wallMs),
      `${s.cpuS.promoted} + ${s.cpuS.secondary}`,
      s.verify.equal && s.verify.bad === 0 ? 'equal' : 'DIFFER',
    ]),
  };
  const expectHash = (full.size / HASH_BLOCK) * HASH_BYTES;
  const fullRows = [
    [
      're-protection of a new node (promoted primary)',
      full.resync,
      full.resyncMs,
      full.wireBytes,
      full.cpuS,
      attemptsText(full.totals),
    ],
    ['first sync of a new pair (primary process)', full.initial, full.initialMs, null, null, '—'],
    ...(full.pinned
      ? ([
          [
            'first sync of a new pair, each node on its own CPU (taskset)',
            full.pinned.resync,
            full.pinned.ms,
            null,
            null,
            '—',
          ],
        ] as const)
      : []),
  ] as const;
  const fullTable: Table = {
    columns: [
      'Full sync, identical disks',
      'Compared',
      'Data sent',
      'Hashes',
      'On the wire',
      'Attempts',
      'Time',
      'Hashing rate',
      'CPU s: promoted + new node',
    ],
    rows: fullRows.map(([what, r, ms, wire, cpu, attempts]) => [
      what,
      fmtBytes(r.totalBytes),
      fmtBytes(r.sentBytes),
      fmtBytes(r.hashBytes),
      wire === null ? '—' : fmtBytes(wire),
      attempts,
      fmtS(ms),
      fmtRate(r.totalBytes, ms),
      cpu ? `${cpu.promoted} + ${cpu.secondary}` : '—',
    ]),
  };
  const targets: Target[] = inc.map((s) => {
    const ratio = sendRatio(s.totals, s.wireBytes, s.outOfSyncBytes);
    const ok = s.verify.equal && s.verify.bad === 0;
    const interrupted = s.totals.interruptions.length;
    return {
      what: `incremental resync after failover, ${s.writeSize / KiB} KiB writes: data sent ÷ out-of-sync data`,
      target: `≤ ${SEND_RATIO_LIMIT}×, disks equal after`,
      measured:
        `${ratio.text} (${s.totals.exact ? '' : '≥ '}${fmtBytes(s.totals.sentBytes)} ÷ ${fmtBytes(s.outOfSyncBytes)})` +
        (interrupted
          ? `, ${interrupted} attempt${interrupted === 1 ? '' : 's'} interrupted and retried`
          : '') +
        (ok ? '' : ', but the disks DIFFER after it'),
      pass: !ok || ratio.low > SEND_RATIO_LIMIT ? false : ratio.high <= SEND_RATIO_LIMIT ? true : null,
    };
  });
  const fullOk = full.verify.equal;
  targets.push({
    what: `full sync of two identical ${sizeName(full.size)} disks: sends almost nothing but hashes`,
    target: `data sent ≤ 0.1% of the disk; hashes ≈ ${fmtBytes(expectHash)} (16 B per 64 KiB)`,
    measured:
      `${fmtBytes(full.totals.sentBytes)} sent, ${fmtBytes(full.totals.hashBytes)} of hashes, in ${fmtS(full.wallMs)} ` +
      `(${fmtRate(full.size, full.wallMs)} compared)` +
      (full.totals.interruptions.length
        ? `, ${full.totals.interruptions.length} attempt(s) interrupted`
        : '') +
      (fullOk ? '' : ', but the disks DIFFER after it'),
    pass:
      full.totals.exact &&
      full.totals.sentBytes <= full.size / 1000 &&
      full.totals.hashBytes <= 1.1 * expectHash &&
      fullOk,
  });
  // The issue's: data is hashed at no less than the disk's read rate, using every core.
  const hashBps = full.size / (full.resyncMs / 1000);
  const alg: HashAlg = full.resync.hashAlg ?? 'sha256';
  const digestName = alg === 'blake3' ? 'BLAKE3' : 'SHA-256';
  const hashLimitBps = (full.limits.readHashBps[alg] * os.availableParallelism()) / 2;
  targets.push({
    what: `full sync of two identical ${sizeName(full.size)} disks: hashing rate ÷ a plain read of the image`,
    target: '≥ 1×',
    measured:
      `${(hashBps / full.limits.readBps).toFixed(2)}× (${fmtRate(full.size, full.resyncMs)} ÷ ` +
      `${fmtBps(full.limits.readBps)})`,
    pass: hashBps >= full.limits.readBps,
  });
  if (full.pinned) {
    const pinnedBps = full.size / (full.pinned.ms / 1000);
    targets.push({
      what:
        `full sync of two identical ${sizeName(full.size)} disks, each node on its own CPU (as on two hosts): ` +
        'hashing rate ÷ a plain read of the image',
      target: '≥ 1×',
      measured:
        `${(pinnedBps / full.limits.readBps).toFixed(2)}× (${fmtRate(full.size, full.pinned.ms)} ÷ ` +
        `${fmtBps(full.limits.readBps)}; ${full.pinned.resync.hashAlg ?? 'sha256'})`,
      pass: pinnedBps >= full.limits.readBps,
    });
  }
  const notes: string[] = [];
  for (const s of inc) {
    const r = s.resync;
    notes.push(
      `${s.writeSize / KiB} KiB writes: decision ${decisionText(s.decision)}. The promoted node wrote ` +
        `${fmtBytes(s.promotedBytes)} of distinct blocks (its \`exactBytes\` said ${fmtBytes(s.exactBytes)}; hot ` +
        `extents ${fmtBytes(s.hotBytes)}) and the old primary ${fmtBytes(s.rolledBackBytes)} uncommitted. The ` +
        `${s.totals.attempts > 1 ? 'last attempt of the ' : ''}resync went through ${fmtBytes(r.totalBytes)} (sent ` +
        `ranges plus hash-compared hot extents of both sides): ${fmtBytes(r.equalBytes)} found equal by hash, ` +
        `${r.checkpoints} checkpoint${r.checkpoints === 1 ? '' : 's'}; the wire carried ` +
        `${(s.wireBytes / s.outOfSyncBytes).toFixed(2)}× the out-of-sync data. From \`POST /reprotect\` to ` +
        `\`protected\` ${fmtS(s.wallMs)}, of which the ${s.totals.attempts > 1 ? 'last attempt' : 'resync itself'} ` +
        `${fmtS(s.resyncMs)} (${fmtRate(r.totalBytes, s.resyncMs)} of disk gone through).` +
        (s.totals.interruptions.length
          ? ` Interrupted: ${s.totals.interruptions.map((l) => `“${l}”`).join('; ')}; the secondary logged: ` +
            `${s.totals.secondaryLinkLog.map((l) => `“${l}”`).join('; ') || 'nothing about it'}.`
          : ''),
    );
  }
  notes.push(
    `Full sync: decision ${decisionText(full.decision)}; ${fmtBytes(full.resync.equalBytes)} found equal. Hashing rate = ` +
      `bytes compared ÷ resync time; both sides hash (${digestName}, 16 B kept per 64 KiB block) at the same time, ` +
      `on this machine’s ${os.availableParallelism()} cores, shared with other work. The first sync of every new ` +
      'pair is the same comparison run by a plain primary (a pair on sparse images compares zeroes, which reads ' +
      'faster). The limits, measured in the benchmark process: a plain read of the image (1 MiB reads) ' +
      `runs at ${fmtBps(full.limits.readBps)}, ${digestName} of 64 KiB blocks at ` +
      `${fmtBps(full.limits.digestBps[alg])} on one core` +
      (alg === 'blake3'
        ? ` (SHA-256, which a node without BLAKE3 uses, ${fmtBps(full.limits.digestBps.sha256)})`
        : '') +
      `, reading and hashing on one core (as a hashing worker does) at ${fmtBps(full.limits.readHashBps[alg])}` +
      `; with both sides on this ` +
      `machine’s ${os.availableParallelism()} cores, each reading and hashing every byte, comparing cannot go faster than ` +
      `${fmtBps(hashLimitBps)} (the resync reached ${Math.round((100 * hashBps) / hashLimitBps)} % of it); ` +
      'on two hosts, each side hashes on all of its own cores.' +
      (full.totals.interruptions.length
        ? ` Interrupted: ${full.totals.interruptions.map((l) => `“${l}”`).join('; ')}; the new node logged: ` +
          `${full.totals.secondaryLinkLog.map((l) => `“${l}”`).join('; ') || 'nothing about it'}.`
        : ''),
  );
  return {
    tables: [
      { caption: 'Incremental resync of the old primary after a failover:', table: incTable },
      { caption: 'Full sync of two identical disks:', table: fullTable },
    ],
    targets,
    notes,
    data: {
      incremental: inc.map((s) => ({ ...s, wallMs: round2(s.wallMs), resyncMs: round2(s.resyncMs) })),
      full: { ...full, wallMs: round2(full.wallMs) },
    },
  };
}

// ---------------------------------------------------------------- recovery

interface RecoverReport {
  ok: boolean;
  role: string;
  tornTails: unknown[];
  indexRebuilt: boolean;
  applied: number[];
  appliedBytes: number;
  committedEpoch?: number;
  pending: { epoch: number; state: string; writes: number; bytes: number }[];
  actions: string[];
}

function journalBytes(dir: string): { files: number; bytes: number } {
  let files = 0;
  let bytes = 0;
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.journal')) {
        files++;
        bytes += fs.statSync(p).size;
      }
    }
  };
  walk(dir);
  return { files, bytes };
}

interface RecoveryVariant {
  label: string;
  /** Bytes of the image file allocated when recover started (holes cost a page allocation when applied). */
  allocatedBefore: number;
  first: Awaited<ReturnType<typeof runRecover>>;
  second: Awaited<ReturnType<typeof runRecover>>;
  equal: boolean;
  problems: string[];
}

const cpuCell = (c: { user: number; sys: number } | null) => (c ? `${c.user} + ${c.sys}` : '—');

const TIME = '/usr/bin/time';
const RUSAGE = 'colo-blk-bench-rusage';

/** `colo-blk recover --state DIR --json`, timed; with CPU time and peak RSS when /usr/bin/time exists. */
async function runRecover(ctx: BenchContext, stateDir: string) {
  const cmd = [
    process.execPath,
    path.join(ctx.root, 'bin/colo-blk.js'),
    'recover',
    '--state',
    stateDir,
    '--json',
  ];
  const timed = fs.existsSync(TIME);
  const r = await runCommand(
    timed ? TIME : cmd[0],
    timed ? ['-f', `${RUSAGE} %U %S %M`, ...cmd] : cmd.slice(1),
    {
      timeoutMs: 300_000,
      allowFailure: true,
    },
  );
  const usage = new RegExp(`^${RUSAGE} (\\S+) (\\S+) (\\d+)$`, 'm').exec(r.stderr);
  const cpuS = usage ? { user: Number(usage[1]), sys: Number(usage[2]) } : null;
  const maxRssBytes = usage ? Number(usage[3]) * 1024 : null;
  const line = r.stdout.trim().split('\n').pop() ?? '';
  let report: RecoverReport;
  try {
    report = JSON.parse(line) as RecoverReport;
  } catch {
    throw new Error(
      `colo-blk recover exited ${r.code ?? r.signal} without a JSON report: ${lastLine(r.stderr)}`,
    );
  }
  if (r.code !== 0 || !report.ok)
    throw new Error(`colo-blk recover failed (exit ${r.code ?? r.signal}): ${line.slice(0, 300)}`);
  return { ms: r.ms, cpuS, maxRssBytes, report };
}

export const recoveryScenario: ScenarioDef = {
  id: 'recovery',
  title: 'Recovery of a crashed secondary',
  method: (ctx) => {
    const size = sizeName(diskSize(ctx));
    return (
      `A fresh pair (sparse ${size} images, state directories on tmpfs, the primary with \`--budget 4G\`), the ` +
      'secondary started with `COLO_BLK_CRASH_AT=secondary-mid-apply` (it kills itself with SIGKILL at its ' +
      `first step of applying a committed epoch to its image). The whole ${size} export written once through ` +
      `colo-blk’s NBD client (64 KiB writes, every slot once in random order, ${IN_FLIGHT} in flight) into one ` +
      'epoch, shipped, and checkpointed: the secondary commits the epoch and dies applying it, leaving ' +
      `${size} of committed journal not in its image. The primary is then stopped, and ` +
      '`colo-blk recover --state <secondary state> --json` is timed from spawn to exit (it verifies every ' +
      'frame’s CRC, rebuilds the index if needed and applies the committed epoch), then run a second time ' +
      '(it must find nothing to do). Verified: the recovered image’s sha256 equals the primary’s image’s. ' +
      'Three variants from the same crashed state (a copy is kept aside): as the crash left it, with the ' +
      'LevelDB index deleted first (recover rebuilds it from the journals), and with the image’s holes ' +
      'filled beforehand (to show what allocating them costs). Before any, the crashed image is checked to ' +
      'differ from the primary’s. Time = spawn to exit; CPU and peak RSS from `/usr/bin/time`.'
    );
  },
  // Both images, the secondary's journal, the primary's log until released, a copy of state and image.
  tmpfsBytes: (ctx) => 7 * diskSize(ctx) + 256 * MiB,
  async run(ctx) {
    const size = diskSize(ctx);
    const dir = path.join(ctx.workDir, 'recovery');
    const pair = await startPair(ctx, {
      dir,
      primaryImage: path.join(dir, 'pvm.img'),
      size,
      exportName: ctx.exportName,
      budget: '4G',
      secondaryEnv: { COLO_BLK_CRASH_AT: 'secondary-mid-apply' },
    });
    try {
      ctx.log(
        `    pair up (primary pid ${pair.primary.pid}, secondary pid ${pair.secondary.pid}; first sync ` +
          `${fmtS(pair.initialSync.waitedMs)})`,
      );
      const client = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: ctx.exportName });
      let writeMs: number;
      try {
        writeMs = await writeBlocks(client, {
          bytes: size,
          size: 64 * KiB,
          exportSize: size,
          order: 'cover',
        });
      } finally {
        await client.close().catch(() => client.destroy());
      }
      const t = performance.now();
      await pollStatus(
        pair.primary,
        (s) => s.lag.unsentBytes === 0,
        'the primary shipping its log',
        300_000,
        20,
      );
      ctx.log(
        `    wrote ${sizeName(size)} in ${fmtS(writeMs)} (${fmtRate(size, writeMs)}), shipped ${fmtS(performance.now() - t)} later`,
      );
      let ckpt: unknown;
      try {
        ckpt = await checkpoint(pair.primary, 120_000);
      } catch (err) {
        // The secondary may die before it answers the commit: the commit record is durable by then.
        ckpt = { error: (err as Error).message };
      }
      const deadline = performance.now() + 60_000;
      while (pair.secondary.exited() === null && performance.now() < deadline) await sleep(20);
      const died = pair.secondary.exited();
      if (died === null) throw new Error('the secondary did not crash while applying the epoch within 60 s');
      ctx.log(`    checkpoint ${JSON.stringify(ckpt)}; ${died}`);
      await pair.stop();
      const state = path.join(dir, 'svm-state');
      const journals = journalBytes(state);
      ctx.log(`    ${journals.files} journal files, ${fmtBytes(journals.bytes)}; running colo-blk recover`);
      const startup = await runCommand(
        process.execPath,
        [path.join(ctx.root, 'bin/colo-blk.js'), '--version'],
        { timeoutMs: 30_000 },
      );
      // The crashed state is kept aside (the image with its holes), so that every variant starts from it.
      const image = path.join(dir, 'svm.img');
      const saved = { state: `${state}.saved`, image: `${image}.saved` };
      const sparseCopy = (from: string, to: string) =>
        runCommand('cp', ['--sparse=always', from, to], { timeoutMs: 300_000 });
      let t3 = performance.now();
      fs.cpSync(state, saved.state, { recursive: true });
      await sparseCopy(image, saved.image);
      ctx.log(`    saved a copy of the crashed state and image in ${fmtS(performance.now() - t3)}`);
      const reference = hashFile(path.join(dir, 'pvm.img'));
      // The crash must have left work to do: the image does not hold the epoch yet.
      if (hashFile(image) === reference)
        throw new Error('the crashed secondary’s image already equals the primary’s: nothing to recover');
      const allocated = (file: string) => fs.statSync(file).blocks * 512;
      const restore = async (how: { allocate: boolean; dropIndex: boolean }) => {
        t3 = performance.now();
        fs.rmSync(state, { recursive: true, force: true });
        fs.rmSync(image, { force: true });
        fs.cpSync(saved.state, state, { recursive: true });
        // copyFileSync writes the holes as zeroes: every page of the image is allocated.
        if (how.allocate) fs.copyFileSync(saved.image, image);
        else await sparseCopy(saved.image, image);
        // The LevelDB index is derived from the journals; without it, recover rebuilds it from them.
        if (how.dropIndex) fs.rmSync(path.join(state, 'meta'), { recursive: true, force: true });
        ctx.log(
          `    restored the crashed state${how.dropIndex ? ', deleted its metadata index' : ''}` +
            `${how.allocate ? ', image fully allocated' : ''} (${fmtS(performance.now() - t3)})`,
        );
      };
      const variant = async (label: string): Promise<RecoveryVariant> => {
        const allocatedBefore = allocated(image);
        const first = await runRecover(ctx, state);
        ctx.log(
          `    ${label}: recover ${fmtS(first.ms)} (${fmtRate(journals.bytes, first.ms)} of journal; CPU ` +
            `${cpuCell(first.cpuS)} s user + sys, peak RSS ${first.maxRssBytes === null ? '?' : fmtBytes(first.maxRssBytes)}); ` +
            `applied epochs ${first.report.applied.join(', ') || 'none'}, ${fmtBytes(first.report.appliedBytes)}; ` +
            `index rebuilt: ${first.report.indexRebuilt ? 'yes' : 'no'}; image allocated before: ${fmtBytes(allocatedBefore)}`,
        );
        const second = await runRecover(ctx, state);
        const equal = hashFile(image) === reference;
        ctx.log(
          `    ${label}: recover again ${fmtS(second.ms)}, actions: ${second.report.actions.length || 'none'}; ` +
            `image ${equal ? 'equal to' : 'DIFFERENT from'} the primary’s (sha256)`,
        );
        const problems = [
          ...(first.report.applied.length > 0 && first.report.appliedBytes > 0
            ? []
            : ['the first run applied nothing']),
          ...(second.report.actions.length === 0 && second.report.applied.length === 0
            ? []
            : [`the second run did something: ${second.report.actions.join('; ')}`]),
          ...(equal ? [] : ['the recovered image differs from the primary’s']),
        ];
        return { label, allocatedBefore, first, second, equal, problems };
      };
      const asLeft = await variant('as the crash left it');
      await restore({ allocate: false, dropIndex: true });
      const lost = await variant('index deleted');
      await restore({ allocate: true, dropIndex: false });
      const prealloc = await variant('image preallocated');
      const variants = [asLeft, lost, prealloc];
      const table: Table = {
        columns: [
          'Variant',
          'Run',
          'Time',
          'CPU s: user + sys',
          'Peak RSS',
          'Journal ÷ time',
          'Image allocated before',
          'Applied',
          'Torn tails cut',
          'Index rebuilt',
          'Actions',
        ],
        rows: variants.flatMap((v) =>
          (
            [
              ['first', v.first],
              ['second', v.second],
            ] as const
          ).map(([name, x]) => [
            v.label,
            name,
            fmtS(x.ms),
            cpuCell(x.cpuS),
            x.maxRssBytes === null ? '—' : fmtBytes(x.maxRssBytes),
            x === v.first ? fmtRate(journals.bytes, x.ms) : '—',
            x === v.first ? fmtBytes(v.allocatedBefore) : '—',
            `${x.report.applied.length ? `epoch ${x.report.applied.join(', ')}, ` : ''}${fmtBytes(x.report.appliedBytes)}`,
            String(x.report.tornTails.length),
            x.report.indexRebuilt ? 'yes' : 'no',
            String(x.report.actions.length),
          ]),
        ),
      };
      return {
        tables: [{ table }],
        // The third variant only shows where the time goes (allocating the image's pages).
        targets: [asLeft, lost].map((v) => ({
          what:
            `recovery of a secondary with ${fmtBytes(journals.bytes)} of committed journal, ${v.label} ` +
            '(colo-blk recover)',
          target: `≤ ${RECOVERY_LIMIT_S} s, image equal to the primary’s, second run a no-op`,
          measured:
            `${fmtS(v.first.ms)} (${fmtRate(journals.bytes, v.first.ms)})` +
            (v.problems.length ? `, but ${v.problems.join('; ')}` : ''),
          pass: v.first.ms <= RECOVERY_LIMIT_S * 1000 && v.problems.length === 0,
        })),
        notes: [
          `Before recovery the state directory held ${journals.files} journal files, ${fmtBytes(journals.bytes)} ` +
            `(the committed epoch: ${sizeName(size)} of data plus frame headers). Times are from spawn to exit and ` +
            `include starting Node and the CLI: \`colo-blk --version\` takes ${fmtS(startup.ms)} here. The first ` +
            `run’s actions: ${asLeft.first.report.actions.join('; ')}. The other variants start from a copy of ` +
            'the same crashed state (the image copied with its holes, `cp --sparse=always`): with its LevelDB ' +
            'index (`meta/`) deleted, and with the image’s holes filled with zeroes beforehand (every page of ' +
            'the tmpfs file allocated, as on a disk that has been in use for a while): applying into holes ' +
            'makes the kernel allocate and zero a page for each, which shows as system time — ' +
            `${asLeft.first.cpuS?.sys ?? '?'} s as the crash left it, ${prealloc.first.cpuS?.sys ?? '?'} s with the ` +
            `image preallocated. Writing the ${sizeName(size)} through the primary ran at ` +
            `${fmtRate(size, writeMs)}.`,
        ],
        data: {
          journalFiles: journals.files,
          journalBytes: journals.bytes,
          writeMs: round2(writeMs),
          checkpoint: ckpt,
          secondaryExit: died,
          versionMs: round2(startup.ms),
          variants: variants.map((v) => ({
            label: v.label,
            allocatedBefore: v.allocatedBefore,
            first: { ...v.first, ms: round2(v.first.ms) },
            second: { ...v.second, ms: round2(v.second.ms) },
            imageEqual: v.equal,
            problems: v.problems,
          })),
        },
      };
    } catch (err) {
      const why = said([pair.primary, pair.secondary]);
      throw new Error(`${(err as Error).message}${why ? ` (${why})` : ''}`);
    } finally {
      await pair.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  },
};
