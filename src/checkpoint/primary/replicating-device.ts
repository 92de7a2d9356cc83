/**
 * The PVM's disk on the primary: the local image plus the epoch log.
 *
 * Notes on the design:
 * - Every mutating method (write, write-zeroes, trim) runs on the local disk
 *   first and, once it succeeded, is logged (and so streamed to the
 *   secondary) *before* it is acknowledged. "Acknowledged before the seal"
 *   therefore implies "logged in epoch ≤ N" (invariant 2).
 * - Overlapping mutations are executed in arrival order (a small range lock),
 *   so the order in the log is the order in which they hit the local disk;
 *   otherwise two overlapping writes in flight could land in one order here
 *   and in the other order on the secondary.
 * - TRIM is made deterministic: the range is zeroed (punched where the file
 *   system can), so both sides read zeroes afterwards. NBD allows any content
 *   after a trim, but replicas must agree byte for byte (invariant 1).
 * - FLUSH and FUA keep their full local meaning (invariant 10); they are not
 *   logged, because the secondary is made durable at each checkpoint.
 * - `seal()` writes the seal marker and opens epoch N+1 at once; mutations
 *   still running are logged in N+1 (none of them was acknowledged yet).
 */
import { Buffer } from 'node:buffer';
import { ColoError } from '../../errors.js';
import {
  assertRange,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type FileRange,
  type WriteOptions,
  type ZeroOptions,
  writePieces,
} from '../../block/device.js';
import { crashPoint } from '../../crash.js';
import { limits } from '../../limits.js';
import type { ActivityLog } from '../../failover/activity.js';
import type { NewMutation, PrimaryLog } from './log.js';
import type { SealRecord } from '../format/records.js';

/** What a write done before returning returns (one settled promise for all). */
const DONE = Promise.resolve();

interface Inflight {
  start: number;
  end: number;
  done: Promise<void>;
}

export class ReplicatingDevice implements BlockDevice {
  readonly caps: Capabilities;
  private inflight: Inflight[] = [];
  /** Set when this primary was deposed (its secondary was promoted): writes are refused. */
  deposed: string | null = null;
  /**
   * Set while PVM writes (not a resync's) are refused for a time, with
   * nothing recorded or written: a primary that went on alone but could not
   * record its new generation yet (PrimaryReplica.goLone).
   */
  refusal: ColoError | null = null;
  /** Flow control: returns a promise to wait on when the secondary is too far behind. */
  throttle: (admitted: number) => Promise<void> | null = () => null;
  /** Whether `throttle` would let a write through now (asked without side effects). */
  hasRoom: (admitted: number) => boolean = () => true;
  /** Payload bytes of writes past the throttle and not yet in the log. */
  private admitted = 0;
  /** Called when an admitted write is logged (or failed): waiters may fit now. */
  roomChanged: () => void = () => {};

  constructor(
    readonly local: BlockDevice,
    readonly log: PrimaryLog,
    /** Regions are recorded here before they are written (failover/activity.ts). */
    readonly activity?: ActivityLog,
  ) {
    // Trim is always offered: it is implemented as a zeroing that may punch holes.
    this.caps = { ...local.caps, trim: local.caps.zero === 'none' ? 'none' : 'native' };
  }

  get size(): number {
    return this.local.size;
  }

  /**
   * A write's buffers are free again once it settles, if the local disk's are:
   * the log copies the payload (into its resend memory, or a copy for its file
   * part: ResendJournal.append) before the write is acknowledged, and the link
   * sends those copies. So the NBD server may read payloads into its reused
   * buffers here too (Connection.directPayload).
   */
  get releasesWrites(): boolean {
    return this.local.releasesWrites === true;
  }

  pread(buf: Buffer, offset: number): Promise<void> {
    return this.local.pread(buf, offset);
  }

  /** Reads are the local disk's, done on this thread where it does them so (its preadNow). */
  preadNow(buf: Buffer, offset: number): boolean {
    return this.local.preadNow?.(buf, offset) ?? false;
  }

  /** Reads are the local disk's: so is the file they may be sent from. */
  fileRange(offset: number, length: number): FileRange | null {
    return this.local.fileRange?.(offset, length) ?? null;
  }

