/**
 * The activity log: which regions of the disk a node may have written that
 * its peer does not hold.
 *
 * Notes on the design (after DRBD's activity log and QEMU's dirty bitmaps):
 * - Two bitmaps. The *hot* bitmap is coarse (1 MiB extents or larger, at
 *   most 65536 of them) and durable: a region is recorded hot on disk
 *   *before* the first write to it is performed, so after any crash the
 *   node knows every region it may have changed since the last checkpoint
 *   its peer committed. Only the first write to a cold extent waits for a
 *   sync, and concurrent writers share one (group commit), so a warm
 *   working set costs nothing. The *exact* bitmap is fine (4 KiB blocks or
 *   larger) and in memory only: what was written while no secondary was
 *   protecting the disk, for an incremental resync that sends little more
 *   than those bytes, and for the out-of-sync figure in `status`.
 * - An extent cools when every epoch that wrote to it is committed on a
 *   synchronised secondary; the file is rewritten lazily, so a stale hot
 *   extent only costs a hash comparison in a later resync — never a miss.
 * - A hot extent is *unknown* (in memory) when the exact bitmap may not hold
 *   every block of it that the peer lacks: all hot extents after a restart
 *   (the exact bitmap is gone), and, at each commit, those written in an
 *   epoch the commit does not cover (their exact bits are cleared with the
 *   rest). Only unknown extents need a hash comparison in an incremental
 *   resync; in the others the exact blocks are all there is to send, so a
 *   node that ran alone for long compares only what it wrote before.
 *   A hot extent whose writes are all committed on a synchronised secondary
 *   (the working set kept hot) holds nothing the peer lacks until it is
 *   written again, and then each block is in the exact bitmap.
 * - File `<state>/activity.bitmap`: two slots written alternately, each a
 *   32-byte header (magic "CBAL", version, sequence, extent size, bit
 *   count, CRC32 of header and bitmap) and the bitmap. A torn write breaks
 *   one slot's CRC; the other slot is the previous durable state.
 */
import { Buffer } from 'node:buffer';
import { crashPoint } from '../crash.js';
import { defaultTunables } from '../limits.js';
import type { Storage, StorageFile } from '../sys/storage.js';
import { ColoError } from '../errors.js';
import { crc32 } from 'node:zlib';

const MAGIC = 0x4c414243; // "CBAL" little-endian
const HEADER = 32;
const MAX_EXTENTS = 65536;
const MIN_BLOCK = 4096;
const MAX_BLOCKS = 1 << 28;

export interface Range {
  offset: number;
  length: number;
}

function pow2AtLeast(n: number, min: number): number {
  let v = min;
  while (v < n) v *= 2;
  return v;
}

class Bitmap {
  readonly bytes: Uint8Array;
  constructor(readonly bits: number) {
    this.bytes = new Uint8Array(Math.ceil(bits / 8));
  }
  get(i: number): boolean {
    return (this.bytes[i >> 3] & (1 << (i & 7))) !== 0;
  }
  set(i: number): void {
    this.bytes[i >> 3] |= 1 << (i & 7);
  }
  clear(i: number): void {
    this.bytes[i >> 3] &= ~(1 << (i & 7));
  }
  count(): number {
    let n = 0;
    for (const b of this.bytes) {
      let v = b;
      while (v) {
        v &= v - 1;
        n++;
      }
    }
    return n;
  }
  /** Runs of set bits as [first, end) bit indices. */
  *runs(): Generator<[number, number]> {
    let start = -1;
    for (let i = 0; i < this.bits; i++) {
      if ((i & 7) === 0 && this.bytes[i >> 3] === 0 && start < 0) {
        i += 7;
        continue;
      }
      const on = this.get(i);
      if (on && start < 0) start = i;
      else if (!on && start >= 0) {
        yield [start, i];
        start = -1;
      }
    }
    if (start >= 0) yield [start, this.bits];
  }
}

/**
 * A bitmap allocated in pages as bits are set: the exact bitmap of a 1 TiB
 * disk has 2^28 bits, of which a node usually sets a few. Memory and the
 * cost of clearing it (at every commit) follow what was written, not the disk.
 */
