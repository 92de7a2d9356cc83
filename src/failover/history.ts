/**
 * Generation history: which writers a disk has had.
 *
 * Notes on the design:
 * - A generation is one writer's reign over the disk. It starts when a node
 *   becomes a primary: a new disk (generation 1), a secondary promoted at
 *   failover, or a primary that lost its secondary and went on alone ("lone"
 *   — from then on its writes are real, no checkpoint protects them). Each
 *   generation has a random id, so two nodes can never mint "the same"
 *   generation by accident, and a counter `n` for people to read.
 * - Every node keeps its history in `<state>/history.json`, written
 *   atomically (temporary file, fdatasync, rename, fsync of the directory)
 *   *before* the first write of a new generation. A secondary adopts its
 *   primary's history when a resynchronisation completes.
 * - When a primary meets a secondary, `decide()` compares the two histories:
 *   nothing to do, incremental resync (from the common generation), full
 *   resync (no usable common history), or refuse — the primary is stale, or
 *   both sides have a generation the other does not know (split brain: both
 *   wrote after diverging). Never a silent merge.
 */
import { ColoError } from '../errors.js';
import { realClock, realRandom, type Clock, type Random } from '../sys/clock.js';
import type { Storage } from '../sys/storage.js';

export interface Generation {
  /** Counter for humans: 1, 2, 3... along one history. */
  n: number;
  /** Random id: what histories are compared by. */
  id: string;
  /** Node that minted it. */
  by: string;
  /** The committed epoch the generation started from (its fork point). */
  base: number;
  at: number;
  reason: string;
  /** Set once a secondary was fully synchronised within this generation. */
  protected?: boolean;
  /** Minted by `failover --force` on a node that held no complete checkpoint: its children resync in full. */
  forced?: boolean;
}

export interface HistoryFile {
  version: 1;
  /** This state directory's identity. */
  node: string;
  generations: Generation[];
}

export const label = (g: Generation | undefined): string =>
  g ? `generation ${g.n} (${g.id})` : 'no generation';

export interface HistoryEnv {
  clock?: Clock;
  random?: Random;
}

export class History {
  private readonly clock: Clock;
  private readonly random: Random;

  private constructor(
    private readonly storage: Storage,
    readonly file: string,
    private data: HistoryFile,
    env: HistoryEnv,
  ) {
    this.clock = env.clock ?? realClock;
    this.random = env.random ?? realRandom;
  }

  /** Load the history file (state-dir: history.json), creating an empty history (with a fresh node id) if there is none. */
  static load(storage: Storage, file: string, env: HistoryEnv = {}): History {
    if (storage.exists(file)) {
      let data: HistoryFile;
      try {
        data = JSON.parse(storage.readFile(file).toString('utf8')) as HistoryFile;
      } catch (err) {
        throw new ColoError(
          'EIO',
          `${file} is not valid JSON (${(err as Error).message}); it is written atomically, so this is ` +
            `damage from outside colo-blk. Restore it, or move it away to make this node a fresh one ` +
            `(it will then be fully resynchronised).`,
        );
      }
      if (data.version !== 1 || !Array.isArray(data.generations) || typeof data.node !== 'string')
        throw new ColoError('EIO', `${file} is not a colo-blk generation history`);
      return new History(storage, file, data, env);
    }
    const random = env.random ?? realRandom;
    const h = new History(storage, file, { version: 1, node: random.id(6), generations: [] }, env);
    h.save([]);
    return h;
  }

  get node(): string {
    return this.data.node;
  }

  get generations(): readonly Generation[] {
    return this.data.generations;
  }

  get last(): Generation | undefined {
    return this.data.generations[this.data.generations.length - 1];
  }

  get empty(): boolean {
    return this.data.generations.length === 0;
  }

  /** Start a new generation with this node as its writer; durable before it returns. */
  mint(reason: string, base: number): Generation {
    const g: Generation = {
      n: (this.last?.n ?? 0) + 1,
      id: this.random.id(6),
      by: this.node,
      base,
      at: this.clock.now(),
      reason,
    };
    this.append(g);
    return g;
  }

  /** Record a generation minted elsewhere in this node's own records (e.g. a promotion being finished after a crash). */
  append(g: Generation): void {
    this.save([...this.data.generations, g]);
  }

  /** The current generation has a synchronised secondary. */
  markProtected(): void {
    const g = this.last;
    if (!g || g.protected) return;
    this.save([...this.data.generations.slice(0, -1), { ...g, protected: true }]);
  }

  /** Take over a primary's history (a resync into this node completed). */
  adopt(generations: Generation[]): void {
    this.save(generations.map((g) => ({ ...g })));
  }

  /** Forget this node's history (operator: `--discard-my-data`). */
  discard(): void {
    this.save([]);
  }

