/**
 * A real VM checkpointed into a durable standby and resumed from it on
 * another QEMU (issue 12's loop without the network yet): a guest counting
 * in memory under QEMU (TCG, RAM in a shared file) is checkpointed five
 * times (stop, device state by x-ignore-shared migration, changed RAM pages,
 * cont) into a StandbyRam; the QEMU is SIGKILLed later, and a new QEMU started
 * on the standby's committed RAM image with its device state goes on counting
 * from the last checkpoint, not from where the dead one got to, nor from 1.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { QmpClient } from '../src/checkpoint/qemu/qmp.js';
import { StandbyRam } from '../src/checkpoint/qemu/standby-ram.js';
import { PAGE_BYTES } from '../src/checkpoint/qemu/ram.js';
import { QemuVm, resumeFromCheckpoint } from '../src/checkpoint/qemu/vm.js';
import { nodeStorage } from '../src/sys/storage.js';
import { killAll, rmDir, tmpDir, track } from './helpers.js';
import { describeWith } from './tools.js';
import { bootGuest } from './vm-helpers.js';
import { bootGuest as bootUntracked } from '../tools/vm/guest.js';

const dirs: string[] = [];
afterAll(async () => {
  await killAll();
  dirs.forEach(rmDir);
});
const fresh = (name: string) => {
  const d = tmpDir(`colo-blk-vmcp-${name}-`);
  dirs.push(d);
  return d;
};

function lastTick(serial: string): number {
  const all = [...serial.matchAll(/colo-guest: tick (\d+)/g)];
  return all.length ? Number(all[all.length - 1][1]) : 0;
}

describeWith(
  ['qemu-system-x86_64', 'busybox', 'cpio'],
  'a real VM checkpointed and resumed elsewhere',
  () => {
    it('goes on from its last committed checkpoint on a new QEMU after the first is killed', async () => {
      const pvm = await bootGuest(fresh('pvm'), { workload: 'counter' });
      const qmp = await QmpClient.connect({ path: pvm.qmpPath });
      const vm = await QemuVm.attach(qmp, pvm.ramPath);
      const standby = await StandbyRam.open(
        nodeStorage,
        path.join(fresh('standby'), 'ram'),
        256 * 1024 * 1024,
      );
      await pvm.waitSerial(/colo-guest: tick 5\b/);
      const pauses: number[] = [];
      let atCheckpoint = 0;
      for (let epoch = 1; epoch <= 5; epoch++) {
        await new Promise((r) => setTimeout(r, 200));
        const cp = await vm.checkpoint({ keepPaused: true });
        await new Promise((r) => setTimeout(r, 30)); // let the console's last line reach us
        atCheckpoint = lastTick(pvm.serial());
        await qmp.execute('cont');
        pauses.push(cp.timings.pause);
        standby.receive(epoch, cp.pages, cp.data, cp.device);
        await standby.commit(epoch);
        vm.checkpointed();
        if (epoch === 1) expect(cp.pages.length).toBeGreaterThan(1000);
        else expect(cp.pages.length).toBeLessThan(16384);
        expect(cp.device.length).toBeGreaterThan(1024);
      }
      // The PVM goes on after the last checkpoint, then dies.
      await pvm.waitSerial(new RegExp(`colo-guest: tick ${atCheckpoint + 6}\\b`));
      const died = lastTick(pvm.serial());
      await pvm.kill();
      qmp.close();
      vm.close();

      const committed = standby.committed;
      expect(committed.epoch).toBe(5);
      standby.close();
      const t0 = Date.now();
      const svm = await bootGuest(fresh('svm'), { incoming: { ramPath: committed.ram } });
      const qmp2 = await QmpClient.connect({ path: svm.qmpPath });
      try {
        await resumeFromCheckpoint(qmp2, committed.device!);
        const m = await svm.waitSerial(/colo-guest: tick (\d+)/, 30_000);
        const first = Number(m[1]);
        const resumedMs = Date.now() - t0;
        // It counts on from the checkpoint (the tick after the last one it had printed, give or take
        // the one being printed at the pause): not from 1 (a reboot), not from where the dead VM got to.
        // (Once in CI, under load, the new QEMU printed tick 1: say what it printed, if it happens again.)
        const seen = () =>
          `resumed at tick ${first} (checkpoint at ${atCheckpoint}, died at ${died}); the new QEMU's serial ends: ` +
          svm.serial().slice(-1500);
        expect(first, seen()).toBeGreaterThanOrEqual(atCheckpoint);
        expect(first, seen()).toBeLessThanOrEqual(atCheckpoint + 2);
        expect(first, seen()).toBeLessThan(died);
        await svm.waitSerial(new RegExp(`colo-guest: tick ${first + 3}\\b`));
        pauses.sort((a, b) => a - b);
        console.log(
          `checkpoints of a 256 MiB guest: pause ${pauses.map((p) => p.toFixed(1)).join(', ')} ms ` +
            `(the first is full); resumed on a new QEMU at tick ${first} (checkpoint at ${atCheckpoint}, ` +
            `the dead one got to ${died}) ${resumedMs} ms after starting it`,
        );
      } finally {
        qmp2.close();
        await svm.kill();
      }
    }, 180_000);

    it('a boot that fails stops QEMU and removes its RAM file (256 MiB of /dev/shm each)', async () => {
      const dir = fresh('failboot');
      const ram = path.join('/dev/shm', `colo-blk-vm-ram-${process.pid}-${path.basename(dir)}`);
      let ramExisted = false;
      // QEMU dies mid-boot (killed once its RAM file is there): bootGuest throws, and cleans up.
      const boot = bootUntracked(dir, {
        track: (child) => {
          void track(child);
          const poll = setInterval(() => {
            if (!fs.existsSync(ram)) return;
            ramExisted = true;
            clearInterval(poll);
            child.kill('SIGKILL');
          }, 20);
          child.once('exit', () => clearInterval(poll));
        },
      });
      await expect(boot).rejects.toThrow(/QEMU exited/);
      expect(ramExisted).toBe(true);
      expect(fs.existsSync(ram)).toBe(false);
    }, 60_000);

    // Under TCG the guest rewrites about 20 MiB/s: a checkpoint every 750 ms finds ~15 MiB dirtied.
    it('pauses for the pages dirtied: a 256 MiB guest dirtying ~15 MiB per checkpoint', async () => {
      const pvm = await bootGuest(fresh('dirty'), { workload: 'dirty' });
      const qmp = await QmpClient.connect({ path: pvm.qmpPath });
      const vm = await QemuVm.attach(qmp, pvm.ramPath);
      try {
        await pvm.waitSerial(/colo-guest: dirtied b/);
        await vm.checkpoint(); // the first is full
        vm.checkpointed();
        const rows: { pause: number; mib: number; device: number; ram: number }[] = [];
        for (let i = 0; i < 8; i++) {
          await new Promise((r) => setTimeout(r, 750));
          const cp = await vm.checkpoint();
          vm.checkpointed();
          rows.push({
            pause: cp.timings.pause,
            mib: (cp.pages.length * PAGE_BYTES) / 2 ** 20,
            device: cp.timings.device,
            ram: cp.timings.ram,
          });
        }
        const q = (xs: number[], p: number) =>
          [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))];
        const pauses = rows.map((r) => r.pause);
        const mib = rows.map((r) => r.mib);
        // The guest dirtied memory between checkpoints, and each pause carried it.
        // (How much depends on how fast TCG runs on a loaded machine: the figure is printed, not judged.)
        expect(Math.min(...mib)).toBeGreaterThan(0);
        expect(q(mib, 0.5)).toBeGreaterThan(0.25);
        console.log(
          `256 MiB guest, a checkpoint every 750 ms (x8): dirtied p50 ${q(mib, 0.5).toFixed(1)} MiB ` +
            `(max ${Math.max(...mib).toFixed(1)}); pause p50 ${q(pauses, 0.5).toFixed(1)} ms, p99 ${q(pauses, 0.99).toFixed(1)} ms ` +
            `(device state p50 ${q(
              rows.map((r) => r.device),
              0.5,
            ).toFixed(1)} ms, RAM compare and copy p50 ${q(
              rows.map((r) => r.ram),
              0.5,
            ).toFixed(1)} ms)`,
        );
      } finally {
        qmp.close();
        vm.close();
        await pvm.kill();
      }
    }, 180_000);
  },
);