class SparseBitmap {
  private static readonly PAGE_BITS = 1 << 15;
  private readonly pages = new Map<number, Uint8Array>();
  constructor(readonly bits: number) {}
  /** Set bit `i`; true if it was clear (one lookup of its page: this runs on every write). */
  add(i: number): boolean {
    const k = Math.floor(i / SparseBitmap.PAGE_BITS);
    let page = this.pages.get(k);
    if (!page) this.pages.set(k, (page = new Uint8Array(SparseBitmap.PAGE_BITS / 8)));
    const j = i % SparseBitmap.PAGE_BITS;
    const bit = 1 << (j & 7);
    if (page[j >> 3] & bit) return false;
    page[j >> 3] |= bit;
    return true;
  }
  clearAll(): void {
    this.pages.clear();
  }
  /** Runs of set bits as [first, end) bit indices, in order. */
  *runs(): Generator<[number, number]> {
    let start = -1;
    let end = -1;
    for (const k of [...this.pages.keys()].sort((a, b) => a - b)) {
      const page = this.pages.get(k)!;
      const base = k * SparseBitmap.PAGE_BITS;
      for (let byte = 0; byte < page.length; byte++) {
        const v = page[byte];
        if (v === 0) continue;
        for (let bit = 0; bit < 8; bit++) {
          if ((v & (1 << bit)) === 0) continue;
          const i = base + byte * 8 + bit;
          if (i === end) end++;
          else {
            if (start >= 0) yield [start, end];
            start = i;
            end = i + 1;
          }
        }
      }
    }
    if (start >= 0) yield [start, Math.min(end, this.bits)];
  }
}

/** `status`'s `unprotected`: what a node may hold that its peer lacks, and what a resync would do about it. */
export interface UnprotectedSummary {
  /** Bytes written (4 KiB blocks) that no synchronised secondary holds. */
  exactBytes: number;
  /** Extents recorded hot on disk (an upper bound that survives a crash). */
  hotBytes: number;
  /** Of those, what an incremental resync compares by hash (the rest hold only exact blocks). */
  unknownBytes: number;
}

export class ActivityLog {
  readonly extentBytes: number;
  readonly blockBytes: number;
  private readonly hot: Bitmap;
  /** Bits known to be on disk (a superset of `hot` for every extent a write is performed in). */
  private readonly durable: Bitmap;
  private readonly lastEpoch: Float64Array;
  /**
   * Mutations under way per extent (`hold` to `release`): recorded, not yet
   * logged. Such an extent never cools: the epoch its write lands in is only
   * known once it is logged, and any number of seals may pass while it waits
   * for the bitmap's sync or a slow disk.
   */
  private readonly busy: Uint32Array;
  private readonly exact: SparseBitmap;
  /**
   * Hot extents whose differences from the peer the exact bitmap may not all hold (see the notes
   * above); always within `hot`.
   */
  private readonly unknown: Bitmap;
  private exactCount = 0;
  private version = 0;
  private durableVersion = 0;
  private seq = 0;
  private writing: Promise<void> | null = null;
  private waiters: { target: number; resolve: () => void; reject: (e: Error) => void }[] = [];
  private readonly slotBytes: number;
  /** Syncs of the bitmap file, for metrics and tests. */
  syncs = 0;
  private closed = false;

  private constructor(
    private readonly fd: StorageFile,
    readonly size: number,
    minExtentBytes: number,
  ) {
    this.extentBytes = pow2AtLeast(Math.ceil(size / MAX_EXTENTS), minExtentBytes);
    this.blockBytes = pow2AtLeast(Math.ceil(size / MAX_BLOCKS), MIN_BLOCK);
    const extents = Math.max(1, Math.ceil(size / this.extentBytes));
    this.hot = new Bitmap(extents);
    this.durable = new Bitmap(extents);
    this.lastEpoch = new Float64Array(extents);
    this.busy = new Uint32Array(extents);
    this.exact = new SparseBitmap(Math.max(1, Math.ceil(size / this.blockBytes)));
    this.unknown = new Bitmap(extents);
    this.slotBytes = Math.ceil((HEADER + this.hot.bytes.length) / 4096) * 4096;
  }

  /** Open (or create) the bitmap file (state-dir: activity.bitmap) for a disk of `size` bytes. */
  static open(
    storage: Storage,
    file: string,
    size: number,
    minExtentBytes = defaultTunables.activityExtentBytes,
  ): ActivityLog {
    const log = new ActivityLog(storage.open(file), size, minExtentBytes);
    log.load();
    return log;
  }

  get file(): string {
    return this.fd.path;
  }

