/**
 * Journal files: append-only sequences of frames (see frame.ts).
 *
 * Notes on the design:
 * - A journal is written with positional writev at a tracked end offset, so
 *   a record's data position is known the moment it is appended, and the
 *   data can later be read back by (file, position) — which is what the
 *   extent indexes store.
 * - Appends are gathered and written with one writev per turn of the event
 *   loop (or sooner, past 1 MiB): a burst of small records costs one system
 *   call, not one each. Reads and syncs write out what is pending first. A
 *   write error is kept and thrown by every later call, but for a full disk
 *   (ENOSPC, EDQUOT): then what was not written is kept, copied (its
 *   buffers belong to the caller once the turn ends), the error goes to the
 *   caller whose flush failed, and appends are refused until a flush
 *   succeeds again (every read, sync and append tries one). A disk that
 *   fills for a while loses nothing it was given, and works again once it
 *   has space; it used to stay failed until a restart.
 * - `sync()` makes everything appended so far durable (fdatasync) and is what
 *   "durable" means for an epoch. Syncs are coalesced: callers that arrive
 *   while a sync runs share the next one.
 * - `scanJournal` reads a journal back, verifying every frame. A bad or
 *   incomplete frame at the very end is a torn tail (an append interrupted
 *   by a crash): it is reported with its offset so the caller can truncate.
 *   A bad frame followed by more data is corruption in the middle: it is
 *   reported as such and must never be applied.
 * - A journal may be written over an older file (a secondary's epoch journal
 *   over a spare: an applied epoch's journal, kept to save the cost of fresh
 *   pages): past its own frames lie the bytes of the file's earlier use. The
 *   caller says which frames are its own and which one is its last
 *   (`JournalBounds`; records.ts `epochJournal` for an epoch): a frame not
 *   its own, or anything after its last, ends the scan (`leftover`), and a
 *   damaged frame is corruption only if a frame of its own follows it.
 */
import { Buffer } from 'node:buffer';
import { crashPoint } from '../../crash.js';
import { ColoError, toColoError } from '../../errors.js';
import { readFully, type Storage, type StorageFile } from '../../sys/storage.js';
import {
  decodeFrame,
  encodeFrame,
  FRAME_HEADER_BYTES,
  FrameError,
  peekFrameBytes,
  type Frame,
} from './frame.js';

export interface AppendResult {
  /** File offset of the frame. */
  offset: number;
  /** File offset of the frame's data bytes. */
  dataPos: number;
  /** Total bytes appended. */
  bytes: number;
  /** The encoded frame (header+meta, data), for forwarding without re-encoding. */
  parts: Buffer[];
}

/** Pending appends are written out once they reach this size, without waiting for the turn to end. */
const FLUSH_BYTES = 1024 * 1024;
/** Buffers per writev (below the system's IOV_MAX of 1024). */
const IOV_BATCH = 512;

export class JournalWriter {
  /** Logical end: everything appended, written out or not. */
  private end: number;
  /** End of what has been written to the file. */
  private writtenEnd: number;
  private syncedEnd: number;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private flushScheduled = false;
  private failure: Error | null = null;
  /** The last flush found the disk full: what it could not write is still pending. */
  private spaceError: ColoError | null = null;
  private syncing: Promise<void> | null = null;
  private closed = false;

  private constructor(
    private readonly file: StorageFile,
    size: number,
  ) {
    this.end = size;
    this.writtenEnd = size;
    this.syncedEnd = size;
  }

  /**
   * Open (creating if needed) for appending at `validEnd` (default: the file's size; the tail beyond is
   * cut). What the file holds is made durable first: a process killed before its fdatasync (SIGKILL,
   * not a power cut) leaves its last records in the page cache, where the next process reads them and
   * acts on them (a fold record: it wrote to the next overlay, and a FLUSH there was lost with the
   * record at the next power cut). And this writer counts them as synced.
   */
  static open(storage: Storage, path: string, validEnd?: number): JournalWriter {
    const file = storage.open(path);
    const size = file.size();
    const end = validEnd ?? size;
    if (end < size) file.truncate(end);
    if (end > 0) file.datasyncSync();
    return new JournalWriter(file, end);
  }

