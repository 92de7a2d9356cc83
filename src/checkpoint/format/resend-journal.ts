/**
 * The primary's resend buffer for one epoch: the frames the link carries,
 * kept until the secondary holds the epoch durably, so that a reconnect can
 * resend them. In memory while a budget shared by every epoch allows, in a
 * journal file past it.
 *
 * Why memory first: the buffer exists only within one run (a restarted
 * primary resynchronises its peer instead), so nothing needs it on disk; and
 * writing every byte of every PVM write to a file a second time was a third
 * of the primary's CPU under sequential writes (the image write is the
 * first). Frames are copied once into long-lived chunks, and the live link
 * sends those very bytes (`viewsAt`), so the PVM's payload dies
 * young and no slab copy is needed either.
 *
 * Byte positions are those of the journal the epoch would have been: the
 * memory part is [0, inMemory), the file part follows. An epoch that
 * overflowed keeps appending to its file; the next epoch tries memory again.
 * A chunk goes back to the pool when its epoch is dropped and no socket
 * write queued from it is still waiting (ResendMemory's references).
 */
import { Buffer } from 'node:buffer';
import { encodeFrame, encodeFrameInto, FRAME_HEADER_BYTES } from './frame.js';
import { JournalWriter, type AppendResult } from './journal.js';
import type { Storage, StorageFile } from '../../sys/storage.js';

export const CHUNK_BYTES = 4 * 1024 * 1024;

/**
 * The memory every epoch's resend buffer shares, in chunks. A chunk is
 * reused only when nothing refers to it: its epoch dropped, and every socket
 * write queued from it handed to the kernel (a dropped epoch's bytes may
 * still sit in a socket's queue when the peer is marked out of sync).
 */
export class ResendMemory {
  private readonly free: Buffer[] = [];
  /** Holds per chunk, by its memory (any view of a chunk names it). */
  private readonly refs = new Map<ArrayBufferLike, number>();
  /** Every chunk made, by its memory. */
  private readonly made = new Map<ArrayBufferLike, Buffer>();
  /** One release function per chunk, made once (releaserOf). */
  private readonly releasers = new Map<ArrayBufferLike, () => void>();
  private chunks = 0;

  constructor(readonly limitBytes: number) {}

  /** A chunk (held once), or null when the budget is spent. */
  take(): Buffer | null {
    let c = this.free.pop();
    if (!c) {
      if ((this.chunks + 1) * CHUNK_BYTES > this.limitBytes) return null;
      this.chunks++;
      c = Buffer.allocUnsafeSlow(CHUNK_BYTES); // memory of its own: `c.buffer` names it
      this.made.set(c.buffer, c);
    }
    this.refs.set(c.buffer, 1);
    return c;
  }

  /** One more hold on the chunk `view` lies in. */
  hold(view: Buffer): void {
    this.refs.set(view.buffer, (this.refs.get(view.buffer) ?? 0) + 1);
  }

  /** One hold less on the chunk `view` lies in; back to the pool at none. */
  release(view: Buffer): void {
    const key = view.buffer;
    const n = (this.refs.get(key) ?? 1) - 1;
    if (n > 0) this.refs.set(key, n);
    else {
      this.refs.delete(key);
      this.free.push(this.made.get(key)!);
    }
  }

  /**
   * A function that releases one hold on the chunk `view` lies in: the same
   * function for every view of that chunk (a socket write's callback, with no
   * closure made per write).
   */
  releaserOf(view: Buffer): () => void {
    let f = this.releasers.get(view.buffer);
    if (!f) {
      const chunk = this.made.get(view.buffer)!;
      this.releasers.set(view.buffer, (f = () => this.release(chunk)));
    }
    return f;
  }

  /** Bytes of chunks in use (by epochs, or by writes still queued). */
  get usedBytes(): number {
    return (this.chunks - this.free.length) * CHUNK_BYTES;
  }
}

/**
 * `parts` are the frame's bytes as the buffer holds them (views of its
 * chunks, or a copy for the file): never the caller's buffers, which are
 * free again once `append` returns.
 */