  private load(): void {
    let best: { seq: number; bits: Uint8Array } | null = null;
    const buf = Buffer.alloc(this.slotBytes);
    for (let slot = 0; slot < 2; slot++) {
      const n = this.fd.read(buf, slot * this.slotBytes);
      if (n < HEADER) continue;
      if (buf.readUInt32LE(0) !== MAGIC || buf.readUInt32LE(4) !== 1) continue;
      const seq = buf.readUInt32LE(8) + buf.readUInt32LE(12) * 2 ** 32;
      const extentBytes = buf.readUInt32LE(16);
      const bits = buf.readUInt32LE(20);
      const len = Math.ceil(bits / 8);
      if (HEADER + len > n) continue;
      const crc = buf.readUInt32LE(24);
      buf.writeUInt32LE(0, 24);
      const ok = crc32(buf.subarray(0, HEADER + len)) === crc;
      buf.writeUInt32LE(crc, 24);
      if (!ok) continue;
      if (extentBytes !== this.extentBytes || bits !== this.hot.bits)
        throw new ColoError(
          'EUSAGE',
          `${this.file} describes a disk of ${bits} extents of ${extentBytes} bytes, not this ${this.size}-byte disk`,
        );
      if (!best || seq > best.seq) best = { seq, bits: Uint8Array.from(buf.subarray(HEADER, HEADER + len)) };
    }
    if (best) {
      this.seq = best.seq;
      this.hot.bytes.set(best.bits);
      this.durable.bytes.set(best.bits);
      this.unknown.bytes.set(best.bits); // what was written before the restart is not known exactly
    }
  }

  /** The first extent of a range starting at `offset`. (Two numbers, not a pair: this runs on every write.) */
  private firstExtent(offset: number): number {
    return Math.floor(offset / this.extentBytes);
  }

  /** The extent after the last one of the range (an empty range counts as one byte). */
  private endExtent(offset: number, length: number): number {
    return Math.ceil((offset + Math.max(length, 1)) / this.extentBytes);
  }

  /** Whether every extent of the range is hot on disk already (a write there needs no sync first). */
  hotOnDisk(offset: number, length: number): boolean {
    for (let x = this.firstExtent(offset), x1 = this.endExtent(offset, length); x < x1; x++)
      if (!this.durable.get(x)) return false;
    return true;
  }

  /**
   * Record a write in memory: exact blocks and hot extents (with the epoch it
   * belongs to). Returns true if an extent is not yet hot on disk.
   */
  mark(offset: number, length: number, epoch: number): boolean {
    if (length <= 0) return false;
    const b0 = Math.floor(offset / this.blockBytes);
    const b1 = Math.ceil((offset + length) / this.blockBytes);
    for (let b = b0; b < b1; b++) if (this.exact.add(b)) this.exactCount++;
    let needSync = false;
    for (let x = this.firstExtent(offset), x1 = this.endExtent(offset, length); x < x1; x++) {
      if (this.lastEpoch[x] < epoch) this.lastEpoch[x] = epoch;
      if (!this.hot.get(x)) {
        this.hot.set(x);
        this.version++;
      }
      if (!this.durable.get(x)) needSync = true;
    }
    return needSync;
  }

  /**
   * A mutation of the range begins (before `ensureHot`): its extents stay hot,
   * whatever is committed meanwhile, until `release`.
   */
  hold(offset: number, length: number): void {
    for (let x = this.firstExtent(offset), x1 = this.endExtent(offset, length); x < x1; x++) this.busy[x]++;
  }

  /**
   * The mutation `hold` began is over, logged (if at all) in an epoch no later
   * than `epoch`: its extents cool once that epoch is committed.
   */
  release(offset: number, length: number, epoch: number): void {
    for (let x = this.firstExtent(offset), x1 = this.endExtent(offset, length); x < x1; x++) {
      this.busy[x]--;
      if (this.lastEpoch[x] < epoch) this.lastEpoch[x] = epoch;
    }
  }

  /**
   * Before a write is performed: record it, and if its extents are not hot on
   * disk yet, return a promise that resolves once they are (null otherwise).
   */
  ensureHot(offset: number, length: number, epoch: number): Promise<void> | null {
    return this.mark(offset, length, epoch) ? this.persist() : null;
  }

  /** Make the on-disk bitmap hold every hot extent. */
  persist(): Promise<void> {
    const target = this.version;
    if (this.durableVersion >= target && !this.writing) return Promise.resolve();
    return new Promise((resolve, reject) => {
      this.waiters.push({ target, resolve, reject });
      this.kick();
    });
  }

