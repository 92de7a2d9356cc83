import path from 'node:path'; import fs from 'node:fs'; import os from 'node:os';
const root = process.argv[2] ?? '/work/main';
const { MemoryDevice } = await import(root + '/dist/src/block/memory.js');
const { PrimaryLog } = await import(root + '/dist/src/checkpoint/primary/log.js');
const { ReplicatingDevice } = await import(root + '/dist/src/checkpoint/primary/replicating-device.js');
const { ActivityLog } = await import(root + '/dist/src/failover/activity.js');
const { nodeStorage } = await import(root + '/dist/src/sys/storage.js');
const dir = fs.mkdtempSync('/dev/shm/rep4k-');
const dev = new MemoryDevice(1 << 30);
const plog = new PrimaryLog(nodeStorage, path.join(dir, 'epochs'), 1, 1 << 40);
const act = ActivityLog.open(nodeStorage, path.join(dir, 'act'), dev.size);
const rep = new ReplicatingDevice(dev, plog, act);
const buf = Buffer.alloc(4096, 1); let seed = 1; const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) % 262144) * 4096;
async function worker(n) { for (let i = 0; i < n; i++) await rep.pwritev([buf], rnd()); }
for (let r = 0; r < 5; r++) {
  const N = 200000; const t = performance.now();
  await Promise.all(Array.from({ length: 32 }, () => worker(N / 32)));
  const us = (performance.now() - t) * 1000 / N;
  plog.seal(); plog.releaseThrough(plog.current - 1);
  console.log(`${us.toFixed(2)} µs/write`);
}
fs.rmSync(dir, { recursive: true });
