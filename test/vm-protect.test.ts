/**
 * A real QEMU VM protected end to end (issue 12), as a user runs it
 * (tools/vm/stack.ts): the guest writes numbered files on ext4, each
 * fsync'ed, on a colo-blk primary's export, and answers GET
 * /cgi-bin/synced with the last one; `colo-blk vm` and `vm-standby` are its
 * memory-checkpoint hook; `colo-blk colo --mode remus` checkpoints it every
 * 100 ms and holds its network output until each commit. Something dies; the
 * guest must carry on, and its disk, copied and its journal replayed, must
 * be fsck-clean with every file f1..fN whole, N at least every number a
 * client was told (released output) and every number synced before the last
 * committed checkpoint's pause.
 */
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { spawnRole, startSecondary, type Proc } from '../tools/loop/stack.js';
import { guestQemuArgs, QEMU_COMMAND } from '../tools/vm/guest.js';
import { DISK_SIZE } from '../tools/vm/stack.js';
import { CLI, freePort, killAll, prng, rmDir, run, tmpDir, track } from './helpers.js';
import { describeWith } from './tools.js';
import {
  checkDisk,
  committedSynced,
  standbyStarted,
  startProtectedVm,
  syncedNumbers,
  waitFor,
  type ProtectedVm,
} from './vm-protect-helpers.js';

const dirs: string[] = [];
const stacks: ProtectedVm[] = [];
afterAll(async () => {
  for (const s of stacks) {
    s.stopWatch();
    await s.close().catch(() => {});
  }
  await killAll();
  dirs.forEach(rmDir);
});

/** Start a colo-blk process again with the arguments it had, on the ports it had. */
async function respawn(old: Proc): Promise<Proc> {
  const [, , role, ...args] = old.child.spawnargs;
  const ports: Record<string, string> = {
    '--listen': 'port',
    '--control': 'controlPort',
    '--replication-listen': 'replicationPort',
  };
  const again = args
    .filter((a) => a !== '--json' && a !== '--quiet')
    .map((a, i, all) =>
      ports[all[i - 1]] && a.endsWith(':0') ? `127.0.0.1:${old.info[ports[all[i - 1]]]}` : a,
    );
  const p = await spawnRole(role, again);
  track(p.child);
  return p;
}

const ROUNDS = Number(process.env.COLO_BLK_VM_ROUNDS ?? 2);

async function protectedVm(coloArgs: string[] = []): Promise<ProtectedVm> {
  const dir = tmpDir('colo-blk-vmprot-');
  dirs.push(dir);
  const p = await startProtectedVm(dir, coloArgs);
  stacks.push(p);
  await p.waitState('protected', 90_000);
  return p;
}

/** Run protected until the guest has synced `files` more files and a client heard of one of them. */
async function runProtected(p: ProtectedVm, files: number): Promise<void> {
  const s0 = p.synced.at(-1)?.n ?? 0;
  await waitFor(
    `${files} files synced under protection and a client answered`,
    async () =>
      (p.synced.at(-1)?.n ?? 0) >= s0 + files &&
      p.acked.some((a) => a.n > s0) &&
      (await p.status()).checkpoints >= 10,
    120_000,
  );
}

/**
 * After `kill()`: the standby runs the VM, the guest goes on writing, clients
 * are answered again from at least what they were told; then the VM is
 * killed too and its disk checked. Returns the figures.
 */
