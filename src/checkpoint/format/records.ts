/**
 * The records of an epoch: what the primary logs for every mutation, what the
 * replication link carries and what the secondary's epoch journals hold.
 *
 * Every mutating NBD command (net/protocol.ts COMMANDS) reaches one of the
 * three mutating BlockDevice methods, and ReplicatingDevice logs each as
 * exactly one record kind; FLUSH is not a content change and is kept local
 * (durability on the secondary is the checkpoint's business: a commit is a
 * flush barrier). The mirror suite sends every mutating command and checks.
 */
import type { JournalBounds } from './journal.js';

export type MutationKind = 'w' | 'z' | 't';

/** A write: data follows in the frame. */
export interface WriteRecord {
  t: 'w';
  /** Epoch and sequence number (global, strictly increasing). */
  e: number;
  s: number;
  /** Disk offset. */
  o: number;
  /** FUA on the primary (informational). */
  f?: boolean;
}

/** Write-zeroes; `h` true if the primary allowed holes (no NO_HOLE flag). */
export interface ZeroRecord {
  t: 'z';
  e: number;
  s: number;
  o: number;
  l: number;
  h?: boolean;
  f?: boolean;
}

/** Trim: the secondary zeroes (a trimmed range reads back as zeroes on our devices). */
export interface TrimRecord {
  t: 't';
  e: number;
  s: number;
  o: number;
  l: number;
  f?: boolean;
}

export type MutationRecord = WriteRecord | ZeroRecord | TrimRecord;

/** End of epoch `e`: `n` mutation records and `b` bytes of write data were in it. */
export interface SealRecord {
  t: 'seal';
  e: number;
  n: number;
  b: number;
}

export type EpochRecord = MutationRecord | SealRecord;

/**
 * The bounds of epoch `e`'s journal, which may be written over a spare that
 * held older epochs (journal.ts): its frames carry `e`, its seal is its last.
 * (A spare only ever held older epochs of the same numbering: a rebase
 * deletes them.)
 */
export function epochJournal(e: number): JournalBounds {
  const field = (meta: unknown, key: 'e' | 't') =>
    typeof meta === 'object' && meta !== null ? (meta as Record<string, unknown>)[key] : undefined;
  return { owns: (meta) => field(meta, 'e') === e, isLast: (meta) => field(meta, 't') === 'seal' };
}

export function isMutation(rec: { t: string }): rec is MutationRecord {
  return rec.t === 'w' || rec.t === 'z' || rec.t === 't';
}

/** Length of the disk range a mutation covers (writes: their data length). */
export function mutationLength(rec: MutationRecord, dataLength: number): number {
  return rec.t === 'w' ? dataLength : rec.l;
}
