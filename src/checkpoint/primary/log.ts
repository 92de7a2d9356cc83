/**
 * The primary's epoch log: every mutation of the current epoch, on disk, until
 * the secondary holds it durably.
 *
 * Notes on the design:
 * - One resend buffer per epoch (format/resend-journal.ts), made of the same
 *   frames the link carries: in memory up to RESEND_MEMORY_BYTES for all
 *   epochs, then in `<state>/epochs/<N>.journal`. The replication stream *is*
 *   the concatenation of these buffers, so the sender can resend after a
 *   disconnect by streaming their bytes, and memory stays bounded whatever the
 *   epoch size.
 * - Sequence numbers increase strictly within a session (one run of the
 *   primary); the secondary drops any record of the session it already holds,
 *   which makes resends idempotent. A new session makes the secondary drop
 *   what it holds of epochs that were never sealed durable.
 * - An epoch's buffer goes once the secondary holds it durably (its answer to
 *   the checkpoint's durable phase, or what it reports after a reconnect):
 *   its memory back to the pool. One that spilled into a file waits for the
 *   commit: removing the file takes milliseconds of kernel time, which must
 *   not fall inside the checkpoint's phases.
 * - Budget: if the bytes held for a secondary that is not keeping up exceed
 *   `budgetBytes`, the log stops holding data, and the peer is marked out of
 *   sync (a resync is then required; checkpoints fail until it is done).
 */
import { Buffer } from 'node:buffer';
import path from 'node:path';
import { internal } from '../../errors.js';
import { defaultTunables } from '../../limits.js';
import { realRandom, type Random } from '../../sys/clock.js';
import type { Storage } from '../../sys/storage.js';
import { ResendJournal, ResendMemory, type ResendAppend } from '../format/resend-journal.js';
import type { MutationRecord, SealRecord } from '../format/records.js';

export interface LogEpoch {
  epoch: number;
  /** The epoch's frames; null while the peer is out of sync (nothing is held for it). */
  journal: ResendJournal | null;
  records: number;
  bytes: number;
  sealed: boolean;
}

export type NewMutation =
  | { t: 'w'; o: number; f?: boolean }
  | { t: 'z'; o: number; l: number; h?: boolean; f?: boolean }
  | { t: 't'; o: number; l: number; f?: boolean };

/**
 * The resend buffer's memory, shared by every epoch held: one epoch of 100 ms
 * at the ~600 MB/s a pinned pair replicates here, plus the few MiB of the next
 * epoch written before the secondary answers durable. Past it frames go to a
 * file with a synchronous write on the event loop into fresh pages: at 64 MiB
 * the tail of the epochs spilled, and 1 MiB writes ran 538/624 MB/s against
 * 604/670 at 96 MiB (the primary 1.59/1.41 → 1.31/1.18 CPU-s/GiB); 128 MiB
 * gained nothing more then. Once the pair replicated 1 MiB writes at 700+ MB/s,
 * a 100 ms epoch outgrew 96 MiB and its tail spilled again (`perf`: the
 * spill's writev and reads back were 12 % of the primary); at 128 MiB, three
 * alternations: 729/723/762 → 808/822/834 MB/s, the primary 1.18/1.19/1.18 →
 * 1.03/1.00/0.99 CPU-s/GiB. Peak RSS with 1 GiB pending 211 → 243 MiB.
 */
export const RESEND_MEMORY_BYTES = defaultTunables.resendMemoryBytes;

export class PrimaryLog {
  private readonly memory: ResendMemory;
  readonly epochs = new Map<number, LogEpoch>();
  current: number;
  /** Sequence numbers count per session; a session is one run of the primary. */
  seq = 0;
  readonly session: string;
  outOfSync: { since: number; reason: string } | null = null;
  /** Wall clock, for the out-of-sync record. */
  now: () => number = Date.now;
  /** Bytes of journals not yet durable at the secondary. */
  heldBytes = 0;
  /** Called after every append, so the link can send it. */
  onAppend: (epoch: number, r: ResendAppend) => void = () => {};
  /** A resync is streaming: its data is paced by flow control and released by its own commits, not budgeted. */
  budgetSuspended = false;
  /** Called once when the peer is marked out of sync. */
  onOutOfSync: (reason: string) => void = () => {};

  constructor(
    private readonly storage: Storage,
    readonly dir: string,
    firstEpoch: number,
    readonly budgetBytes: number,
    random: Random = realRandom,
    /** Frames held in memory (past it, in journal files). */
    resendMemoryBytes = RESEND_MEMORY_BYTES,
  ) {
    this.memory = new ResendMemory(resendMemoryBytes);
    this.session = random.id(8);
    storage.mkdirp(dir);
    // Journals from an earlier run describe writes that run cannot vouch for; the
    // peer is resynchronised instead (see docs/ARCHITECTURE.md, restarts).
    for (const name of storage.list(dir)) if (name.endsWith('.journal')) storage.remove(path.join(dir, name));
    this.current = firstEpoch;
    this.open(firstEpoch);
  }

