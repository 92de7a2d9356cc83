/**
 * The workloads. Each runs one client program against a running server and
 * returns one figure (higher is better). All figures are decimal: 1 MB/s is
 * 10^6 bytes per second.
 */
import fs from 'node:fs';
import path from 'node:path';
import { median } from '../src/util/stats.js';
import { fillRandom } from './image.js';
import { runCommand, shellQuote } from './proc.js';
import type { BenchContext, Measurement, RunningServer, WorkloadDef } from './types.js';

// ---------------------------------------------------------------- fio (nbd engine)

interface FioSpec {
  id: string;
  title: string;
  rw: 'read' | 'write' | 'randread' | 'randwrite';
  bs: string;
  iodepth: number;
  unit: 'MB/s' | 'IOPS';
}

const fioTimes = (ctx: BenchContext) => (ctx.quick ? { runtime: 1, ramp: 0 } : { runtime: 5, ramp: 1 });

function fioArgs(ctx: BenchContext, spec: FioSpec, uri: string): string[] {
  const { runtime, ramp } = fioTimes(ctx);
  return [
    `--name=${spec.id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${spec.rw}`,
    `--bs=${spec.bs}`,
    `--iodepth=${spec.iodepth}`,
    '--numjobs=1',
    '--time_based',
    `--runtime=${runtime}`,
    `--ramp_time=${ramp}`,
    '--output-format=json',
  ];
}

interface FioSide {
  bw_bytes: number;
  iops: number;
  io_bytes: number;
  clat_ns?: { mean?: number; percentile?: Record<string, number> };
  lat_ns?: { mean?: number };
}
interface FioJob {
  error: number;
  read: FioSide;
  write: FioSide;
}

