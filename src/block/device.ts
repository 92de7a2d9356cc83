/**
 * The block-device interface: what every storage backend and every layer in
 * the write path implements (in the spirit of nbdkit's plugin/filter API).
 *
 * Notes on the design:
 * - The NBD server knows nothing of storage; it validates a client's request at
 *   the edge (range, flags, read-only) and then calls exactly one of these
 *   methods. Devices may therefore assume in-range arguments; they assert it.
 * - Capabilities are explicit so the server can advertise the right
 *   transmission flags: 'native' means the device does it efficiently,
 *   'emulate' means it works but costs what a plain write would, 'none' means
 *   it is not offered.
 * - Durability is explicit at every call: `fua` on a mutation means "durable
 *   before the promise resolves"; `flush()` makes every completed mutation
 *   durable (NBD semantics, invariant 10).
 * - Three methods change contents: pwrite, zero and trim. A layer that wraps
 *   a device must handle all three; the wrappers that matter most
 *   (ReplicatingDevice, SwitchDevice) run the conformance suite and the
 *   mirror suite (test/mirror.test.ts), which checks that every mutating NBD
 *   command (net/protocol.ts COMMANDS) is replicated.
 */
import { Buffer } from 'node:buffer';
import { internal } from '../errors.js';

export type Support = 'none' | 'emulate' | 'native';

export interface Capabilities {
  /** Writes allowed at all (false for read-only backends). */
  write: boolean;
  flush: boolean;
  fua: Support;
  trim: Support;
  zero: Support;
  /** Write-zeroes that can promise to be faster than writing zeroes. */
  fastZero: boolean;
  /** Extent (allocation) information beyond "all data". */
  extents: boolean;
  cache: Support;
  /** Safe for several connections at once with flush semantics shared across them. */
  multiConn: boolean;
}

export interface WriteOptions {
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range may be deallocated (punched) rather than written. NBD: !NO_HOLE. */
  mayTrim?: boolean;
  /** Fail with ENOTSUP at once unless zeroing is fast. NBD: FAST_ZERO. */
  fast?: boolean;
}

/** base:allocation semantics: HOLE = unallocated, ZERO = reads as zero. */
export const ExtentFlag = { HOLE: 1, ZERO: 2 } as const;

export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

export interface BlockDevice {
  readonly size: number;
  readonly caps: Capabilities;
  /** Fill `buf` with the bytes at [offset, offset + buf.length). */
  pread(buf: Buffer, offset: number): Promise<void>;
  /**
   * Optional: write the pieces' concatenation at `offset`, without making it
   * (an NBD payload as the socket delivered it). Same semantics as pwrite.
   */
  pwritev?(bufs: readonly Buffer[], offset: number, opts?: WriteOptions): Promise<void>;
  /**
   * Optional: pwritev done before returning, when the device would do this
   * write on the calling thread anyway: true once written (it throws as
   * pwritev rejects), false with nothing done (use pwritev).
   */
  pwritevNow?(bufs: readonly Buffer[], offset: number, opts?: WriteOptions): boolean;
  /**
   * Optional, with pwritevNow: pread done before returning when the device
   * would read on the calling thread anyway; false with nothing done. A range
   * pwritevNow could write, it can read.
   */
  preadNow?(buf: Buffer, offset: number): boolean;
  pwrite(buf: Buffer, offset: number, opts?: WriteOptions): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  zero(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /**
   * Allocation status of a range: contiguous extents starting at `offset`,
   * covering at least one byte and at most `length` bytes.
   */
  extents(offset: number, length: number): Promise<Extent[]>;
  /** A hint that the range will be read soon. */
  cache(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
  /**
   * Optional: the open file and offset where [offset, offset+length) lies as
   * is, for a reader that sends it straight from there (sendfile); null when
   * it does not (an overlay, a closed device, a backend being switched). Valid
   * only until the caller yields: use it in the same synchronous step.
   */
  fileRange?(offset: number, length: number): FileRange | null;
  /**
   * Optional: true when pwrite/pwritev hold none of the caller's buffers once
   * their promise has settled (nothing queued or kept from them), so the
   * caller may fill them again at once. Absent means they may be kept.
   */
  readonly releasesWrites?: boolean;
}

export interface FileRange {
  fd: number;
  offset: number;
}

/** Assert that a range lies within a device: broken internal invariants, not client errors. */
export function assertRange(dev: { size: number }, offset: number, length: number): void {
  if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0))
    throw internal(`bad range offset=${offset} length=${length}`);
  if (offset + length > dev.size) throw internal(`range ${offset}+${length} beyond device size ${dev.size}`);
}

/** Merge adjacent extents with equal flags. */
export function coalesceExtents(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    if (e.length === 0) continue;
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** Write pieces through a device: its pwritev if it has one, else one pwrite of their concatenation. */
export function writePieces(
  dev: BlockDevice,
  bufs: readonly Buffer[],
  offset: number,
  opts?: WriteOptions,
): Promise<void> {
  if (bufs.length === 1) return dev.pwrite(bufs[0], offset, opts);
  if (dev.pwritev) return dev.pwritev(bufs, offset, opts);
  return dev.pwrite(Buffer.concat(bufs), offset, opts);
}
