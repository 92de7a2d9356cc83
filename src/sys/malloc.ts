/**
 * glibc malloc settings for colo-blk's processes, applied once at startup (by
 * the CLI, next to the V8 settings), through the native helper's mallopt.
 *
 * Every socket read Node makes lands in a fresh 64 KiB buffer, and every
 * buffer is freed when a scavenge finds it dead. With glibc's defaults the
 * heap's free top is given back to the kernel (a `brk` shrink) as soon as it
 * passes a few MiB, and the next reads fault the same memory in again as
 * fresh, zeroed pages: in a `perf` profile of `colo-blk serve` under fio
 * 1 MiB writes, the shrinks and the page faults were ~9 % of the server's
 * samples, and `clear_page` 3.6 % of the replicated primary's.
 *
 * - M_MMAP_THRESHOLD 32 MiB (glibc's largest): buffers up to 32 MiB come from
 *   the heap, as glibc's own adaptive threshold would have it after the first
 *   free of each size, from the start and for good.
 * - M_TRIM_THRESHOLD 64 MiB: up to that much free memory stays at the top of
 *   the heap for the next allocations.
 * - M_TOP_PAD 16 MiB: the heap grows in steps of that, not page by page.
 *
 * Measured back to back (server on its own core, fio on the other, three
 * alternated pairs): 1 MiB QD8 writes 3,189/3,575/3,928 → 4,170/4,058/4,185
 * MB/s, 0.33/0.30/0.27 → 0.26/0.26/0.25 CPU-s/GiB; 1 MiB reads and 4 KiB
 * writes unchanged within noise; the replicated pair (pinned, 1 MiB) 556/744
 * → 745/790 MB/s, its primary 1.57/1.15 → 1.13/1.07 CPU-s/GiB. The cost: up to
 * 64 MiB of freed memory a process keeps instead of returning it (its peak
 * RSS is unchanged). A no-op without glibc or without the native helper.
 */
import { MiB } from '../limits.js';
import { native } from '../block/native.js';

export const MALLOC_SETTINGS = { mmapThreshold: 32 * MiB, trimThreshold: 64 * MiB, topPad: 16 * MiB };

/** Apply the settings; true if glibc took them all. Calling it again is harmless. */
export function tuneMalloc(): boolean {
  const s = MALLOC_SETTINGS;
  return native?.tuneMalloc?.(s.mmapThreshold, s.trimThreshold, s.topPad) ?? false;
}