  /**
   * Open an existing file to be written over from its start, its old bytes
   * left in place past the end (a recycled epoch journal: see the notes).
   */
  static overwrite(storage: Storage, path: string): JournalWriter {
    return new JournalWriter(storage.open(path), 0);
  }

  get path(): string {
    return this.file.path;
  }

  get size(): number {
    return this.end;
  }

  /** Bytes the file holds: what was appended, or more if it was written over (see `overwrite`). */
  get fileBytes(): number {
    return this.closed ? this.end : Math.max(this.end, this.file.size());
  }

  /** Bytes appended but not yet covered by a completed sync. */
  get unsyncedBytes(): number {
    return this.end - this.syncedEnd;
  }

  append(meta: object, data?: Buffer | readonly Buffer[]): AppendResult {
    return this.appendEncoded(encodeFrame(meta, data));
  }

  /** Append an already-encoded frame: encodeFrame's parts, the header first. */
  appendEncoded(parts: Buffer[]): AppendResult {
    let dataLength = 0;
    for (let i = 1; i < parts.length; i++) dataLength += parts[i].length;
    const r = this.appendRaw(parts, dataLength);
    // A literal, not `{ ...r, parts }`: a spread result gets a hidden class of its own once optimised (see PrimaryLog.append).
    return { offset: r.offset, dataPos: r.dataPos, bytes: r.bytes, parts };
  }