  private open(n: number): LogEpoch {
    const e: LogEpoch = {
      epoch: n,
      journal: this.outOfSync
        ? null
        : new ResendJournal(this.storage, path.join(this.dir, `${n}.journal`), this.memory),
      records: 0,
      bytes: 0,
      sealed: false,
    };
    this.epochs.set(n, e);
    return e;
  }

  get currentEpoch(): LogEpoch {
    return this.epochs.get(this.current)!;
  }

  /**
   * Log a mutation in the current epoch; returns its full record, which is `m`
   * itself given its epoch and sequence number (the caller hands over a fresh
   * literal). Not a copy: `{ ...m, e, s }` gives every record a hidden class of
   * its own once V8 optimises it (Node 20), and each new class then misses
   * every inline cache downstream (the frame encoder's key walk, the link):
   * ~0.85 µs a record instead of ~0.01.
   */
  append(m: NewMutation, data?: Buffer | readonly Buffer[]): MutationRecord {
    const e = this.currentEpoch;
    const rec = m as MutationRecord;
    rec.e = e.epoch;
    rec.s = ++this.seq;
    e.records++;
    if (rec.t === 'w')
      e.bytes += Buffer.isBuffer(data) ? data.length : data!.reduce((n, b) => n + b.length, 0);
    if (this.outOfSync || !e.journal) return rec; // counted, not held: a resync will carry it
    let r;
    try {
      r = e.journal.append(rec, data);
    } catch (err) {
      // The resend buffer failed (disk full?): the PVM keeps being served; the peer needs a resync.
      this.markOutOfSync(`the epoch log could not be written: ${(err as Error).message}`);
      return rec;
    }
    this.heldBytes += r.bytes;
    this.onAppend(e.epoch, r);
    if (this.heldBytes > this.budgetBytes && !this.budgetSuspended)
      this.markOutOfSync(
        `the secondary fell ${this.heldBytes} bytes behind, more than the budget of ${this.budgetBytes} bytes`,
      );
    return rec;
  }

  /** Close the current epoch with its seal marker and open the next. */
  seal(): SealRecord {
    const e = this.currentEpoch;
    const seal: SealRecord = { t: 'seal', e: e.epoch, n: e.records, b: e.bytes };
    if (!this.outOfSync && e.journal) {
      const r = e.journal.append(seal);
      this.heldBytes += r.bytes;
      this.onAppend(e.epoch, r);
    }
    e.sealed = true;
    this.current = e.epoch + 1;
    this.open(this.current);
    return seal;
  }

  /**
   * The secondary holds epoch N durably: its buffer (and older ones) can go;
   * with `keepSpilled`, not those with a file part (see the 'release' action).
   */
  releaseThrough(n: number, opts: { keepSpilled?: boolean } = {}): void {
    for (const e of [...this.epochs.values()]) {
      if (e.epoch > n || !e.sealed) continue;
      if (opts.keepSpilled && e.journal?.spilled) continue;
      this.drop(e);
      this.epochs.delete(e.epoch);
    }
  }

  markOutOfSync(reason: string): void {
    if (this.outOfSync) return;
    this.outOfSync = { since: this.now(), reason };
    // Stop holding data: the journals are useless to a peer that needs a resync.
    for (const e of this.epochs.values()) this.drop(e);
    this.heldBytes = 0;
    this.onOutOfSync(reason);
  }

  /**
   * Hold data again after being out of sync (a resync is starting). Call right
   * after a seal, inside the seal gate: the open epoch must be empty, because
   * its journal restarts from nothing. Sealed epochs are dropped: the resync
   * carries what they changed.
   */
  resumeLogging(): void {
    const cur = this.currentEpoch;
    if (cur.records !== 0) throw internal('resumeLogging needs an empty open epoch');
    for (const e of this.epochs.values()) this.drop(e);
    this.epochs.clear();
    this.heldBytes = 0;
    this.outOfSync = null;
    this.open(this.current);
  }

  /** Sealed epochs still held (not yet durable at the secondary), oldest first. */
  heldEpochs(): LogEpoch[] {
    return [...this.epochs.values()].sort((a, b) => a.epoch - b.epoch);
  }

  epoch(n: number): LogEpoch {
    const e = this.epochs.get(n);
    if (!e) throw internal(`epoch ${n} is not held by this primary`);
    return e;
  }

  /** Let an epoch's frames go: its memory back to the pool, its file (if it spilled) deleted off the acknowledgement path. */
  private drop(e: LogEpoch): void {
    if (!e.journal) return;
    this.heldBytes -= e.journal.size;
    e.journal.close();
    e.journal = null;
  }

  close(): void {
    // Held epochs stay readable for `colo-blk inspect --state` after a clean stop.
    for (const e of this.epochs.values()) e.journal?.close({ keep: true });
  }
}