  /**
   * Make `generations` the history, on disk first: if the write fails (a full
   * disk) it throws and the history in memory is still the one on disk, so no
   * generation is ever acted on that a restart would not find.
   */
  private save(generations: Generation[]): void {
    const data = { ...this.data, generations };
    this.storage.writeFileDurable(this.file, JSON.stringify(data, null, 2) + '\n');
    this.data = data;
  }
}

export type SyncMode = 'incremental' | 'full';

export type Decision =
  | { action: 'none'; reason: string }
  | { action: 'resync'; mode: SyncMode; reason: string; common?: Generation }
  | { action: 'refuse'; kind: 'stale-primary' | 'split-brain'; reason: string };

export interface PeerSyncState {
  /** The secondary is part-way through a resync towards `target` (a generation id). */
  syncing?: { target: string; mode: SyncMode } | null;
}

/**
 * What a primary with history `p` must do to a secondary with history `s`.
 * `primaryNeedsResync`: the primary cannot resend what the secondary lacks
 * from its own log (it restarted, or its log went over budget).
 */
export function decide(
  p: readonly Generation[],
  s: readonly Generation[],
  opts: PeerSyncState & { primaryNeedsResync?: boolean } = {},
): Decision {
  const pLast = p[p.length - 1];
  const sLast = s[s.length - 1];
  if (!pLast) throw new ColoError('EPROTO', 'the primary has no generation');
  if (opts.syncing) {
    // A half-finished resync: the secondary's disk matches no checkpoint. Resume it
    // (same primary generation and mode), or start over with a full comparison.
    if (opts.syncing.target === pLast.id)
      return {
        action: 'resync',
        mode: opts.syncing.mode,
        reason: `resuming the interrupted ${opts.syncing.mode} resync towards ${label(pLast)}`,
      };
    return {
      action: 'resync',
      mode: 'full',
      reason:
        opts.syncing.target === ''
          ? "the secondary's data was discarded (--discard-my-data)"
          : `the secondary was part-way through a resync towards another primary (${opts.syncing.target})`,
    };
  }
  if (!sLast) return { action: 'resync', mode: 'full', reason: 'the secondary has no history (a new node)' };
  if (sLast.id === pLast.id)
    return opts.primaryNeedsResync
      ? {
          action: 'resync',
          mode: 'incremental',
          reason: `same ${label(pLast)}, but the primary cannot resend its log (restarted or over budget)`,
          common: pLast,
        }
      : { action: 'none', reason: `both at ${label(pLast)}` };
  const pi = p.findIndex((g) => g.id === sLast.id);
  if (pi >= 0) {
    // The secondary is behind: its last generation is in the primary's past.
    const after = p.slice(pi + 1);
    const forced = after.find((g) => g.forced);
    if (forced)
      return {
        action: 'resync',
        mode: 'full',
        reason:
          `the primary's ${label(forced)} was forced (failover --force) from a disk that held no complete ` +
          `checkpoint: what differs is not on record`,
        common: sLast,
      };
    if (after.length === 1 && !after[0].protected)
      return {
        action: 'resync',
        mode: 'incremental',
        reason:
          `the secondary's ${label(sLast)} is the parent of the primary's ${label(pLast)}: ` +
          `resending what the primary wrote since, and rolling back what the secondary wrote after the fork`,
        common: sLast,
      };
    return {
      action: 'resync',
      mode: 'full',
      reason:
        `the secondary's ${label(sLast)} is ${after.length} generations behind the primary's ${label(pLast)}` +
        (after.length === 1 ? ', which has since protected another secondary' : '') +
        ': no record of every difference is kept that long',
      common: sLast,
    };
  }
  if (s.some((g) => g.id === pLast.id))
    return {
      action: 'refuse',
      kind: 'stale-primary',
      reason:
        `this primary's ${label(pLast)} is older than the secondary's ${label(sLast)}: the secondary was ` +
        `promoted since. This node must not write; re-protect it as a secondary of the new primary ` +
        `(colo-blk reprotect --control <new primary> --peer <this node>).`,
    };
  let common: Generation | undefined;
  for (let i = 0; i < Math.min(p.length, s.length) && p[i].id === s[i].id; i++) common = p[i];
  return {
    action: 'refuse',
    kind: 'split-brain',
    reason:
      `split brain: both nodes wrote after diverging from ${label(common)} — the primary is at ` +
      `${label(pLast)}, the secondary at ${label(sLast)}, and neither generation is in the other's history. ` +
      `Nothing was merged or overwritten. Decide which node's data survives; then restart the other one ` +
      `as a secondary with --discard-my-data (its writes since the fork are lost) and re-protect it.`,
  };
}
