/**
 * The background apply of a secondary: committed epochs (and a promoted
 * node's folded overlays), oldest first, written into the checkpoint image.
 *
 * Notes on the design:
 * - An epoch is applied as its *merged* final state (from its extent index),
 *   so applying twice equals applying once (invariant 7): a crash mid-apply
 *   is repaired by applying again on start.
 * - Zeroes go first, then data extents in journal order, copied journal →
 *   image in batches of up to 4,096 extents or 16 MiB, each one call on a
 *   thread-pool thread (FileDevice.copyRangesFromFile): small extents
 *   read in journal order, neighbours in one read, large ones
 *   copy_file_range. Where the image
 *   cannot (simulated storage, no native helper), range by range: in the
 *   kernel up to 8 MiB at a time, else read and written in 1 MiB chunks,
 *   letting the event loop turn after every MiB. The apply is background
 *   work and must not delay the link or the SVM's I/O (a seal that arrives
 *   mid-apply waits for no copy).
 * - The image is flushed before a job is done; only then does the store
 *   forget the layer (`job.done()`). Reads meanwhile resolve through the
 *   layers, so a commit never waits for its apply.
 * - A failure stops the applier (the store reports it); close interrupts it
 *   between chunks.
 */
import { Buffer } from 'node:buffer';
import { crashArmed, crashPoint } from '../../crash.js';
import { limits } from '../../limits.js';
import type { Extent } from '../format/extent-map.js';
import type { Layer } from '../format/layers.js';
import type { StoreImage } from './store.js';

/** Bytes per in-kernel copy (a large one runs on the thread pool: FileDevice.copyFromFile). */
const COPY_STEP_BYTES = 8 * 1024 * 1024;
/** The apply lets the event loop turn at least this often. */
const YIELD_EVERY_BYTES = 1024 * 1024;
/** A batch of data extents copied in one call on a pool thread: at most this many, or this many bytes. */
const BATCH_RANGES = 4096;
const BATCH_BYTES = 16 * 1024 * 1024;

export interface ApplyJob {
  layer: Layer;
  /** The epoch (0 for a folded overlay), for progress reports. */
  label: number;
  /** The layer is in the image, durably: forget it. */
  done(): void;
}

export interface ApplierOptions {
  /** The next layer to apply, oldest first; null when there is none. */
  next(): ApplyJob | null;
  onError?: (err: Error) => void;
  onProgress?: (label: number, doneBytes: number, totalBytes: number) => void;
}

export class Applier {
  private running: Promise<void> | null = null;
  error: Error | null = null;
  private closed = false;
  /** Bytes copied on the event loop since it last turned (one job runs at a time). */
  private sinceYield = 0;

  constructor(
    private readonly image: StoreImage,
    private readonly opts: ApplierOptions,
  ) {}

  /** Start the next job if none runs. */
  kick(): void {
    if (this.running || this.closed || this.error) return;
    const job = this.opts.next();
    if (!job) return;
    this.running = this.apply(job)
      .then((complete) => {
        if (complete) job.done();
      })
      .catch((err: Error) => {
        this.error = err;
        this.opts.onError?.(err);
      })
      .finally(() => {
        this.running = null;
        this.kick();
      });
  }

  /** Wait until every job is done (or throw the applier's failure). */
  async drain(): Promise<void> {
    for (;;) {
      if (this.error) throw this.error;
      if (!this.running) this.kick(); // a commit may have deferred it
      if (!this.running) return;
      await this.running;
    }
  }

