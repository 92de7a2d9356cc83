/**
 * Loader for the optional native helpers (native/colo_native.c): fallocate
 * (punch hole, zero range) and lseek (SEEK_DATA / SEEK_HOLE). If the addon is
 * missing, `native` is null and the file device falls back to portable code:
 * trims become no-ops (allowed by NBD), zeroes are written, every byte is data.
 */
import process from 'node:process';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeHelpers {
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
  allocateRange(fd: number, offset: number, length: number): void;
  /** Next data offset at or after `offset`, or -1 if none. */
  seekData(fd: number, offset: number): number;
  /** Next hole offset at or after `offset` (EOF counts as a hole), or -1. */
  seekHole(fd: number, offset: number): number;
  /** copy_file_range: bytes copied (may be short at end of file). */
  copyRange(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number): number;
  /** copyRange on a thread-pool thread (absent from builds before it). */
  copyRangeAsync?(
    fdIn: number,
    offIn: number,
    fdOut: number,
    offOut: number,
    length: number,
  ): Promise<number>;
  /**
   * Many copies from `fdIn` to `fdOut` on a thread-pool thread: `ranges` holds
   * [posIn, posOut, length] per range, `count` of them, none overlapping;
   * resolves to the bytes copied (absent from builds before it).
   */
  copyRangesAsync?(fdIn: number, fdOut: number, ranges: Float64Array, count: number): Promise<number>;
  /** CRC-32C of `buf`, continuing from `prev` (0 to start), in hardware where the CPU can. */
  crc32c(buf: Buffer, prev?: number): number;
  /** A read-only MAP_SHARED view of [offset, offset+length) of the file (unmapped when collected). */
  mapShared(fd: number, offset: number, length: number): ArrayBuffer;
  /**
   * Pages of `current` that differ from `reference` are copied into it and their
   * indexes written, ascending, to `out`; returns how many. Runs on `threads` threads.
   */
  diffPages(current: Buffer, reference: Buffer, pageBytes: number, out: Uint32Array, threads: number): number;
  /** glibc's mallopt: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD; true if all were taken (absent before it). */
  tuneMalloc?(mmapThreshold: number, trimThreshold: number, topPad: number): boolean;
  /**
   * send(2) of `header` then sendfile(2) of [offset, offset+length) of `fileFd`, on a non-blocking
   * socket: returns the bytes sent, header included, stopping where the socket is full or the file
   * ends (absent before it).
   */
  sendFileReply?(sockFd: number, header: Buffer, fileFd: number, offset: number, length: number): number;
}

function load(): NativeHelpers | null {
  const require = createRequire(import.meta.url);
  // dist/src/block/native.js and src/block/native.ts both sit below the package root.
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 4; i++) {
    try {
      const addon = require(join(dir, 'build', 'Release', 'colo_native.node')) as Record<string, unknown>;
      // A plain copy: the addon's own properties are neither enumerable nor redefinable, and tests
      // watch calls (vi.spyOn).
      return Object.fromEntries(
        Object.getOwnPropertyNames(addon).map((k) => [k, addon[k]]),
      ) as unknown as NativeHelpers;
    } catch {
      dir = dirname(dir);
    }
  }
  return null;
}

export const native: NativeHelpers | null = process.env.COLO_BLK_NO_NATIVE ? null : load();
