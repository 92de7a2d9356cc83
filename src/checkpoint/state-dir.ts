/**
 * A node's state directory: the one module that knows every path in it, and
 * node.json, and the metadata index.
 *
 *   node.json            role, export, image, size (for `inspect --state` and `recover`)
 *   history.json         generation history (failover/history.ts)
 *   activity.bitmap      regions this node may have written that its peer lacks (failover/activity.ts)
 *   commits.journal      a secondary's commit records (the truth of its epochs)
 *   epochs/<N>.journal   a secondary's buffered PVM epochs; a primary's epoch log
 *   epochs-primary/      the epoch log of a promoted secondary that re-protects
 *   overlay/<K>.journal  a secondary's SVM overlay (and folded overlays)
 *   meta/                LevelDB: an index of the above, rebuilt from the journals
 *                        whenever it is missing or stale (the primary keeps its next
 *                        epoch number there)
 */
import path from 'node:path';
import { ClassicLevel } from 'classic-level';
import { ColoError } from '../errors.js';
import { nodeStorage, type Storage } from '../sys/storage.js';

export type NodeRole = 'primary' | 'secondary' | 'promoted';

export interface NodeFile {
  role: NodeRole;
  export: string;
  image: string;
  size: number;
}

export class StateDir {
  constructor(
    readonly root: string,
    readonly storage: Storage = nodeStorage,
  ) {}

  get nodeFile(): string {
    return path.join(this.root, 'node.json');
  }
  get history(): string {
    return path.join(this.root, 'history.json');
  }
  get activity(): string {
    return path.join(this.root, 'activity.bitmap');
  }
  get commits(): string {
    return path.join(this.root, 'commits.journal');
  }
  get epochsDir(): string {
    return path.join(this.root, 'epochs');
  }
  epoch(n: number): string {
    return path.join(this.epochsDir, `${n}.journal`);
  }
  /** Where a primary keeps its epoch log: inside a promoted secondary, beside the store's epochs. */
  primaryLogDir(attached: boolean): string {
    return attached ? path.join(this.root, 'epochs-primary') : this.epochsDir;
  }
  get overlayDir(): string {
    return path.join(this.root, 'overlay');
  }
  overlay(id: number): string {
    return path.join(this.overlayDir, `${id}.journal`);
  }
  get meta(): string {
    return path.join(this.root, 'meta');
  }

  /** Parse `<N>.journal`; null for any other name. */
  static journalNumber(name: string): number | null {
    const m = /^(\d+)\.journal$/.exec(name);
    return m ? Number(m[1]) : null;
  }

  /** Create the directory and a secondary's subdirectories. */
  ensure(): void {
    this.storage.mkdirp(this.root);
    this.storage.mkdirp(this.epochsDir);
    this.storage.mkdirp(this.overlayDir);
  }

  /** What node.json says, or null for a new (or foreign) directory. */
  readNodeFile(): NodeFile | null {
    try {
      return JSON.parse(this.storage.readFile(this.nodeFile).toString('utf8')) as NodeFile;
    } catch {
      return null;
    }
  }

  /** Durably: which role the directory last served decides how a restart treats its journals. */
  writeNodeFile(info: NodeFile): void {
    this.storage.writeFileDurable(
      this.nodeFile,
      JSON.stringify({ ...info, image: path.resolve(info.image) }, null, 2),
    );
  }

  /** A secondary's files (epochs, overlays, commit journal), once a promoted store is folded into its image. */
  removeSecondaryFiles(): void {
    for (const dir of [this.epochsDir, this.overlayDir, this.primaryLogDir(true)])
      this.storage.removeTree(dir);
    this.storage.remove(this.commits);
  }
}

export type MetaOp = { type: 'put'; key: string; value: string } | { type: 'del'; key: string };

/**
 * The metadata index: a small key-value store (LevelDB in a node, a map in
 * the simulator). Everything in it but the primary's next epoch number can be
 * rebuilt from the journals.
 */
export interface MetaIndex {
  get(key: string): Promise<string | undefined>;
  put(key: string, value: string, opts?: { sync?: boolean }): Promise<void>;
  batch(ops: MetaOp[], opts?: { sync?: boolean }): Promise<void>;
  /** Keys in [gte, lt). */
  keys(range: { gte: string; lt: string }): AsyncIterable<string>;
  close(): Promise<void>;
}

class LevelMeta implements MetaIndex {
  constructor(private readonly db: ClassicLevel<string, string>) {}
  get(key: string): Promise<string | undefined> {
    return this.db.get(key);
  }
  put(key: string, value: string, opts?: { sync?: boolean }): Promise<void> {
    return this.db.put(key, value, opts ?? {});
  }
  batch(ops: MetaOp[], opts?: { sync?: boolean }): Promise<void> {
    return this.db.batch(ops, opts ?? {});
  }
  keys(range: { gte: string; lt: string }): AsyncIterable<string> {
    return this.db.keys(range);
  }
  close(): Promise<void> {
    return this.db.close();
  }
}

/** Open `<dir>/meta`; a lock held by another process becomes a clear usage error. */
export async function openMeta(dir: string): Promise<MetaIndex> {
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
  return new LevelMeta(db);
}

/** node.json of a directory on the real file system (kept for callers that have only a path). */
export function writeNodeFile(dir: string, info: NodeFile): void {
  new StateDir(dir).writeNodeFile(info);
}
