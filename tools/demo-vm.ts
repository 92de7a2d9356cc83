/**
 * `npm run demo:vm`: a real QEMU VM protected end to end on localhost.
 *
 *   1. A small Linux guest (built once from Debian packages) boots under
 *      QEMU with its RAM in a shared file and its disk on a colo-blk
 *      primary's export. It writes numbered files, each fsync'ed, and serves
 *      GET /cgi-bin/synced (the last file it synced) on port 80.
 *   2. `colo-blk vm` beside it, `colo-blk vm-standby` with the same QEMU
 *      command line on the secondary's export, and `colo-blk colo --mode
 *      remus` in front: a checkpoint every 100 ms, the guest's answers held
 *      until each commit. A client asks all along.
 *   3. The primary side (QEMU, its agent, the primary disk node) is
 *      SIGKILLed. The standby starts the VM from the last committed
 *      checkpoint on the promoted secondary; the client is answered again.
 *   4. The VM is stopped and its disk checked: the ext4 journal replayed,
 *      fsck clean, every file up to the last one synced whole, and no answer
 *      a client got is missing from the disk.
 *
 * Options: --seconds N (protected run before the kill, and after; default 5),
 * --ram MiB (default 256), --json (the summary as JSON), --keep (the files).
 * Needs qemu-system-x86, busybox-static, cpio, e2fsprogs (apt-get install …).
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import type { CheckpointRecord, FailoverRecord } from '../src/checkpoint/coordinator/coordinator.js';
import { failoverLine } from '../src/cli/colo.js';
import { quantile } from '../src/util/stats.js';
import { askAllAlong, checkDisk } from './vm/check.js';
import { ensureGuest } from './vm/guest.js';
import { startVmStack, type VmStack } from './vm/stack.js';

interface Args {
  seconds: number;
  ramMiB: number;
  json: boolean;
  keep: boolean;
}

const TOOLS: [string, string][] = [
  ['qemu-system-x86_64', 'qemu-system-x86'],
  ['busybox', 'busybox-static'],
  ['cpio', 'cpio'],
  ['mkfs.ext4', 'e2fsprogs'],
  ['e2fsck', 'e2fsprogs'],
  ['debugfs', 'e2fsprogs'],
];

function usage(msg: string): never {
  process.stderr.write(
    `demo:vm: ${msg}\nusage: npm run demo:vm -- [--seconds N] [--ram MiB] [--json] [--keep]\n`,
  );
  process.exit(2);
}

function parseArgs(argv: string[]): Args {
  const a: Args = { seconds: 5, ramMiB: 256, json: false, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const next = () => argv[++i] ?? usage(`${k} needs a value`);
    if (k === '--seconds') a.seconds = Number(next());
    else if (k === '--ram') a.ramMiB = Number(next());
    else if (k === '--json') a.json = true;
    else if (k === '--keep') a.keep = true;
    else usage(`unknown argument '${k}'`);
  }
  if (!(a.seconds > 0)) usage('--seconds must be positive');
  if (!(Number.isInteger(a.ramMiB) && a.ramMiB >= 128))
    usage('--ram must be a whole number of MiB, at least 128');
  return a;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const pct = (xs: number[], q: number) => (xs.length ? quantile(xs, q) : 0);

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const say = (s: string) => {
    if (!args.json) process.stdout.write(s + '\n');
  };
  const missing = TOOLS.filter(([cmd]) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status !== 0);
  if (missing.length) {
    process.stderr.write(
      `demo:vm: needs ${missing.map(([c]) => c).join(', ')}: ` +
        `apt-get install ${[...new Set(missing.map(([, p]) => p))].join(' ')}\n`,
    );
    process.exit(2);
  }
  say('building the guest kit (once: Debian kernel and busybox, cached in ~/.cache/colo-blk/guest) ...');
  ensureGuest();
  const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : '/tmp', 'colo-blk-demo-vm-'));
  const children: ChildProcess[] = [];
  let stack: VmStack | null = null;
  const cleanup = () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    const pid = stack?.standbyQemuPid();
    if (pid)
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
    if (stack) fs.rmSync(stack.guest.ramPath, { force: true });
    if (!args.keep) fs.rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  for (const sig of ['SIGINT', 'SIGTERM'] as const) process.on(sig, () => process.exit(130));

  say(`1. the VM and its protection (files in ${dir})`);
  const s = await startVmStack({
    dir,
    workload: 'web',
    ramMiB: args.ramMiB,
    track: (c) => children.push(c),
    log: (line) => say(`   ${line}`),
  });
  stack = s;
  say(
    `   colo-blk vm (control ${s.vm.info.controlPort}), colo-blk vm-standby (control ${s.standby.info.controlPort})`,
  );
  say(`   colo-blk colo --mode remus: clients reach the VM's port 80 at 127.0.0.1:${s.port}`);
  await s.waitState('protected', 120_000);
  const pair = s.events.find((e) => e.event === 'checkpoint') as CheckpointRecord | undefined;
  say(
    `   protected: the first checkpoint sent the whole RAM (${pair ? (pair.memoryBytes / 2 ** 20).toFixed(1) : '?'} MiB) to the standby`,
  );

  // A client asks all along; each answer was released by a committed checkpoint.
  const client = askAllAlong(s.port);
  const answers = client.answers;
  const checkpoints = () => s.events.filter((e) => e.event === 'checkpoint') as unknown as CheckpointRecord[];
  const report = async (seconds: number) => {
    for (let t = 0; t < seconds; t++) {
      const before = checkpoints().length;
      await sleep(1000);
      const cps = checkpoints().slice(before);
      const last = answers.at(-1);
      if (cps.length === 0 && s.events.some((e) => e.event === 'failover')) {
        say(
          `   running unprotected on the standby (no secondary left); the client was told: ${last?.n ?? 0} files synced`,
        );
        continue;
      }
      say(
        `   ${cps.length} checkpoints in the last second, pause p50 ${pct(
          cps.map((c) => c.pauseMs),
          0.5,
        ).toFixed(
          1,
        )} ms, ${(cps.reduce((n, c) => n + c.memoryBytes, 0) / Math.max(1, cps.length) / 2 ** 20).toFixed(1)} MiB of RAM each; ` +
          `the client was told: ${last ? `${last.n} files synced` : 'nothing yet'}`,
      );
    }
  };
  say(`2. running protected for ${args.seconds} s`);
  await report(args.seconds);
  const protectedCps = checkpoints().filter((c) => !c.full);

  say('3. SIGKILL the primary side: its QEMU, colo-blk vm and the primary disk node');
  const killedAt = Date.now();
  const told = Math.max(0, ...answers.map((a) => a.n));
  s.killPrimarySide();
  while (!s.standbyQemuPid()) {
    if (Date.now() - killedAt > 30_000) throw new Error('the standby never started the VM');
    await sleep(5);
  }
  const runningMs = Date.now() - killedAt;
  while (!answers.some((a) => a.at > killedAt)) {
    if (Date.now() - killedAt > 30_000) throw new Error('no answer after the failover');
    await sleep(5);
  }
  const first = answers.find((a) => a.at > killedAt)!;
  const failover = s.events.find((e) => e.event === 'failover') as unknown as FailoverRecord | undefined;
  if (failover) say(`   ${failoverLine(failover)}`);
  say(
    `   the VM runs on the standby (QEMU ${s.standbyQemuPid()}) ${runningMs} ms after the kill; ` +
      `the client was answered again ${first.at - killedAt} ms after it: ${first.n} files synced (it had been told ${told})`,
  );
  await report(Math.min(args.seconds, 3));
  await client.stop();

  say("4. stop the VM and check its disk (the promoted secondary's export)");
  process.kill(s.standbyQemuPid()!, 'SIGKILL');
  await sleep(100);
  const disk = await checkDisk(Number(s.secondary.info.port), path.join(dir, 'check.img'));
  const last = Math.max(0, ...answers.map((a) => a.n));
  const contiguous = disk.files.slice(0, last).every((n, i) => n === i + 1) && disk.files.length >= last;
  say(
    `   fsck ${disk.fsckCode === 0 ? 'clean' : `FAILED (${disk.fsckCode})`}; ${disk.files.length} files, ` +
      `${disk.bad.length ? `${disk.bad.length} DAMAGED` : 'every one whole'}; ` +
      `${contiguous ? `f1..f${last} all there (the last a client was told: ${last})` : `MISSING some of f1..f${last}`}`,
  );
  const ok = disk.fsckCode === 0 && disk.bad.length === 0 && contiguous && first.n >= told;
  const pauses = protectedCps.map((c) => c.pauseMs);
  const summary = {
    ok,
    ramMiB: args.ramMiB,
    checkpoints: protectedCps.length,
    pauseMs: { p50: pct(pauses, 0.5), p99: pct(pauses, 0.99) },
    memoryBytesPerCheckpoint: protectedCps.length
      ? protectedCps.reduce((n, c) => n + c.memoryBytes, 0) / protectedCps.length
      : 0,
    failover: { runningMs, answeredMs: first.at - killedAt, coordinatorMs: failover?.ms ?? null },
    told,
    answeredAfter: first.n,
    lastAnswer: last,
    files: disk.files.length,
    fsckClean: disk.fsckCode === 0,
    damaged: disk.bad,
  };
  if (args.json) process.stdout.write(JSON.stringify(summary) + '\n');
  else
    say(
      `${ok ? 'OK' : 'FAILED'}: ${summary.checkpoints} checkpoints (pause p50 ${summary.pauseMs.p50.toFixed(1)} ms, p99 ${summary.pauseMs.p99.toFixed(1)} ms); ` +
        `the VM ran on ${runningMs} ms after the kill; nothing a client was told is missing`,
    );
  await s.close();
  process.exitCode = ok ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`demo:vm: ${(err as Error).message}\n`);
  process.exitCode = 1;
});