export interface ResendAppend extends AppendResult {
  /** The frame went to memory (the sender can take it with `viewsAt`), not to the file. */
  inMemory: boolean;
  /**
   * The chunk the frame lies in whole, and where in it (the usual append):
   * frames appended one after another in one chunk are one run of its bytes,
   * which the live sender writes as one view (PrimaryLink.queueRun).
   */
  chunk: Buffer | null;
  at: number;
}

export class ResendJournal {
  private readonly chunks: Buffer[] = [];
  /** Bytes held in memory (the first `inMemory` bytes of the epoch's stream). */
  private inMemory = 0;
  private file: JournalWriter | null = null;
  private closed = false;

  constructor(
    private readonly storage: Storage,
    readonly path: string,
    private readonly memory: ResendMemory,
  ) {}

  get size(): number {
    return this.inMemory + (this.file?.size ?? 0);
  }

  /** Whether a file was needed (past the memory budget). */
  get spilled(): boolean {
    return this.file !== null;
  }

  append(meta: object, data?: Buffer | readonly Buffer[]): ResendAppend {
    const offset = this.size;
    if (!this.file) {
      const placed = this.inPlace(meta, data, offset);
      if (placed) return placed;
    }
    const encoded = encodeFrame(meta, data);
    let bytes = 0;
    for (const p of encoded) bytes += p.length;
    const dataPos = offset + encoded[0].length;
    if (!this.file) {
      const held = this.toMemory(encoded, bytes);
      if (held) return { offset, dataPos, bytes, parts: held, inMemory: true, chunk: null, at: 0 };
    }
    // The file writer keeps what it is given until its next flush (a later turn): the
    // header it made, and a copy of the data, not the caller's buffers.
    const parts =
      encoded.length > 1 ? [encoded[0], Buffer.concat(encoded.slice(1), bytes - encoded[0].length)] : encoded;
    this.file ??= JournalWriter.open(this.storage, this.path, 0);
    this.file.appendEncoded(parts);
    return { offset, dataPos, bytes, parts, inMemory: false, chunk: null, at: 0 };
  }

  /**
   * The usual case: the frame is encoded straight into the last chunk (a
   * fresh one if that is full), where it fits whole. Null when it does not
   * (the frame would straddle two chunks, the budget is spent, or there is
   * no native helper): the caller encodes it apart and copies it.
   */
  private inPlace(
    meta: object,
    data: Buffer | readonly Buffer[] | undefined,
    offset: number,
  ): ResendAppend | null {
    // Bytes used in the last chunk (a full one where there is none yet).
    let into = this.chunks.length ? this.inMemory - (this.chunks.length - 1) * CHUNK_BYTES : CHUNK_BYTES;
    if (into === CHUNK_BYTES) {
      const c = this.memory.take();
      if (!c) return null;
      this.chunks.push(c); // room for the general path too, should the frame not fit
      into = 0;
    }
    const chunk = this.chunks[this.chunks.length - 1];
    const bytes = encodeFrameInto(meta, data, chunk, into);
    if (bytes < 0) return null;
    this.inMemory += bytes;
    const frame = chunk.subarray(into, into + bytes);
    const dataPos = offset + FRAME_HEADER_BYTES + 2 + frame.readUInt16BE(FRAME_HEADER_BYTES);
    return { offset, dataPos, bytes, parts: [frame], inMemory: true, chunk, at: into };
  }

  /**
   * Copy a frame into the chunks; returns the copy (views of the chunks), or
   * null (nothing copied) if the budget cannot hold it.
   */
  private toMemory(parts: Buffer[], bytes: number): Buffer[] | null {
    const room = this.chunks.length * CHUNK_BYTES - this.inMemory;
    const needed = Math.ceil(Math.max(0, bytes - room) / CHUNK_BYTES);
    const fresh: Buffer[] = [];
    for (let i = 0; i < needed; i++) {
      const c = this.memory.take();
      if (!c) {
        for (const f of fresh) this.memory.release(f);
        return null;
      }
      fresh.push(c);
    }
    this.chunks.push(...fresh);
    const views: Buffer[] = [];
    let at = this.inMemory;
    for (const p of parts) {
      let from = 0;
      while (from < p.length) {
        const chunk = this.chunks[Math.floor(at / CHUNK_BYTES)];
        const into = at % CHUNK_BYTES;
        const n = Math.min(p.length - from, CHUNK_BYTES - into);
        p.copy(chunk, into, from, from + n);
        views.push(chunk.subarray(into, into + n));
        from += n;
        at += n;
      }
    }
    this.inMemory = at;
    return views;
  }