  private kick(): void {
    if (this.writing || this.waiters.length === 0) return;
    this.writing = this.writeSlot()
      .then(
        (v) => {
          const ready = this.waiters.filter((w) => w.target <= v);
          this.waiters = this.waiters.filter((w) => w.target > v);
          for (const w of ready) w.resolve();
        },
        (err: Error) => {
          const all = this.waiters;
          this.waiters = [];
          for (const w of all)
            w.reject(new ColoError('EIO', `cannot record the activity log ${this.file}: ${err.message}`));
        },
      )
      .finally(() => {
        this.writing = null;
        this.kick();
      });
  }

  private async writeSlot(): Promise<number> {
    if (this.closed) throw new Error('closed');
    const v = this.version;
    const snap = Uint8Array.from(this.hot.bytes);
    // Bits being dropped are not durable from now on (a write to such an extent waits for the next sync).
    for (let i = 0; i < snap.length; i++) this.durable.bytes[i] &= snap[i];
    const seq = ++this.seq;
    const buf = Buffer.alloc(HEADER + snap.length);
    buf.writeUInt32LE(MAGIC, 0);
    buf.writeUInt32LE(1, 4);
    buf.writeUInt32LE(seq % 2 ** 32, 8);
    buf.writeUInt32LE(Math.floor(seq / 2 ** 32), 12);
    buf.writeUInt32LE(this.extentBytes, 16);
    buf.writeUInt32LE(this.hot.bits, 20);
    buf.set(snap, HEADER);
    buf.writeUInt32LE(crc32(buf), 24);
    const at = (seq % 2) * this.slotBytes;
    this.fd.writev([buf], at);
    crashPoint('activity-before-sync');
    await this.fd.datasync();
    this.syncs++;
    for (let i = 0; i < snap.length; i++) this.durable.bytes[i] |= snap[i];
    this.durableVersion = Math.max(this.durableVersion, v);
    return v;
  }

  /**
   * Epochs up to `through` (or later) are committed on a synchronised
   * secondary: extents whose writes all belong to epochs ≤ `through` cool
   * down, and the exact bitmap starts over (what is written from now on is in
   * the epoch log). The file shrinks lazily.
   */
  cool(through: number): void {
    this.coolLeastRecent(through, Infinity, through); // every committed extent is "idle"
  }

  /**
   * The steady-state cooling after a commit, as DRBD keeps an LRU of active
   * extents: of the extents whose writes all belong to epochs ≤ `through`
   * (committed on a synchronised secondary), only the least recently written
   * cool, just enough to leave at most `keep` extents hot; and any extent last
   * written in an epoch ≤ `idleThrough`, whatever the count. A working set of
   * up to `keep` extents stays hot while it is rewritten, so its writes never
   * wait for the bitmap's sync again (cooling every committed extent made a
   * sequential writer sync the bitmap for every extent of every pass). An
   * extent kept hot costs only a hash comparison in a later resync. The exact
   * bitmap starts over (what is written from now on is in the epoch log).
   */
  coolLeastRecent(through: number, keep: number, idleThrough: number): void {
    let hotCount = 0;
    const candidates: number[] = [];
    for (let x = 0; x < this.hot.bits; x++) {
      if ((x & 7) === 0 && this.hot.bytes[x >> 3] === 0) {
        x += 7;
        continue;
      }
      if (!this.hot.get(x)) continue;
      hotCount++;
      if (this.busy[x] > 0) {
        // A write under way: its blocks may land in a later epoch, after the exact bits go.
        this.unknown.set(x);
        continue;
      }
      // The exact bits go below: an extent written in an epoch past `through` may then hold blocks
      // the peer lacks that no bit records; one whose writes are all committed holds none (and a
      // cooled one is not hot: unknown stays within hot).
      if (this.lastEpoch[x] <= through) {
        candidates.push(x);
        this.unknown.clear(x);
      } else this.unknown.set(x);
    }
    // The oldest `excess` candidates go: find the epoch below which all of them do (a count
    // per epoch, not a sort), and how many of that epoch itself.
    const excess = Math.max(0, hotCount - keep);
    let cutEpoch = -Infinity;
    let atCut = 0;
    if (excess > 0) {
      const perEpoch = new Map<number, number>();
      for (const x of candidates) perEpoch.set(this.lastEpoch[x], (perEpoch.get(this.lastEpoch[x]) ?? 0) + 1);
      let left = excess;
      for (const e of [...perEpoch.keys()].sort((a, b) => a - b)) {
        const n = perEpoch.get(e)!;
        if (n >= left) {
          cutEpoch = e;
          atCut = left;
          break;
        }
        left -= n;
      }
      if (cutEpoch === -Infinity) cutEpoch = Infinity; // fewer candidates than the excess: all go
    }
    let changed = false;
    for (const x of candidates) {
      const e = this.lastEpoch[x];
      let go = e <= idleThrough || e < cutEpoch;
      if (!go && e === cutEpoch && atCut > 0) {
        atCut--;
        go = true;
      }
      if (go) {
        this.hot.clear(x);
        changed = true;
      }
    }
    this.dropExact();
    if (changed) {
      this.version++;
      this.persist().catch(() => {}); // best effort: a stale hot extent costs a hash comparison, no more
    }
  }