/** fio prints "fio: connected to NBD server" (and maybe warnings) before the JSON document. */
export function parseFioJson(stdout: string): FioJob {
  const start = stdout.search(/^\{/m);
  if (start < 0) throw new Error(`fio printed no JSON: ${stdout.trim().slice(0, 200) || 'no output'}`);
  const doc = JSON.parse(stdout.slice(start)) as { jobs?: FioJob[] };
  const job = doc.jobs?.[0];
  if (!job) throw new Error('fio JSON has no jobs');
  return job;
}

function fio(spec: FioSpec): WorkloadDef {
  return {
    id: spec.id,
    group: 'fio',
    title: spec.title,
    unit: spec.unit,
    tool: 'fio',
    commandLine: (ctx, uri) => shellQuote(['fio', ...fioArgs(ctx, spec, uri)]),
    async run(ctx, server): Promise<Measurement> {
      const { runtime, ramp } = fioTimes(ctx);
      const argv = fioArgs(ctx, spec, server.uri);
      const r = await (server.clientCpus
        ? runCommand('taskset', ['-c', server.clientCpus, 'fio', ...argv], {
            timeoutMs: (runtime + ramp + 60) * 1000,
          })
        : runCommand('fio', argv, {
            timeoutMs: (runtime + ramp + 60) * 1000,
          }));
      const job = parseFioJson(r.stdout);
      if (job.error) throw new Error(`fio job error ${job.error}`);
      const side = spec.rw === 'read' || spec.rw === 'randread' ? job.read : job.write;
      if (!side || !(side.io_bytes > 0)) throw new Error('fio completed no I/O');
      const p = side.clat_ns?.percentile ?? {};
      const us = (ns: number | undefined) => (ns === undefined ? undefined : Math.round(ns / 100) / 10);
      return {
        value: spec.unit === 'IOPS' ? side.iops : side.bw_bytes / 1e6,
        detail: {
          iops: Math.round(side.iops),
          mbps: Math.round(side.bw_bytes / 1e4) / 100,
          latMeanUs: us(side.lat_ns?.mean),
          clatP50Us: us(p['50.000000']),
          clatP99Us: us(p['99.000000']),
          clatP999Us: us(p['99.900000']),
          runtimeS: runtime,
          bytesPerS: Math.round(side.bw_bytes),
          ...(server.clientCpus ? { clientCpus: server.clientCpus } : {}),
        },
      };
    },
  };
}

// ---------------------------------------------------------------- nbdcopy (multi-conn)

const NBDCOPY_OPTS = ['--connections=4', '--threads=4'];
const nbdcopyReps = (ctx: BenchContext) => (ctx.quick ? 1 : 3);
const sourceFile = (ctx: BenchContext) => path.join(ctx.workDir, 'nbdcopy-source.img');

function nbdcopy(id: string, title: string, direction: 'read' | 'write'): WorkloadDef {
  const args = (ctx: BenchContext, uri: string) =>
    direction === 'read' ? [...NBDCOPY_OPTS, uri, 'null:'] : [...NBDCOPY_OPTS, sourceFile(ctx), uri];
  return {
    id,
    group: 'nbdcopy',
    title,
    unit: 'MB/s',
    tool: 'nbdcopy',
    commandLine: (ctx, uri) =>
      `${shellQuote(['nbdcopy', ...args(ctx, uri)])}   # whole export, median of ${nbdcopyReps(ctx)}`,
    prepare:
      direction === 'write'
        ? async (ctx) => {
            if (fs.existsSync(sourceFile(ctx))) return;
            ctx.log(`creating the nbdcopy source file (${ctx.imageSize / 2 ** 20} MiB, random data)`);
            fillRandom(sourceFile(ctx), ctx.imageSize);
          }
        : undefined,
    async run(ctx, server: RunningServer): Promise<Measurement> {
      const rates: number[] = [];
      for (let i = 0; i < nbdcopyReps(ctx); i++) {
        const r = await runCommand('nbdcopy', args(ctx, server.uri), { timeoutMs: 180_000 });
        rates.push(ctx.imageSize / (r.ms / 1000) / 1e6);
      }
      return {
        value: median(rates),
        detail: { runsMBps: rates.map((x) => Math.round(x * 10) / 10), bytes: ctx.imageSize },
      };
    },
  };
}

// ---------------------------------------------------------------- qemu-img bench (QEMU's NBD client)

/**
 * qemu-img bench runs a fixed number of requests, and rates differ by 100× between servers (qemu-nbd
 * 7.2 does not set TCP_NODELAY, so QEMU's client meets Nagle + delayed-ACK stalls there). So the
 * count is calibrated: a short probe run, then a run sized to last about `targetS`, unless the probe
 * alone already took half of that.
 */
const qemuImgPlan = (ctx: BenchContext) =>
  ctx.quick ? { probe: 1000, targetS: 0.5, max: 100_000 } : { probe: 2000, targetS: 3, max: 1_000_000 };

function qemuImg(id: string, title: string, write: boolean): WorkloadDef {
  const args = (uri: string, count: number | string) => [
    'bench',
    '-f',
    'raw',
    '-d',
    '16',
    '-s',
    '4096',
    '-c',
    String(count),
    ...(write ? ['-w', '--pattern=165'] : []),
    uri,
  ];
  const once = async (uri: string, count: number) => {
    const r = await runCommand('qemu-img', args(uri, count), { timeoutMs: 180_000 });
    const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
    if (!m) throw new Error(`qemu-img bench printed no timing: ${r.stdout.trim().slice(-200)}`);
    const seconds = Number(m[1]);
    if (!(seconds > 0)) throw new Error(`qemu-img bench reported ${seconds} s`);
    return { count, seconds, iops: count / seconds };
  };
  return {
    id,
    group: 'qemu-img',
    title,
    unit: 'IOPS',
    tool: 'qemu-img',
    commandLine: (ctx, uri) => {
      const p = qemuImgPlan(ctx);
      return `${shellQuote(['qemu-img', ...args(uri, 'COUNT')])}   # COUNT: ${p.probe}-request probe, then sized for ~${p.targetS} s`;
    },
    async run(ctx, server): Promise<Measurement> {
      const plan = qemuImgPlan(ctx);
      const probe = await once(server.uri, plan.probe);
      let final = probe;
      if (probe.seconds < plan.targetS / 2) {
        const count = Math.min(plan.max, Math.max(plan.probe, Math.round(probe.iops * plan.targetS)));
        final = await once(server.uri, count);
      }
      return {
        value: final.iops,
        detail: { requests: final.count, seconds: final.seconds, probeIops: Math.round(probe.iops) },
      };
    },
  };
}

export const WORKLOADS: WorkloadDef[] = [
  fio({
    id: 'fio-seq-read',
    title: 'fio seq read 1 MiB, QD8',
    rw: 'read',
    bs: '1M',
    iodepth: 8,
    unit: 'MB/s',
  }),
  fio({
    id: 'fio-seq-write',
    title: 'fio seq write 1 MiB, QD8',
    rw: 'write',
    bs: '1M',
    iodepth: 8,
    unit: 'MB/s',
  }),
  fio({
    id: 'fio-rand-read',
    title: 'fio rand read 4 KiB, QD32',
    rw: 'randread',
    bs: '4k',
    iodepth: 32,
    unit: 'IOPS',
  }),
  fio({
    id: 'fio-rand-write',
    title: 'fio rand write 4 KiB, QD32',
    rw: 'randwrite',
    bs: '4k',
    iodepth: 32,
    unit: 'IOPS',
  }),
  nbdcopy('nbdcopy-read', 'nbdcopy export -> null:, 4 conns', 'read'),
  nbdcopy('nbdcopy-write', 'nbdcopy file -> export, 4 conns', 'write'),
  qemuImg('qemu-img-read', 'qemu-img bench read 4 KiB, QD16', false),
  qemuImg('qemu-img-write', 'qemu-img bench write 4 KiB, QD16', true),
];
