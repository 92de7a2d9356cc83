/**
 * V8 settings for colo-blk's processes, applied once at startup (by the CLI,
 * before any I/O).
 *
 * - `--no-concurrent-array-buffer-sweeping`: every socket chunk and large I/O
 *   buffer is an ArrayBuffer whose memory V8 counts as "external"; V8 starts
 *   a major collection whenever external memory has grown by 64 MB since the
 *   last one. Young buffers are freed at each scavenge, but by a concurrent
 *   sweeper, and their bytes are taken off the count only when it finishes:
 *   once a server had served a few seconds of 1 MiB reads, that sweeper lagged
 *   behind 1 MiB writes for good and V8 ran 90–140 mark-compacts per 3 s
 *   instead of 2–8, halving the write rate (3.0 → 1.7–1.9 GB/s; fio, 1 MiB,
 *   QD8, tmpfs). Sweeping young ArrayBuffers on the main thread (a scavenge's
 *   worth of frees) keeps the count true.
 * - `--no-incremental-marking`: our JavaScript heap is small (~10 MB) and
 *   almost all garbage is young, yet under 1 MiB writes the replicated
 *   primary ran ~20 mark-compacts a second, each started by V8's scheduled
 *   marking task (`--trace-incremental-marking`: "Start (task)") with the old
 *   generation at 8 of its 20 MB limit, and concurrent marking took a quarter
 *   of its CPU (which heuristic schedules the task we did not pin down).
 *   Without incremental marking a mark-compact runs only when the old
 *   generation really is full (9–14 in 8 s instead of ~200), in one pause of
 *   a few milliseconds on heaps this size. Replicated 1 MiB writes, pinned
 *   pair: 372–404 → 548–555 MB/s, the primary 2.2–2.4 → 1.5 CPU-s/GiB.
 */
import v8 from 'node:v8';

/** Setting a flag again is harmless: each CLI command calls this once. */
export function applyV8Flags(): void {
  v8.setFlagsFromString('--no-concurrent-array-buffer-sweeping');
  v8.setFlagsFromString('--no-incremental-marking');
}
