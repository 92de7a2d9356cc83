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
import { Buffer } from 'node:buffer';
import { createHash, randomBytes } from 'node:crypto';
import { crc32 } from 'node:zlib';
import { ColoError } from '../errors.js';
import { ByteQueue } from '../net/bytequeue.js';
import { takeCapture } from '../checkpoint/coordinator/hooks.js';

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
 * key length, version, value length, key, value. Encoded as a list of
 * buffers that refer to the values where they lie (the entries' headers and
 * keys share one buffer; a value is never changed in place, a PUT stores a
 * new one), so the only copy is the sender's (`DeltaSender`), into memory it
 * keeps.
 */
export function encodeDelta(d: MemoryDelta): Buffer[] {
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
  const keys = d.entries.map(([k]) => Buffer.from(k, 'utf8'));
  let metaBytes = 8 + head.length;
  for (const key of keys) metaBytes += 12 + key.length;
  const meta = Buffer.allocUnsafe(metaBytes);
  meta.writeUInt32LE(DELTA_MAGIC, 0);
  meta.writeUInt32LE(head.length, 4);
  head.copy(meta, 8);
  let at = 8 + head.length;
  let from = 0;
  const parts: Buffer[] = [];
  d.entries.forEach(([, value, version], i) => {
    meta.writeUInt32LE(keys[i].length, at);
    meta.writeUInt32LE(version, at + 4);
    meta.writeUInt32LE(value.length, at + 8);
    at += 12 + keys[i].copy(meta, at + 12);
    parts.push(meta.subarray(from, at), value);
    from = at;
  });
  if (parts.length === 0) parts.push(meta);
  return parts;
}

/** Bytes of an encoded checkpoint. */
export function deltaBytes(parts: readonly Buffer[]): number {
  let n = 0;
  for (const p of parts) n += p.length;
  return n;
}

/** Largest piece `DeltaSender` makes; a full checkpoint of a large state goes out as several. */
const SEND_PIECE_BYTES = 4 * 1024 * 1024;

/**
 * Joins an encoded checkpoint's parts into a few large buffers for the
 * socket: hundreds of small writes cost the HTTP stream more than the copy
 * (a 1 MiB delta of 4 KiB values is 513 parts). A delta of up to 4 MiB goes
 * into one buffer kept from checkpoint to checkpoint, memory already touched
 * (a fresh 1 MiB buffer costs its page faults, ~0.4 ms here, and the
 * Buffer.concat before this cost the PVM ~0.9 ms a checkpoint). It is lent to
 * one send at a time and taken back once that send's callback has settled; a
 * send that finds it lent, or needs more, uses buffers of its own.
 */
export class DeltaSender {
  private kept = Buffer.alloc(0);
  private lent = false;

  async send<T>(parts: readonly Buffer[], out: (pieces: Buffer[]) => Promise<T>): Promise<T> {
    const total = deltaBytes(parts);
    const reuse = !this.lent && total <= SEND_PIECE_BYTES;
    if (reuse && this.kept.length < total) this.kept = Buffer.allocUnsafeSlow(SEND_PIECE_BYTES);
    const pieces: Buffer[] = [];
    let piece = reuse ? this.kept : Buffer.allocUnsafe(Math.min(total, SEND_PIECE_BYTES));
    let at = 0;
    let left = total;
    for (const p of parts)
      for (let from = 0; from < p.length;) {
        if (at === piece.length) {
          pieces.push(piece);
          left -= at;
          piece = Buffer.allocUnsafe(Math.min(left, SEND_PIECE_BYTES));
          at = 0;
        }
        const n = p.copy(piece, at, from, Math.min(p.length, from + piece.length - at));
        at += n;
        from += n;
      }
    pieces.push(piece.subarray(0, at));
    if (reuse) this.lent = true;
    try {
      return await out(pieces);
    } finally {
      if (reuse) this.lent = false;
    }
  }
}

