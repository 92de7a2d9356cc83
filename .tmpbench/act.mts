import { ActivityLog } from '../src/failover/activity.js';
import { nodeStorage } from '../src/sys/storage.js';
import fs from 'node:fs';
const MiB = 1 << 20;
fs.rmSync('/tmp/actdbg', { recursive: true, force: true }); fs.mkdirSync('/tmp/actdbg');
const log = ActivityLog.open(nodeStorage, '/tmp/actdbg/a', 32 * MiB);
let epoch = 1;
for (let pass = 0; pass < 2; pass++) for (let x = 0; x < 32; x++, epoch++) {
  const p = log.ensureHot(x * MiB, MiB, epoch); if (p) await p;
  const before = log.hotExtents;
  log.coolLeastRecent(epoch - 1 - 4, 64, epoch - 1 - 600);
  if (pass === 1 && x < 3) console.log(x, 'hot', before, '->', log.hotExtents, 'syncs', log.syncs, 'p?', !!p);
  await log.persist();
}
