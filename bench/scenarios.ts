/**
 * Scenarios: measurements of the replicated pair that are not "a client
 * workload against a server". Each starts its own fresh pair (images and state
 * on tmpfs), writes through colo-blk's own NBD client, drives the checkpoint
 * through the primary's control API and stops both nodes by PID at the end.
 *
 *   checkpoint — checkpoint latency by pending size, once the data is shipped
 *   memory     — peak RSS of both nodes with 1 GiB pending in one epoch
 *   failover   — from the primary's death to the promoted node serving writes
 *   resync, recovery — in resync.ts
 *   loop-modes, loop-scale, loop-checkpoint, loop-failover — the COLO loop, in loop.ts
 */
import { Buffer } from 'node:buffer';
import process from 'node:process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { NbdClient } from '../src/net/client.js';
import { percentile } from '../src/util/stats.js';
import {
  checkpoint,
  memoryOf,
  pollStatus,
  startPair,
  status,
  type CheckpointTimes,
  type NodeHandle,
  type Pair,
} from './pair.js';
import { lastLine } from './proc.js';
import { limitsScenario } from './limits.js';
import { LOOP_SCENARIOS } from './loop.js';
import { VM_SCENARIOS } from './vm.js';
import { recoveryScenario, resyncScenario } from './resync.js';
import type { BenchContext, ScenarioDef, ScenarioReport, Target } from './types.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const PAIR_SIZE = GiB;
const WRITE_SIZE = 64 * 1024;
const IN_FLIGHT = 16;

const round2 = (x: number) => Math.round(x * 100) / 100;
const fmtMs = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
const fmtMiB = (bytes: number) => `${Math.round(bytes / MiB)} MiB`;
const sizeName = (bytes: number) => (bytes >= GiB ? `${bytes / GiB} GiB` : `${bytes / MiB} MiB`);

export { percentile };

const sortNum = (xs: number[]) => [...xs].sort((a, b) => a - b);

/** Random data to slice writes from (4 MiB, so neighbouring writes differ). */
let pool: Buffer | null = null;
function dataPool(): Buffer {
  if (!pool) pool = randomFillSync(Buffer.allocUnsafe(4 * MiB));
  return pool;
}

/**
 * Write `bytes` into the export with 64 KiB writes at random 64 KiB-aligned offsets, 16 in flight.
 * Returns the wall time in ms.
 */
