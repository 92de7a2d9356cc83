/**
 * The physical limits of this machine for what colo-blk does, measured in the
 * same run as colo-blk: a small C program (bench/ref/limits.c, built here with
 * the machine's C compiler) copies memory, writes tmpfs, streams over loopback
 * TCP and relays a stream as a replicating primary would, with plain system
 * calls and nothing else.
 *
 * The relay is the ceiling of the replication ratio at 1 MiB writes: a client
 * streams 1 MiB chunks to a server that writes each one into an image on
 * tmpfs ("alone"), or also sends it on to a sink on the other core that
 * writes it into a journal file ("replicating"), pinned as the pinned pair
 * is (client and server on CPU 0, the sink on CPU 1). No NBD, no checksums,
 * no resend copy: what any replicating design pays at least here.
 */
import fs from 'node:fs';
import path from 'node:path';
import { median } from '../src/util/stats.js';
import { freePort, runCommand, type RunResult } from './proc.js';
import { PIN } from './servers.js';
import type { BenchContext, ScenarioDef, ScenarioReport } from './types.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const round2 = (x: number) => Math.round(x * 100) / 100;

/** What one run of the C program printed. */
interface Run {
  bytes: number;
  seconds: number;
  cpuSeconds: number;
}

/** GB/s and CPU-seconds per GiB of a run. */
const rate = (r: Run) => r.bytes / r.seconds / 1e9;
const cpuPerGiB = (r: Run) => r.cpuSeconds / (r.bytes / GiB);

/** The first C compiler on the PATH, or null. */
async function findCompiler(): Promise<string | null> {
  for (const cc of ['cc', 'gcc', 'clang']) {
    const r = await runCommand(cc, ['--version'], { timeoutMs: 10_000, allowFailure: true }).catch(
      () => null,
    );
    if (r && r.code === 0) return cc;
  }
  return null;
}

async function hasTaskset(): Promise<boolean> {
  const r = await runCommand('taskset', ['-c', '0', 'true'], { timeoutMs: 10_000, allowFailure: true }).catch(
    () => null,
  );
  return r !== null && r.code === 0;
}

function parseRun(r: RunResult, what: string): Run {
  const line = r.stdout.trim().split('\n').pop() ?? '';
  try {
    const j = JSON.parse(line) as Run;
    if (typeof j.bytes === 'number' && typeof j.seconds === 'number' && typeof j.cpuSeconds === 'number')
      return j;
  } catch {
    // reported below
  }
  throw new Error(`${what}: unexpected output ${JSON.stringify(line.slice(0, 200))}`);
}

/** Sizes: bytes streamed per run, the image and the journal the relay writes into. */
const plan = (ctx: BenchContext) =>
  ctx.quick
    ? { mib: 1024, imageBytes: 256 * MiB, journalBytes: 64 * MiB, newPagesBytes: 256 * MiB, reps: 1 }
    : { mib: 4096, imageBytes: GiB, journalBytes: 256 * MiB, newPagesBytes: GiB, reps: 3 };

