/**
 * A VM's RAM as checkpoints see it: QEMU's memory-backend-file (share=on)
 * mapped read-only into this process, beside a copy of it as of the last
 * checkpoint. `diff()`, called while the VM is paused, finds the pages that
 * changed since (a page compare on every core, native), brings the copy up
 * to date and lists them: exactly what the checkpoint must send (D^p).
 *
 * Notes on the design:
 * - No page of RAM is read through a system call: the file is mapped, and
 *   the compare runs over the mapping and the copy in C, on several threads.
 * - The RAM is handled in segments of up to 1 GiB (a Buffer's limit is a
 *   few GiB, and a segment is one mapping), so guests of any size work.
 * - The first diff after opening finds every page that is not zero (the
 *   copy starts as zeroes, like a fresh guest's RAM): a full checkpoint.
 * - A diff lists the pages changed since the last *checkpointed()*, not since
 *   the last diff: if a checkpoint fails after its pages were taken (the
 *   secondary never committed them), the next one carries them again.
 * - Only the file's data is compared: a guest's RAM file on tmpfs has holes
 *   where the guest never wrote (SEEK_DATA/SEEK_HOLE), which read as zeroes.
 *   The ranges compared are those that had data at any diff, so a page the
 *   copy holds non-zero is always looked at again; only the holes between
 *   them are asked for new data, so no diff walks every page the guest has.
 * - Nothing else walks the whole RAM either: the pages not yet checkpointed
 *   are kept as a list beside their bitmap. A diff costs what the guest has
 *   touched and dirtied, not the RAM it was given.
 * - Soft-dirty page tracking (/proc/PID/clear_refs, pagemap bit 55) would
 *   find the pages without comparing them, but needs CONFIG_MEM_SOFT_DIRTY,
 *   which this machine's kernel lacks; the compare works everywhere.
 */
import { Buffer } from 'node:buffer';
import { performance } from 'node:perf_hooks';
import fs from 'node:fs';
import os from 'node:os';
import { native } from '../../block/native.js';
import { ColoError } from '../../errors.js';

export const PAGE_BYTES = 4096;
const SEGMENT_BYTES = 1024 * 1024 * 1024;

interface Segment {
  offset: number;
  current: Buffer;
  reference: Buffer;
  out: Uint32Array;
}

export interface RamDiff {
  /** Page indexes (across the whole RAM) that changed, ascending. */
  pages: Uint32Array;
  /** Milliseconds the compare took. */
  ms: number;
}

const MERGE_GAP = 1024 * 1024;

