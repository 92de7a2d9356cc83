/**
 * Resynchronisation of a secondary from a running primary.
 *
 * Notes on the design:
 * - The data travels as ordinary write records in the primary's epoch log
 *   (ReplicatingDevice.resyncRange reads the range under the range lock and
 *   logs it), so it is ordered with the PVM's own writes, flow-controlled,
 *   resent after a reconnect and committed by the usual checkpoint. The PVM
 *   keeps running throughout; its writes stream as always.
 * - Two kinds of work. *Send* ranges are known to differ (the primary's exact
 *   record of what it wrote while unprotected): sent as they are. *Compare*
 *   ranges may differ (hot extents of either side's activity log, or the
 *   whole disk for a full sync): both sides hash them in 64 KiB blocks; a
 *   differing block is compared again in 4 KiB blocks when few differ, and
 *   only differing blocks are sent. A hash request travels in the stream, so
 *   the secondary hashes its disk exactly as of that point; whatever the
 *   primary writes afterwards reaches the secondary after the request too,
 *   which makes "hashes equal" imply "equal once the stream is applied".
 * - Commits along the way carry a 'partial' mark (the secondary is then
 *   inconsistent and refuses promotion, durably); the final commit carries
 *   'done' and the primary's history. An interrupted resync restarts with
 *   every range turned into a compare range: what was already transferred
 *   costs only its hashes.
 */
import { crashPoint } from '../../crash.js';
import { ColoError } from '../../errors.js';
import { mergeRanges, type Range } from '../activity.js';
import {
  blockHashes,
  HASH_BLOCK,
  HASH_BYTES,
  HASH_SUBBLOCK,
  type RangeReader,
  type ZeroRanges,
} from './hash.js';
import type { HashAlg, HashPool } from './hash-pool.js';
import type { FileRange } from '../../block/device.js';
import type { SyncMode } from '../history.js';

export interface ResyncHost {
  size: number;
  readLocal: RangeReader;
  /** Ranges of the local disk known to read as zeroes (holes), without reading them. */
  zeroLocal?: ZeroRanges;
  /** Where a range of the local disk reads straight from an open file (hashed there by a worker). */
  fileLocal?: (offset: number, length: number) => FileRange | null;
  /** Log the range's current contents (a write record the secondary applies). */
  sendRange(offset: number, length: number): Promise<void>;
  /** The secondary's hashes of a range, as of this point of the stream, with digest `alg`. */
  requestHashes(offset: number, length: number, block: number, alg: HashAlg): Promise<Buffer>;
  /** Seal, wait durable, commit with a sync mark. */
  checkpoint(state: 'partial' | 'done'): Promise<void>;
  /** Commit (with a 'partial' mark) every so many bytes sent. */
  commitBytes: number;
  /** Wall clock (for the progress record). */
  now(): number;
  /** Threads for block hashing (the process's pool by default). */
  hashing?: HashPool;
  /** The digest both sides hash with (one both have; SHA-256 if not given). */
  hashAlg?: HashAlg;
}

export interface ResyncPlan {
  mode: SyncMode;
  send: Range[];
  compare: Range[];
}

export interface ResyncProgress {
  mode: SyncMode;
  state: 'running' | 'done' | 'failed';
  startedAt: number;
  finishedAt: number | null;
  /** Bytes of the disk to go through (send + compare ranges). */
  totalBytes: number;
  doneBytes: number;
  /** Data sent (as write records). */
  sentBytes: number;
  /** Hash bytes received from the secondary. */
  hashBytes: number;
  /** Bytes found equal by hash (not sent). */
  equalBytes: number;
  /** The block digest both sides hash with. */
  hashAlg: HashAlg;
  checkpoints: number;
  error: string | null;
}

const SEND_CHUNK = 1024 * 1024;
const COMPARE_CHUNK = 4 * 1024 * 1024;
/** Requests in flight (hashes are prefetched while local hashing runs). */
const PIPELINE = 4;
/** How far ahead the local holes are listed at a time. */
const HOLE_WINDOW = 1024 * 1024 * 1024;

interface Chunk extends Range {
  /** Hash block size: HASH_BLOCK, or the whole chunk for a local hole. */
  block: number;
}

function* chunks(ranges: Range[], align: number): Generator<Range> {
  for (const r of ranges)
    for (let o = r.offset; o < r.offset + r.length;) {
      const end = Math.min(r.offset + r.length, (Math.floor(o / align) + 1) * align);
      yield { offset: o, length: end - o };
      o = end;
    }
}

export class Resync {
  readonly progress: ResyncProgress;
  private aborted: Error | null = null;
  private sinceCheckpoint = 0;

