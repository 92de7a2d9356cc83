/**
 * Spare epoch journals: an applied epoch's journal file, kept to be written
 * over by a later epoch instead of being unlinked and created anew.
 *
 * Notes on the design:
 * - Why: the secondary writes every byte it receives into an epoch journal.
 *   On tmpfs, and more so in a VM that hands free pages back to its host,
 *   writing into fresh pages costs two to six times what writing over pages
 *   a file already has does, and unlinking a journal of tens of MiB takes
 *   milliseconds of kernel time. A spare keeps its pages.
 * - Safe by three rules, under the crash model of the power-loss tests
 *   (namespace operations persist in order, as a prefix; a directory fsync
 *   that returned makes every earlier one durable):
 *   1. `keep` renames `<M>.journal` to `spare-<k>.journal`, called by the
 *      store's retire queue in the order epochs were applied, the same queue
 *      as deletions: a later journal is never gone while an earlier one
 *      could survive a crash and be applied again over newer bytes.
 *   2. A spare is handed out only once a directory sync that began after its
 *      rename has returned: `<M>.journal` can then no longer reappear after a
 *      crash holding another epoch's bytes.
 *   3. `take` renames the spare to `<N>.journal` and starts a directory sync;
 *      the epoch's seal waits for it (Layer.sync), so an epoch answered
 *      durable is found under its own name. A crash before that leaves the
 *      new bytes under the spare's name (recovery deletes spares) or the new
 *      name over bytes of older epochs, where the scan stops (journal.ts).
 * - Bounded: at most MAX_SPARES files of at most `bytes` together; a journal
 *   that does not fit is deleted, as it always was. A failed directory sync
 *   turns the pool off (new journals are fresh files again).
 */
import path from 'node:path';
import type { Storage } from '../../sys/storage.js';

/** Spares kept at most: one per epoch in the pipeline (receiving, durable, committed, applying). */
export const MAX_SPARES = 4;

interface Spare {
  path: string;
  bytes: number;
  /** The rename that made it a spare (see `renames`). */
  rename: number;
}

interface Waiter {
  rename: number;
  resolve: () => void;
  reject: (err: Error) => void;
}

export class SpareJournals {
  private ready: Spare[] = [];
  private settling: Spare[] = [];
  private nextId = 1;
  /** Renames made so far, and how many of them a returned directory sync covers. */
  private renames = 0;
  private synced = 0;
  private syncing = false;
  private waiters: Waiter[] = [];
  /** Set once a directory sync failed: no more syncs. */
  private failed = false;
  /** Set by discard (a promotion, or that failure): no more spares. */
  private off = false;
  private reused = 0;

  constructor(
    private readonly storage: Storage,
    private readonly dir: string,
    /** Bytes all spares may hold together (0: keep none). */
    private readonly maxBytes: number,
    private readonly log: (msg: string) => void = () => {},
  ) {}

  static isSpare(name: string): boolean {
    return /^spare-\d+\.journal$/.test(name);
  }

  /** Spares held, how many of them may be written over now, their bytes, and how many were written over so far. */
  get held(): { files: number; ready: number; bytes: number; reused: number } {
    return {
      files: this.ready.length + this.settling.length,
      ready: this.ready.length,
      bytes: this.bytes,
      reused: this.reused,
    };
  }

  private get bytes(): number {
    let n = 0;
    for (const s of [...this.ready, ...this.settling]) n += s.bytes;
    return n;
  }

  /**
   * Keep the applied journal at `file` (`bytes` long) as a spare: renamed
   * now. False when the pool is full or off: the caller deletes it.
   */
  keep(file: string, bytes: number): boolean {
    if (this.off || bytes > this.maxBytes - this.bytes) return false;
    if (this.ready.length + this.settling.length >= MAX_SPARES) return false;
    const spare = path.join(this.dir, `spare-${this.nextId++}.journal`);
    this.storage.rename(file, spare);
    this.settling.push({ path: spare, bytes, rename: ++this.renames });
    this.pump();
    return true;
  }

  /**
   * Rename a ready spare to `file`, to be written over. Returns a promise
   * that settles once the rename is durable, or null when no spare is ready.
   */
  take(file: string): Promise<void> | null {
    const spare = this.ready.pop();
    if (!spare) return null;
    this.storage.rename(spare.path, file);
    this.reused++;
    const rename = ++this.renames;
    const named = new Promise<void>((resolve, reject) => this.waiters.push({ rename, resolve, reject }));
    this.pump();
    return named;
  }

  /** Delete every spare (a promoted node receives no more epochs). */
  discard(): void {
    this.off = true;
    for (const s of [...this.ready, ...this.settling]) void this.storage.removeLater(s.path);
    this.clear();
  }

  /** Forget every spare (their files were deleted by the caller). */
  clear(): void {
    this.ready = [];
    this.settling = [];
  }

  /** One directory sync at a time, covering every rename made before it started. */
  private pump(): void {
    if (this.syncing || this.failed || this.synced >= this.renames) return;
    const upTo = this.renames;
    this.syncing = true;
    this.storage.syncDirLater(this.dir).then(
      () => {
        this.syncing = false;
        this.synced = upTo;
        this.ready.push(...this.settling.filter((s) => s.rename <= upTo));
        this.settling = this.settling.filter((s) => s.rename > upTo);
        this.settle(upTo, null);
        this.pump();
      },
      (err: Error) => {
        this.syncing = false;
        this.failed = true;
        this.log(
          `syncing ${this.dir} failed (${err.message}): applied epoch journals are deleted from now on`,
        );
        this.discard();
        this.settle(Infinity, err);
      },
    );
  }

  private settle(upTo: number, err: Error | null): void {
    const done = this.waiters.filter((w) => w.rename <= upTo);
    this.waiters = this.waiters.filter((w) => w.rename > upTo);
    for (const w of done) {
      if (err) w.reject(err);
      else w.resolve();
    }
  }
}
