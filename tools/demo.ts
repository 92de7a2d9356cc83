/**
 * `npm run demo`: COLO end to end on localhost, needing nothing but this
 * package. Every piece is a real `colo-blk` process: a disk pair, a guest
 * (the stand-in VM: an HTTP key-value service) on each side, and the colo
 * process (comparer and checkpoint coordinator) in front.
 *
 *   1. Clients send PUTs and GETs through the comparer. The guests answer
 *      alike except for a small fraction of nondeterministic responses; each
 *      of those is a mismatch, and a checkpoint (a live line each: reason,
 *      memory bytes, disk bytes, phase times, and SVM = PVM verified while
 *      both are paused).
 *   2. The primary side (the PVM guest and the primary disk node) is
 *      SIGKILLed under load. The SVM takes over; the clients' connections
 *      carry on.
 *   3. A fresh secondary disk node and SVM guest re-protect the VM with one
 *      `colo-blk reprotect`; checkpoints resume on the same connections.
 *   4. A verified summary: every acknowledged PUT is readable, no connection
 *      was reset, every checkpoint found SVM = PVM in memory and on disk.
 *
 * Options: --seconds N (load per phase, default 4), --clients N (default 8),
 * --nondeterminism P (default 0.01), --json (the summary as JSON), --keep.
 * The old disk-only demo is `npm run demo:disk`.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { controlCall } from '../src/checkpoint/control.js';
import type { CheckpointRecord, FailoverRecord } from '../src/checkpoint/coordinator/coordinator.js';
import { checkpointLine, failoverLine } from '../src/cli/colo.js';
import { Load, longestGap } from './loop/load.js';
import { CLI, startGuest, startLoop, startSecondary, stop, type Loop, type Proc } from './loop/stack.js';

interface Args {
  seconds: number;
  clients: number;
  nondeterminism: number;
  json: boolean;
  keep: boolean;
}

function usage(msg: string): never {
  process.stderr.write(
    `demo: ${msg}\nusage: npm run demo -- [--seconds N] [--clients N] [--nondeterminism P] [--json] [--keep]\n`,
  );
  process.exit(2);
}

function parseArgs(argv: string[]): Args {
  const a: Args = { seconds: 4, clients: 8, nondeterminism: 0.01, json: false, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const next = () => argv[++i] ?? usage(`${k} needs a value`);
    if (k === '--seconds') a.seconds = Number(next());
    else if (k === '--clients') a.clients = Number(next());
    else if (k === '--nondeterminism') a.nondeterminism = Number(next());
    else if (k === '--json') a.json = true;
    else if (k === '--keep') a.keep = true;
    else usage(`unknown argument '${k}'`);
  }
  if (!(a.seconds > 0)) usage('--seconds must be positive');
  if (!(Number.isInteger(a.clients) && a.clients >= 1 && a.clients <= 256)) usage('--clients must be 1-256');
  if (!(a.nondeterminism >= 0 && a.nondeterminism <= 1)) usage('--nondeterminism must be from 0 to 1');
  return a;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function quantile(xs: number[], q: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.min(s.length - 1, Math.floor(q * s.length))] : NaN;
}

async function waitState(loop: Loop, state: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await controlCall<{ state: string; lastError: string | null }>(
      loop.coloControl,
      'GET',
      '/status',
    );
    if (s.state === state) return;
    if (Date.now() > deadline) throw new Error(`colo did not become ${state} (${s.state}: ${s.lastError})`);
    await sleep(20);
  }
}

function runCli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const c = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    c.on('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const say = (s: string) => {
    if (!args.json) process.stdout.write(s + '\n');
  };
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, 'colo-blk-demo-'));
  const procs: Proc[] = [];
  const cleanup = () => {
    for (const p of procs) if (p.child.exitCode === null) p.child.kill('SIGKILL');
    if (!args.keep) fs.rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => process.exit(130));

  say('colo-blk demo: COLO end to end on localhost');
  const loop = await startLoop({
    dir,
    size: '256M',
    mode: 'colo',
    nondeterminism: args.nondeterminism,
    intervalMs: 2000,
    verify: true,
  });
  procs.push(...loop.all());
  say(
    `  disk pair   primary pid ${loop.primary.child.pid} ⇄ secondary pid ${loop.secondary.child.pid} (--failover manual: the coordinator decides)`,
  );
  say(
    `  guests      PVM pid ${loop.pvm.child.pid} on the primary's export, SVM pid ${loop.svm.child.pid} on the secondary's SVM export`,
  );
  say(
    `              (the same HTTP key-value service; ${args.nondeterminism * 100}% of its responses carry real time and randomness)`,
  );
  say(
    `  colo        pid ${loop.colo.child.pid}: clients connect to 127.0.0.1:${loop.port}; each checkpoint is verified SVM = PVM (the SVM paused, against the PVM's captured state)`,
  );

  const checkpoints: CheckpointRecord[] = [];
  const failovers: FailoverRecord[] = [];
  let shownThisSecond = 0;
  let second = 0;
  let hidden = 0;
  loop.colo.onEvent = (e) => {
    if (e.event === 'checkpoint') {
      const r = e as unknown as CheckpointRecord;
      checkpoints.push(r);
      const now = Math.floor(Date.now() / 1000);
      if (now !== second) {
        if (hidden) say(`    (${hidden} more checkpoint(s) in that second)`);
        second = now;
        shownThisSecond = 0;
        hidden = 0;
      }
      if (shownThisSecond++ < 6) say(`    ${checkpointLine(r)}`);
      else hidden++;
    } else if (e.event === 'failover') {
      const r = e as unknown as FailoverRecord;
      failovers.push(r);
      say(`    ${failoverLine(r)}`);
    }
  };
  await waitState(loop, 'protected');

  // 1. Load through the comparer.
  say(`\n1. ${args.clients} clients send PUTs and GETs through the comparer for ${args.seconds} s`);
  const load = await Load.open(loop.port, args.clients);
  load.start();
  await sleep(args.seconds * 1000);
  const phase1 = load.requests;

  // 2. Kill the primary side under load.
  say(
    `\n2. SIGKILL the primary side (PVM guest pid ${loop.pvm.child.pid}, primary disk node pid ${loop.primary.child.pid}) under load`,
  );
  const before = load.requests;
  const killedAt = Date.now();
  loop.pvm.child.kill('SIGKILL');
  loop.primary.child.kill('SIGKILL');
  await sleep(2000);
  // The client-visible gap: the longest wait between two responses around the kill.
  const gapMs = longestGap(load.times, killedAt - 1000, killedAt);
  say(
    `    the clients' longest wait for a response around the kill: ${gapMs} ms; ${args.clients - load.resets()} of ${args.clients} connections intact; ${load.requests - before} responses since`,
  );

  // 3. Re-protect with a fresh secondary and SVM, while the load goes on.
  say(`\n3. A fresh secondary disk node and SVM guest; one colo-blk reprotect pairs them (the load goes on)`);
  const sec2 = await startSecondary(dir, 'svm2', '256M');
  procs.push(sec2);
  const svm2 = await startGuest(sec2, {
    dir,
    size: '256M',
    mode: 'colo',
    nondeterminism: args.nondeterminism,
  });
  procs.push(svm2);
  const t0 = Date.now();
  const rp = await runCli([
    'reprotect',
    '--control', `127.0.0.1:${loop.coloControl.port}`,
    '--peer', `127.0.0.1:${sec2.info.replicationPort}`,
    '--svm', `127.0.0.1:${svm2.info.port}`,
    '--svm-control', `127.0.0.1:${svm2.info.controlPort}`,
    '--secondary-control', `127.0.0.1:${sec2.info.controlPort}`,
  ]); // prettier-ignore
  if (rp.code !== 0) throw new Error(`colo-blk reprotect failed: ${rp.stderr}`);
  say(`    ${rp.stdout.trim()} (disk resync included: ${Date.now() - t0} ms)`);
  await sleep(args.seconds * 1000);
  await load.pause();

  // 4. Verify.
  say('\n4. Verify (a last checkpoint, every acknowledged PUT read back, both whole disks hashed)');
  const last = await controlCall<CheckpointRecord>(loop.coloControl, 'POST', '/checkpoint');
  let readable = 0;
  for (const [key, value] of load.acked) {
    const r = await load.conns[0].request('GET', `/kv/${key}`);
    if (r.body.toString() === value) readable++;
  }
  const svmNow = { host: '127.0.0.1', port: Number(loop.svm.info.controlPort) };
  const svm2Ctl = { host: '127.0.0.1', port: Number(svm2.info.controlPort) };
  const [h1, h2, d1, d2] = await Promise.all([
    controlCall<{ hash: string }>(svmNow, 'GET', '/hash'),
    controlCall<{ hash: string }>(svm2Ctl, 'GET', '/hash'),
    controlCall<{ hash: string }>(svmNow, 'GET', '/disk-hash?whole=1', undefined, 120_000),
    controlCall<{ hash: string }>(svm2Ctl, 'GET', '/disk-hash?whole=1', undefined, 120_000),
  ]);
  loop.colo.onEvent = null;
  const status = await controlCall<{
    byReason: Record<string, number>;
    pauseMs: { p50: number; p99: number };
  }>(loop.coloControl, 'GET', '/status');
  const verified = checkpoints.filter((c) => c.verified?.state && c.verified.disk).length;
  const afterFailover = checkpoints.filter((c) => c.at > killedAt).length;
  const summary = {
    requests: load.requests,
    requestsBeforeKill: phase1,
    errors: load.errors,
    connections: args.clients,
    connectionsReset: load.resets(),
    latencyMs: { p50: quantile(load.latencies, 0.5), p99: quantile(load.latencies, 0.99) },
    checkpoints: checkpoints.length,
    checkpointsByReason: status.byReason,
    verified,
    checkpointsAfterFailover: afterFailover,
    pauseMs: status.pauseMs,
    failover: failovers[0] ?? null,
    clientGapMs: gapMs,
    acknowledgedPuts: load.acked.size,
    readable,
    finalCheckpoint: { epoch: last.epoch, stateEqual: h1.hash === h2.hash, diskEqual: d1.hash === d2.hash },
  };
  const ok =
    load.errors.length === 0 &&
    summary.connectionsReset === 0 &&
    readable === load.acked.size &&
    verified === checkpoints.length &&
    failovers.length === 1 &&
    afterFailover > 0 &&
    summary.finalCheckpoint.stateEqual &&
    summary.finalCheckpoint.diskEqual;
  if (args.json) process.stdout.write(JSON.stringify({ ok, ...summary }) + '\n');
  else {
    const yes = (b: boolean) => (b ? 'yes' : 'NO');
    say(
      `    requests           ${load.requests} (${phase1} before the kill), errors ${load.errors.length}, p50 ${summary.latencyMs.p50.toFixed(2)} ms, p99 ${summary.latencyMs.p99.toFixed(2)} ms`,
    );
    say(
      `    connections        ${args.clients} opened, ${summary.connectionsReset} reset: the same connections were served by the PVM, then by the SVM`,
    );
    say(
      `    checkpoints        ${checkpoints.length}: ${Object.entries(status.byReason)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ')}; pause p50 ${status.pauseMs.p50} ms, p99 ${status.pauseMs.p99} ms`,
    );
    say(
      `    SVM = PVM          at every checkpoint (state hash and disk hash, the SVM's while paused, the PVM's as captured): ${yes(verified === checkpoints.length)} (${verified}/${checkpoints.length})`,
    );
    say(
      `    failover           ${failovers[0] ? `${failovers[0].ms.toFixed(0)} ms in the coordinator; the clients waited at most ${gapMs} ms` : 'NONE'}`,
    );
    say(
      `    acknowledged PUTs  ${readable} of ${load.acked.size} readable afterwards: ${yes(readable === load.acked.size)}`,
    );
    say(
      `    after re-protection ${afterFailover} checkpoint(s); final state and disk equal: ${yes(summary.finalCheckpoint.stateEqual && summary.finalCheckpoint.diskEqual)}`,
    );
    for (const e of load.errors.slice(0, 5)) say(`    error: ${e}`);
    say(ok ? '\ndemo: OK' : '\ndemo: FAILED');
  }
  for (const c of load.conns) c.close();
  for (const p of [...procs].reverse()) await stop(p);
  process.exitCode = ok ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`demo: ${(err as Error).stack ?? err}\n`);
  process.exitCode = 1;
});