/** Sorted, overlapping or close ranges joined. */
function mergeRanges(ranges: [number, number][]): [number, number][] {
  const sorted = [...ranges].sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [a, b] of sorted) {
    const last = out.at(-1);
    if (last && a <= last[1] + MERGE_GAP) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

export class RamImage {
  /** Pages taken by a diff and not yet part of a committed checkpoint (one byte each). */
  private readonly uncommitted: Uint8Array;
  /** The same pages as a list (the order they were found in), so that nothing walks the whole RAM. */
  private uncommittedList: number[] = [];
  private listSorted = true;
  /** Where the file had data at any diff so far, merged (the copy is zero everywhere else). */
  private known: [number, number][] = [];

  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly fd: number,
    private readonly segments: Segment[],
    readonly threads: number,
  ) {
    this.uncommitted = new Uint8Array(size / PAGE_BYTES);
  }

  static open(path: string, threads = Math.max(1, os.availableParallelism())): RamImage {
    if (!native) throw new ColoError('ENOTSUP', 'RAM checkpoints need the native helpers (npm run install)');
    let fd: number;
    try {
      fd = fs.openSync(path, 'r');
    } catch (err) {
      throw new ColoError('ENOENT', `cannot open the VM's RAM file ${path}: ${(err as Error).message}`);
    }
    const size = fs.fstatSync(fd).size;
    if (size === 0 || size % PAGE_BYTES !== 0) {
      fs.closeSync(fd);
      throw new ColoError(
        'EINVAL',
        `${path} is ${size} bytes: not a RAM file (a whole number of 4 KiB pages)`,
      );
    }
    const segments: Segment[] = [];
    for (let off = 0; off < size; off += SEGMENT_BYTES) {
      const len = Math.min(SEGMENT_BYTES, size - off);
      segments.push({
        offset: off,
        current: Buffer.from(native.mapShared(fd, off, len)),
        reference: Buffer.alloc(len),
        out: new Uint32Array(len / PAGE_BYTES),
      });
    }
    return new RamImage(path, size, fd, segments, threads);
  }

  /**
   * Pages changed since the last checkpointed() (or since zero), with the copy
   * brought up to date: the compare finds what changed since the last diff,
   * and the pages of diffs not yet checkpointed are added to it.
   */
  diff(): RamDiff {
    const t0 = performance.now();
    // Only where the file has or had data: a hole reads as zeroes, and the copy is zero wherever
    // the file never had data (see dataRanges).
    for (const [from, to] of this.dataRanges()) {
      for (const s of this.segments) {
        const a = Math.max(from, s.offset);
        const b = Math.min(to, s.offset + s.current.length);
        if (a >= b) continue;
        const first = (a - s.offset) / PAGE_BYTES;
        const out = s.out.subarray(first);
        const n = native!.diffPages(
          s.current.subarray(a - s.offset, b - s.offset),
          s.reference.subarray(a - s.offset, b - s.offset),
          PAGE_BYTES,
          out,
          b - a >= 16 * 1024 * 1024 ? this.threads : 1,
        );
        const base = s.offset / PAGE_BYTES + first;
        for (let i = 0; i < n; i++) {
          const page = base + out[i];
          if (this.uncommitted[page]) continue;
          this.uncommitted[page] = 1;
          if (this.uncommittedList.length && page < this.uncommittedList[this.uncommittedList.length - 1])
            this.listSorted = false;
          this.uncommittedList.push(page);
        }
      }
    }
    const pages = Uint32Array.from(this.uncommittedList);
    if (!this.listSorted) pages.sort();
    return { pages, ms: performance.now() - t0 };
  }

  /**
   * Byte ranges to compare, page-aligned, gaps under 1 MiB merged: every range
   * the file had data in at any diff so far, and where it has data now.
   *
   * The ranges known from earlier diffs are kept, not asked again: SEEK_HOLE
   * walks the page cache page by page, so asking for the whole file each time
   * cost a walk of every page the guest ever touched (3.6 of 17 ms at 4 GiB
   * with 200 MiB touched). Only the holes between them are asked for new data
   * (SEEK_DATA skips a hole's empty index at once). Keeping a range whose data
   * the file lost since (a punched hole) is what the compare needs anyway: the
   * copy still holds that data, and the page now reads as zeroes.
   */
  private dataRanges(): [number, number][] {
    const found: [number, number][] = [];
    try {
      let at = 0;
      for (const [from, to] of [...this.known, [this.size, this.size] as [number, number]]) {
        // The hole [at, from) as of the last diff: new data in it?
        while (at < from) {
          const d = native!.seekData(this.fd, at);
          if (d < 0 || d >= from) break;
          let h = native!.seekHole(this.fd, d);
          if (h < 0 || h > this.size) h = this.size;
          found.push([Math.floor(d / PAGE_BYTES) * PAGE_BYTES, Math.ceil(h / PAGE_BYTES) * PAGE_BYTES]);
          at = h;
        }
        at = Math.max(at, to);
      }
    } catch {
      found.push([0, this.size]);
    }
    if (found.length) this.known = mergeRanges([...this.known, ...found]);
    return this.known;
  }

  /** The last diff's pages are committed at the other side: the next diff starts from here. */
  checkpointed(): void {
    for (const page of this.uncommittedList) this.uncommitted[page] = 0;
    this.uncommittedList = [];
    this.listSorted = true;
  }

  /** Forget what the other side holds: the next diff lists every page that is not zero (a new secondary). */
  forgetPeer(): void {
    for (const s of this.segments) s.reference.fill(0);
    this.checkpointed();
  }

  /** Page `i` as of the last diff (a view of the copy: valid until the next diff). */
  page(i: number): Buffer {
    return this.pages(i, 1);
  }

  /** `n` consecutive pages from `first` as of the last diff: a view of the copy (a new buffer only across a segment boundary). */
  pages(first: number, n: number): Buffer {
    const off = first * PAGE_BYTES;
    const s = this.segments[Math.floor(off / SEGMENT_BYTES)];
    const end = off - s.offset + n * PAGE_BYTES;
    if (end > s.reference.length) {
      // Across a segment boundary: split.
      const head = s.reference.length - (off - s.offset);
      return Buffer.concat([
        s.reference.subarray(off - s.offset),
        this.pages(first + head / PAGE_BYTES, n - head / PAGE_BYTES),
      ]);
    }
    return s.reference.subarray(off - s.offset, end);
  }

  /** The whole copy as of the last diff, in order (for hashing). */
  copyParts(): Buffer[] {
    return this.segments.map((s) => s.reference);
  }

  close(): void {
    fs.closeSync(this.fd);
  }
}
