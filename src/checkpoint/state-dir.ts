/** The pieces every node's state directory has: the LevelDB index and node.json. */
import fs from 'node:fs';
import path from 'node:path';
import { ClassicLevel } from 'classic-level';
import { ColoError } from '../errors.js';

/** Open `<dir>/meta`; a lock held by another process becomes a clear usage error. */
export async function openMeta(dir: string): Promise<ClassicLevel<string, string>> {
  const db = new ClassicLevel<string, string>(path.join(dir, 'meta'), { valueEncoding: 'utf8' });
  try {
    await db.open();
  } catch (err) {
    const cause = (err as { cause?: { message?: string } }).cause?.message ?? (err as Error).message;
    throw new ColoError(
      'EUSAGE',
      `cannot open ${path.join(dir, 'meta')}: ${cause} (is another colo-blk using this state directory?)`,
    );
  }
  return db;
}

/** node.json: what `inspect --state` and `recover` need to know about a stopped node. */
export function writeNodeFile(
  dir: string,
  info: { role: string; export: string; image: string; size: number },
): void {
  fs.writeFileSync(
    path.join(dir, 'node.json'),
    JSON.stringify({ ...info, image: path.resolve(info.image) }, null, 2),
  );
}