  /** Run a mutation under the range lock. */
  private async mutate(
    start: number,
    length: number,
    run: () => Promise<void>,
    resync = false,
    payload = false,
  ): Promise<void> {
    // Before anything is recorded: a call outside the disk is a bug of the caller, not a write.
    assertRange(this, start, length);
    // One writer per generation: a deposed primary never writes again.
    if (this.deposed)
      throw new ColoError('ESTALE', `this primary was deposed and serves no writes: ${this.deposed}`);
    if (this.refusal && !resync) throw this.refusal;
    // Admitted writes count from here until they are logged: the PVM's writes in flight
    // (QD × size) would otherwise all pass the mark before any of them is in the log.
    // Woken waiters ask again, so a release admits only what fits.
    const logged = payload ? length : 0;
    for (let room = this.throttle(this.admitted); room; room = this.throttle(this.admitted)) await room;
    this.admitted += logged;
    const end = start + length;
    const before = this.inflight.filter((f) => f.start < end && start < f.end).map((f) => f.done);
    let finish!: () => void;
    const me: Inflight = { start, end, done: new Promise<void>((r) => (finish = r)) };
    this.inflight.push(me);
    // The epoch it will be logged in is not known yet: seals do not wait for a write under
    // way, and any number of them may pass while it waits (for the range, the bitmap's sync, a
    // slow disk). Its extents stay hot until it is over, and then until the epoch current at
    // its end is committed (release).
    const activity = this.activity && length > 0 && !resync ? this.activity : null;
    activity?.hold(start, length);
    try {
      if (before.length) await Promise.all(before);
      // Record the region (durably, if it was cold) before the disk changes: after
      // a crash this node knows every region it may have written that its peer lacks.
      if (activity) {
        const hot = activity.ensureHot(start, length, this.log.current);
        if (hot) await hot;
      }
      await run();
    } finally {
      activity?.release(start, length, this.log.current);
      if (logged) {
        this.admitted -= logged;
        this.roomChanged();
      }
      this.inflight.splice(this.inflight.indexOf(me), 1);
      finish();
    }
  }

  /**
   * Run the local part of a mutation. If it fails, it may have changed some
   * bytes already (a short write, a zeroing done in chunks, a punch followed
   * by a failed flush): the range's bytes as they now are go into the log, so
   * the secondary ends up equal to this disk all the same; if even that read
   * fails (or the range is too large to carry), the peer is marked out of
   * sync, and the range is in the activity log for the resync. Never silently
   * different (invariant 6). The client still gets the error.
   */
  private async local_(offset: number, length: number, op: () => Promise<void>): Promise<void> {
    try {
      await op();
    } catch (err) {
      if (length > 0) await this.logWhatIsThere(offset, length, (err as Error).message);
      throw err;
    }
  }

  private async logWhatIsThere(offset: number, length: number, why: string): Promise<void> {
    if (length <= limits.maxPayloadBytes) {
      const buf = Buffer.allocUnsafe(length);
      try {
        await this.local.pread(buf, offset);
        this.log.append({ t: 'w', o: offset }, buf);
        return;
      } catch (err) {
        why = `${why}; reading the range back failed too: ${(err as Error).message}`;
      }
    }
    this.unlogged(offset, length, why);
  }

  /** logWhatIsThere for pwritevNow: the same, read on this thread (a range the local disk wrote so, it reads so). */
  private logWhatIsThereNow(offset: number, length: number, why: string): void {
    if (length <= limits.maxPayloadBytes) {
      const buf = Buffer.allocUnsafe(length);
      try {
        if (this.local.preadNow?.(buf, offset)) {
          this.log.append({ t: 'w', o: offset }, buf);
          return;
        }
        why = `${why}; it could not be read back at once`;
      } catch (err) {
        why = `${why}; reading the range back failed too: ${(err as Error).message}`;
      }
    }
    this.unlogged(offset, length, why);
  }

  /** A failed local change whose bytes could not be logged: the peer is out of sync (the range is on record). */
  private unlogged(offset: number, length: number, why: string): void {
    this.log.markOutOfSync(`a local write to ${offset}+${length} failed part-way (${why})`);
  }

  pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    return this.pwritev([buf], offset, opts);
  }

  /** pwrite of the pieces' concatenation, never made: the local disk and the log take the pieces. */
  pwritev(bufs: readonly Buffer[], offset: number, opts: WriteOptions = {}): Promise<void> {
    try {
      if (this.pwritevNow(bufs, offset, opts)) return DONE;
    } catch (err) {
      return Promise.reject(err);
    }
    let length = 0;
    for (const b of bufs) length += b.length;
    return this.mutate(
      offset,
      length,
      async () => {
        await this.local_(offset, length, () => writePieces(this.local, bufs, offset, opts));
        crashPoint('primary-after-local-write');
        if (length > 0)
          this.log.append(opts.fua ? { t: 'w', o: offset, f: true } : { t: 'w', o: offset }, bufs);
      },
      false,
      true,
    );
  }

  /**
   * The usual write, done before returning: nothing in flight overlaps it, the
   * link has room, its extents are hot on disk already and the local disk
   * writes it on this thread (its pwritevNow). Then the range lock, the waits
   * and the async frames of `mutate` have nothing to do, and they were about
   * half of what the primary allocated per 4 KiB write. The same steps in the
   * same order: recorded, written, logged. False when any of that does not
   * hold, nothing done (`pwritev` then takes the general path). A local
   * failure is handled as `local_` does, here too: what the disk now holds
   * is read back and logged before the error is thrown.
   */
  pwritevNow(bufs: readonly Buffer[], offset: number, opts: WriteOptions = {}): boolean {
    const local = this.local;
    let length = 0;
    for (const b of bufs) length += b.length;
    if (!local.pwritevNow || this.deposed || length <= 0 || offset < 0 || offset + length > this.size)
      return false;
    const end = offset + length;
    for (const f of this.inflight) if (f.start < end && offset < f.end) return false;
    if (this.refusal || !this.hasRoom(this.admitted)) return false;
    if (this.activity && !this.activity.hotOnDisk(offset, length)) return false;
    // From here on nothing waits. Recorded (hot on disk already: no sync), then written and
    // logged in this turn: in the current epoch (no seal comes in between).
    this.activity?.mark(offset, length, this.log.current);
    try {
      if (!local.pwritevNow(bufs, offset, opts)) return false;
    } catch (err) {
      this.logWhatIsThereNow(offset, length, (err as Error).message);
      throw err;
    }
    crashPoint('primary-after-local-write');
    this.log.append(opts.fua ? { t: 'w', o: offset, f: true } : { t: 'w', o: offset }, bufs);
    this.roomChanged();
    return true;
  }

  zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.mutate(offset, length, async () => {
      await this.local_(offset, length, () => this.local.zero(offset, length, opts));
      if (length > 0) {
        const rec: NewMutation = { t: 'z', o: offset, l: length };
        if (opts.mayTrim !== false) rec.h = true;
        if (opts.fua) rec.f = true;
        this.log.append(rec);
      }
    });
  }

  trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    return this.mutate(offset, length, async () => {
      await this.local_(offset, length, () =>
        this.local.zero(offset, length, { mayTrim: true, fua: opts.fua }),
      );
      if (length > 0)
        this.log.append(
          opts.fua ? { t: 't', o: offset, l: length, f: true } : { t: 't', o: offset, l: length },
        );
    });
  }

  /**
   * Resynchronisation: log the range's current contents as a write (ordered
   * with the PVM's writes by the same range lock), so the
   * secondary receives exactly what this disk holds at this point of the stream.
   */
  resyncRange(offset: number, length: number): Promise<void> {
    return this.mutate(
      offset,
      length,
      async () => {
        const buf = Buffer.allocUnsafe(length);
        await this.local.pread(buf, offset);
        this.log.append({ t: 'w', o: offset }, buf);
      },
      true,
    );
  }

  flush(): Promise<void> {
    return this.local.flush();
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return this.local.extents(offset, length);
  }

  cache(offset: number, length: number): Promise<void> {
    return this.local.cache(offset, length);
  }

  /**
   * Close the current epoch at once: what was logged so far is epoch N, and
   * the mutations still running are logged in N+1 when they finish. None of
   * them was acknowledged (a mutation is acknowledged after it is logged), so
   * "acknowledged before the seal" still means "in epoch ≤ N" (invariant 2),
   * and overlapping mutations keep their order through the range lock. The
   * seal does not wait for them: under a continuous load that wait was most of
   * a checkpoint (15 ms at QD8 of 1 MiB writes). A paused VM (COLO) has none.
   * It is synchronous: whatever the caller does right after it (the resync
   * resumes logging in the new epoch) happens before any mutation can log.
   */
  seal(): SealRecord {
    return this.log.seal();
  }

  close(): Promise<void> {
    return this.local.close();
  }
}
