/** Turning a promoted secondary's state directory into a plain one (see finishPromotedStore). */
import { crashPoint } from '../crash.js';
import { ColoError } from '../errors.js';
import type { ActivityLog } from './activity.js';
import type { History } from './history.js';
import type { Clock, Random } from '../sys/clock.js';
import { SecondaryStore, type StoreImage } from '../checkpoint/secondary/store.js';
import type { MetaIndex, StateDir } from '../checkpoint/state-dir.js';

export interface FinishOptions {
  history: History;
  activity: ActivityLog;
  log: (msg: string) => void;
  /** Return -1 (instead of refusing) for a secondary that was never promoted. */
  onlyIfPromoted?: boolean;
  meta?: MetaIndex;
  clock?: Clock;
  random?: Random;
}

/**
 * A state directory that served a promoted secondary: bring everything it
 * holds (folded overlays, committed epochs, the current overlay) into the
 * image, then drop the secondary's files. Returns the last committed epoch
 * (0 if there was no such store). A secondary that was never promoted is refused.
 */
export async function finishPromotedStore(
  state: StateDir,
  image: StoreImage,
  opts: FinishOptions,
): Promise<number> {
  if (!state.storage.exists(state.commits)) return 0;
  const store = await SecondaryStore.open(state, image, {
    history: opts.history,
    activity: opts.activity,
    log: opts.log,
    meta: opts.meta,
    clock: opts.clock,
    random: opts.random,
  });
  // A start as a secondary that failed before it was recorded (node.json still says primary: a full
  // disk, say) left a store that never received anything: its files are leftovers, not a secondary's.
  // So are those of a new secondary that never received anything (its image is the operator's to
  // serve: promoting it is refused, and says to start it as the primary).
  const failedStart = store.lastCommitted === 0 && state.readNodeFile()?.role === 'primary';
  if (!opts.onlyIfPromoted && !store.promoted && (failedStart || store.fresh)) {
    await store.close();
    state.removeSecondaryFiles();
    opts.log(
      `${state.root}: removed the files of ${failedStart ? 'a start as a secondary that did not complete' : 'a new secondary that never received anything'}`,
    );
    return 0;
  }
  try {
    if (!store.promoted && opts.onlyIfPromoted) return -1;
    if (!store.promoted)
      throw new ColoError(
        'EUSAGE',
        `${state.root} belongs to a secondary that was never promoted: starting it as a primary would fork the ` +
          `disk's history. Start it as a secondary, or promote it first (colo-blk failover).`,
      );
    await store.foldAll();
  } finally {
    await store.close();
  }
  if (!store.promoted) return -1;
  const committed = store.lastCommitted;
  // A crash here leaves the secondary's files: the next start folds again (nothing left to do) and removes them.
  crashPoint('promoted-finish-before-cleanup');
  state.removeSecondaryFiles();
  opts.log(`finished the promoted secondary's state in ${state.root}: its image now holds every write`);
  return committed;
}