export function decodeDelta(body: Buffer | readonly Buffer[]): MemoryDelta {
  const bad = (why: string) => new ColoError('EPROTO', `not a guest memory checkpoint: ${why}`);
  // Read from the pieces as the socket delivered them: views where a field lies in one, a copy where it is split.
  const b = new ByteQueue();
  for (const piece of Buffer.isBuffer(body) ? [body] : body) b.push(piece);
  const left = () => b.length;
  if (left() < 8) throw bad('bad magic');
  const top = b.take(8);
  if (top.readUInt32LE(0) !== DELTA_MAGIC) throw bad('bad magic');
  const hl = top.readUInt32LE(4);
  if (hl > left()) throw bad('truncated header');
  let head: { full: boolean; ops: number; rng: number[]; logPos: number; logSeq: number; count: number };
  try {
    head = JSON.parse(b.take(hl).toString('utf8'));
  } catch {
    throw bad('header is not JSON');
  }
  if (!Array.isArray(head.rng) || head.rng.length !== 4 || !Number.isSafeInteger(head.count))
    throw bad('bad header');
  const entries: [string, Buffer, number][] = [];
  for (let i = 0; i < head.count; i++) {
    if (left() < 12) throw bad(`entry ${i} truncated`);
    const h = b.take(12);
    const kl = h.readUInt32LE(0);
    const version = h.readUInt32LE(4);
    const vl = h.readUInt32LE(8);
    if (kl + vl > left()) throw bad(`entry ${i} truncated`);
    const key = b.take(kl).toString('utf8');
    entries.push([key, b.take(vl), version]);
  }
  if (left() !== 0) throw bad(`${left()} bytes after the last entry`);
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
  /**
   * Keys changed since the last checkpoint, with their value at that checkpoint (null: absent).
   * On a PVM: changed since its state was last taken (a capture, or a save), with their value
   * then.
   */
  private undo = new Map<string, Entry | null>();
  /**
   * A PVM's state taken and not yet committed: the keys it took as changed (until that checkpoint
   * commits, the next one carries them too), the state taken for the send (a capture, for early
   * resume), and its counters (the hash of the state taken).
   */
  private inFlight: Set<string> | null = null;
  private captured: { full: boolean; parts: Buffer[] } | null = null;
  private capturedAt: { ops: number; rng: number[]; logPos: number; logSeq: number } | null = null;
  private staged: MemoryDelta | null = null;
  /** The checkpoint id of the last load (a repeated load of it is answered, not refused). */
  private loaded: string | null = null;
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
    for (const k of this.changed()) n += k.length + (this.entries.get(k)?.value.length ?? 0);
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

  /** Keys changed since the last committed checkpoint. */
  private changed(): string[] {
    const keys = [...this.undo.keys()];
    if (this.inFlight) for (const k of this.inFlight) if (!this.undo.has(k)) keys.push(k);
    return keys;
  }

  /**
   * The memory checkpoint to send now (the PVM paused until it commits): what changed since the
   * last one (everything if `full`), as pieces.
   */
  save(full: boolean): Buffer[] {
    this.capture(full);
    return this.takeCaptured(full);
  }

  private encode(full: boolean): Buffer[] {
    const keys = full ? [...this.entries.keys()] : this.changed();
    const delta: MemoryDelta = {
      full,
      ops: this.ops,
      rng: [...this.rng.s],
      logPos: this.logPos,
      logSeq: this.logSeq,
      entries: [],
    };
    for (const k of keys) {
      const e = this.entries.get(k);
      if (e) delta.entries.push([k, e.value, e.version]);
    }
    return encodeDelta(delta);
  }

  /**
   * Paused: take the state to send (values are never changed in place: the pieces stay valid if
   * it runs again before the send, as with early resume) and count changes from here.
   */
  capture(full: boolean): { entries: number } {
    const parts = this.encode(full);
    this.inFlight = new Set(this.changed());
    this.undo.clear();
    this.capturedAt = { ops: this.ops, rng: [...this.rng.s], logPos: this.logPos, logSeq: this.logSeq };
    this.captured = { full, parts };
    return { entries: full ? this.entries.size : this.inFlight.size };
  }

  /** The state `capture` took, once (for its send). */
  takeCaptured(full: boolean): Buffer[] {
    const c = takeCapture(this.captured, full);
    this.captured = null;
    return c.parts;
  }

  /**
   * The checkpoint that carried the last state taken is committed: the changes made since it
   * (by a PVM that ran again) are what the next one carries.
   */
  checkpointed(): void {
    this.inFlight = null;
    this.checkpoints++;
  }

  /** Hold a checkpoint received from the primary until it is committed. */
  receive(body: Buffer | readonly Buffer[]): { entries: number; bytes: number } {
    const delta = decodeDelta(body);
    this.staged = delta;
    return { entries: delta.entries.length, bytes: Buffer.isBuffer(body) ? body.length : deltaBytes(body) };
  }

  /**
   * Load the staged checkpoint: roll back this side's own changes since the
   * last checkpoint, then apply the primary's (or take its state whole).
   */
  load(checkpoint?: string): { entries: number } {
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
    this.inFlight = null;
    this.captured = null;
    this.capturedAt = null;
    this.checkpoints++;
    this.loaded = checkpoint ?? null;
    return { entries: d.entries.length };
  }

  /** The checkpoint named was the last one loaded, and nothing was received since. */
  loadedAlready(checkpoint: string | undefined): boolean {
    return checkpoint !== undefined && this.staged === null && this.loaded === checkpoint;
  }

  /** A received checkpoint that will not be committed. */
  discard(): void {
    this.staged = null;
  }

  /**
   * The state's hash: equal on both sides after every checkpoint. `captured`: of the state as the
   * last capture took it (a PVM that runs again before its checkpoint completes), if there is one.
   */
  hash(captured = false): string {
    const at = captured ? this.capturedAt : null;
    const h = createHash('sha256');
    const keys = new Set(this.entries.keys());
    if (at) for (const k of this.undo.keys()) keys.add(k);
    for (const k of [...keys].sort()) {
      const e = at && this.undo.has(k) ? this.undo.get(k) : this.entries.get(k);
      if (!e) continue;
      h.update(`${k.length}:${k}:${e.version}:${e.value.length}:`);
      h.update(e.value);
    }
    const c = at ?? { ops: this.ops, rng: this.rng.s, logPos: this.logPos, logSeq: this.logSeq };
    h.update(`ops=${c.ops};rng=${c.rng.join(',')};log=${c.logPos},${c.logSeq}`);
    return h.digest('hex');
  }

  /**
   * sha256 of the disk as the guest sees it (through its own disk client):
   * the log and the rest of its last MiB, or the whole disk if `whole`.
   * Two guests whose states are equal cover the same range. `captured`: the
   * log only, up to its end in the state the last capture took (or in this
   * state, without one): a PVM running past its capture appends beyond it.
   */
  async diskHash(whole = false, captured = false): Promise<{ hash: string; bytes: number }> {
    const h = createHash('sha256');
    const chunk = 1024 * 1024;
    const end = whole
      ? this.disk.size
      : captured
        ? Math.min(this.disk.size, this.capturedAt?.logPos ?? this.logPos)
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
      dirtyKeys: this.changed().length,
      dirtyBytes: this.dirtyBytes,
      checkpoints: this.checkpoints,
    };
  }
}