  constructor(
    private readonly host: ResyncHost,
    readonly plan: ResyncPlan,
  ) {
    const total = (rs: Range[]) => rs.reduce((a, r) => a + r.length, 0);
    this.progress = {
      mode: plan.mode,
      state: 'running',
      startedAt: host.now(),
      finishedAt: null,
      totalBytes: total(plan.send) + total(plan.compare),
      doneBytes: 0,
      sentBytes: 0,
      hashBytes: 0,
      equalBytes: 0,
      hashAlg: host.hashAlg ?? 'sha256',
      checkpoints: 0,
      error: null,
    };
  }

  /** Every range of the plan, for a restart after an interruption. */
  allRanges(): Range[] {
    return mergeRanges([...this.plan.send, ...this.plan.compare]);
  }

  abort(err: Error): void {
    this.aborted ??= err;
  }

  private check(): void {
    if (this.aborted) throw this.aborted;
  }

  private async send(offset: number, length: number): Promise<void> {
    this.check();
    crashPoint('primary-mid-resync');
    await this.host.sendRange(offset, length);
    this.progress.sentBytes += length;
    this.sinceCheckpoint += length;
    if (this.sinceCheckpoint >= this.host.commitBytes) {
      this.sinceCheckpoint = 0;
      await this.host.checkpoint('partial');
      this.progress.checkpoints++;
    }
  }

  async run(): Promise<ResyncProgress> {
    try {
      for (const c of chunks(this.plan.send, SEND_CHUNK)) {
        await this.send(c.offset, c.length);
        this.progress.doneBytes += c.length;
      }
      await this.compareAll();
      this.check();
      await this.host.checkpoint('done');
      this.progress.checkpoints++;
      this.progress.state = 'done';
    } catch (err) {
      this.progress.state = 'failed';
      this.progress.error = (err as Error).message;
      throw err;
    } finally {
      this.progress.finishedAt = this.host.now();
    }
    return this.progress;
  }

  /**
   * Compare ranges, pipelined: each chunk's hashes are asked of the secondary
   * and computed here at once, several chunks ahead of the comparison. Where
   * the local disk has a hole of at least a chunk, the whole hole is one
   * block (one hash each side, nothing read where the other side has a hole
   * too); a hole that turns out to differ is compared again block by block.
   *
   * The local hashes may be computed before or after the secondary's point in
   * the stream: either way a write to the chunk that lands in between makes
   * the hashes differ and the block is sent (read as it is then), and every
   * write after that point reaches the secondary in the stream. Equal hashes
   * are never wrong, a few sends may be spare.
   */
  private async compareAll(): Promise<void> {
    const redo: Range[] = [];
    await this.pipeline(this.plan.compare, true, async (c, remote, local) => {
      if (c.block === HASH_BLOCK) return this.compareChunk(c, remote, local);
      if (local.equals(remote)) this.progress.equalBytes += c.length;
      else redo.push({ offset: c.offset, length: c.length });
    });
    if (redo.length > 0)
      await this.pipeline(redo, false, (c, remote, local) => this.compareChunk(c, remote, local));
  }

  private async pipeline(
    ranges: Range[],
    count: boolean,
    each: (c: Chunk, remote: Buffer, local: Buffer) => Promise<void>,
  ): Promise<void> {
    const inflight: { c: Chunk; p: Promise<Buffer>; local: Promise<Buffer> }[] = [];
    const request = (c: Chunk) => {
      const p = this.remoteHashes(c.offset, c.length, c.block).then((h) => {
        this.progress.hashBytes += h.length;
        return h;
      });
      const local = this.localHashes(c.offset, c.length, c.block);
      // A rejected request or hashing is awaited (and rethrown) in order.
      p.catch(() => {});
      local.catch(() => {});
      inflight.push({ c, p, local });
    };
    const plan = this.chunks(ranges, count ? this.host.zeroLocal : undefined);
    let next = await plan.next();
    for (;;) {
      while (!next.done && inflight.length < PIPELINE) {
        this.check();
        request(next.value);
        next = await plan.next();
      }
      const head = inflight.shift();
      if (!head) return;
      this.check();
      const remote = await head.p;
      await each(head.c, remote, await head.local);
      if (count) this.progress.doneBytes += head.c.length;
    }
  }

