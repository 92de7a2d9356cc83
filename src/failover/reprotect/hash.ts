/**
 * Block hashes for resynchronisation: both sides hash the same ranges in
 * fixed-size blocks, and only blocks whose hashes differ are sent. BLAKE3 or
 * SHA-256 (hash-pool.ts, HashAlg), truncated to 16 bytes per block: a
 * comparison of disk contents that a guest cannot steer (a guest that could
 * craft a collision could make two different blocks compare equal, and the
 * replicas differ for good).
 *
 * A block that reads as zeroes hashes to ZERO_MARK (16 zero bytes) instead,
 * on both sides. So a block inside a hole (SEEK_HOLE, or an extent the device
 * reports as zero) costs nothing to hash: it is not read. Two sparse images
 * compare at the speed of their extent maps, and a block of any size works,
 * which lets the resync ask for one hash of a whole gigabyte of hole.
 */
import { Buffer } from 'node:buffer';
import fs from 'node:fs';
import { ExtentFlag, type BlockDevice, type FileRange } from '../../block/device.js';
import type { Range } from '../activity.js';
import { hasher, hashPool, isZero, PIECE, POOL_MIN_BYTES, type HashAlg, type HashPool } from './hash-pool.js';

export const HASH_BYTES = 16;
/** First-level block (whole-disk comparison); differing blocks are compared again in sub-blocks. */
export const HASH_BLOCK = 64 * 1024;
export const HASH_SUBBLOCK = 4 * 1024;
/** The hash of a block of zeroes, whatever its size. */
export const ZERO_MARK = Buffer.alloc(HASH_BYTES);
/** Limits on a hash request a peer may make: block size and blocks per request. */
export const MIN_HASH_BLOCK = 512;
export const MAX_HASH_BLOCKS = 1 << 16;

export type RangeReader = (buf: Buffer, offset: number) => Promise<void>;
/** Ranges within [offset, offset+length) known to read as zeroes, sorted, without reading them. */
export type ZeroRanges = (offset: number, length: number) => Promise<Range[]>;

/**
 * Whether [offset, offset+length) lies inside one of the sorted, merged
 * ranges; asked with offsets that never go back, so it walks them once.
 */
function coverage(ranges: Range[]): (offset: number, length: number) => boolean {
  let j = 0;
  return (offset, length) => {
    while (j < ranges.length && ranges[j].offset + ranges[j].length <= offset) j++;
    const r = ranges[j];
    return r !== undefined && r.offset <= offset && r.offset + r.length >= offset + length;
  };
}

export interface BlockHashOptions {
  /** Ranges known to read as zeroes (not read: their blocks are ZERO_MARK or hash as zeroes). */
  zeroes?: ZeroRanges;
  /** The threads that hash (the process's pool by default). */
  pool?: HashPool;
  /** The digest (SHA-256 by default). */
  alg?: HashAlg;
  /**
   * Where a range reads, as it is now, straight from an open file (a device's
   * `fileRange`), or null: the pool's workers then read it themselves and
   * only the hashes come back (HashPool.hashFile).
   */
  file?: (offset: number, length: number) => FileRange | null;
}

/** Bytes of file one worker job reads and hashes (a compare chunk's worth). */
export const FILE_JOB = 4 * 1024 * 1024;

/** Cleared when there is no /proc/self/fd: hashing then reads on this thread's side. */
let canReopen = true;

/**
 * A descriptor of its own on the file behind `fd`, opened now (while `fd` is
 * sure to be the device's): a worker reads from it later, whatever the device
 * does with `fd` meanwhile (a close, and the number reused). null when it
 * cannot be opened (no /proc, or the file's permissions changed since the
 * device opened it): the caller reads the usual way.
 */
function reopen(fd: number): number | null {
  if (!canReopen) return null;
  try {
    return fs.openSync(`/proc/self/fd/${fd}`, 'r');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !fs.existsSync('/proc/self/fd'))
      canReopen = false;
    return null;
  }
}

/**
 * Hashes of [offset, offset+length) in blocks of `block` bytes (the last one
 * may be short). Pieces are read one after another while the pool hashes the
 * ones already read, on every core.
 */
