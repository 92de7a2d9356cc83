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
 */
import v8 from 'node:v8';

/** Setting a flag again is harmless: each CLI command calls this once. */
export function applyV8Flags(): void {
  v8.setFlagsFromString('--no-concurrent-array-buffer-sweeping');
}
