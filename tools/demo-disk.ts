/**
 * `npm run demo:disk`: a COLO disk pair live on localhost, needing nothing but this
 * package. It starts `colo-blk secondary` and `colo-blk primary` as real
 * processes on fresh images, drives a guest-like workload on the PVM's export
 * (writes, overwrites, FUA writes, flushes, write-zeroes, trims) and a
 * different one on the SVM's export, and checkpoints every few hundred
 * milliseconds. At each checkpoint the workloads pause (as the VMs would),
 * the checkpoint runs (seal → durable → commit), and the demo verifies by
 * sha256 that the SVM's disk now equals the PVM's, byte for byte.
 *
 * Halfway through, the primary is killed (SIGKILL) in the middle of the
 * workload. The secondary detects it by heartbeat and takes over on its own
 * (a new generation); the SVM's workload runs on through the same NBD
 * connections. A fresh secondary is started and paired with `colo-blk
 * reprotect` (a full resync that compares hashes), checkpoints resume, and
 * every one of them is verified by hash again.
 *
 * Options: --seconds N (default 8), --size SIZE (default 64M), --interval MS
 * between checkpoints (default 300), --json (summary as JSON), --keep.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { formatBytes, parseSize } from '../src/util/size.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(ROOT, 'bin', 'colo-blk.js');

interface Args {
  seconds: number;
  size: number;
  intervalMs: number;
  json: boolean;
  keep: boolean;
}

function usage(msg: string): never {
  process.stderr.write(
    `demo: ${msg}\nusage: npm run demo -- [--seconds N] [--size SIZE] [--interval MS] [--json] [--keep]\n`,
  );
  process.exit(2);
}

function parseArgs(argv: string[]): Args {
  const args: Args = { seconds: 8, size: 64 * 1024 * 1024, intervalMs: 300, json: false, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => argv[++i] ?? usage(`${a} needs a value`);
    if (a === '--seconds') args.seconds = Number(next());
    else if (a === '--size') args.size = parseSize(next());
    else if (a === '--interval') args.intervalMs = Number(next());
    else if (a === '--json') args.json = true;
    else if (a === '--keep') args.keep = true;
    else usage(`unknown argument '${a}'`);
  }
  if (!(args.seconds > 0) || !(args.intervalMs > 0)) usage('--seconds and --interval must be positive');
  if (args.size < 8 * 1024 * 1024) usage('--size must be at least 8M');
  return args;
}

function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
}

async function startNode(
  role: string,
  args: string[],
): Promise<{ child: ChildProcess; info: Record<string, number> }> {
  const child = spawn(process.execPath, [CLI, role, '--json', '--quiet', ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const info = await new Promise<Record<string, number>>((resolve, reject) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line) resolve(JSON.parse(line));
    });
    child.once('exit', (code) => reject(new Error(`${role} exited with code ${code}`)));
  });
  return { child, info };
}

async function hashExport(c: NbdClient): Promise<string> {
  const h = createHash('sha256');
  const chunk = 8 * 1024 * 1024;
  for (let off = 0; off < c.size; off += chunk) h.update(await c.read(off, Math.min(chunk, c.size - off)));
  return h.digest('hex');
}

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))] : NaN;
}

/** A guest-like workload that runs until `paused()` says stop; returns op counts. */
async function guest(
  clients: NbdClient[],
  seed: number,
  size: number,
  until: () => boolean,
  counts: Record<string, number>,
  mix: 'pvm' | 'svm',
): Promise<void> {
  const rand = xorshift(seed);
  const inflight: Promise<unknown>[] = [];
  while (!until()) {
    const c = clients[rand() % clients.length];
    const len = 4096 * (1 + (rand() % (mix === 'pvm' ? 64 : 16)));
    // Overwrites: half the writes go to a hot 4 MiB region.
    const span = rand() % 2 ? 4 * 1024 * 1024 : size;
    const off = 4096 * (rand() % Math.floor((span - len) / 4096));
    const op = rand() % 100;
    if (op < 60 || mix === 'svm') {
      const fua = op < 4;
      inflight.push(c.write(randomFillSync(Buffer.allocUnsafe(len)), off, { fua }));
      counts[fua ? 'fua' : 'write']++;
      counts.bytes += len;
    } else if (op < 70) {
      inflight.push(c.zero(off, len, { noHole: op < 65 }));
      counts.zero++;
    } else if (op < 76) {
      inflight.push(c.trim(off, len));
      counts.trim++;
    } else if (op < 80) {
      inflight.push(c.flush());
      counts.flush++;
    } else {
      inflight.push(c.read(off, len));
      counts.read++;
    }
    if (inflight.length >= 16) await Promise.all(inflight.splice(0));
  }
  await Promise.all(inflight);
}

