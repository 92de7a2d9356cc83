/**
 * Journal-backed layers over a disk: a journal file plus an extent index.
 *
 * Notes on the design: the secondary keeps two kinds of layer, and both are
 * this class.
 * - An *epoch buffer* holds the PVM's mutations of one epoch as received from
 *   the primary (invisible to the SVM until committed).
 * - The *overlay* holds the SVM's own writes since the last checkpoint.
 * A layer appends every mutation as a frame to its journal (so it can be
 * rebuilt after a crash by scanning) and records in its ExtentMap where the
 * newest bytes of each range are. Reads resolve a range against the map and
 * read data from the journal. Discarding a layer is O(1): close and unlink.
 */
import { ExtentMap, type Segment } from './extent-map.js';
import { JournalWriter, scanJournal, type JournalBounds, type ScanResult } from './journal.js';
import { isMutation, mutationLength, type MutationRecord } from './records.js';
import type { Storage } from '../../sys/storage.js';

/** Kinds of a pending index entry, by code (a data entry's file is the layer, the others' 0). */
const KINDS = ['data', 'zero', 'hole'] as const;

export class Layer {
  private readonly map = new ExtentMap();
  /**
   * Records appended but not yet in the map, four numbers each: offset,
   * length, kind code, journal position. The link appends one per frame;
   * nobody reads an epoch's map until it is committed (the SVM sees only
   * committed layers and its own overlay), so the map is built when first
   * asked for, in one loop. Inserting as frames arrived, between socket
   * reads and journal writes, cost ~0.6 µs each in cache misses (4 % of the
   * secondary at 4 KiB writes), against ~0.1 µs in a loop.
   */
  private pending = new Float64Array(4 * 64);
  private pendingCount = 0;
  /** Mutation records held and bytes of write data. */
  records = 0;
  dataBytes = 0;

  private constructor(
    private readonly storage: Storage,
    readonly id: number,
    readonly journal: JournalWriter,
  ) {}

  /** A new, empty layer (the file must not hold anything we need). */
  static create(storage: Storage, id: number, path: string): Layer {
    if (storage.exists(path)) storage.remove(path);
    return new Layer(storage, id, JournalWriter.open(storage, path));
  }

  /**
   * A new, empty epoch layer written over the file at `path` (a spare just
   * renamed there: see journal.ts). `named` settles when that rename is
   * durable; the layer's syncs wait for it.
   */
  static overwrite(storage: Storage, epoch: number, path: string, named: Promise<void>): Layer {
    const layer = new Layer(storage, epoch, JournalWriter.overwrite(storage, path));
    layer.named = named;
    named.catch(() => {}); // reported by the next sync
    return layer;
  }

  /** Set on a layer written over a spare: the rename that gave the file its name, made durable. */
  private named: Promise<void> | null = null;

  /**
   * Open an existing layer by scanning its journal. A torn tail is cut;
   * corruption in the middle is returned for the caller to refuse.
   */
  static recover(
    storage: Storage,
    id: number,
    path: string,
    /** Its own frames, when it may be written over an older file (records.ts `epochJournal`). */
    bounds?: JournalBounds,
  ): { layer: Layer; scan: ScanResult; others: Record<string, unknown>[] } {
    const others: Record<string, unknown>[] = [];
    const pending: { rec: MutationRecord; dataPos: number; dataLength: number }[] = [];
    const scan = scanJournal<Record<string, unknown>>(
      storage,
      path,
      (r) => {
        if (isMutation(r.meta as { t: string }))
          pending.push({
            rec: r.meta as unknown as MutationRecord,
            dataPos: r.dataPos,
            dataLength: r.dataLength,
          });
        else others.push(r.meta);
      },
      { bounds },
    );
    const layer = new Layer(
      storage,
      id,
      JournalWriter.open(storage, path, scan.corruption ? undefined : scan.validEnd),
    );
    for (const p of pending) layer.index_(p.rec, p.dataPos, p.dataLength);
    return { layer, scan, others };
  }

  get path(): string {
    return this.journal.path;
  }

  /** Append a mutation (data for writes) and index it. Returns the bytes appended. */
  append(rec: MutationRecord, data?: Buffer): number {
    const r = this.journal.append(rec, data);
    this.index_(rec, r.dataPos, data?.length ?? 0);
    return r.bytes;
  }

  /** Append the raw bytes of a frame carrying `rec` (forwarded from the link as is). */
  appendFrame(rec: MutationRecord, frame: readonly Buffer[], dataLength: number): number {
    const r = this.journal.appendRaw(frame, dataLength);
    this.index_(rec, r.dataPos, dataLength);
    return r.bytes;
  }

  /** Append a non-mutation record (seal markers and the like). */
  appendMarker(meta: object): void {
    this.journal.append(meta);
  }

  /** Where each range's newest bytes are (built from the records appended so far). */
  get index(): ExtentMap {
    if (this.pendingCount > 0) this.buildIndex();
    return this.map;
  }

  private index_(rec: MutationRecord, dataPos: number, dataLength: number): void {
    const length = mutationLength(rec, dataLength);
    if (length === 0) return;
    if (rec.t === 'w') this.dataBytes += length;
    this.records++;
    if (4 * (this.pendingCount + 1) > this.pending.length) {
      const grown = new Float64Array(this.pending.length * 2);
      grown.set(this.pending);
      this.pending = grown;
    }
    const p = 4 * this.pendingCount++;
    this.pending[p] = rec.o;
    this.pending[p + 1] = length;
    this.pending[p + 2] = rec.t === 'w' ? 0 : rec.t === 't' || (rec.t === 'z' && rec.h) ? 2 : 1;
    this.pending[p + 3] = rec.t === 'w' ? dataPos : 0;
  }

  /** Put the pending records into the map, in the order they were appended. */
  private buildIndex(): void {
    const p = this.pending;
    for (let i = 0; i < 4 * this.pendingCount; i += 4)
      this.map.set(p[i], p[i + 1], KINDS[p[i + 2]], p[i + 2] === 0 ? this.id : 0, p[i + 3]);
    this.pendingCount = 0;
    if (p.length > 4 * 4096) this.pending = new Float64Array(4 * 64); // an epoch's worth: let it go
  }

  lookup(offset: number, length: number): Segment[] {
    return this.index.lookup(offset, length);
  }

  /** Copy held data for a 'data' segment into `buf` at `bufOffset`. */
  readSegment(seg: Segment, buf: Buffer, bufOffset: number): void {
    const e = seg.extent!;
    const view = buf.subarray(bufOffset, bufOffset + (seg.end - seg.start));
    if (e.kind !== 'data') view.fill(0);
    else this.journal.read(view, e.pos + (seg.start - e.start));
  }

  async sync(): Promise<void> {
    if (this.named) await this.named;
    await this.journal.sync();
  }

  close(): void {
    this.journal.close();
  }

  /** Close and delete the journal (the deletion runs in the background: it can take milliseconds). */
  destroy(): void {
    this.journal.close();
    this.storage.removeLater(this.journal.path);
  }
}