  /** Chunks to compare: 4 MiB in 64 KiB blocks, or a local hole of at least that as one block. */
  private async *chunks(ranges: Range[], zeroLocal: ZeroRanges | undefined): AsyncGenerator<Chunk> {
    for (const r of ranges) {
      const end = r.offset + r.length;
      for (let pos = r.offset; pos < end;) {
        const winEnd = Math.min(end, pos + HOLE_WINDOW);
        const holes = zeroLocal ? await zeroLocal(pos, winEnd - pos) : [];
        let h = 0;
        while (pos < winEnd) {
          while (h < holes.length && holes[h].offset + holes[h].length <= pos) h++;
          const hole = holes[h];
          if (hole && hole.offset <= pos) {
            const hEnd = Math.min(winEnd, hole.offset + hole.length);
            if (hEnd - pos >= COMPARE_CHUNK) {
              yield { offset: pos, length: hEnd - pos, block: hEnd - pos };
              pos = hEnd;
              continue;
            }
          }
          let cEnd = Math.min(winEnd, (Math.floor(pos / COMPARE_CHUNK) + 1) * COMPARE_CHUNK);
          // Stop a data chunk where a long hole begins, so the hole goes in one piece.
          for (let k = h; k < holes.length && holes[k].offset < cEnd; k++)
            if (
              holes[k].offset > pos &&
              Math.min(winEnd, holes[k].offset + holes[k].length) - holes[k].offset >= COMPARE_CHUNK
            ) {
              cEnd = holes[k].offset;
              break;
            }
          yield { offset: pos, length: cEnd - pos, block: HASH_BLOCK };
          pos = cEnd;
        }
      }
    }
  }

  /** This side's hashes of a range. */
  private localHashes(offset: number, length: number, block: number): Promise<Buffer> {
    return blockHashes(this.host.readLocal, offset, length, block, {
      zeroes: this.host.zeroLocal,
      file: this.host.fileLocal,
      pool: this.host.hashing,
      alg: this.progress.hashAlg,
    });
  }

  /** The secondary's hashes of a range, with the same digest. */
  private remoteHashes(offset: number, length: number, block: number): Promise<Buffer> {
    return this.host.requestHashes(offset, length, block, this.progress.hashAlg);
  }

  private async compareChunk(c: Range, remote: Buffer, local: Buffer): Promise<void> {
    if (local.length !== remote.length)
      throw new ColoError(
        'EPROTO',
        `the secondary sent ${remote.length} hash bytes for ${c.offset}+${c.length}`,
      );
    const blocks = local.length / HASH_BYTES;
    const differing: number[] = [];
    for (let b = 0; b < blocks; b++)
      if (
        local.compare(remote, b * HASH_BYTES, (b + 1) * HASH_BYTES, b * HASH_BYTES, (b + 1) * HASH_BYTES) !==
        0
      )
        differing.push(b);
    this.progress.equalBytes += c.length - differing.reduce((a, b) => a + this.blockLen(c, b), 0);
    // Few differences: look closer, 4 KiB at a time; many: send whole blocks. The closer looks
    // at every differing block are asked for at once (one round trip, not one per block, which
    // made the blocks an old primary wrote before it failed cost a millisecond each); a send
    // afterwards changes only its own block, whose hashes are in by then.
    const closer = differing.length * 4 <= blocks;
    const looks = differing.map((b) => {
      const off = c.offset + b * HASH_BLOCK;
      const len = this.blockLen(c, b);
      if (!closer || len <= HASH_SUBBLOCK) return { off, len, finer: null };
      const finer = Promise.all([
        this.localHashes(off, len, HASH_SUBBLOCK),
        this.remoteHashes(off, len, HASH_SUBBLOCK),
      ]);
      finer.catch(() => {}); // awaited (and rethrown) in order below
      return { off, len, finer };
    });
    for (const { off, len, finer } of looks) {
      if (!finer) {
        await this.send(off, len);
        continue;
      }
      const [l2, r2] = await finer;
      this.progress.hashBytes += r2.length;
      const runs: Range[] = [];
      for (let k = 0; k < l2.length / HASH_BYTES; k++) {
        const s = k * HASH_BYTES;
        if (l2.compare(r2, s, s + HASH_BYTES, s, s + HASH_BYTES) === 0) {
          this.progress.equalBytes += Math.min(HASH_SUBBLOCK, len - k * HASH_SUBBLOCK);
          continue;
        }
        runs.push({
          offset: off + k * HASH_SUBBLOCK,
          length: Math.min(HASH_SUBBLOCK, len - k * HASH_SUBBLOCK),
        });
      }
      for (const r of mergeRanges(runs)) await this.send(r.offset, r.length);
    }
  }

  private blockLen(c: Range, b: number): number {
    return Math.min(HASH_BLOCK, c.length - b * HASH_BLOCK);
  }
}