  /** Forget the exact blocks: every hot extent becomes unknown (compared by the next resync). */
  clearExact(): void {
    for (let i = 0; i < this.hot.bytes.length; i++) this.unknown.bytes[i] |= this.hot.bytes[i];
    this.dropExact();
  }

  private dropExact(): void {
    this.exact.clearAll();
    this.exactCount = 0;
  }

  /** Forget everything (this node's disk now equals its peer's). */
  async reset(): Promise<void> {
    this.hot.bytes.fill(0);
    this.unknown.bytes.fill(0);
    this.lastEpoch.fill(0);
    this.dropExact();
    this.version++;
    await this.persist();
  }

  /** Hot extents as byte ranges (what this node may have written that its peer lacks). */
  hotRanges(): Range[] {
    return this.extentRanges(this.hot);
  }

  /**
   * Hot extents the exact bitmap may not cover (see the notes above): where an
   * incremental resync that sends the exact ranges must still compare.
   */
  unknownRanges(): Range[] {
    return this.extentRanges(this.unknown);
  }

  private extentRanges(bits: Bitmap): Range[] {
    return [...bits.runs()].map(([a, b]) => ({
      offset: a * this.extentBytes,
      length: Math.min(b * this.extentBytes, this.size) - a * this.extentBytes,
    }));
  }

  exactRanges(): Range[] {
    return [...this.exact.runs()].map(([a, b]) => ({
      offset: a * this.blockBytes,
      length: Math.min(b * this.blockBytes, this.size) - a * this.blockBytes,
    }));
  }

  /** Bytes written (at block granularity) that no synchronised secondary holds yet. */
  get exactBytes(): number {
    return Math.min(this.exactCount * this.blockBytes, this.size);
  }

  get hotBytes(): number {
    return Math.min(this.hot.count() * this.extentBytes, this.size);
  }

  /** Bytes of unknown hot extents: what an incremental resync compares by hash on this node's side. */
  get unknownBytes(): number {
    return Math.min(this.unknown.count() * this.extentBytes, this.size);
  }

  /** What `status` reports of a node its peer does not protect (`unprotected`). */
  summary(): UnprotectedSummary {
    return { exactBytes: this.exactBytes, hotBytes: this.hotBytes, unknownBytes: this.unknownBytes };
  }

  async close(): Promise<void> {
    if (this.writing) await this.writing.catch(() => {});
    this.closed = true;
    this.fd.close();
  }
}

/** Merge ranges (sorted by offset; overlapping or touching ones join). */
export function mergeRanges(ranges: Range[]): Range[] {
  const sorted = [...ranges].filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const out: Range[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.offset <= last.offset + last.length)
      last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/** `ranges` minus every range in `minus` (both sorted; the result is sorted). */
export function subtractRanges(ranges: Range[], minus: Range[]): Range[] {
  const out: Range[] = [];
  let j = 0;
  for (const r of ranges) {
    let s = r.offset;
    const e = r.offset + r.length;
    while (j < minus.length && minus[j].offset + minus[j].length <= s) j++;
    let k = j;
    while (s < e && k < minus.length && minus[k].offset < e) {
      const m = minus[k];
      if (m.offset > s) out.push({ offset: s, length: m.offset - s });
      s = Math.max(s, m.offset + m.length);
      k++;
    }
    if (s < e) out.push({ offset: s, length: e - s });
  }
  return out;
}