  /**
   * Append whole frame bytes whose last `dataLength` bytes are the frame's
   * data. The buffers are kept, not copied, until written out: at once past
   * FLUSH_BYTES, else by an immediate scheduled here. So they are free again
   * after any immediate scheduled later (the link's reader reuses them then).
   */
  appendRaw(buffers: readonly Buffer[], dataLength: number): Omit<AppendResult, 'parts'> {
    if (this.failure) throw this.failure;
    if (this.closed) throw new ColoError('ESHUTDOWN', `journal ${this.path} is closed`);
    if (this.spaceError) this.flush(); // still full: refused, nothing appended
    const offset = this.end;
    let total = 0;
    for (const b of buffers) {
      total += b.length;
      this.pending.push(b);
    }
    this.end += total;
    this.pendingBytes += total;
    if (this.pendingBytes >= FLUSH_BYTES) this.flush();
    else if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => {
        this.flushScheduled = false;
        try {
          this.flush();
        } catch {
          // kept (this.failure), or kept pending on a full disk (this.spaceError): a later call reports it
        }
      });
    }
    return { offset, dataPos: offset + total - dataLength, bytes: total };
  }

  /** Write out pending appends now. */
  flush(): void {
    if (this.failure) throw this.failure;
    if (this.pending.length === 0 || this.closedFd) return;
    const buffers = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    let i = 0;
    try {
      for (; i < buffers.length; i += IOV_BATCH) {
        const batch = buffers.slice(i, i + IOV_BATCH);
        let total = 0;
        for (const b of batch) total += b.length;
        this.file.writev(batch, this.writtenEnd);
        this.writtenEnd += total;
      }
      this.spaceError = null;
    } catch (err) {
      const e = toColoError(err);
      if (e.code !== 'ENOSPC') {
        this.failure = e;
        throw e;
      }
      // The batch that failed is written again whole, at the same place, by the next flush.
      this.pending = buffers.slice(i).map((b) => Buffer.from(b));
      for (const b of this.pending) this.pendingBytes += b.length;
      this.spaceError = e;
      throw e;
    }
  }

  /** Make every append so far durable. Concurrent callers share syncs. */
  async sync(): Promise<void> {
    this.flush();
    const target = this.end;
    while (this.syncedEnd < target) {
      if (this.syncing) {
        await this.syncing;
        continue;
      }
      // Closed meanwhile (its layer discarded, applied, or the store closing): the descriptor is
      // closed, or is being closed by the sync just awaited, so an fdatasync would fail (EBADF) or
      // sync whatever file has been given that number since. Whoever closed it knows what that means.
      if (this.closedFd)
        throw new ColoError(
          'ESHUTDOWN',
          `journal ${this.path} was closed before its last appends were synced`,
        );
      // Appends made while this caller waited are written out first: a sync
      // only ever claims bytes that were written before it started.
      this.flush();
      const upTo = this.writtenEnd;
      crashPoint('journal-before-fdatasync'); // written, not yet durable
      this.syncing = this.file
        .datasync()
        .then(() => {
          this.syncedEnd = Math.max(this.syncedEnd, upTo);
        })
        .finally(() => {
          this.syncing = null;
        });
      await this.syncing;
    }
  }

  /**
   * Give up on what is not written yet (a record that failed) and close: the
   * bytes kept since a full disk are dropped, not written by `close`. Bytes a
   * failed flush wrote part of stay in the file: `cut` them.
   */
  abandon(): void {
    this.pending = [];
    this.pendingBytes = 0;
    this.spaceError = null;
    this.close();
  }

  /** Cut the file at `end` (if it is longer) and make that durable. */
  static async cut(storage: Storage, path: string, end: number): Promise<void> {
    const file = storage.open(path);
    try {
      if (file.size() > end) file.truncate(end);
      await file.datasync();
    } finally {
      file.close();
    }
  }

  /** Read `length` bytes at `pos` (data previously appended). */
  read(buf: Buffer, pos: number): void {
    if (pos + buf.length > this.writtenEnd) this.flush();
    readFully(this.file, buf, pos);
  }

  /** The OS descriptor of a real file (for copy_file_range), null on simulated storage. */
  get descriptor(): number | null {
    return this.file.fd;
  }

  private closedFd = false;

  close(): void {
    if (this.closed) return;
    try {
      this.flush();
    } catch {
      // the error was reported to (or will be seen by) the writer's users
    }
    this.closed = true;
    this.closedFd = true;
    // A sync in flight keeps the descriptor until it finishes (its caller gets its answer).
    if (this.syncing) void this.syncing.finally(() => this.file.close()).catch(() => {});
    else this.file.close();
  }
}

/** Which frames belong to a journal written over an older file (see the notes). */
export interface JournalBounds {
  owns(meta: unknown): boolean;
  /** Nothing of the journal follows this frame. */
  isLast(meta: unknown): boolean;
}

export interface ScannedRecord<M> {
  meta: M;
  /** File offset of the frame. */
  offset: number;
  /** File offset and length of the data. */
  dataPos: number;
  dataLength: number;
  /** The data, only when `withData` was asked for (valid during the callback only). */
  data?: Buffer;
}

export interface ScanResult {
  records: number;
  /** End of the last valid frame: where appending must continue. */
  validEnd: number;
  fileSize: number;
  /** Set when the file ends in a partial or damaged frame (safe to truncate at validEnd). */
  tornTail: { offset: number; reason: string } | null;
  /** Set when a damaged frame is followed by more data: never apply past it. */
  corruption: { offset: number; reason: string } | null;
  /** Scanned with `bounds`: where the bytes left from the file's earlier use begin. */
  leftover?: { offset: number };
}

const SCAN_CHUNK = 4 * 1024 * 1024;

/**
 * Read every valid frame of a journal in order. `onRecord` may be async only
 * if the caller awaits; it is called with frames in file order.
 */