  /** Stop between two chunks; resolves once the job in progress has stopped. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.running) await this.running;
  }

  /** Write a layer's merged final state into the image and make it durable; false if interrupted by close. */
  private async apply(job: ApplyJob): Promise<boolean> {
    const { layer, label } = job;
    // What is applied must be durable in the layer first: after a crash the layer is applied
    // again from its journal, and a journal missing a tail the image already holds would
    // write older bytes over newer ones. (Epochs are durable since their seal; a folded
    // overlay may still have unsynced appends.)
    await layer.sync();
    const chunk = Buffer.allocUnsafe(limits.zeroChunkBytes);
    // Zeroes and holes first, then data in journal order: the extents never overlap, so any
    // order gives the same image, and in journal order each batch reads runs of neighbouring
    // frames (in image order a batch held every other frame of a random-write epoch, and
    // read them one pread each).
    const extents = [...layer.index.extents()];
    const data = inJournalOrder(extents.filter((x) => x.kind === 'data'));
    const rest = extents.filter((x) => x.kind !== 'data');
    const total = extents.reduce((a, x) => a + (x.end - x.start), 0);
    let done = 0;
    // Data extents go in batches, each one call on a pool thread, where the image can
    // (one call per extent cost ~2.7 µs of the secondary per 4 KiB extent of random writes).
    // A process armed to die mid-apply copies one extent per batch, so that its crash point
    // falls between extents as it did before batching: the crash tests then leave images
    // applied part-way, not only before or after a whole epoch.
    const perBatch = crashArmed('secondary-mid-apply') ? 1 : BATCH_RANGES;
    let batch =
      this.image.copyRangesFromFile && layer.journal.descriptor !== null
        ? new Float64Array(3 * perBatch)
        : null;
    let queued = 0;
    let queuedBytes = 0;
    const copyBatch = async (): Promise<void> => {
      const ranges = batch;
      const n = queued;
      queued = 0;
      queuedBytes = 0;
      if (!ranges || n === 0) return;
      layer.journal.flush();
      if (await this.image.copyRangesFromFile!(layer.journal.descriptor!, ranges, n)) {
        crashPoint('secondary-mid-apply');
        return;
      }
      batch = null; // the helper cannot: these ranges, and the rest, one by one
      for (let i = 0; i < n; i++)
        await this.copyRange(layer, ranges[3 * i], ranges[3 * i + 1], ranges[3 * i + 2], chunk);
    };
    for (const ext of [...rest, ...data]) {
      this.opts.onProgress?.(label, done, total);
      done += ext.end - ext.start;
      if (this.closed) return false;
      if (ext.kind !== 'data') {
        await this.image.zero(ext.start, ext.end - ext.start, { mayTrim: ext.kind === 'hole' });
        continue;
      }
      if (batch) {
        // The merged extents of one layer never overlap: the batch may copy them in any order.
        batch[3 * queued] = ext.pos;
        batch[3 * queued + 1] = ext.start;
        batch[3 * queued + 2] = ext.end - ext.start;
        queued++;
        queuedBytes += ext.end - ext.start;
        if (queued === perBatch || queuedBytes >= BATCH_BYTES) await copyBatch();
        continue;
      }
      await this.copyRange(layer, ext.pos, ext.start, ext.end - ext.start, chunk);
    }
    if (this.closed) return false;
    await copyBatch();
    await this.image.flush();
    this.opts.onProgress?.(label, total, total);
    return true;
  }

  /** One range, in steps: in the kernel where the image can, else read and written through `chunk`. */
  private async copyRange(
    layer: Layer,
    pos: number,
    start: number,
    length: number,
    chunk: Buffer,
  ): Promise<void> {
    for (let off = start; off < start + length;) {
      const src = pos + (off - start);
      layer.journal.flush();
      const fd = layer.journal.descriptor;
      let len = Math.min(COPY_STEP_BYTES, start + length - off);
      if (fd === null || !(await this.image.copyFromFile?.(fd, src, off, len))) {
        len = Math.min(chunk.length, start + length - off);
        const view = chunk.subarray(0, len);
        layer.journal.read(view, src);
        await this.image.pwrite(view, off);
      }
      crashPoint('secondary-mid-apply');
      off += len;
      // Small copies run on the loop (a thread-pool trip costs more): let it turn every MiB.
      if ((this.sinceYield += len) >= YIELD_EVERY_BYTES) {
        this.sinceYield = 0;
        await new Promise<void>((r) => setImmediate(r));
      }
    }
  }
}

/**
 * Data extents sorted by journal position (ties keep their order). The sort
 * is of numbers, not of objects through a comparator: each key is the
 * position scaled by a power of two ≥ the count, plus the extent's index, so
 * a typed array's own numeric sort orders them and the low bits say which
 * extent each key is. Where a key would pass 2^53 (a journal beyond 2^53 /
 * count bytes) it is the comparator sort. (That sort of a random-write
 * epoch's few thousand extents was 3 % of the secondary's CPU.)
 */
export function inJournalOrder(xs: Extent[]): Extent[] {
  const n = xs.length;
  if (n < 2) return xs;
  let maxPos = 0;
  for (let i = 0; i < n; i++) if (xs[i].pos > maxPos) maxPos = xs[i].pos;
  let scale = 1;
  while (scale < n) scale *= 2;
  if ((maxPos + 1) * scale > Number.MAX_SAFE_INTEGER) return xs.sort((a, b) => a.pos - b.pos);
  const keys = new Float64Array(n);
  for (let i = 0; i < n; i++) keys[i] = xs[i].pos * scale + i;
  keys.sort();
  const out = new Array<Extent>(n);
  for (let i = 0; i < n; i++) out[i] = xs[keys[i] % scale];
  return out;
}