async function failoverAndCheck(p: ProtectedVm, kill: () => void, opts: { pvmConsole?: boolean } = {}) {
  const killedAt = Date.now();
  kill();
  const told = Math.max(0, ...p.acked.filter((a) => a.at <= killedAt).map((a) => a.n));
  // What the PVM's console showed synced before the last commit (when the PVM is the booted guest).
  const mustHave = Math.max(opts.pvmConsole === false ? 0 : committedSynced(p, killedAt), told);
  await standbyStarted(p);
  const runningMs = Date.now() - killedAt;
  const before = syncedNumbers(p.standby.console()).length;
  await waitFor(
    '3 more synced files on the standby',
    () => (syncedNumbers(p.standby.console()).length >= before + 3 ? true : null),
    60_000,
  );
  const after = syncedNumbers(p.standby.console());
  const answer = await waitFor(
    'an answer after the failover',
    () => p.acked.find((a) => a.at > killedAt) ?? null,
    30_000,
  );
  const failover = (await p.status()).failovers.at(-1);
  expect(failover, 'a failover record').toBeTruthy();
  expect(after[0], 'the standby guest goes on from the committed state').toBeGreaterThanOrEqual(mustHave + 1);
  expect(answer.n, 'clients are never told less than before').toBeGreaterThanOrEqual(told);
  process.kill(p.standbyQemuPid()!, 'SIGKILL');
  p.stopWatch();
  const last = Math.max(after.at(-1)!, ...p.acked.map((a) => a.n));
  const disk = await checkDisk(
    Number(p.secondary.info.port),
    path.join(path.dirname(p.guest.qmpPath), 'check.img'),
  );
  expect(disk.fsckCode, disk.fsck).toBe(0);
  expect(disk.bad).toEqual([]);
  expect(disk.files.slice(0, last), 'f1..fN with no gap').toEqual(
    Array.from({ length: last }, (_, i) => i + 1),
  );
  const figures = {
    runningMs,
    coordinatorMs: Math.round(failover.ms),
    answeredMs: answer.at - killedAt,
    told,
    mustHave,
    resumedAt: after[0],
    files: disk.files.length,
  };
  console.log(`VM failover: ${JSON.stringify(figures)}`);
  return figures;
}