async function writeRandom(client: NbdClient, bytes: number, exportSize: number): Promise<number> {
  const t = performance.now();
  const src = dataPool();
  const slots = exportSize / WRITE_SIZE;
  const poolSlots = src.length / WRITE_SIZE;
  const count = Math.ceil(bytes / WRITE_SIZE);
  let issued = 0;
  const worker = async () => {
    while (issued < count) {
      issued++;
      const from = Math.floor(Math.random() * poolSlots) * WRITE_SIZE;
      const offset = Math.floor(Math.random() * slots) * WRITE_SIZE;
      await client.write(src.subarray(from, from + WRITE_SIZE), offset);
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  return performance.now() - t;
}

/** Wait until the primary has sent every logged byte to the secondary; returns the wait in ms. */
async function waitShipped(primary: NodeHandle, timeoutMs: number): Promise<number> {
  const t = performance.now();
  await pollStatus(
    primary,
    (s) => s.lag.unsentBytes === 0 && s.link.state === 'connected',
    'the primary shipping its log (lag.unsentBytes 0)',
    timeoutMs,
  );
  return performance.now() - t;
}

async function withPair<T>(
  ctx: BenchContext,
  name: string,
  budget: string | undefined,
  body: (pair: Pair, client: NbdClient) => Promise<T>,
): Promise<T> {
  const dir = path.join(ctx.workDir, name);
  const pair = await startPair(ctx, {
    dir,
    primaryImage: path.join(dir, 'pvm.img'),
    size: PAIR_SIZE,
    exportName: ctx.exportName,
    budget,
  });
  let client: NbdClient | null = null;
  try {
    ctx.log(
      `  pair up: primary pid ${pair.primary.pid}, secondary pid ${pair.secondary.pid} ` +
        `(first sync of the disks: ${(pair.initialSync.waitedMs / 1000).toFixed(1)} s)`,
    );
    client = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: ctx.exportName });
    const r = await body(pair, client);
    await client.close();
    client = null;
    return r;
  } catch (err) {
    const gone = pair.exited();
    const said = [pair.primary, pair.secondary]
      .map((n) => [n.role, lastLine(n.stderr(), 300)] as const)
      .filter(([, line]) => line)
      .map(([role, line]) => `${role} said: ${line}`);
    const extra = [...(gone ? [gone] : []), ...said];
    throw extra.length ? new Error(`${(err as Error).message} (${extra.join('; ')})`) : err;
  } finally {
    if (client) await client.close().catch(() => {});
    await pair.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- checkpoint latency

/** The range: flat from 1 MiB to 1 GiB pending. */
const CKPT_SIZES = [1 * MiB, 64 * MiB, 256 * MiB, 1024 * MiB];
const CKPT_TOP = CKPT_SIZES[CKPT_SIZES.length - 1];
const ckptReps = (ctx: BenchContext) => (ctx.quick ? [5, 5, 2, 1] : [30, 30, 10, 5]);
/**
 * The primary's budget in this scenario: a 1 GiB epoch is held whole until the secondary's durable
 * answer, more than the default 1G budget (which would mark the peer out of sync, as it should).
 */
const CKPT_BUDGET = '2G';

interface CkptSample extends CheckpointTimes {
  writeMs: number;
  shipMs: number;
  /** Committed bytes the secondary had not applied yet when the checkpoint started. */
  secondaryUnappliedBytes: number;
}

export const checkpointScenario: ScenarioDef = {
  id: 'checkpoint',
  title: 'Checkpoint latency',
  method: (ctx) => {
    const reps = ckptReps(ctx);
    return (
      `A fresh pair (primary and secondary, each with a sparse ${sizeName(PAIR_SIZE)} image; images and state ` +
      `directories on tmpfs; default I/O mode; the primary with \`--budget ${CKPT_BUDGET}\`, since a 1 GiB ` +
      'epoch is held whole until the secondary holds it durably). For each pending size, repeated ' +
      CKPT_SIZES.map((s, i) => `${reps[i]}× at ${sizeName(s)}`).join(', ') +
      ': write that many bytes into the open epoch through colo-blk’s NBD client (64 KiB writes at random ' +
      `64 KiB-aligned offsets, ${IN_FLIGHT} in flight), wait until the primary’s \`GET /status\` shows ` +
      '`lag.unsentBytes` 0 (the data has been shipped, as it would be while a VM runs), then run one ' +
      '`POST /checkpoint` and record the phase times the primary reports (seal, durable, commit, total). ' +
      'One unrecorded 1 MiB round first. The secondary applies committed epochs in the background, so a ' +
      'checkpoint may overlap the apply of the previous one, as it would in a running pair. Percentiles ' +
      'are nearest-rank (p99 of 30 samples is the largest).'
    );
  },
  tmpfsBytes: () => 2 * PAIR_SIZE + 3 * 1024 * MiB + 256 * MiB,
  async run(ctx) {
    const reps = ckptReps(ctx);
    return withPair(ctx, 'checkpoint', CKPT_BUDGET, async (pair, client) => {
      const round = async (bytes: number): Promise<CkptSample> => {
        const writeMs = await writeRandom(client, bytes, PAIR_SIZE);
        const shipMs = await waitShipped(pair.primary, 60_000);
        const sec = await status(pair.secondary);
        const c = await checkpoint(pair.primary, 30_000);
        return { ...c, writeMs, shipMs, secondaryUnappliedBytes: sec.lag.unappliedBytes };
      };
      await round(1 * MiB);
      const bySize: { bytes: number; samples: CkptSample[] }[] = [];
      for (const [i, bytes] of CKPT_SIZES.entries()) {
        const samples: CkptSample[] = [];
        const t = performance.now();
        for (let k = 0; k < reps[i]; k++) {
          try {
            samples.push(await round(bytes));
          } catch (err) {
            throw new Error(`${sizeName(bytes)} pending, round ${k + 1}: ${(err as Error).message}`);
          }
        }
        const totals = sortNum(samples.map((s) => s.totalMs));
        ctx.log(
          `    ${sizeName(bytes)} pending: ${samples.length} checkpoints, p50 ${fmtMs(percentile(totals, 0.5))} ms, ` +
            `p99 ${fmtMs(percentile(totals, 0.99))} ms  (${((performance.now() - t) / 1000).toFixed(1)} s)`,
        );
        bySize.push({ bytes, samples });
      }
      return checkpointReport(bySize, unlinkTimes(ctx));
    });
  },
};

/**
 * For comparison with the durable phase: how long deleting a file of each pending size takes on
 * this tmpfs (written, then fs.rmSync'd, in this process). Freeing a big tmpfs file is not free.
 */
function unlinkTimes(ctx: BenchContext): Record<number, number> {
  const file = path.join(ctx.workDir, 'unlink-probe');
  const chunk = Buffer.alloc(MiB, 1);
  const out: Record<number, number> = {};
  for (const bytes of CKPT_SIZES) {
    const fd = fs.openSync(file, 'w');
    try {
      for (let off = 0; off < bytes; off += MiB) fs.writeSync(fd, chunk, 0, MiB, off);
    } finally {
      fs.closeSync(fd);
    }
    const t = performance.now();
    fs.rmSync(file);
    out[bytes] = performance.now() - t;
  }
  return out;
}

function checkpointReport(
  bySize: { bytes: number; samples: CkptSample[] }[],
  unlinkMs: Record<number, number>,
): ScenarioReport {
  const stats = bySize.map(({ bytes, samples }) => {
    const p = (key: keyof CkptSample, q: number) => percentile(sortNum(samples.map((s) => s[key])), q);
    const mean = (key: keyof CkptSample) => samples.reduce((a, s) => a + s[key], 0) / samples.length;
    return {
      bytes,
      n: samples.length,
      totalP50: p('totalMs', 0.5),
      totalP99: p('totalMs', 0.99),
      totalMax: p('totalMs', 1),
      sealP50: p('sealMs', 0.5),
      durableP50: p('durableMs', 0.5),
      commitP50: p('commitMs', 0.5),
      sealP99: p('sealMs', 0.99),
      durableP99: p('durableMs', 0.99),
      commitP99: p('commitMs', 0.99),
      writesP50: p('writes', 0.5),
      checkpointedBytesP50: p('bytes', 0.5),
      shipMsP50: p('shipMs', 0.5),
      writeMBps: (bytes * samples.length) / 1e6 / (samples.reduce((a, s) => a + s.writeMs, 0) / 1000),
      meanUnapplied: mean('secondaryUnappliedBytes'),
    };
  });
  const at = (bytes: number) => stats.find((s) => s.bytes === bytes);
  const s1 = at(1 * MiB);
  const s64 = at(64 * MiB);
  const sTop = at(CKPT_TOP);
  const le = (what: string, v: number | undefined, limit: number, target: string): Target => ({
    what,
    target,
    measured: v === undefined ? null : `${fmtMs(v)} ms`,
    pass: v === undefined ? null : v <= limit,
  });
  const targets: Target[] = [
    le('checkpoint p50 total, 64 MiB pending', s64?.totalP50, 5, '≤ 5 ms'),
    le('checkpoint p99 total, 64 MiB pending', s64?.totalP99, 20, '≤ 20 ms'),
    {
      what: `checkpoint p50 total, ${sizeName(CKPT_TOP)} ÷ 1 MiB pending`,
      target: '≤ 2× (flat)',
      measured:
        s1 && sTop
          ? `${(sTop.totalP50 / s1.totalP50).toFixed(2)}× (${fmtMs(sTop.totalP50)} ÷ ${fmtMs(s1.totalP50)} ms)`
          : null,
      pass: s1 && sTop ? sTop.totalP50 <= 2 * s1.totalP50 : null,
    },
  ];
  const notes: string[] = [];
  for (const s of stats) {
    const phases = { seal: s.sealP50, durable: s.durableP50, commit: s.commitP50 };
    const [top] = Object.entries(phases).sort((a, b) => b[1] - a[1]);
    notes.push(
      `${sizeName(s.bytes)}: the largest phase at p50 is ${top[0]} (${fmtMs(top[1])} of ${fmtMs(s.totalP50)} ms); ` +
        `p99 seal ${fmtMs(s.sealP99)}, durable ${fmtMs(s.durableP99)}, commit ${fmtMs(s.commitP99)} ms. ` +
        `Writing the ${sizeName(s.bytes)} ran at ${Math.round(s.writeMBps)} MB/s and shipping the rest took ` +
        `${fmtMs(s.shipMsP50)} ms (p50) after the last write; the secondary had on average ` +
        `${fmtMiB(s.meanUnapplied)} committed but unapplied when a checkpoint started.`,
    );
  }
  if (s1 && sTop && sTop.durableP50 > 2 * s1.durableP50) {
    const perMiB = (sTop.durableP50 - s1.durableP50) / ((sTop.bytes - s1.bytes) / MiB);
    notes.push(
      `The durable phase grows with the epoch’s size although its data had been shipped before the ` +
        `checkpoint: about ${perMiB.toFixed(3)} ms per MiB at p50. For comparison, deleting a file of ` +
        CKPT_SIZES.map((b) => `${sizeName(b)} takes ${fmtMs(unlinkMs[b])} ms`).join(', ') +
        ' on this tmpfs (measured in the benchmark process). The primary deletes an epoch’s journal when the ' +
        'secondary’s durable answer arrives (PrimaryLog.releaseThrough, called by the link before it ' +
        'resolves the durable wait); if that deletion is synchronous, its cost lands in this phase.',
    );
  }
  return {
    tables: [
      {
        table: {
          columns: [
            'Pending',
            'Checkpoints',
            'p50 total (ms)',
            'p99 total (ms)',
            'p50 seal (ms)',
            'p50 durable (ms)',
            'p50 commit (ms)',
            'Writes per epoch',
          ],
          rows: stats.map((s) => [
            sizeName(s.bytes),
            String(s.n),
            fmtMs(s.totalP50),
            fmtMs(s.totalP99),
            fmtMs(s.sealP50),
            fmtMs(s.durableP50),
            fmtMs(s.commitP50),
            String(s.writesP50),
          ]),
        },
      },
    ],
    targets,
    notes,
    data: {
      unlinkMsBySize: Object.fromEntries(Object.entries(unlinkMs).map(([k, v]) => [k, round2(v)])),
      sizes: bySize.map(({ bytes, samples }, i) => ({
        pendingBytes: bytes,
        ...Object.fromEntries(
          Object.entries(stats[i]).map(([k, v]) => [k, typeof v === 'number' ? round2(v) : v]),
        ),
        samples: samples.map((s) =>
          Object.fromEntries(Object.entries(s).map(([k, v]) => [k, typeof v === 'number' ? round2(v) : v])),
        ),
      })),
    },
  };
}

// ---------------------------------------------------------------- memory

const MEMORY_PENDING = GiB;
const MEMORY_LIMIT = 256 * MiB;

export const memoryScenario: ScenarioDef = {
  id: 'memory',
  title: 'Memory with 1 GiB pending',
  method: () =>
    `A fresh pair (each node with a sparse ${sizeName(PAIR_SIZE)} image; images and state directories on tmpfs; ` +
    'the primary with `--budget 4G`). Write 1 GiB into one epoch through colo-blk’s NBD client (64 KiB ' +
    `writes at random 64 KiB-aligned offsets, ${IN_FLIGHT} in flight; no checkpoint), wait until the primary’s ` +
    '`lag.unsentBytes` is 0, and read VmRSS and VmHWM of both node processes from `/proc/PID/status`. Then ' +
    'run one checkpoint, wait until the secondary has applied it (its `GET /status` shows the epoch applied and ' +
    'nothing pending) ' +
    'and read them again. Peak = VmHWM at the end (the high-water mark over the process’s life).',
  tmpfsBytes: () => 2 * PAIR_SIZE + 2 * MEMORY_PENDING + 512 * MiB,
  async run(ctx) {
    return withPair(ctx, 'memory', '4G', async (pair, client) => {
      const nodes = { primary: pair.primary, secondary: pair.secondary };
      const read = () =>
        Object.fromEntries(Object.entries(nodes).map(([k, n]) => [k, memoryOf(n.pid)])) as Record<
          'primary' | 'secondary',
          { rss: number; hwm: number }
        >;
      const atStart = read();
      const writeMs = await writeRandom(client, MEMORY_PENDING, PAIR_SIZE);
      const shipMs = await waitShipped(pair.primary, 120_000);
      const prim = await status(pair.primary);
      const pending = read();
      ctx.log(
        `    1 GiB written in ${(writeMs / 1000).toFixed(1)} s, shipped ${(shipMs / 1000).toFixed(1)} s later; ` +
          `RSS primary ${fmtMiB(pending.primary.rss)}, secondary ${fmtMiB(pending.secondary.rss)}`,
      );
      const ckpt = await checkpoint(pair.primary, 120_000);
      const t = performance.now();
      // Applied: the epoch has left the secondary's pending list (an empty 'receiving' entry for the next
      // epoch may appear there; it holds nothing).
      await pollStatus(
        pair.secondary,
        (s) => s.appliedEpoch >= ckpt.epoch && !s.pending.some((p: { bytes: number }) => p.bytes > 0),
        'the secondary applying the epoch',
        300_000,
        20,
      );
      const applyMs = performance.now() - t;
      const end = read();
      ctx.log(
        `    checkpoint ${fmtMs(ckpt.totalMs)} ms, applied ${(applyMs / 1000).toFixed(1)} s later; ` +
          `peak primary ${fmtMiB(end.primary.hwm)}, secondary ${fmtMiB(end.secondary.hwm)}`,
      );
      const targets: Target[] = (['primary', 'secondary'] as const).map((role) => ({
        what: `peak RSS of the ${role}, 1 GiB pending`,
        target: '≤ 256 MiB',
        measured: fmtMiB(end[role].hwm),
        pass: end[role].hwm <= MEMORY_LIMIT,
      }));
      const row = (role: 'primary' | 'secondary') => [
        role,
        fmtMiB(atStart[role].rss),
        fmtMiB(pending[role].rss),
        fmtMiB(pending[role].hwm),
        fmtMiB(end[role].rss),
        fmtMiB(end[role].hwm),
      ];
      return {
        tables: [
          {
            table: {
              columns: [
                'Node',
                'RSS at start',
                'RSS, 1 GiB pending',
                'VmHWM, 1 GiB pending',
                'RSS after apply',
                'Peak (VmHWM) after apply',
              ],
              rows: [row('primary'), row('secondary')],
            },
          },
        ],
        targets,
        notes: [
          `Writing 1 GiB took ${(writeMs / 1000).toFixed(1)} s (${Math.round(MEMORY_PENDING / 1e6 / (writeMs / 1000))} MB/s) ` +
            `and the primary had shipped all of it ${(shipMs / 1000).toFixed(2)} s after the last write; the epoch held ` +
            `${prim.pending[0]?.writes ?? '?'} writes. The checkpoint with 1 GiB pending took ${fmtMs(ckpt.totalMs)} ms ` +
            `(seal ${fmtMs(ckpt.sealMs)}, durable ${fmtMs(ckpt.durableMs)}, commit ${fmtMs(ckpt.commitMs)}); ` +
            `the secondary applied it in ${(applyMs / 1000).toFixed(1)} s.`,
        ],
        data: {
          pendingBytes: MEMORY_PENDING,
          bytes: { atStart, pending, afterApply: end },
          writeMs: round2(writeMs),
          shipMs: round2(shipMs),
          primaryHeldBytes: prim.lag.heldBytes,
          checkpoint: ckpt,
          applyMs: round2(applyMs),
        },
      };
    });
  },
};

// ---------------------------------------------------------------- failover

const FAILOVER_LIMIT_MS = 50;

export const failoverScenario: ScenarioDef = {
  id: 'failover',
  title: 'Failover',
  method: (ctx) =>
    `${ctx.quick ? 3 : 10} times: a fresh pair (sparse ${sizeName(PAIR_SIZE)} images on tmpfs; the secondary with ` +
    '`--failover auto --failover-grace 0`), 16 MiB written and checkpointed, 4 MiB more written and not ' +
    'committed, and an NBD client connected to the SVM export. Then the primary is killed with SIGKILL. ' +
    'Measured: from the kill until the secondary reports itself primary (`GET /status` polled every 2 ms), ' +
    'the promotion itself as the secondary timed it (detection to promoted: minting the generation durably and ' +
    'dropping the uncommitted epochs), and from the kill until a 4 KiB FUA write by the SVM’s client ' +
    'completed on the promoted node.',
  tmpfsBytes: () => 3 * PAIR_SIZE,
  async run(ctx) {
    const reps = ctx.quick ? 3 : 10;
    const samples: { killToPromotedMs: number; promotionMs: number; killToWriteMs: number }[] = [];
    for (let i = 0; i < reps; i++) {
      const dir = path.join(ctx.workDir, `failover-${i}`);
      const pair = await startPair(ctx, {
        dir,
        primaryImage: path.join(dir, 'pvm.img'),
        size: PAIR_SIZE,
        exportName: ctx.exportName,
        failover: 'auto',
        failoverGraceMs: 0,
      });
      try {
        const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: ctx.exportName });
        await writeRandom(pvm, 16 * MiB, PAIR_SIZE);
        await checkpoint(pair.primary);
        await writeRandom(pvm, 4 * MiB, PAIR_SIZE);
        pvm.destroy();
        const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: ctx.exportName });
        const t0 = performance.now();
        process.kill(pair.primary.pid, 'SIGKILL');
        const promoted = await pollStatus(
          pair.secondary,
          (s) => s.role === 'primary',
          'the secondary taking over',
          10_000,
          2,
        );
        const killToPromotedMs = performance.now() - t0;
        await svm.write(Buffer.alloc(4096, 1), 0, { fua: true });
        const killToWriteMs = performance.now() - t0;
        await svm.close();
        samples.push({ killToPromotedMs, promotionMs: promoted.promotionMs, killToWriteMs });
        ctx.log(
          `    ${i + 1}/${reps}: promoted ${fmtMs(killToPromotedMs)} ms after the kill (promotion ${fmtMs(promoted.promotionMs)} ms), ` +
            `first write done at ${fmtMs(killToWriteMs)} ms`,
        );
      } finally {
        await pair.stop();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
    const col = (k: keyof (typeof samples)[number]) => samples.map((x) => x[k]).sort((a, b) => a - b);
    const p50 = (k: keyof (typeof samples)[number]) => percentile(col(k), 0.5);
    const p99 = (k: keyof (typeof samples)[number]) => percentile(col(k), 0.99);
    const detectToWrite = samples.map((x) => x.killToWriteMs).sort((a, b) => a - b);
    return {
      tables: [
        {
          table: {
            columns: ['Measure', 'p50 (ms)', 'max (ms)'],
            rows: [
              [
                'kill → secondary reports itself primary',
                fmtMs(p50('killToPromotedMs')),
                fmtMs(p99('killToPromotedMs')),
              ],
              [
                'promotion (detection → promoted), timed by the node',
                fmtMs(p50('promotionMs')),
                fmtMs(p99('promotionMs')),
              ],
              [
                'kill → first SVM write completed on the promoted node',
                fmtMs(p50('killToWriteMs')),
                fmtMs(p99('killToWriteMs')),
              ],
            ],
          },
        },
      ],
      targets: [
        {
          what: 'from detection to the first write served by the promoted node, p50',
          target: `≤ ${FAILOVER_LIMIT_MS} ms`,
          measured: `${fmtMs(percentile(detectToWrite, 0.5))} ms (kill → write; detection is the connection reset)`,
          pass: percentile(detectToWrite, 0.5) <= FAILOVER_LIMIT_MS,
        },
      ],
      notes: [
        'With `--failover-grace 0` the takeover starts when the secondary sees the connection reset, which a killed ' +
          'process causes at once; a frozen or partitioned primary is detected by the heartbeat after ' +
          '`--heartbeat-timeout` (800 ms by default) plus the grace (1 s by default), both outside this figure.',
      ],
      data: { samples },
    };
  },
};