  /** Read `buf.length` bytes of the epoch's stream at `pos`. */
  read(buf: Buffer, pos: number): void {
    let done = 0;
    while (done < buf.length && pos + done < this.inMemory) {
      const at = pos + done;
      const chunk = this.chunks[Math.floor(at / CHUNK_BYTES)];
      const into = at % CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - into, buf.length - done, this.inMemory - at);
      done += chunk.copy(buf, done, into, into + n);
    }
    if (done < buf.length) this.file!.read(buf.subarray(done), pos + done - this.inMemory);
  }

  /** One hold on the chunk `view` lies in (released by `releaserOf(view)`). */
  hold(view: Buffer): void {
    this.memory.hold(view);
  }

  /** The release of one hold on the chunk `view` lies in (one function per chunk). */
  releaserOf(view: Buffer): () => void {
    return this.memory.releaserOf(view);
  }

  /**
   * The bytes [pos, pos + length) where memory keeps them, held until the
   * returned `release` (the sender's zero-copy path); null if any of them lie
   * in the file part.
   */
  viewsAt(pos: number, length: number): { views: Buffer[]; release: () => void } | null {
    if (pos + length > this.inMemory || length <= 0) return null;
    const views: Buffer[] = [];
    const used: Buffer[] = [];
    for (let at = pos; at < pos + length;) {
      const chunk = this.chunks[Math.floor(at / CHUNK_BYTES)];
      const into = at % CHUNK_BYTES;
      const n = Math.min(CHUNK_BYTES - into, pos + length - at);
      views.push(chunk.subarray(into, into + n));
      used.push(chunk);
      this.memory.hold(chunk);
      at += n;
    }
    let done = false;
    const release = () => {
      if (done) return;
      done = true;
      for (const c of used) this.memory.release(c);
    };
    return { views, release };
  }

  /** The stream as a read-only file (for inspection). */
  asFile(): StorageFile {
    const size = this.size;
    return {
      path: this.path,
      fd: null,
      size: () => size,
      read: (buf, pos) => {
        const n = Math.max(0, Math.min(buf.length, size - pos));
        this.read(buf.subarray(0, n), pos);
        return n;
      },
      writev: () => {
        throw new Error(`${this.path}: a resend buffer is read-only here`);
      },
      truncate: () => {
        throw new Error(`${this.path}: a resend buffer is read-only here`);
      },
      datasync: async () => {},
      datasyncSync: () => {},
      close: () => {},
    };
  }

  /**
   * Give the memory back. The file part is removed, unless `keep`: then the
   * whole stream is left in the journal file at `path` (a primary shutting
   * down leaves its pending epochs for `colo-blk inspect --state`).
   */
  close(opts: { keep?: boolean } = {}): void {
    if (this.closed) return;
    if (opts.keep && this.size > 0) this.persist();
    this.closed = true;
    for (const c of this.chunks) this.memory.release(c);
    this.chunks.length = 0;
    if (this.file) {
      this.file.close();
      if (!opts.keep) this.storage.removeLater(this.path);
    }
  }

  /** Write the stream, memory part first, into the file at `path`. */
  private persist(): void {
    if (this.inMemory === 0) return; // all in the file already (closing it writes it out)
    const tmp = `${this.path}.tmp`;
    this.storage.remove(tmp);
    const out = JournalWriter.open(this.storage, tmp, 0);
    const step = CHUNK_BYTES;
    for (let at = 0; at < this.size; at += step) {
      const buf = Buffer.allocUnsafe(Math.min(step, this.size - at));
      this.read(buf, at);
      out.appendRaw([buf], 0);
    }
    out.close();
    this.file?.close();
    this.file = null;
    this.storage.rename(tmp, this.path);
  }
}