describeWith(
  ['qemu-system-x86_64', 'busybox', 'cpio', 'mkfs.ext4', 'e2fsck', 'debugfs'],
  'a protected QEMU VM',
  () => {
    it(
      `the primary side dies at a random moment (${ROUNDS} rounds): the standby runs the VM on, nothing acknowledged is lost`,
      async () => {
        const seed = Number(process.env.COLO_BLK_SEED ?? Date.now() % 100_000);
        const rand = prng(seed);
        for (let round = 0; round < ROUNDS; round++) {
          // --verify: every checkpoint compares the PVM's checkpointed RAM with the standby's committed image.
          const p = await protectedVm(['--verify']);
          await runProtected(p, 10);
          const checked = p.events
            .filter((e) => e.event === 'checkpoint')
            .map((e) => e.verified as { state: boolean | null });
          expect(checked.length).toBeGreaterThan(0);
          expect(
            checked.every((v) => v.state === true),
            'SVM = PVM after every checkpoint',
          ).toBe(true);
          await new Promise((r) => setTimeout(r, rand() * 1500));
          const f = await failoverAndCheck(p, () => p.killPrimarySide());
          expect(f.runningMs, `seed ${seed}`).toBeLessThan(5000);
          await p.close();
        }
      },
      300_000 * ROUNDS,
    );

    it('QEMU dies in the middle of a checkpoint: the agent exits, the coordinator fails over', async () => {
      const p = await protectedVm();
      await runProtected(p, 5);
      const vmControl = { host: '127.0.0.1', port: Number(p.vm.info.controlPort) };
      // Catch the VM paused by a checkpoint.
      await waitFor(
        'the VM paused by a checkpoint',
        async () =>
          (await controlCall<{ state: string }>(vmControl, 'GET', '/status', undefined, 1000)).state ===
          'paused',
        30_000,
      );
      await failoverAndCheck(p, () => p.guest.child.kill('SIGKILL'));
      expect(p.vm.child.exitCode, "the VM's agent exits when its VM is gone").toBe(1);
      await p.close();
    }, 300_000);

    it('the secondary side dies and comes back: the VM is re-protected, then survives the primary side dying (every checkpoint verified)', async () => {
      // --verify: after each checkpoint the PVM's RAM as checkpointed and the standby's committed image hash the same.
      const p = await protectedVm(['--verify']);
      await runProtected(p, 5);
      const verified = () =>
        p.events
          .filter((e) => e.event === 'checkpoint')
          .map((e) => e.verified as { state: boolean | null; disk: boolean | null });
      expect(verified().length).toBeGreaterThan(0);
      expect(verified().every((v) => v.state === true && v.disk === null)).toBe(true);
      // The secondary side dies: the VM goes on unprotected (its output passes through).
      p.standby.child.kill('SIGKILL');
      p.secondary.child.kill('SIGKILL');
      await p.waitState('unprotected', 30_000);
      const unprotectedAt = Date.now();
      await waitFor(
        'answers while unprotected',
        () => p.acked.some((a) => a.at > unprotectedAt + 200) || null,
        30_000,
      );
      // It comes back on the same addresses, with the same state directories.
      const secondary = await respawn(p.secondary);
      const standby = await respawn(p.standby);
      let pid: number | null = null;
      standby.onEvent = (e) => {
        if (e.event === 'vm-started') pid = e.pid as number;
      };
      Object.assign(p, { secondary, standby, standbyQemuPid: () => pid });
      await p.waitState('protected', 120_000);
      const s = await p.status();
      expect(s.checkpoints).toBeGreaterThan(0);
      await runProtected(p, 5);
      expect(s.verifyFailures).toBe(0);
      expect(verified().every((v) => v.state === true)).toBe(true);
      await failoverAndCheck(p, () => p.killPrimarySide());
      await p.close();
    }, 300_000);

    it('after a failover a new standby re-protects the VM (colo-blk reprotect; every checkpoint verified), and it survives a second failover', async () => {
      const p = await protectedVm(['--verify']);
      await runProtected(p, 5);
      // The first failover: the standby runs the VM.
      p.killPrimarySide();
      await standbyStarted(p);
      await p.waitState('unprotected', 30_000);
      const firstQemu = p.standbyQemuPid()!;
      const dir = path.dirname(p.guest.qmpPath);
      // A new secondary side: a disk node and a standby with the same VM's command line.
      const secondary = await startSecondary(dir, 'svm2', DISK_SIZE);
      track(secondary.child);
      const httpPort = await freePort();
      const standby = await spawnRole('vm-standby', [
        '--dir', path.join(dir, 'standby2'),
        '--control', '127.0.0.1:0',
        '--',
        ...QEMU_COMMAND,
        ...guestQemuArgs({
          workload: 'web',
          disk: `nbd://127.0.0.1:${secondary.info.port}/disk0`,
          ramPath: '/dev/shm/replaced-by-colo-blk',
          httpPort,
        }),
      ]); // prettier-ignore
      track(standby.child);
      const r = await run(process.execPath, [
        CLI, 'reprotect', '--json',
        '--control', `127.0.0.1:${p.colo.info.controlPort}`,
        '--peer', `127.0.0.1:${secondary.info.replicationPort}`,
        '--svm', `127.0.0.1:${httpPort}`,
        '--svm-control', `127.0.0.1:${standby.info.controlPort}`,
        '--secondary-control', `127.0.0.1:${secondary.info.controlPort}`,
      ], { timeoutMs: 120_000 }); // prettier-ignore
      expect(r.code, r.stderr).toBe(0);
      await p.waitState('protected', 120_000);
      // The VM that runs on the first standby is the PVM now: its QEMU, its agent, the promoted node.
      const oldStandby = p.standby;
      const promoted = p.secondary;
      let pid: number | null = null;
      standby.onEvent = (e) => {
        if (e.event === 'vm-started') pid = e.pid as number;
      };
      Object.assign(p, { secondary, standby, standbyQemuPid: () => pid });
      const before = (await p.status()).checkpoints;
      await waitFor(
        'checkpoints of the re-protected VM, and answers',
        async () => (await p.status()).checkpoints >= before + 10 && p.acked.at(-1)!.at > Date.now() - 500,
        60_000,
      );
      await failoverAndCheck(
        p,
        () => {
          process.kill(firstQemu, 'SIGKILL');
          oldStandby.child.kill('SIGKILL');
          promoted.child.kill('SIGKILL');
        },
        { pvmConsole: false },
      );
      const end = await p.status();
      expect(end.failovers).toHaveLength(2);
      // Every checkpoint, before and after the re-protection, found SVM = PVM.
      expect(end.verifyFailures).toBe(0);
      await p.close();
    }, 300_000);
  },
);
