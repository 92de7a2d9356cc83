/**
 * What the SVM sees on a secondary: overlay > folded overlays (a promoted
 * node's) > committed-but-unapplied epochs > the checkpoint image. Writes land
 * in the overlay only; FLUSH and FUA make the overlay durable. A promoted
 * node records its writes in the activity log before they land (invariant 8).
 */
import type {
  BlockDevice,
  Capabilities,
  Extent,
  FileRange,
  WriteOptions,
  ZeroOptions,
} from '../../block/device.js';
import { assertRange, coalesceExtents } from '../../block/device.js';
import type { ActivityLog } from '../../failover/activity.js';
import type { Layer } from '../format/layers.js';

/** What the view needs of the store. */
export interface SvmSource {
  readonly size: number;
  readonly image: BlockDevice;
  readonly overlayLayer: Layer;
  foldedLayers(): Layer[];
  committedLayers(): Layer[];
  readonly activity: ActivityLog | undefined;
  /** From the first moment of a promotion, the SVM's writes are this node's own: they are recorded. */
  readonly tracksActivity: boolean;
  /** A promoted node folds a large overlay into the image. */
  maybeFold(): void;
}

/**
 * Read [offset, offset+buf.length) through layers (first wins) over an image.
 * Every layer is resolved synchronously (journal reads are synchronous), so no
 * layer can be applied and deleted in the middle; what no layer holds is then
 * read from the image, which the apply never touches for those ranges.
 */
export async function readLayers(
  layers: Layer[],
  image: BlockDevice,
  buf: Buffer,
  offset: number,
): Promise<void> {
  const gaps: { at: number; length: number; offset: number }[] = [];
  const resolve = (i: number, at: number, off: number, length: number): void => {
    if (i === layers.length) {
      gaps.push({ at, length, offset: off });
      return;
    }
    const layer = layers[i];
    if (layer.index.size === 0) return resolve(i + 1, at, off, length);
    for (const seg of layer.lookup(off, length)) {
      const segAt = at + (seg.start - off);
      if (seg.extent) layer.readSegment(seg, buf, segAt);
      else resolve(i + 1, segAt, seg.start, seg.end - seg.start);
    }
  };
  resolve(0, 0, offset, buf.length);
  for (const g of gaps) await image.pread(buf.subarray(g.at, g.at + g.length), g.offset);
}

/**
 * Where [offset, offset+length) of what readLayers would read lies as is in
 * the image's file: when no layer holds any of it (data or zeroes). null
 * otherwise, or when the image maps to no file. Valid until the caller
 * yields, like fileRange.
 */
export function imageFileRange(
  layers: Layer[],
  image: BlockDevice,
  offset: number,
  length: number,
): FileRange | null {
  for (const layer of layers)
    if (layer.index.size > 0 && layer.lookup(offset, length).some((seg) => seg.extent)) return null;
  return image.fileRange?.(offset, length) ?? null;
}

/**
 * The SVM's disk: overlay > committed-unapplied epochs > image. Writes land in
 * the overlay only; FLUSH and FUA make the overlay durable.
 */
export class SvmDevice implements BlockDevice {
  readonly caps: Capabilities = {
    write: true,
    flush: true,
    fua: 'emulate',
    trim: 'native',
    zero: 'native',
    fastZero: true,
    extents: true,
    cache: 'emulate',
    multiConn: true,
  };
  private seq = 0;

  constructor(private readonly store: SvmSource) {}

  get size(): number {
    return this.store.size;
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    assertRange(this, offset, buf.length);
    await readLayers(
      [this.store.overlayLayer, ...this.store.foldedLayers(), ...this.store.committedLayers()],
      this.store.image,
      buf,
      offset,
    );
  }

  /**
   * A promoted node (from the first moment of its promotion) records what it
   * writes, durably before the write lands, for a later re-protection
   * (invariant 8). Null when nothing needs to wait.
   */
  private track(offset: number, length: number): Promise<void> | null {
    if (!this.store.tracksActivity) return null;
    return this.store.activity?.ensureHot(offset, length, 0) ?? null;
  }

  async pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    assertRange(this, offset, buf.length);
    if (buf.length === 0) return;
    const hot = this.track(offset, buf.length);
    if (hot) await hot;
    const overlay = this.store.overlayLayer;
    overlay.append({ t: 'w', e: 0, s: ++this.seq, o: offset }, buf);
    this.store.maybeFold();
    if (opts.fua) await this.syncLayer(overlay);
  }

  async flush(): Promise<void> {
    // On a promoted node, writes acknowledged before a fold sit in folded overlays until the
    // apply has flushed the image: those must be durable too.
    const layers = [this.store.overlayLayer, ...this.store.foldedLayers()];
    await Promise.all(layers.map((l) => this.syncLayer(l)));
  }

  /**
   * Make what `layer` holds durable. A layer the store let go of meanwhile
   * needs nothing more, and its sync may fail (its journal is closed): an
   * overlay a commit discarded (the checkpoint replaced what it held), or a
   * folded overlay applied to the image, which was flushed before it was.
   */
  private async syncLayer(layer: Layer): Promise<void> {
    try {
      await layer.sync();
    } catch (err) {
      if (layer === this.store.overlayLayer || this.store.foldedLayers().includes(layer)) throw err;
    }
  }

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    if (length === 0) return;
    const hot = this.track(offset, length);
    if (hot) await hot;
    const overlay = this.store.overlayLayer;
    overlay.append({ t: 't', e: 0, s: ++this.seq, o: offset, l: length });
    this.store.maybeFold();
    if (opts.fua) await this.syncLayer(overlay);
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    if (length === 0) return;
    const hot = this.track(offset, length);
    if (hot) await hot;
    const overlay = this.store.overlayLayer;
    overlay.append({ t: 'z', e: 0, s: ++this.seq, o: offset, l: length, h: opts.mayTrim !== false });
    this.store.maybeFold();
    if (opts.fua) await this.syncLayer(overlay);
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    assertRange(this, offset, length);
    // Start from the image's map, then mark what the layers hold as data (or zero).
    const base = await this.store.image.extents(offset, length);
    const end = base.length ? base[base.length - 1].offset + base[base.length - 1].length : offset;
    const layers = [
      ...this.store.committedLayers().reverse(),
      ...this.store.foldedLayers().reverse(),
      this.store.overlayLayer,
    ];
    const out: Extent[] = [];
    for (const b of base) {
      let pieces: Extent[] = [{ ...b }];
      for (const layer of layers) {
        const next: Extent[] = [];
        for (const p of pieces)
          for (const seg of layer.lookup(p.offset, p.length))
            next.push({
              offset: seg.start,
              length: seg.end - seg.start,
              flags: seg.extent ? { data: 0, zero: 2, hole: 3 }[seg.extent.kind] : p.flags,
            });
        pieces = next;
      }
      out.push(...pieces);
    }
    return coalesceExtents(out).filter((e) => e.offset < end);
  }

  async cache(offset: number, length: number): Promise<void> {
    assertRange(this, offset, length);
  }

  async close(): Promise<void> {}
}
