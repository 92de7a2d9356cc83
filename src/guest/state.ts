/**
 * The guest's state: its "memory" (a key-value map, counters, the seeded
 * generator of its nondeterminism decisions, the next position of its disk
 * log) and its disk (a colo-blk export, through our NBD client).
 *
 * Notes on the design:
 * - A PUT appends a record to the disk log and makes it durable (FUA) before
 *   it is answered; the map is the index. A guest started on a disk that
 *   holds records rebuilds its map from them.
 * - Memory checkpoints are incremental, like the disk's epochs: the primary's
 *   guest records the keys it changed since the last checkpoint (D^p) and
 *   sends only those. The secondary's guest keeps an undo record of what it
 *   changed itself since the last checkpoint (D^s); at a load it rolls those
 *   back to the checkpoint and applies the primary's changes. Both are
 *   O(changes), never O(state). The first checkpoint of a pair is full.
 * - Deterministic: the same requests in the same order give the same state
 *   and the same bytes. What differs between runs is what the caller asks for
 *   on purpose (a fraction of noisy responses, decided by the seeded
 *   generator so both sides decide alike, then made of real time and
 *   randomness).
 */
import { createHash, randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { ColoError } from '../errors.js';

/** The block device the guest keeps its log on (NbdClient, or a test's memory disk). */
export interface GuestDisk {
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
  write(data: Buffer, offset: number, opts?: { fua?: boolean }): Promise<void>;
}

export interface Entry {
  value: Buffer;
  version: number;
}

const MAGIC = 0x564b4743; // "CGKV" little-endian
const HEADER = 32;
const SECTOR = 512;
/** The log starts after a reserved first block. */
export const LOG_START = 4096;

/** sfc32: the guest's seeded generator (its state is part of the memory checkpoint). */
class Sfc32 {
  constructor(public s: [number, number, number, number]) {}
  static seeded(seed: number): Sfc32 {
    const r = new Sfc32([0x9e3779b9, seed >>> 0, 0x243f6a88, 0xb7e15162]);
    for (let i = 0; i < 16; i++) r.next();
    return r;
  }
  next(): number {
    const [a, b, c, d] = this.s;
    const t = (((a + b) >>> 0) + d) >>> 0;
    this.s = [
      b ^ (b >>> 9),
      (c + (c << 3)) >>> 0,
      ((((c << 21) | (c >>> 11)) >>> 0) + t) >>> 0,
      (d + 1) >>> 0,
    ];
    return t / 2 ** 32;
  }
}

/** What a memory checkpoint carries. */
export interface MemoryDelta {
  full: boolean;
  ops: number;
  rng: [number, number, number, number];
  logPos: number;
  logSeq: number;
  /** Keys changed since the last checkpoint (all keys when full): [key, value, version]. */
  entries: [string, Buffer, number][];
}

const DELTA_MAGIC = 0x314d4743; // "CGM1"

/**
 * A memory checkpoint on the wire: magic, a JSON header (counters, the
 * generator's state, the log position, the entry count), then each entry as
 * key length, version, value length, key, value. Built with one copy of the
 * values, so a full checkpoint of a large state costs a memcpy, not an
 * encoder's growing buffer.
 */
export function encodeDelta(d: MemoryDelta): Buffer {
  const head = Buffer.from(
    JSON.stringify({
      full: d.full,
      ops: d.ops,
      rng: d.rng,
      logPos: d.logPos,
      logSeq: d.logSeq,
      count: d.entries.length,
    }),
  );
  const parts: Buffer[] = [];
  const top = Buffer.alloc(8);
  top.writeUInt32LE(DELTA_MAGIC, 0);
  top.writeUInt32LE(head.length, 4);
  parts.push(top, head);
  for (const [k, value, version] of d.entries) {
    const key = Buffer.from(k, 'utf8');
    const h = Buffer.allocUnsafe(12);
    h.writeUInt32LE(key.length, 0);
    h.writeUInt32LE(version, 4);
    h.writeUInt32LE(value.length, 8);
    parts.push(h, key, value);
  }
  return Buffer.concat(parts);
}

export function decodeDelta(b: Buffer): MemoryDelta {
  const bad = (why: string) => new ColoError('EPROTO', `not a guest memory checkpoint: ${why}`);
  if (b.length < 8 || b.readUInt32LE(0) !== DELTA_MAGIC) throw bad('bad magic');
  const hl = b.readUInt32LE(4);
  if (8 + hl > b.length) throw bad('truncated header');
  let head: { full: boolean; ops: number; rng: number[]; logPos: number; logSeq: number; count: number };
  try {
    head = JSON.parse(b.subarray(8, 8 + hl).toString('utf8'));
  } catch {
    throw bad('header is not JSON');
  }
  if (!Array.isArray(head.rng) || head.rng.length !== 4 || !Number.isSafeInteger(head.count))
    throw bad('bad header');
  const entries: [string, Buffer, number][] = [];
  let pos = 8 + hl;
  for (let i = 0; i < head.count; i++) {
    if (pos + 12 > b.length) throw bad(`entry ${i} truncated`);
    const kl = b.readUInt32LE(pos);
    const version = b.readUInt32LE(pos + 4);
    const vl = b.readUInt32LE(pos + 8);
    pos += 12;
    if (pos + kl + vl > b.length) throw bad(`entry ${i} truncated`);
    const key = b.subarray(pos, pos + kl).toString('utf8');
    entries.push([key, b.subarray(pos + kl, pos + kl + vl), version]);
    pos += kl + vl;
  }
  if (pos !== b.length) throw bad(`${b.length - pos} bytes after the last entry`);
  return {
    full: head.full === true,
    ops: head.ops,
    rng: head.rng as [number, number, number, number],
    logPos: head.logPos,
    logSeq: head.logSeq,
    entries,
  };
}

export interface GuestStateOptions {
  seed: number;
  /** Fraction (0-1) of responses that carry a timestamp and a random id. */
  nondeterminism: number;
}

export class GuestState {
  private entries = new Map<string, Entry>();
  private ops = 0;
  private rng: Sfc32;
  private logPos = LOG_START;
  private logSeq = 0;
  /** Keys changed since the last checkpoint, with their value at that checkpoint (null: absent). */
  private undo = new Map<string, Entry | null>();
  private staged: MemoryDelta | null = null;
  /** Checkpoints taken (primary) or loaded (secondary). */
  checkpoints = 0;

  constructor(
    private readonly disk: GuestDisk,
    private readonly opts: GuestStateOptions,
  ) {
    this.rng = Sfc32.seeded(opts.seed);
  }

  get nondeterminism(): number {
    return this.opts.nondeterminism;
  }

  get keys(): number {
    return this.entries.size;
  }

  /** Bytes of state changed since the last checkpoint (what the next one would send). */
  get dirtyBytes(): number {
    let n = 0;
    for (const k of this.undo.keys()) n += k.length + (this.entries.get(k)?.value.length ?? 0);
    return n;
  }

  /**
   * Fill memory with `bytes` of state that is not on the disk (4 KiB values
   * under keys p/0, p/1, ..., made from the seed): a VM with that much RAM in
   * use. Both sides started alike hold the same; it counts as the state at
   * start, not as a change.
   */
  preload(bytes: number): number {
    const size = 4096;
    const n = Math.ceil(bytes / size);
    for (let i = 0; i < n; i++) {
      const v = Buffer.alloc(size, (i * 31 + this.opts.seed) & 255);
      v.writeUInt32LE(i, 0);
      this.entries.set(`p/${i}`, { value: v, version: 1 });
    }
    return n;
  }

  /** Rebuild the map from the disk log (a guest started on a disk that holds one). */
  async recover(): Promise<number> {
    let pos = LOG_START;
    let n = 0;
    while (pos + HEADER <= this.disk.size) {
      const head = await this.disk.read(pos, HEADER);
      if (head.readUInt32LE(0) !== MAGIC) break;
      const keyLen = head.readUInt32LE(16);
      const valLen = head.readUInt32LE(20);
      const total = Math.ceil((HEADER + keyLen + valLen) / SECTOR) * SECTOR;
      if (pos + total > this.disk.size) break;
      const rec = await this.disk.read(pos, HEADER + keyLen + valLen);
      const crc = rec.readUInt32LE(4);
      rec.writeUInt32LE(0, 4);
      if (crc32(rec) !== crc) break; // a torn last record: the log ends before it
      const key = rec.subarray(HEADER, HEADER + keyLen).toString('utf8');
      this.entries.set(key, {
        value: Buffer.from(rec.subarray(HEADER + keyLen)),
        version: rec.readUInt32LE(24),
      });
      this.logSeq = Number(rec.readBigUInt64LE(8));
      pos += total;
      n++;
    }
    this.logPos = pos;
    return n;
  }

  /** One more operation: the op counter, and whether this response is noisy (decided alike on both sides). */
  step(): { op: number; noise: string | null } {
    const op = ++this.ops;
    const noisy = this.opts.nondeterminism > 0 && this.rng.next() < this.opts.nondeterminism;
    return { op, noise: noisy ? `${Date.now()}-${randomBytes(6).toString('hex')}` : null };
  }

  get(key: string): Entry | undefined {
    return this.entries.get(key);
  }

  /** Store durably, then in memory. Returns the new version. */
  async put(key: string, value: Buffer): Promise<number> {
    const k = Buffer.from(key, 'utf8');
    const total = Math.ceil((HEADER + k.length + value.length) / SECTOR) * SECTOR;
    if (this.logPos + total > this.disk.size)
      throw new ColoError('ENOSPC', `the guest's disk is full (${this.disk.size} bytes)`);
    // Reserve the place in the log now: concurrent PUTs take places in the order they run.
    const pos = this.logPos;
    this.logPos += total;
    const seq = ++this.logSeq;
    const version = (this.entries.get(key)?.version ?? 0) + 1;
    const rec = Buffer.alloc(total);
    rec.writeUInt32LE(MAGIC, 0);
    rec.writeBigUInt64LE(BigInt(seq), 8);
    rec.writeUInt32LE(k.length, 16);
    rec.writeUInt32LE(value.length, 20);
    rec.writeUInt32LE(version, 24);
    k.copy(rec, HEADER);
    value.copy(rec, HEADER + k.length);
    rec.writeUInt32LE(crc32(rec.subarray(0, HEADER + k.length + value.length)), 4);
    this.remember(key);
    this.entries.set(key, { value: Buffer.from(value), version });
    await this.disk.write(rec, pos, { fua: true });
    return version;
  }

  private remember(key: string): void {
    if (this.undo.has(key)) return;
    const e = this.entries.get(key);
    this.undo.set(key, e ? { value: e.value, version: e.version } : null);
  }

  /** The memory checkpoint to send: what changed since the last one (everything if `full`). */
  save(full: boolean): Buffer {
    const keys = full ? [...this.entries.keys()] : [...this.undo.keys()];
    const delta: MemoryDelta = {
      full,
      ops: this.ops,
      rng: [...this.rng.s],
      logPos: this.logPos,
      logSeq: this.logSeq,
      entries: keys.flatMap((k) => {
        const e = this.entries.get(k);
        return e ? [[k, e.value, e.version] as [string, Buffer, number]] : [];
      }),
    };
    return encodeDelta(delta);
  }

  /** The checkpoint that carried `save()` is committed: changes count from here. */
  checkpointed(): void {
    this.undo.clear();
    this.checkpoints++;
  }

  /** Hold a checkpoint received from the primary until it is committed. */
  receive(bytes: Buffer): { entries: number; bytes: number } {
    const delta = decodeDelta(bytes);
    this.staged = delta;
    return { entries: delta.entries.length, bytes: bytes.length };
  }

  /**
   * Load the staged checkpoint: roll back this side's own changes since the
   * last checkpoint, then apply the primary's (or take its state whole).
   */
  load(): { entries: number } {
    const d = this.staged;
    if (!d) throw new ColoError('EINVAL', 'no memory checkpoint was received to load');
    if (d.full) this.entries.clear();
    else
      for (const [k, e] of this.undo) {
        if (e) this.entries.set(k, e);
        else this.entries.delete(k);
      }
    for (const [k, value, version] of d.entries) this.entries.set(k, { value: Buffer.from(value), version });
    this.ops = d.ops;
    this.rng = new Sfc32([...d.rng] as [number, number, number, number]);
    this.logPos = d.logPos;
    this.logSeq = d.logSeq;
    this.staged = null;
    this.undo.clear();
    this.checkpoints++;
    return { entries: d.entries.length };
  }

  /** A received checkpoint that will not be committed. */
  discard(): void {
    this.staged = null;
  }

  /** The state's hash: equal on both sides after every checkpoint. */
  hash(): string {
    const h = createHash('sha256');
    for (const k of [...this.entries.keys()].sort()) {
      const e = this.entries.get(k)!;
      h.update(`${k.length}:${k}:${e.version}:${e.value.length}:`);
      h.update(e.value);
    }
    h.update(`ops=${this.ops};rng=${this.rng.s.join(',')};log=${this.logPos},${this.logSeq}`);
    return h.digest('hex');
  }

  /**
   * sha256 of the disk as the guest sees it (through its own disk client):
   * the log and the rest of its last MiB, or the whole disk if `whole`.
   * Two guests whose states are equal cover the same range.
   */
  async diskHash(whole = false): Promise<{ hash: string; bytes: number }> {
    const h = createHash('sha256');
    const chunk = 1024 * 1024;
    const end = whole
      ? this.disk.size
      : Math.min(this.disk.size, Math.ceil((this.logPos + 1) / chunk) * chunk);
    for (let off = 0; off < end; off += chunk)
      h.update(await this.disk.read(off, Math.min(chunk, end - off)));
    return { hash: h.digest('hex'), bytes: end };
  }

  status() {
    return {
      keys: this.entries.size,
      ops: this.ops,
      logPos: this.logPos,
      logSeq: this.logSeq,
      dirtyKeys: this.undo.size,
      dirtyBytes: this.dirtyBytes,
      checkpoints: this.checkpoints,
    };
  }
}