export async function blockHashes(
  read: RangeReader,
  offset: number,
  length: number,
  block: number,
  opts: BlockHashOptions = {},
): Promise<Buffer> {
  const { zeroes, pool = hashPool, alg = 'sha256', file } = opts;
  pool.check(alg);
  const n = Math.ceil(length / block);
  const out = Buffer.allocUnsafe(n * HASH_BYTES);
  const covered = coverage(zeroes && length > 0 ? await zeroes(offset, length) : []);
  // Blocks of up to a piece are read several at a time (as many whole blocks as a piece holds, so
  // the pool gets jobs worth a thread's hop); larger ones piece by piece.
  const pieceBytes =
    block >= PIECE
      ? Math.min(PIECE, Math.max(length, 1))
      : Math.max(block, Math.floor(Math.min(PIECE, length) / block) * block);
  const perRead = Math.max(1, Math.floor(pieceBytes / block));
  // Runs a worker may read itself: up to FILE_JOB, when the pool has workers.
  const perFileJob =
    file && pool.size > 0 && block <= PIECE ? Math.max(perRead, Math.floor(FILE_JOB / block)) : 0;
  // Pieces being hashed; their buffers come back to `free`.
  const depth = pool.depth;
  const free: ArrayBuffer[] = [];
  const inflight = new Set<Promise<void>>();
  let buffers = 0;
  let failure: Error | null = null;
  const takeBuffer = async (): Promise<ArrayBuffer> => {
    while (free.length === 0) {
      if (buffers < depth) {
        buffers++;
        return pool.buffer();
      }
      await Promise.race(inflight);
      if (failure) throw failure;
    }
    return free.pop()!;
  };
  /** Wait until fewer than `depth` jobs run; a failed one's error is thrown. */
  const slot = async (): Promise<void> => {
    while (inflight.size >= depth) {
      await Promise.race(inflight);
      if (failure) throw failure;
    }
  };
  /** Count `work` in flight until it settles (then `after`); its error is kept for the end. */
  const track = (work: Promise<void>, after?: () => void): void => {
    const job: Promise<void> = work
      .catch((err: Error) => {
        failure ??= err;
      })
      .finally(() => {
        after?.();
        inflight.delete(job);
      });
    inflight.add(job);
  };
  try {
    for (let i = 0; i < n;) {
      const start = offset + i * block;
      const len = Math.min(block, offset + length - start);
      if (covered(start, len)) {
        ZERO_MARK.copy(out, i * HASH_BYTES);
        i++;
        continue;
      }
      if (block <= pieceBytes) {
        // A run of whole blocks in one read (stopping before a block known to be zero).
        let k = 1;
        while (
          k < Math.max(perRead, perFileJob) &&
          i + k < n &&
          !covered(start + k * block, Math.min(block, offset + length - start - k * block))
        )
          k++;
        let runLen = Math.min(k * block, offset + length - start);
        const at = i * HASH_BYTES;
        if (perFileJob > 0 && runLen >= POOL_MIN_BYTES) {
          await slot();
          // Asked and opened in one step: the range lies in the file as of now, and the
          // descriptor is the job's own.
          const src = file!(start, runLen);
          const fd = src ? reopen(src.fd) : null;
          if (src && fd !== null) {
            track(
              pool.hashFile(fd, src.offset, runLen, block, HASH_BYTES, alg).then((h) => void h.copy(out, at)),
              () => fs.closeSync(fd),
            );
            i += k;
            continue;
          }
        }
        if (k > perRead) {
          k = perRead;
          runLen = Math.min(k * block, offset + length - start);
        }
        const ab = await takeBuffer();
        await read(Buffer.from(ab, 0, runLen), start);
        track(
          pool.hash(ab, runLen, block, HASH_BYTES, alg).then((r) => {
            r.hashes.copy(out, at);
            free.push(r.buffer);
          }),
        );
        i += k;
        continue;
      }
      // A block larger than a piece: hash it piece by piece, here.
      const buf = Buffer.allocUnsafe(pieceBytes);
      const h = hasher(alg);
      let zero = true;
      for (let at = 0; at < len; at += buf.length) {
        const view = buf.subarray(0, Math.min(buf.length, len - at));
        if (covered(start + at, view.length)) view.fill(0);
        else await read(view, start + at);
        if (zero && !isZero(view)) zero = false;
        h.update(view);
      }
      if (zero) ZERO_MARK.copy(out, i * HASH_BYTES);
      else h.digest().copy(out, i * HASH_BYTES, 0, HASH_BYTES);
      i++;
    }
  } finally {
    // Never leave a job behind (its buffer and its error), even when a read failed.
    await Promise.all(inflight);
    for (const ab of free) pool.recycle(ab);
  }
  if (failure) throw failure;
  return out;
}

/** Ranges of a device that read as zeroes without reading them (its extents with the ZERO flag). */
export async function deviceZeroRanges(dev: BlockDevice, offset: number, length: number): Promise<Range[]> {
  if (!dev.caps.extents) return [];
  const out: Range[] = [];
  const end = offset + length;
  for (let pos = offset; pos < end;) {
    const exts = await dev.extents(pos, end - pos);
    if (exts.length === 0) break;
    for (const e of exts) {
      if (e.flags & ExtentFlag.ZERO) {
        const last = out[out.length - 1];
        if (last && last.offset + last.length === e.offset) last.length += e.length;
        else out.push({ offset: e.offset, length: e.length });
      }
      pos = e.offset + e.length;
    }
  }
  return out;
}