export const limitsScenario: ScenarioDef = {
  id: 'limits',
  title: 'Physical limits of this machine (plain system calls, C)',
  method: (ctx) => {
    const p = plan(ctx);
    return (
      '`bench/ref/limits.c`, built with the machine’s C compiler (`cc -O2`), run as one to three processes ' +
      'with nothing else running; CPU is each process’s own (getrusage). **memcpy**: 1 MiB pieces between ' +
      'two 256 MiB buffers, one core. **tmpfs writes**: `pwrite` of 1 MiB chunks over a file’s existing pages, ' +
      `and into a new sparse ${p.newPagesBytes / MiB} MiB file. **Loopback TCP**: one stream of 1 MiB writes, ` +
      `sender on CPU ${PIN.primary}, receiver (dropping the bytes) on CPU ${PIN.secondary}. **Relay**, the ` +
      'floor of what replicating 1 MiB writes costs: a client streams 1 MiB chunks to a server that ' +
      `\`pwrite\`s each into a ${p.imageBytes / MiB} MiB image on tmpfs (*alone*), or also sends it on to a ` +
      `sink that \`pwrite\`s it into a ${p.journalBytes / MiB} MiB journal (*replicating*); the client and ` +
      `the server on CPU ${PIN.primary}, the sink on CPU ${PIN.secondary}, as the pinned pair runs. ` +
      `${p.mib / 1024} GiB per run; alone and replicating alternated, ${p.reps} of each, medians.`
    );
  },
  tmpfsBytes: (ctx) => {
    const p = plan(ctx);
    return p.imageBytes + p.journalBytes + p.newPagesBytes + 16 * MiB;
  },
  async run(ctx): Promise<ScenarioReport> {
    const p = plan(ctx);
    const cc = await findCompiler();
    if (!cc)
      throw new Error('no C compiler (cc, gcc or clang) to build bench/ref/limits.c: apt-get install gcc');
    const pin = await hasTaskset();
    if (!pin) throw new Error('taskset is missing (apt-get install util-linux): the relay must be pinned');
    const dir = path.join(ctx.workDir, 'limits');
    fs.mkdirSync(dir, { recursive: true });
    const bin = path.join(dir, 'limits');
    await runCommand(cc, ['-O2', '-o', bin, path.join(ctx.root, 'bench/ref/limits.c')], {
      timeoutMs: 120_000,
    });
    const image = path.join(dir, 'image.img');
    const journal = path.join(dir, 'journal');
    const fresh = path.join(dir, 'new-pages.img');
    try {
      const one = async (cpu: string, args: string[]): Promise<Run> =>
        parseRun(
          await runCommand('taskset', ['-c', cpu, bin, ...args], { timeoutMs: 300_000 }),
          `limits ${args[0]}`,
        );
      // The image and the journal get their pages before anything is measured over them.
      for (const [file, bytes] of [
        [image, p.imageBytes],
        [journal, p.journalBytes],
      ] as const) {
        fs.writeFileSync(file, '');
        fs.truncateSync(file, bytes);
        await one(PIN.primary, ['write', file, String(bytes / MiB)]);
      }

      ctx.log('    memcpy, tmpfs writes');
      const memcpy = await one(PIN.primary, ['memcpy', String(p.mib)]);
      const overPages = await one(PIN.primary, ['write', image, String(p.mib)]);
      fs.writeFileSync(fresh, '');
      fs.truncateSync(fresh, p.newPagesBytes);
      const newPages = await one(PIN.primary, ['write', fresh, String(p.newPagesBytes / MiB)]);
      fs.rmSync(fresh, { force: true });

      ctx.log('    loopback TCP, one stream');
      const tcpPort = await freePort();
      const [tcpRecv, tcpSend] = await Promise.all([
        one(PIN.secondary, ['sink', String(tcpPort), '-']),
        one(PIN.primary, ['send', String(tcpPort), String(p.mib)]),
      ]);

      const alone: { server: Run; client: Run }[] = [];
      const replicating: { relay: Run; sink: Run }[] = [];
      for (let i = 0; i < p.reps; i++) {
        ctx.log(`    relay ${i + 1}/${p.reps}: alone, then replicating`);
        const port = await freePort();
        const [server, client] = await Promise.all([
          one(PIN.primary, ['sink', String(port), image]),
          one(PIN.primary, ['send', String(port), String(p.mib)]),
        ]);
        alone.push({ server, client });
        const [inPort, outPort] = [await freePort(), await freePort()];
        const [sink, relay] = await Promise.all([
          one(PIN.secondary, ['sink', String(outPort), journal]),
          one(PIN.primary, ['relay', String(inPort), image, String(outPort)]),
          one(PIN.primary, ['send', String(inPort), String(p.mib)]),
        ]);
        replicating.push({ relay, sink });
      }

      const aloneRate = median(alone.map((x) => rate(x.server)));
      const aloneCpu = median(alone.map((x) => cpuPerGiB(x.server)));
      const replRate = median(replicating.map((x) => rate(x.relay)));
      const relayCpu = median(replicating.map((x) => cpuPerGiB(x.relay)));
      const sinkCpu = median(replicating.map((x) => cpuPerGiB(x.sink)));
      const relay = {
        aloneGBps: round2(aloneRate),
        replicatingGBps: round2(replRate),
        ratio: round2(replRate / aloneRate),
        serverCpuPerGiB: round2(aloneCpu),
        relayCpuPerGiB: round2(relayCpu),
        sinkCpuPerGiB: round2(sinkCpu),
        primaryCpuRatio: round2(relayCpu / aloneCpu),
        secondaryCpuRatio: round2(sinkCpu / aloneCpu),
        addedCpuPerGiB: round2(relayCpu - aloneCpu),
      };
      const gbps = (x: number) => x.toFixed(2);
      const s = (x: number) => x.toFixed(2);
      return {
        tables: [
          {
            table: {
              columns: ['What', 'GB/s', 'CPU s/GiB'],
              rows: [
                ['memcpy, memory to memory, one core', gbps(rate(memcpy)), s(cpuPerGiB(memcpy))],
                ['tmpfs `pwrite` over existing pages', gbps(rate(overPages)), s(cpuPerGiB(overPages))],
                ['tmpfs `pwrite` into new pages', gbps(rate(newPages)), s(cpuPerGiB(newPages))],
                [
                  'loopback TCP, one stream (sender / receiver)',
                  gbps(rate(tcpRecv)),
                  `${s(cpuPerGiB(tcpSend))} / ${s(cpuPerGiB(tcpRecv))}`,
                ],
              ],
            },
          },
          {
            caption:
              'The relay: the floor of replicating 1 MiB writes with plain system calls, pinned as the pinned pair',
            table: {
              columns: ['Relay', 'GB/s', 'Server CPU s/GiB', 'Sink CPU s/GiB', 'Runs (GB/s)'],
              rows: [
                [
                  'alone: receive + write the image',
                  gbps(aloneRate),
                  s(aloneCpu),
                  '–',
                  alone.map((x) => gbps(rate(x.server))).join(', '),
                ],
                [
                  'replicating: receive + write the image + send; the sink receives + writes a journal',
                  gbps(replRate),
                  s(relayCpu),
                  s(sinkCpu),
                  replicating.map((x) => gbps(rate(x.relay))).join(', '),
                ],
                [
                  'replicating ÷ alone',
                  `${relay.ratio.toFixed(2)}×`,
                  `${relay.primaryCpuRatio.toFixed(2)}×`,
                  `${relay.secondaryCpuRatio.toFixed(2)}× (of the server alone)`,
                  '',
                ],
              ],
              align: ['l', 'r', 'r', 'r', 'r'],
            },
          },
        ],
        targets: [],
        notes: [
          `The relay’s replicating ÷ alone (${relay.ratio.toFixed(2)}×; sending each chunk on adds ` +
            `${s(relay.addedCpuPerGiB)} CPU-s/GiB to the server; the sink takes ${s(sinkCpu)}) is what ` +
            'replication costs here before any NBD, checksum or resend copy. The replication-overhead targets at ' +
            '1 MiB (≥ 0.8×, the primary ≤ 1.3×, the secondary ≤ 1.0× of colo-blk alone) show these figures ' +
            'beside their own. On loopback the sender also runs the receiver’s TCP processing (softirq in its ' +
            'own context), which a second host would do itself.',
        ],
        data: {
          memcpy,
          tmpfsOverPages: overPages,
          tmpfsNewPages: newPages,
          tcp: { send: tcpSend, recv: tcpRecv },
          alone,
          replicating,
          relay,
        },
      };
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  },
};
