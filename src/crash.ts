/**
 * Named crash points for fault-injection tests: when the environment variable
 * COLO_BLK_CRASH_AT names a point, the process kills itself with SIGKILL
 * there (no cleanup, no flush: exactly what a power-less crash of the process
 * looks like to the disk, minus the page cache, which the power-loss tests
 * cover separately). COLO_BLK_CRASH_SKIP=n lets the point pass n times first.
 */
const target = process.env.COLO_BLK_CRASH_AT ?? '';
let skip = Number(process.env.COLO_BLK_CRASH_SKIP ?? 0);

export function crashPoint(name: string): void {
  if (target !== name) return;
  if (skip-- > 0) return;
  process.kill(process.pid, 'SIGKILL');
}