/** Run a guest until told to stop; a guest whose disk goes away (its host was killed) just stops. */
async function guestUntilGone(
  clients: NbdClient[],
  seed: number,
  size: number,
  until: () => boolean,
  counts: Record<string, number>,
  mix: 'pvm' | 'svm',
): Promise<string | null> {
  try {
    await guest(clients, seed, size, until, counts, mix);
    return null;
  } catch (err) {
    return (err as Error).message;
  }
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const say = (s: string) => {
    if (!args.json) process.stdout.write(s + '\n');
  };
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, 'colo-blk-demo-'));
  const children: ChildProcess[] = [];
  process.on('exit', () => {
    for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
    if (!args.keep) fs.rmSync(dir, { recursive: true, force: true });
  });

  say('colo-blk demo: a COLO disk pair on localhost');
  say(`  images and state in ${dir} (${formatBytes(args.size)} disks, sparse)`);
  const secondary = await startNode('secondary', [
    '--listen', '127.0.0.1:0',
    '--export', `disk0=${path.join(dir, 'svm.img')},size=${args.size}`,
    '--state', path.join(dir, 'svm-state'),
    '--replication-listen', '127.0.0.1:0',
    '--control', '127.0.0.1:0',
    '--failover', 'auto', '--failover-grace', '200',
  ]); // prettier-ignore
  children.push(secondary.child);
  const primary = await startNode('primary', [
    '--listen', '127.0.0.1:0',
    '--export', `disk0=${path.join(dir, 'pvm.img')},size=${args.size}`,
    '--state', path.join(dir, 'pvm-state'),
    '--peer', `127.0.0.1:${secondary.info.replicationPort}`,
    '--control', '127.0.0.1:0',
  ]); // prettier-ignore
  children.push(primary.child);
  const pctl = { host: '127.0.0.1', port: primary.info.controlPort };
  say(`  secondary pid ${secondary.child.pid}: SVM disk nbd://127.0.0.1:${secondary.info.port}/disk0`);
  say(`  primary   pid ${primary.child.pid}: PVM disk nbd://127.0.0.1:${primary.info.port}/disk0`);
  say(
    `  replication 127.0.0.1:${secondary.info.replicationPort}, primary control http://127.0.0.1:${pctl.port}\n`,
  );

  const waitProtected = async (ctl: { host: string; port: number }) => {
    for (let i = 0; ; i++) {
      const s = await controlCall<{ peerState: string }>(ctl, 'GET', '/status');
      if (s.peerState === 'protected') return;
      if (i > 800) throw new Error('the secondary was not synchronised in time');
      await new Promise((r) => setTimeout(r, 25));
    }
  };
  await waitProtected(pctl);
  const pvm = await Promise.all(
    [0, 1].map(() => NbdClient.connect({ port: primary.info.port, exportName: 'disk0' })),
  );
  const svm = await Promise.all(
    [0].map(() => NbdClient.connect({ port: secondary.info.port, exportName: 'disk0' })),
  );

  const pvmCounts = { write: 0, fua: 0, zero: 0, trim: 0, flush: 0, read: 0, bytes: 0 };
  const svmCounts = { ...pvmCounts };
  const phases = {
    seal: [] as number[],
    durable: [] as number[],
    commit: [] as number[],
    total: [] as number[],
  };
  const results: { epoch: number; writes: number; bytes: number; equal: boolean; phase: number }[] = [];
  const started = Date.now();
  const half = started + (args.seconds * 1000) / 2;
  const deadline = started + args.seconds * 1000;

  /** The checkpoint loop: VMs run, pause, checkpoint, verify SVM == PVM by hash. */
  const loop = async (
    ctl: { host: string; port: number },
    pvmClients: NbdClient[],
    svmClients: NbdClient[],
    end: number,
    phase: number,
  ) => {
    say('  ckpt  epoch    writes      bytes    seal  durable  commit   total   SVM == PVM');
    while (Date.now() < end) {
      const until = Date.now() + args.intervalMs;
      await Promise.all([
        guest(pvmClients, 1000 + results.length, args.size, () => Date.now() >= until, pvmCounts, 'pvm'),
        guest(svmClients, 5000 + results.length, args.size, () => Date.now() >= until, svmCounts, 'svm'),
      ]);
      const r = await controlCall<Record<string, number>>(ctl, 'POST', '/checkpoint', {});
      phases.seal.push(r.sealMs);
      phases.durable.push(r.durableMs);
      phases.commit.push(r.commitMs);
      phases.total.push(r.totalMs);
      const [a, b] = await Promise.all([hashExport(pvmClients[0]), hashExport(svmClients[0])]);
      results.push({ epoch: r.epoch, writes: r.writes, bytes: r.bytes, equal: a === b, phase });
      say(
        `  ${String(results.length).padStart(4)}  ${String(r.epoch).padStart(5)}  ${String(r.writes).padStart(8)}` +
          `  ${formatBytes(r.bytes).padStart(9)}  ${r.sealMs.toFixed(2).padStart(6)}  ${r.durableMs.toFixed(2).padStart(7)}` +
          `  ${r.commitMs.toFixed(2).padStart(6)}  ${r.totalMs.toFixed(2).padStart(6)}   ${a === b ? 'yes' : 'NO'} ${a.slice(0, 12)}`,
      );
    }
  };

  // Phase 1: a protected pair.
  await loop(pctl, pvm, svm, half, 1);

  // Phase 2: the primary dies in the middle of the workload; the secondary takes over.
  say(`\n  killing the primary (pid ${primary.child.pid}) with SIGKILL while both VMs write...`);
  const sctl = { host: '127.0.0.1', port: secondary.info.controlPort };
  let stop = false;
  const killedAt = Date.now();
  const running = Promise.all([
    guestUntilGone(pvm, 77, args.size, () => stop, pvmCounts, 'pvm'),
    guestUntilGone(svm, 78, args.size, () => stop, svmCounts, 'svm'),
  ]);
  await new Promise((r) => setTimeout(r, 50));
  primary.child.kill('SIGKILL');
  interface Promoted {
    generation: number;
    promotionMs: number;
    promoted: { at: number; reason: string };
  }
  let promoted: Promoted | undefined;
  for (let i = 0; !promoted; i++) {
    const s = await controlCall<{
      role: string;
      generation: number;
      promotionMs: number;
      promoted: { at: number; reason: string } | null;
    }>(sctl, 'GET', '/status');
    if (s.role === 'primary' && s.promoted) promoted = s as Promoted;
    else if (i > 400) throw new Error('the secondary did not take over');
    else await new Promise((r) => setTimeout(r, 10));
  }
  const tookOverMs = promoted.promoted.at - killedAt;
  stop = true;
  const [pvmGone, svmGone] = await running;
  say(
    `  the secondary took over as generation ${promoted.generation}, ${tookOverMs} ms after the kill ` +
      `(heartbeat timeout + failover grace; the promotion itself took ${promoted.promotionMs.toFixed(1)} ms)`,
  );
  say(`  the PVM's disk went away with its host (${pvmGone ?? 'no error'});`);
  if (svmGone) throw new Error(`the SVM lost its disk during the failover: ${svmGone}`);
  // The SVM keeps running on the promoted node, through the same connection.
  const afterFailover = Date.now() + Math.min(600, args.intervalMs * 2);
  await guest(svm, 79, args.size, () => Date.now() >= afterFailover, svmCounts, 'svm');
  say(
    `  the SVM runs on, on the promoted node, through the same NBD connection (${svmCounts.write} writes so far)`,
  );
  await Promise.all(pvm.map((c) => c.close().catch(() => {})));

  // Phase 3: a fresh secondary, re-protection, checkpoints again.
  const third = await startNode('secondary', [
    '--listen', '127.0.0.1:0',
    '--export', `disk0=${path.join(dir, 'new.img')},size=${args.size}`,
    '--state', path.join(dir, 'new-state'),
    '--replication-listen', '127.0.0.1:0',
    '--control', '127.0.0.1:0',
  ]); // prettier-ignore
  children.push(third.child);
  say(`\n  started a fresh secondary (pid ${third.child.pid}); re-protecting with colo-blk reprotect:`);
  const rp = spawn(
    process.execPath,
    [
      CLI,
      'reprotect',
      '--control',
      `127.0.0.1:${sctl.port}`,
      '--peer',
      `127.0.0.1:${third.info.replicationPort}`,
      '--json',
    ],
    { stdio: ['ignore', 'pipe', args.json ? 'ignore' : 'inherit'] },
  );
  let rpOut = '';
  rp.stdout!.on('data', (d: Buffer) => (rpOut += d.toString()));
  // The new PVM (the old SVM) keeps running during the resync.
  let resyncing = true;
  const during = guest(svm, 80, args.size, () => !resyncing, svmCounts, 'svm');
  const rpCode = await new Promise<number | null>((r) => rp.once('exit', r));
  resyncing = false;
  await during;
  if (rpCode !== 0) throw new Error(`colo-blk reprotect failed (exit ${rpCode})`);
  const reprotect = JSON.parse(rpOut) as {
    decision: { mode: string; reason: string };
    resync: {
      mode: string;
      sentBytes: number;
      equalBytes: number;
      hashBytes: number;
      startedAt: number;
      finishedAt: number;
    };
  };
  say(
    `  ${reprotect.resync.mode} resync: sent ${formatBytes(reprotect.resync.sentBytes)}, ` +
      `${formatBytes(reprotect.resync.equalBytes)} found equal by ${formatBytes(reprotect.resync.hashBytes)} of hashes, ` +
      `in ${((reprotect.resync.finishedAt - reprotect.resync.startedAt) / 1000).toFixed(2)} s\n`,
  );
  const newSvm = await Promise.all(
    [0].map(() => NbdClient.connect({ port: third.info.port, exportName: 'disk0' })),
  );
  await loop(sctl, svm, newSvm, Math.max(deadline, Date.now() + 3 * args.intervalMs), 3);

  const status = await controlCall<Record<string, unknown>>(sctl, 'GET', '/status');
  await Promise.all([...svm, ...newSvm].map((c) => c.close()));
  const alive = [secondary.child, third.child];
  for (const c of alive) c.kill('SIGTERM');
  const exits = await Promise.all(
    alive.map(
      (c) => new Promise<number | null>((r) => (c.exitCode !== null ? r(c.exitCode) : c.once('exit', r))),
    ),
  );
  const after = results.filter((r) => r.phase === 3);
  const ok =
    results.length > 0 && after.length > 0 && results.every((r) => r.equal) && exits.every((c) => c === 0);
  const ms = (xs: number[]) => ({ p50: quantile(xs, 0.5), p99: quantile(xs, 0.99), max: Math.max(...xs) });
  const summary = {
    ok,
    seconds: (Date.now() - started) / 1000,
    checkpoints: results.length,
    verified: results.filter((r) => r.equal).length,
    checkpointsAfterFailover: after.length,
    failover: {
      generation: promoted.generation,
      msFromKill: tookOverMs,
      promotionMs: promoted.promotionMs,
    },
    reprotect: reprotect.resync,
    pvm: pvmCounts,
    svm: svmCounts,
    mirroredBytes: (status.link as { bytesSent: number }).bytesSent,
    phasesMs: {
      seal: ms(phases.seal),
      durable: ms(phases.durable),
      commit: ms(phases.commit),
      total: ms(phases.total),
    },
    exitCodes: exits,
  };
  if (args.json) {
    process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
  } else {
    const f = (x: { p50: number; p99: number }) => `p50 ${x.p50.toFixed(2)} ms, p99 ${x.p99.toFixed(2)} ms`;
    say(`\nsummary: ${results.length} checkpoints in ${summary.seconds.toFixed(1)} s`);
    say(
      `  PVM: ${pvmCounts.write} writes (+${pvmCounts.fua} FUA), ${pvmCounts.zero} zeroes, ${pvmCounts.trim} trims, ` +
        `${pvmCounts.flush} flushes, ${pvmCounts.read} reads; ${formatBytes(pvmCounts.bytes)} written`,
    );
    say(`  SVM: ${svmCounts.write + svmCounts.fua} writes, ${formatBytes(svmCounts.bytes)}`);
    say(
      `  failover: primary killed, secondary took over ${tookOverMs} ms later as generation ${promoted.generation}`,
    );
    say(
      `  re-protection: ${reprotect.resync.mode} resync sent ${formatBytes(reprotect.resync.sentBytes)}; ` +
        `${after.length} checkpoints after it`,
    );
    say(`  seal    ${f(summary.phasesMs.seal)}`);
    say(`  durable ${f(summary.phasesMs.durable)}`);
    say(`  commit  ${f(summary.phasesMs.commit)}`);
    say(`  total   ${f(summary.phasesMs.total)}`);
    say(
      `  SVM disk == PVM disk after ${summary.verified} of ${results.length} checkpoints (sha256 over NBD), ` +
        `before and after the failover`,
    );
    say(
      `  surviving nodes stopped cleanly: ${exits.every((c) => c === 0) ? 'yes' : `no (${exits.join(', ')})`}`,
    );
    say(`\n${ok ? 'demo passed' : 'demo FAILED'}`);
  }
  process.exitCode = ok ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`demo: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
