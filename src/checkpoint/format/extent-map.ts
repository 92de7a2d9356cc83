/**
 * An interval map over a disk's byte range: which bytes are held where.
 *
 * Notes on the design: the secondary answers reads from layers (the SVM's
 * overlay, committed-but-unapplied epochs, the base image), and each layer
 * needs "for this range, which parts do I hold, and at what journal
 * position?". Entries are non-overlapping; a newer insert overwrites (splits)
 * older ones. Entries never cross a bucket boundary (1 MiB by default), and
 * each bucket keeps a small sorted array, so inserts and lookups touch only
 * the buckets of their range: random 4 KiB writes over a large disk stay
 * O(entries in one bucket) instead of O(all entries).
 */

export interface Extent {
  start: number;
  end: number;
  /**
   * 'data': bytes at `pos` in `file`; 'zero': reads as zeroes, provisioned;
   * 'hole': reads as zeroes, deallocated (trim, or write-zeroes that may punch).
   */
  kind: 'data' | 'zero' | 'hole';
  file: number;
  pos: number;
}

/** A piece of a lookup: [start, end) held by `extent` (or by nobody if null). */
export interface Segment {
  start: number;
  end: number;
  extent: Extent | null;
}

const DEFAULT_BUCKET_BITS = 20;

export class ExtentMap {
  private readonly buckets = new Map<number, Extent[]>();
  private readonly bucketBytes: number;
  private entries = 0;
  private heldBytes = 0;

  constructor(bucketBits = DEFAULT_BUCKET_BITS) {
    this.bucketBytes = 2 ** bucketBits;
  }

  /** Number of extents held (after splitting). */
  get size(): number {
    return this.entries;
  }

  /** Bytes covered by extents. */
  get bytes(): number {
    return this.heldBytes;
  }

  clear(): void {
    this.buckets.clear();
    this.entries = 0;
    this.heldBytes = 0;
  }

  /** Record that [start, start+length) is now held as described (overwriting older entries). */
  set(start: number, length: number, kind: Extent['kind'], file = 0, pos = 0): void {
    const end = start + length;
    let s = start;
    while (s < end) {
      const b = Math.floor(s / this.bucketBytes);
      const e = Math.min(end, (b + 1) * this.bucketBytes);
      this.setInBucket(b, {
        start: s,
        end: e,
        kind,
        file,
        pos: kind === 'data' ? pos + (s - start) : 0,
      });
      s = e;
    }
  }

  private setInBucket(b: number, ext: Extent): void {
    this.entries++;
    this.heldBytes += ext.end - ext.start;
    const list = this.buckets.get(b);
    if (!list) {
      this.buckets.set(b, [ext]);
      return;
    }
    // The entries [first, i) overlap the new extent; they are replaced in place,
    // so an append after the last entry (a log written in order) costs O(log n).
    const first = firstEndingAfter(list, ext.start);
    let i = first;
    // Overlapping entries keep only their parts outside the new extent.
    let head: Extent | null = null;
    let tail: Extent | null = null;
    while (i < list.length && list[i].start < ext.end) {
      const old = list[i++];
      this.entries--;
      this.heldBytes -= old.end - old.start;
      if (old.start < ext.start) head = this.slice(old, old.start, ext.start);
      if (old.end > ext.end) tail = this.slice(old, ext.end, old.end);
    }
    const prev = head ?? (first > 0 ? list[first - 1] : null);
    let merged = false;
    if (prev && continues(prev, ext)) {
      prev.end = ext.end; // sequential writes coalesce into one entry
      this.entries--;
      merged = true;
    }
    const put: Extent[] = [];
    if (head) put.push(head);
    if (!merged) put.push(ext);
    if (tail) put.push(tail);
    if (first === list.length) list.push(...put);
    else list.splice(first, i - first, ...put);
  }

  private slice(e: Extent, start: number, end: number): Extent {
    this.entries++;
    this.heldBytes += end - start;
    return { start, end, kind: e.kind, file: e.file, pos: e.kind === 'data' ? e.pos + (start - e.start) : 0 };
  }

  /** Forget [start, start+length) (e.g. it was applied to the image). */
  delete(start: number, length: number): void {
    const end = start + length;
    for (let b = Math.floor(start / this.bucketBytes); b * this.bucketBytes < end; b++) {
      const list = this.buckets.get(b);
      if (!list) continue;
      const out: Extent[] = [];
      for (const e of list) {
        if (e.end <= start || e.start >= end) {
          out.push(e);
          continue;
        }
        this.entries--;
        this.heldBytes -= e.end - e.start;
        if (e.start < start) out.push(this.slice(e, e.start, start));
        if (e.end > end) out.push(this.slice(e, end, e.end));
      }
      if (out.length) this.buckets.set(b, out);
      else this.buckets.delete(b);
    }
  }

  /** Split [start, start+length) into segments held or not held by this map, in order. */
  lookup(start: number, length: number): Segment[] {
    const end = start + length;
    const out: Segment[] = [];
    let pos = start;
    for (let b = Math.floor(start / this.bucketBytes); pos < end; b++) {
      const bucketEnd = Math.min(end, (b + 1) * this.bucketBytes);
      const list = this.buckets.get(b);
      if (list) {
        for (let i = firstEndingAfter(list, pos); i < list.length; i++) {
          const e = list[i];
          if (e.start >= bucketEnd) break;
          if (e.start > pos) out.push({ start: pos, end: e.start, extent: null });
          const s = Math.max(e.start, pos);
          const t = Math.min(e.end, bucketEnd);
          out.push({ start: s, end: t, extent: e });
          pos = t;
        }
      }
      if (pos < bucketEnd) {
        out.push({ start: pos, end: bucketEnd, extent: null });
        pos = bucketEnd;
      }
    }
    return mergeHoles(out);
  }

  /** True if any byte of the range is held. */
  overlaps(start: number, length: number): boolean {
    return this.lookup(start, length).some((s) => s.extent !== null);
  }

  /** All extents in disk order. */
  *extents(): Generator<Extent> {
    const keys = [...this.buckets.keys()].sort((a, b) => a - b);
    for (const k of keys) yield* this.buckets.get(k)!;
  }
}

/** Index of the first entry of a bucket (sorted, non-overlapping) that ends after `pos`. */
function firstEndingAfter(list: readonly Extent[], pos: number): number {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid].end <= pos) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** `b` starts where `a` ends and continues it in the same place. */
function continues(a: Extent, b: Extent): boolean {
  if (a.end !== b.start || a.kind !== b.kind || a.file !== b.file) return false;
  return a.kind !== 'data' || a.pos + (a.end - a.start) === b.pos;
}

function mergeHoles(segs: Segment[]): Segment[] {
  const out: Segment[] = [];
  for (const s of segs) {
    const last = out[out.length - 1];
    if (last && last.extent === null && s.extent === null && last.end === s.start) last.end = s.end;
    else out.push(s);
  }
  return out;
}
