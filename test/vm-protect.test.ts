/**
 * A real QEMU VM protected end to end (issue 12): the guest writes numbered
 * files on ext4, each fsync'ed, on a colo-blk primary's export; `colo-blk vm`
 * and `vm-standby` are its memory-checkpoint hook; `colo-blk colo --mode
 * remus` checkpoints it every 100 ms. Then the primary side dies (QEMU, its
 * agent and the primary disk node, SIGKILL) at a random moment: the
 * coordinator fails over, the standby starts the VM from the last committed
 * checkpoint on the promoted secondary's disk, and the guest carries on. The
 * disk is then copied, its journal replayed, and checked: fsck clean, and
 * every file f1..fN whole, N at least the last one synced before the last
 * committed checkpoint's pause.
 */
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { killAll, prng, rmDir, tmpDir } from './helpers.js';
import { describeWith } from './tools.js';
import {
  checkDisk,
  committedSynced,
  startProtectedVm,
  syncedNumbers,
  waitFor,
} from './vm-protect-helpers.js';

const dirs: string[] = [];
afterAll(async () => {
  await killAll();
  for (const pid of pids) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  if (!process.env.COLO_BLK_DEBUG_DISK) dirs.forEach(rmDir);
});
const pids: number[] = [];

describeWith(
  ['qemu-system-x86_64', 'busybox', 'cpio', 'mkfs.ext4', 'e2fsck', 'debugfs'],
  'a protected QEMU VM',
  () => {
    it('fails over to the standby when the primary side dies, and loses no synced file', async () => {
      const dir = tmpDir('colo-blk-vmprot-');
      dirs.push(dir);
      const rand = prng(Number(process.env.COLO_BLK_SEED ?? Date.now() % 100000));
      const p = await startProtectedVm(dir);
      try {
        await waitFor('protected', async () => (await p.status()).state === 'protected', 60_000);
        // Run protected for a while: checkpoints under the write loop.
        const s0 = p.synced.at(-1)?.n ?? 0;
        await waitFor(
          '20 checkpoints, 10 files synced under protection, and answers to a client',
          async () => {
            const s = await p.status();
            return (
              s.checkpoints >= 20 && (p.synced.at(-1)?.n ?? 0) >= s0 + 10 && p.acked.some((a) => a.n > s0)
            );
          },
          120_000,
        );
        await new Promise((r) => setTimeout(r, 200 + rand() * 1500));
        // The primary side dies at once.
        const killedAt = Date.now();
        for (const c of [p.guest.child, p.vm.child, p.pair.primary.child]) c.kill('SIGKILL');
        const acked = Math.max(...p.acked.filter((a) => a.at <= killedAt).map((a) => a.n));
        const mustHave = Math.max(committedSynced(p, killedAt), acked);
        const started = await waitFor(
          'the VM started on the standby',
          () => p.standby.events().find((e) => e.event === 'vm-started') ?? null,
          30_000,
        );
        pids.push(started.pid as number);
        const runningAfterMs = Date.now() - killedAt;
        // The guest carries on: new files after the failover.
        const before = syncedNumbers(p.standby.stdout());
        await waitFor(
          '3 more synced files on the standby',
          () => (syncedNumbers(p.standby.stdout()).length >= before.length + 3 ? true : null),
          60_000,
        );
        const after = syncedNumbers(p.standby.stdout());
        const failover = (await p.status()).failovers[0];
        // The service answers clients again, through the same address, from the standby.
        const answer = await waitFor(
          'an answer after the failover',
          () => p.acked.find((a) => a.at > killedAt) ?? null,
          30_000,
        );
        console.log(
          `VM failover: running on the standby ${runningAfterMs} ms after the kill (coordinator ${failover.ms.toFixed(0)} ms); ` +
            `synced ${mustHave} before the last commit (clients were told ${acked}); the standby's guest went on at ${after[0]}; ` +
            `clients answered again ${answer.at - killedAt} ms after the kill (${answer.n})`,
        );
        expect(answer.n).toBeGreaterThanOrEqual(acked);
        if (process.env.COLO_BLK_DEBUG_DISK) {
          const cps = p.colo.events().filter((e) => e.event === 'checkpoint');
          console.log(JSON.stringify(cps.slice(-3), null, 0));
          console.log(
            JSON.stringify(p.acked.filter((a) => a.at > killedAt - 2000 && a.at < killedAt + 6000)),
          );
          console.log(p.colo.stderr().slice(-3000));
        }
        expect(failover).toBeTruthy();
        expect(after[0]).toBeGreaterThanOrEqual(mustHave + 1);
        // Stop the VM (a crash, too) and check its disk.
        process.kill(started.pid as number, 'SIGKILL');
        p.stopWatch();
        const last = Math.max(after.at(-1)!, ...p.acked.map((a) => a.n));
        const disk = await checkDisk(p.pair.secondary.nbdPort, path.join(dir, 'check.img'));
        expect(disk.fsckCode, disk.fsck).toBe(0);
        expect(disk.bad).toEqual([]);
        // Every file up to the last the guest synced is there, with no gap.
        expect(disk.files.length).toBeGreaterThanOrEqual(last);
        expect(disk.files.slice(0, last)).toEqual(Array.from({ length: last }, (_, i) => i + 1));
      } finally {
        p.stopWatch();
        await p.guest.kill();
      }
    }, 240_000);
  },
);