export function scanJournal<M = Record<string, unknown>>(
  storage: Storage,
  path: string,
  onRecord: (rec: ScannedRecord<M>) => void,
  opts: { withData?: boolean; file?: StorageFile; bounds?: JournalBounds } = {},
): ScanResult {
  // `file`: a journal already open (a primary's resend buffer in memory), read instead of `path`.
  const fd = opts.file ?? storage.openRead(path);
  try {
    const fileSize = fd.size();
    let pos = 0;
    let records = 0;
    const leftover = (at: number): ScanResult => ({
      records,
      validEnd: at,
      fileSize,
      tornTail: null,
      corruption: null,
      leftover: { offset: at },
    });
    let buf = Buffer.allocUnsafe(Math.min(SCAN_CHUNK, Math.max(fileSize, FRAME_HEADER_BYTES)));
    while (pos < fileSize) {
      const head = Buffer.allocUnsafe(Math.min(FRAME_HEADER_BYTES, fileSize - pos));
      readFully(fd, head, pos);
      let total: number | null;
      try {
        total = peekFrameBytes(head);
      } catch (err) {
        return damaged(pos, fileSize, records, (err as Error).message, fd, opts.bounds);
      }
      if (total === null || pos + total > fileSize)
        return {
          records,
          validEnd: pos,
          fileSize,
          tornTail: { offset: pos, reason: 'incomplete frame' },
          corruption: null,
        };
      if (buf.length < total) buf = Buffer.allocUnsafe(total);
      const view = buf.subarray(0, total);
      readFully(fd, view, pos);
      let frame: Frame<M> | null;
      try {
        frame = decodeFrame<M>(view);
      } catch (err) {
        if (!(err instanceof FrameError)) throw err;
        return damaged(pos, fileSize, records, err.message, fd, opts.bounds, total);
      }
      if (opts.bounds && !opts.bounds.owns(frame!.meta)) return leftover(pos);
      const dataLength = frame!.data.length;
      onRecord({
        meta: frame!.meta,
        offset: pos,
        dataPos: pos + total - dataLength,
        dataLength,
        data: opts.withData ? frame!.data : undefined,
      });
      records++;
      pos += total;
      if (opts.bounds?.isLast(frame!.meta) && pos < fileSize) return leftover(pos);
    }
    return { records, validEnd: pos, fileSize, tornTail: null, corruption: null };
  } finally {
    fd.close();
  }
}

/** A bad frame at `pos`: a torn tail if nothing valid could follow it, corruption otherwise. */
function damaged(
  pos: number,
  fileSize: number,
  records: number,
  reason: string,
  fd: StorageFile,
  bounds: JournalBounds | undefined,
  claimed?: number,
): ScanResult {
  // If the damaged frame (as claimed) reaches the end of the file, or no frame
  // (of its own, for a journal with bounds) can be found after it, it is the
  // last append: a torn tail.
  const after = claimed !== undefined ? pos + claimed : pos + FRAME_HEADER_BYTES;
  if (after >= fileSize || !hasFrameAfter(fd, after, fileSize, bounds))
    return { records, validEnd: pos, fileSize, tornTail: { offset: pos, reason }, corruption: null };
  return { records, validEnd: pos, fileSize, tornTail: null, corruption: { offset: pos, reason } };
}

/** Is there a decodable frame (one of its own, with `bounds`) starting at `pos`? */
function hasFrameAfter(
  fd: StorageFile,
  pos: number,
  fileSize: number,
  bounds: JournalBounds | undefined,
): boolean {
  if (fileSize - pos < FRAME_HEADER_BYTES) return false;
  const head = Buffer.allocUnsafe(FRAME_HEADER_BYTES);
  readFully(fd, head, pos);
  try {
    const total = peekFrameBytes(head);
    if (total === null || pos + total > fileSize) return false;
    const buf = Buffer.allocUnsafe(total);
    readFully(fd, buf, pos);
    const frame = decodeFrame(buf);
    return frame !== null && (!bounds || bounds.owns(frame.meta));
  } catch {
    return false;
  }
}
