/** Turning a promoted secondary's state directory into a plain one (see finishPromotedStore). */
import fs from 'node:fs';
import path from 'node:path';
import { ColoError } from '../errors.js';
import type { FileDevice } from '../block/file.js';
import type { ActivityLog } from '../failover/activity.js';
import type { History } from '../failover/history.js';
import type { Logger } from '../net/server.js';
import { SecondaryStore } from './secondary-store.js';

/**
 * A state directory that served a promoted secondary: bring everything it
 * holds (folded overlays, committed epochs, the current overlay) into the
 * image, then drop the secondary's files. Returns the last committed epoch
 * (0 if there was no such store). A secondary that was never promoted is refused.
 */
export async function finishPromotedStore(
  dir: string,
  image: FileDevice,
  history: History,
  activity: ActivityLog,
  logger: Logger,
  onlyIfPromoted = false,
): Promise<number> {
  if (!fs.existsSync(path.join(dir, 'commits.journal'))) return 0;
  const store = await SecondaryStore.open(dir, image, { history, activity, log: (m) => logger.info(m) });
  try {
    if (!store.promoted && onlyIfPromoted) return -1;
    if (!store.promoted)
      throw new ColoError(
        'EUSAGE',
        `${dir} belongs to a secondary that was never promoted: starting it as a primary would fork the ` +
          `disk's history. Start it as a secondary, or promote it first (colo-blk failover).`,
      );
    await store.foldAll();
  } finally {
    await store.close();
  }
  if (!store.promoted) return -1;
  const committed = store.lastCommitted;
  for (const sub of ['epochs', 'overlay', 'epochs-primary'])
    fs.rmSync(path.join(dir, sub), { recursive: true, force: true });
  fs.rmSync(path.join(dir, 'commits.journal'), { force: true });
  logger.info(`finished the promoted secondary's state in ${dir}: its image now holds every write`);
  return committed;
}
