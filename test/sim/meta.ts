/**
 * The metadata index in the simulator: a map with LevelDB's durability (a
 * write with `sync` survives a crash; the ones after the last synced write
 * survive as a random prefix). It belongs to a node's disk, not to a process.
 */
import type { MetaIndex, MetaOp } from '../../src/checkpoint/state-dir.js';
import type { Rng } from './world.js';

export class SimMeta {
  private durable = new Map<string, string>();
  private pending: MetaOp[][] = [];
  private current = new Map<string, string>();

  private apply(ops: MetaOp[], into: Map<string, string>): void {
    for (const op of ops) {
      if (op.type === 'put') into.set(op.key, op.value);
      else into.delete(op.key);
    }
  }

  private write(ops: MetaOp[], sync: boolean): void {
    this.apply(ops, this.current);
    this.pending.push(ops);
    if (sync) {
      for (const p of this.pending) this.apply(p, this.durable);
      this.pending = [];
    }
  }

  /** A process's handle on the index (it goes dead with the process). */
  open(alive: () => boolean): MetaIndex {
    return {
      get: async (key) => (alive() ? this.current.get(key) : undefined),
      put: async (key, value, opts) => {
        if (alive()) this.write([{ type: 'put', key, value }], opts?.sync ?? false);
      },
      batch: async (ops, opts) => {
        if (alive()) this.write(ops, opts?.sync ?? false);
      },
      keys: (range) => {
        const keys = [...this.current.keys()].filter((k) => k >= range.gte && k < range.lt).sort();
        return (async function* () {
          for (const k of keys) yield k;
        })();
      },
      close: async () => {},
    };
  }

  /** Power cut: the synced state plus a random prefix of what came after. */
  crash(rng: Rng): void {
    const keep = rng.int(this.pending.length + 1);
    for (const p of this.pending.slice(0, keep)) this.apply(p, this.durable);
    this.pending = [];
    this.current = new Map(this.durable);
  }
}
