/**
 * Named crash points for fault-injection tests: when a process is armed with
 * a point (COLO_BLK_CRASH_AT, read once by the CLI at start, never at
 * import), it kills itself with SIGKILL there: no cleanup, no flush, exactly
 * what a power-less crash of the process looks like to the disk, minus the
 * page cache, which the power-loss tests cover separately.
 * COLO_BLK_CRASH_SKIP=n lets the point pass n times first. The points are a
 * closed list: a misspelt one is refused when armed, so it cannot silently
 * never fire.
 */
import process from 'node:process';
import { ColoError } from './errors.js';

export const CRASH_POINTS = [
  // primary
  'primary-after-local-write',
  'primary-mid-resync',
  'activity-before-sync',
  'journal-before-fdatasync',
  // secondary: an epoch's life
  'secondary-before-durable-sync',
  'secondary-before-commit-record',
  'secondary-after-commit-record',
  'secondary-mid-apply',
  'secondary-before-applied-record',
  // secondary: a resync into it
  'secondary-after-rebase',
  'secondary-after-partial-sync-commit',
  // secondary: failover, and a promoted node
  'secondary-before-promote-record',
  'secondary-after-promote-record',
  'promoted-before-fold-record',
  'secondary-after-fold-record',
  'promoted-finish-before-cleanup',
] as const;

export type CrashPointName = (typeof CRASH_POINTS)[number];

let target: CrashPointName | null = null;
let skip = 0;

/** Arm this process from its environment (the CLI does, at start). */
export function armCrashPoints(env: NodeJS.ProcessEnv): void {
  const at = env.COLO_BLK_CRASH_AT ?? '';
  if (!at) return;
  if (!(CRASH_POINTS as readonly string[]).includes(at))
    throw new ColoError(
      'EUSAGE',
      `COLO_BLK_CRASH_AT=${at} is not a crash point; known: ${CRASH_POINTS.join(', ')}`,
    );
  target = at as CrashPointName;
  skip = Number(env.COLO_BLK_CRASH_SKIP ?? 0);
}

/** True when this process is armed to die at `name` (code that batches work sizes its batches so the point still falls between parts). */
export function crashArmed(name: CrashPointName): boolean {
  return target === name;
}

export function crashPoint(name: CrashPointName): void {
  if (target !== name) return;
  if (skip-- > 0) return;
  process.kill(process.pid, 'SIGKILL');
}