// ---------------------------------------------------------------- a fresh pair on sparse images

const FRESH_SIZES = (ctx: BenchContext) => (ctx.quick ? [GiB, 64 * GiB] : [GiB, 64 * GiB, 1024 * GiB]);
const FRESH_LIMIT_MS = 5000;

export const freshPairScenario: ScenarioDef = {
  id: 'fresh-pair',
  title: 'A fresh pair on empty sparse images, by disk size',
  method: (ctx) =>
    `For each size (${FRESH_SIZES(ctx).map(sizeName).join(', ')}): two new sparse images on tmpfs and empty state ` +
    'directories; the secondary is started, then the primary, which pairs with it at once (a full ' +
    'synchronisation: the two disks are compared by hash). Measured: from starting the primary until its ' +
    '`GET /status` (polled every 10 ms) reports the secondary `protected` (the first checkpoint can run); ' +
    'the resync’s own figures (hash bytes exchanged, bytes found equal, bytes sent); the peak RSS (VmHWM) of ' +
    'both nodes at that point.',
  tmpfsBytes: () => 512 * MiB,
  async run(ctx) {
    const rows: string[][] = [];
    const samples: Record<string, unknown>[] = [];
    const targets: Target[] = [];
    for (const size of FRESH_SIZES(ctx)) {
      const dir = path.join(ctx.workDir, 'fresh-pair');
      const t0 = performance.now();
      const pair = await startPair(ctx, {
        dir,
        primaryImage: path.join(dir, 'pvm.img'),
        size,
        exportName: ctx.exportName,
        syncTimeoutMs: 600_000,
      });
      try {
        const totalMs = performance.now() - t0;
        const mem = { primary: memoryOf(pair.primary.pid), secondary: memoryOf(pair.secondary.pid) };
        const r = pair.initialSync.resync as {
          hashBytes: number;
          equalBytes: number;
          sentBytes: number;
        } | null;
        const protectedMs = pair.initialSync.waitedMs;
        ctx.log(
          `    ${sizeName(size)}: protected ${(protectedMs / 1000).toFixed(2)} s after the primary listened ` +
            `(${(totalMs / 1000).toFixed(2)} s with both starts); hashes ${r?.hashBytes ?? '?'} B; ` +
            `peak RSS ${fmtMiB(mem.primary.hwm)} / ${fmtMiB(mem.secondary.hwm)}`,
        );
        rows.push([
          sizeName(size),
          (protectedMs / 1000).toFixed(2),
          (totalMs / 1000).toFixed(2),
          r ? `${r.hashBytes} B` : '?',
          r ? sizeName(r.equalBytes) : '?',
          r ? `${r.sentBytes} B` : '?',
          fmtMiB(mem.primary.hwm),
          fmtMiB(mem.secondary.hwm),
        ]);
        samples.push({
          size,
          protectedMs: round2(protectedMs),
          totalMs: round2(totalMs),
          resync: r,
          memory: mem,
        });
        targets.push({
          what: `a fresh pair on empty sparse ${sizeName(size)} images is protected (both starts included)`,
          target: `≤ ${FRESH_LIMIT_MS / 1000} s`,
          measured: `${(totalMs / 1000).toFixed(2)} s`,
          pass: totalMs <= FRESH_LIMIT_MS,
        });
      } finally {
        await pair.stop();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    }
    const hwm = samples.map((x) => (x.memory as { primary: { hwm: number } }).primary.hwm);
    targets.push({
      what: `peak RSS of the primary, flat in disk size (${FRESH_SIZES(ctx).map(sizeName).join(' → ')})`,
      target: '≤ 1.25× the smallest',
      measured: `${fmtMiB(Math.max(...hwm))} vs ${fmtMiB(hwm[0])}`,
      pass: Math.max(...hwm) <= 1.25 * hwm[0],
    });
    return {
      tables: [
        {
          table: {
            columns: [
              'Disk',
              'Primary listening → protected (s)',
              'Both starts → protected (s)',
              'Hashes exchanged',
              'Found equal',
              'Sent',
              'Peak RSS primary',
              'Peak RSS secondary',
            ],
            rows,
          },
        },
      ],
      targets,
      notes: [
        'Holes cost nothing: both sides hash a block that reads as zeroes to a zero mark without reading it ' +
          '(SEEK_HOLE), and the primary asks for one hash per hole of up to 1 GiB. Disks full of data are ' +
          'bound by SHA-256 on each side: see the full sync of identical disks under Re-protection.',
      ],
      data: { samples },
    };
  },
};

export const SCENARIOS: ScenarioDef[] = [
  limitsScenario,
  checkpointScenario,
  memoryScenario,
  failoverScenario,
  resyncScenario,
  recoveryScenario,
  freshPairScenario,
  ...LOOP_SCENARIOS,
  ...VM_SCENARIOS,
];
