/**
 * The metadata index of a secondary (LevelDB in meta/, a map in the
 * simulator): a mirror of what the journals say, so `inspect --state` and
 * status can read it cheaply. It is never the truth: the checkpoint path
 * never waits for it, a failed update is only logged, and every start checks
 * it against the journals and rewrites it whole when it is missing or stale.
 */
import type { MetaIndex, MetaOp } from '../state-dir.js';

const pad = (n: number) => String(n).padStart(12, '0');
export const epochKey = (n: number) => `epoch!${pad(n)}`;

/** Everything the index holds, as the journals say it. */
export interface IndexState {
  size: number;
  committed: number;
  applied: number;
  overlay: number;
  generation: number;
  epochs: { epoch: number; meta: object }[];
}

export class IndexMirror {
  /** Updates, in order. */
  private writes: Promise<void> = Promise.resolve();

  constructor(
    readonly db: MetaIndex,
    private readonly log: (msg: string) => void,
  ) {}

  async get<T>(key: string): Promise<T | undefined> {
    const v = await this.db.get(key);
    return v === undefined ? undefined : (JSON.parse(v) as T);
  }

  /** Queue an update without waiting (the journals are the durable record). */
  update(ops: MetaOp[]): void {
    this.writes = this.writes
      .then(() => this.db.batch(ops))
      .catch((err: Error) =>
        this.log(`metadata index update failed (rebuilt on the next start): ${err.message}`),
      );
  }

  /** Replace the whole index with `state` (durably). */
  async rewrite(state: IndexState): Promise<void> {
    const ops: MetaOp[] = [];
    for await (const key of this.db.keys({ gte: 'epoch!', lt: 'epoch"' })) ops.push({ type: 'del', key });
    ops.push(
      { type: 'put', key: 'size', value: String(state.size) },
      { type: 'put', key: 'committed', value: String(state.committed) },
      { type: 'put', key: 'applied', value: String(state.applied) },
      { type: 'put', key: 'overlay', value: String(state.overlay) },
      { type: 'put', key: 'generation', value: String(state.generation) },
    );
    for (const e of state.epochs)
      ops.push({ type: 'put', key: epochKey(e.epoch), value: JSON.stringify(e.meta) });
    await this.db.batch(ops, { sync: true });
  }

  /** Wait for the queued updates. */
  flushed(): Promise<void> {
    return this.writes;
  }
}
