/**
 * A raw image file as a block device.
 *
 * Notes on the design:
 * - Two descriptors on the same file: a plain one for ordinary I/O and one
 *   opened with O_DSYNC for FUA writes, so a FUA write is durable when the
 *   write call returns (native FUA) instead of write + fdatasync.
 * - I/O mode 'sync' issues pread/pwrite directly on the event loop. For
 *   images in the page cache (the normal case for a VM disk under COLO, and
 *   always for tmpfs) a direct syscall costs a few microseconds, while a hop to
 *   libuv's thread pool costs tens; 'async' uses the thread pool and keeps the
 *   loop free when the image is on a slow disk with a cold cache. 'auto' (the
 *   default) does small requests directly and large ones (≥ 256 KiB) in the
 *   pool, so the loop receives the next request while a big copy runs.
 *   Flushes always go to the thread pool: fdatasync can take milliseconds.
 * - Short reads and writes are looped; reads past the end of the file (a file
 *   shorter than the device) return zeroes.
 * - TRIM punches holes, WRITE_ZEROES uses fallocate (punch, or zero-range when
 *   the client forbids holes), and block status reports the file's holes via
 *   SEEK_DATA / SEEK_HOLE — all through the optional native helpers, with
 *   portable fallbacks when the addon or the filesystem lacks them.
 */
import { Buffer } from 'node:buffer';
import { performance } from 'node:perf_hooks';
import fs from 'node:fs';
import { ColoError, toColoError } from '../errors.js';
import { limits } from '../limits.js';
import {
  assertRange,
  ExtentFlag,
  type BlockDevice,
  type Capabilities,
  type Extent,
  type FileRange,
  type WriteOptions,
  type ZeroOptions,
} from './device.js';
import { ioTracer } from './io-trace.js';
import { native } from './native.js';

export type IoMode = 'sync' | 'async' | 'auto';

export interface FileDeviceOptions {
  readOnly?: boolean;
  /** Create the file with this size if it does not exist; if it exists, its size must match. */
  size?: number;
  io?: IoMode;
  /** The node's log: told when 'auto' sends large writes to the thread pool after a slow one, and when they are back. */
  log?: { warn(message: string): void; info(message: string): void };
}

const zeroChunk = Buffer.alloc(limits.zeroChunkBytes);
/** copyFromFile of at least this many bytes runs on the thread pool. */
const ASYNC_COPY_BYTES = 1024 * 1024;

/** In 'auto' I/O mode, reads of at least this size use the thread pool (and so may writes: see syncFor). */
const AUTO_ASYNC_BYTES = 256 * 1024;

/**
 * In 'auto' I/O mode a large write on the event loop is slow when it takes
 * longer than this plus its length at SLOW_WRITE_BYTES_PER_MS (the page
 * cache takes a 1 MiB write in 0.15-0.25 ms here, but a thread descheduled
 * mid-write on a busy machine takes a few ms more: 2 ms sent nbdcopy's
 * writes to the pool most of the time); large writes then use the thread
 * pool for SLOW_WRITE_POOL_MS before the loop tries one again, twice as long
 * after each slow try in a row (up to SLOW_WRITE_POOL_MAX_MS): on a disk
 * that keeps throttling, the loop stalls once a minute, not once a second.
 */
const SLOW_WRITE_BASE_MS = 10;
const SLOW_WRITE_BYTES_PER_MS = 500_000;
const SLOW_WRITE_POOL_MS = 1000;
const SLOW_WRITE_POOL_MAX_MS = 64_000;

function readAsync(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

function writevAsync(fd: number, bufs: Buffer[], pos: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.writev(fd, bufs, pos, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

function fdatasyncAsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

function isUnsupported(err: unknown): boolean {
  const code = (err as { code?: string }).code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENODEV' || code === 'EINVAL';
}

export class FileDevice implements BlockDevice {
  readonly caps: Capabilities;
  /** Writes are done with the caller's buffers when they settle (the I/O trace copies what it keeps). */
  readonly releasesWrites = true;
  private closed = false;
  /**
   * Calls on a thread-pool thread that use the descriptors: `close` waits for
   * them. A descriptor closed under one makes it fail (EBADF), or, once the
   * number is given to another file, read or write that file.
   */
  private inPool = 0;
  private poolIdle: (() => void) | null = null;
  /** Cleared the first time the filesystem refuses the operation. */
  private canPunch = native !== null;
  private canZeroRange = native !== null;
  private canSeek = native !== null;
  private canCopyRange = native !== null;
  /**
   * The last run of data SEEK_HOLE found: [from, to) held data when asked.
   * SEEK_HOLE walks the page cache page by page up to the next hole, whatever
   * range the caller wants, so on a dense file every extents() call of a
   * window scanned to the end of the file: a full sync of two identical
   * 1 GiB images spent 51-61 % of each side's CPU in that walk. Claiming
   * data is always safe (a hole reported as data reads as zeroes), so the run
   * stays usable however old; a punch through this device forgets it, so
   * that holes it makes show at once.
   */
  private dataRun = { from: 0, to: 0 };
  /** 'auto': until when (performance.now()) large writes use the thread pool, after a slow one on the loop. */
  private largeWritesInPoolUntil = 0;
  /** 'auto': how long large writes go to the pool after the next slow one (doubles while they stay slow). */
  private largeWritesPoolMs = SLOW_WRITE_POOL_MS;

  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly fd: number,
    private readonly fdSync: number,
    readonly readOnly: boolean,
    private readonly io: IoMode,
    private readonly log?: FileDeviceOptions['log'],
  ) {
    this.caps = {
      write: !readOnly,
      flush: !readOnly,
      fua: readOnly ? 'none' : 'native',
      trim: readOnly ? 'none' : native ? 'native' : 'emulate',
      zero: readOnly ? 'none' : native ? 'native' : 'emulate',
      fastZero: !readOnly && native !== null,
      extents: native !== null,
      cache: 'emulate',
      multiConn: true,
    };
  }

  static async open(path: string, opts: FileDeviceOptions = {}): Promise<FileDevice> {
    const readOnly = opts.readOnly ?? false;
    let created = false;
    if (opts.size !== undefined && !fs.existsSync(path)) {
      if (readOnly)
        throw new ColoError('ENOENT', `${path} does not exist (a read-only export cannot create it)`);
      if (!Number.isSafeInteger(opts.size) || opts.size <= 0)
        throw new ColoError('EUSAGE', `bad size ${opts.size} for ${path}`);
      const fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
      try {
        fs.ftruncateSync(fd, opts.size);
        ioTracer?.create(path);
        ioTracer?.truncate(path, opts.size);
      } finally {
        fs.closeSync(fd);
      }
      created = true;
    }
    let fd: number;
    try {
      fd = fs.openSync(path, readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR);
    } catch (err) {
      const e = toColoError(err);
      if (e.code === 'ENOENT')
        throw new ColoError('ENOENT', `${path} does not exist; give a size (size=1G) to create it`);
      throw e;
    }
    const st = fs.fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) {
      fs.closeSync(fd);
      throw new ColoError('EUSAGE', `${path} is not a regular file`);
    }
    const size = st.size;
    if (opts.size !== undefined && !created && size !== opts.size) {
      fs.closeSync(fd);
      throw new ColoError(
        'EUSAGE',
        `${path} already exists with ${size} bytes, but size=${opts.size} was given; ` +
          `drop size= to serve the file as it is, or resize it first (qemu-img resize -f raw ${path} ${opts.size})`,
      );
    }
    if (size === 0) {
      fs.closeSync(fd);
      throw new ColoError('EUSAGE', `${path} is empty; give a size (size=1G) to create an image`);
    }
    const fdSync = readOnly ? fd : fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_DSYNC);
    return new FileDevice(path, size, fd, fdSync, readOnly, opts.io ?? 'auto', opts.log);
  }

  /**
   * Whether an I/O runs on the event loop ('sync' and 'async': always,
   * never). 'auto':
   * - Small requests on the loop: a thread-pool hop costs more than the copy.
   * - Large reads in the pool: a read the page cache misses waits for the
   *   disk (and large reads are mostly sent from the file, file-replies.ts).
   * - Writes of any size on the loop, while the page cache takes them at
   *   memory speed: measured on two cores, the pool's hop and the copy on
   *   another core cost 1 MiB fio writes 0.21-0.23 against 0.19 CPU-s/GiB,
   *   and nbdcopy's 256 KiB writes from four connections 0.52 against 0.34
   *   (2,020 against 2,230 MB/s). A large write that was slow (the kernel
   *   throttling dirty pages, a filesystem that blocks) sends large writes to
   *   the pool for a second, then 2, 4, ... 64 s while the writes the loop
   *   tries stay slow (noteLargeWrite).
   * - A FUA write in the pool whatever its size: on the O_DSYNC descriptor it
   *   returns once the disk has it, a wait every request of every connection
   *   would share on the loop (tmpfs never shows it: O_DSYNC costs nothing
   *   there).
   */
  private syncFor(length: number, write = false, fua = false): boolean {
    if (this.io !== 'auto') return this.io === 'sync';
    if (length < AUTO_ASYNC_BYTES) return !fua;
    return write && !fua && performance.now() >= this.largeWritesInPoolUntil;
  }

  /** A large write done on the loop (auto) took `ms`: too slow for the loop, send the next ones to the pool. */
  private noteLargeWrite(length: number, ms: number): void {
    // Spelt out only when logged: this runs for every large write.
    const took = () =>
      `a ${(length / 2 ** 20).toFixed(length < 2 ** 20 ? 2 : 1)} MiB write took ${ms.toFixed(1)} ms`;
    if (ms <= SLOW_WRITE_BASE_MS + length / SLOW_WRITE_BYTES_PER_MS) {
      if (this.largeWritesInPoolUntil > 0)
        this.log?.info(`${this.path}: large writes are back on the event loop (${took()})`);
      this.largeWritesInPoolUntil = 0;
      this.largeWritesPoolMs = SLOW_WRITE_POOL_MS;
      return;
    }
    this.largeWritesInPoolUntil = performance.now() + this.largeWritesPoolMs;
    this.log?.warn(
      `${this.path}: ${took()} on the event loop; large writes go to the thread pool for ` +
        `${this.largeWritesPoolMs / 1000} s (the page cache is not taking writes at memory speed: ` +
        `dirty pages throttled, or a slow disk; --io async keeps every request off the event loop)`,
    );
    this.largeWritesPoolMs = Math.min(SLOW_WRITE_POOL_MAX_MS, this.largeWritesPoolMs * 2);
  }

  private checkWritable(): void {
    if (this.readOnly) throw new ColoError('EPERM', `${this.path} is read-only`);
    this.checkOpen();
  }

  private checkOpen(): void {
    if (this.closed) throw new ColoError('ESHUTDOWN', `${this.path} is closed`);
  }

  /** A call goes to the pool: refused once closing, counted until `leavePool`. */
  private enterPool(): void {
    this.checkOpen();
    this.inPool++;
  }

  private leavePool(): void {
    if (--this.inPool === 0 && this.poolIdle) {
      this.poolIdle();
      this.poolIdle = null;
    }
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    if (this.preadNow(buf, offset)) return;
    assertRange(this, offset, buf.length);
    this.enterPool();
    try {
      for (let done = 0; done < buf.length;) {
        const n = await readAsync(this.fd, buf, done, buf.length - done, offset + done);
        if (n === 0) {
          buf.fill(0, done); // past the end of a short file
          return;
        }
        done += n;
      }
    } finally {
      this.leavePool();
    }
  }

  /** pread on the calling thread when this device reads there (syncFor): true once read, false with nothing done. */
  preadNow(buf: Buffer, offset: number): boolean {
    if (!this.syncFor(buf.length)) return false;
    assertRange(this, offset, buf.length);
    this.checkOpen();
    for (let done = 0; done < buf.length;) {
      const n = fs.readSync(this.fd, buf, done, buf.length - done, offset + done);
      if (n === 0) {
        buf.fill(0, done); // past the end of a short file
        break;
      }
      done += n;
    }
    return true;
  }

  pwrite(buf: Buffer, offset: number, opts: WriteOptions = {}): Promise<void> {
    return this.pwritev([buf], offset, opts);
  }

  /** pwritev(2) of the pieces: an NBD payload that arrived in many socket chunks is never assembled. */
  async pwritev(bufs: readonly Buffer[], offset: number, opts: WriteOptions = {}): Promise<void> {
    if (this.pwritevNow(bufs, offset, opts)) return;
    let length = 0;
    for (const b of bufs) length += b.length;
    assertRange(this, offset, length);
    this.checkWritable();
    // Left to here: FUA, large writes, and --io async (syncFor says which of them stay on this thread).
    const fd = opts.fua ? this.fdSync : this.fd;
    const sync = this.syncFor(length, true, opts.fua);
    const timed = sync && this.io === 'auto' && length >= AUTO_ASYNC_BYTES;
    const started = timed ? performance.now() : 0;
    const left = bufs.filter((b) => b.length > 0);
    const w = { i: 0, done: 0 };
    if (sync) this.writeRestSync(fd, left, w, offset);
    // A short write leaves `left` starting where it stopped: whole pieces dropped, the next one cut.
    else {
      this.enterPool();
      try {
        while (w.i < left.length)
          this.wrote(
            fd,
            left,
            w,
            offset,
            await writevAsync(fd, w.i === 0 ? left : left.slice(w.i), offset + w.done),
          );
      } finally {
        this.leavePool();
      }
    }
    if (timed) this.noteLargeWrite(length, performance.now() - started);
  }

  /**
   * pwritev on the calling thread, when this device would write there anyway
   * (a write under AUTO_ASYNC_BYTES and not FUA, in 'auto' or 'sync' mode):
   * true once written. False, with nothing done, when `pwritev` must do it.
   * For a caller whose own work around the write is synchronous too (the
   * NBD connection, the replicating primary: no promise, no async frame per write).
   */
  pwritevNow(bufs: readonly Buffer[], offset: number, opts: WriteOptions = {}): boolean {
    let length = 0;
    for (const b of bufs) length += b.length;
    if (opts.fua || this.io === 'async' || (this.io === 'auto' && length >= AUTO_ASYNC_BYTES)) return false;
    assertRange(this, offset, length);
    this.checkWritable();
    // The usual case: one writev takes it all, the pieces as given.
    const n = ioTracer || length === 0 ? 0 : fs.writevSync(this.fd, bufs as Buffer[], offset);
    if (n === length && length > 0) return true;
    // A short first write (rare), or a traced one: on from where it stopped.
    const left = bufs.filter((b) => b.length > 0);
    const w = { i: 0, done: 0 };
    if (n > 0) this.wrote(this.fd, left, w, offset, n);
    this.writeRestSync(this.fd, left, w, offset);
    return true;
  }

  /** Write `left` from piece `w.i` on, at `offset + w.done`, on this thread. */
  private writeRestSync(fd: number, left: Buffer[], w: { i: number; done: number }, offset: number): void {
    while (w.i < left.length)
      this.wrote(fd, left, w, offset, fs.writevSync(fd, w.i === 0 ? left : left.slice(w.i), offset + w.done));
  }

  /** `n` bytes of `left` from piece `w.i` were written at `offset + w.done`: move past them. */
  private wrote(fd: number, left: Buffer[], w: { i: number; done: number }, offset: number, n: number): void {
    if (n <= 0) throw new ColoError('EIO', `short write at ${offset + w.done} on ${this.path}`);
    for (let skip = n; skip > 0;) {
      const cur = left[w.i];
      const piece = skip >= cur.length ? cur : cur.subarray(0, skip); // a view only for a short write
      ioTracer?.write(this.path, offset + w.done, piece, fd === this.fdSync);
      w.done += piece.length;
      skip -= piece.length;
      if (piece === cur) w.i++;
      else left[w.i] = cur.subarray(piece.length);
    }
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    this.enterPool();
    try {
      const synced = fdatasyncAsync(this.fd);
      await (ioTracer?.sync(this.path, synced) ?? synced);
    } finally {
      this.leavePool();
    }
  }

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    this.checkWritable();
    if (length === 0) return;
    // TRIM is advisory: a filesystem that cannot punch holes simply keeps the data.
    if (this.canPunch && native) {
      try {
        this.forgetDataRun();
        native.punchHole(this.fd, offset, length);
        ioTracer?.zero(this.path, offset, length);
      } catch (err) {
        if (!isUnsupported(err)) throw toColoError(err);
        this.canPunch = false;
      }
    }
    if (opts.fua) await this.flush();
  }

  async zero(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    assertRange(this, offset, length);
    this.checkWritable();
    if (length > 0 && !this.zeroFast(offset, length, opts.mayTrim !== false)) {
      if (opts.fast) throw new ColoError('ENOTSUP', 'fast zeroing is not supported on this file system');
      await this.writeZeroes(offset, length);
    }
    if (opts.fua) await this.flush();
  }

  /** Zero without writing data; false if the filesystem cannot. */
  private zeroFast(offset: number, length: number, mayTrim: boolean): boolean {
    if (!native) return false;
    this.forgetDataRun();
    if (mayTrim && this.canPunch) {
      try {
        native.punchHole(this.fd, offset, length);
        ioTracer?.zero(this.path, offset, length);
        return true;
      } catch (err) {
        if (!isUnsupported(err)) throw toColoError(err);
        this.canPunch = false;
      }
    }
    if (this.canZeroRange) {
      try {
        native.zeroRange(this.fd, offset, length);
        ioTracer?.zero(this.path, offset, length);
        return true;
      } catch (err) {
        if (!isUnsupported(err)) throw toColoError(err);
        this.canZeroRange = false;
      }
    }
    // NO_HOLE on a filesystem without ZERO_RANGE (tmpfs): punch, then allocate.
    if (this.canPunch) {
      try {
        native.punchHole(this.fd, offset, length);
        native.allocateRange(this.fd, offset, length);
        ioTracer?.zero(this.path, offset, length);
        return true;
      } catch (err) {
        if (!isUnsupported(err)) throw toColoError(err);
      }
    }
    return false;
  }

  /** Holes may appear: extents() asks the file again (see dataRun). */
  private forgetDataRun(): void {
    this.dataRun = { from: 0, to: 0 };
  }

  private async writeZeroes(offset: number, length: number): Promise<void> {
    let done = 0;
    while (done < length) {
      const n = Math.min(zeroChunk.length, length - done);
      await this.pwrite(zeroChunk.subarray(0, n), offset + done);
      done += n;
    }
  }

  /**
   * Copy `length` bytes from another file (at `srcPos`) into this image at
   * `offset` inside the kernel (copy_file_range; from 1 MiB on a thread-pool
   * thread, so the event loop is not held for it; below, the trip to the pool
   * would cost more than the copy), without a trip through the JS heap.
   * Resolves false if the kernel or filesystem cannot, so the caller copies by
   * hand; never a partial copy reported as done.
   */
  async copyFromFile(srcFd: number, srcPos: number, offset: number, length: number): Promise<boolean> {
    assertRange(this, offset, length);
    this.checkWritable();
    if (!this.canCopyRange || !native) return false;
    const pooled = native.copyRangeAsync !== undefined && length >= ASYNC_COPY_BYTES;
    if (pooled) this.enterPool();
    try {
      const n = pooled
        ? await native.copyRangeAsync!(srcFd, srcPos, this.fd, offset, length)
        : native.copyRange(srcFd, srcPos, this.fd, offset, length);
      if (n !== length)
        throw new ColoError('EIO', `copied ${n} of ${length} bytes into ${this.path} at ${offset}`);
      ioTracer?.copied(this.path, this.fd, offset, length);
      return true;
    } catch (err) {
      const code = (err as { code?: string }).code;
      if (isUnsupported(err) || code === 'EXDEV' || code === 'ENOSYS') {
        this.canCopyRange = false;
        return false;
      }
      throw toColoError(err);
    } finally {
      if (pooled) this.leavePool();
    }
  }

  /**
   * Copy many ranges of file `srcFd` into this image at once, on a thread-pool
   * thread (`ranges`: [srcPos, offset, length] per range, `count` of them; no
   * two overlap at either end). Small ranges are read from the source in its
   * order, neighbours in one read, and written one by one; large ones are
   * copied in the kernel. Resolves false, having copied nothing, when the
   * native helper cannot (the caller copies range by range).
   */
  async copyRangesFromFile(srcFd: number, ranges: Float64Array, count: number): Promise<boolean> {
    this.checkWritable();
    if (!native?.copyRangesAsync) return false;
    let total = 0;
    for (let i = 0; i < count; i++) {
      assertRange(this, ranges[3 * i + 1], ranges[3 * i + 2]);
      total += ranges[3 * i + 2];
    }
    let n: number;
    this.enterPool();
    try {
      n = await native.copyRangesAsync(srcFd, this.fd, ranges, count);
    } catch (err) {
      throw toColoError(err);
    } finally {
      this.leavePool();
    }
    if (n !== total) throw new ColoError('EIO', `copied ${n} of ${total} bytes into ${this.path}`);
    if (ioTracer)
      for (let i = 0; i < count; i++)
        ioTracer.copied(this.path, this.fd, ranges[3 * i + 1], ranges[3 * i + 2]);
    return true;
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    assertRange(this, offset, length);
    this.checkOpen();
    const end = offset + length;
    if (!this.canSeek || !native) return [{ offset, length, flags: 0 }];
    const out: Extent[] = [];
    let pos = offset;
    try {
      while (pos < end && out.length < limits.maxExtentsPerReply) {
        const known = pos >= this.dataRun.from && pos < this.dataRun.to;
        let data = known ? pos : native.seekData(this.fd, pos);
        if (data < 0 || data > end) data = end;
        if (data > pos) {
          out.push({ offset: pos, length: data - pos, flags: ExtentFlag.HOLE | ExtentFlag.ZERO });
          pos = data;
          continue;
        }
        let hole = known ? this.dataRun.to : native.seekHole(this.fd, pos);
        if (!known && hole > pos) this.dataRun = { from: pos, to: hole };
        if (hole < 0 || hole > end) hole = end;
        if (hole <= pos) hole = end; // defensive: never loop without progress
        out.push({ offset: pos, length: hole - pos, flags: 0 });
        pos = hole;
      }
    } catch (err) {
      if (!isUnsupported(err)) throw toColoError(err);
      this.canSeek = false;
      return [{ offset, length, flags: 0 }];
    }
    return out;
  }

  async cache(offset: number, length: number): Promise<void> {
    assertRange(this, offset, length);
    // Warm the page cache by reading (posix_fadvise is not reachable from Node);
    // bounded, since CACHE is only a hint.
    const n = Math.min(length, limits.maxPayloadBytes);
    if (n > 0) await this.pread(Buffer.allocUnsafe(n), offset);
  }

  fileRange(offset: number, length: number): FileRange | null {
    assertRange(this, offset, length);
    return this.closed ? null : { fd: this.fd, offset };
  }

  /** New calls are refused (ESHUTDOWN); those in the pool finish first; then a last fdatasync. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.inPool > 0) await new Promise<void>((r) => (this.poolIdle = r));
    if (!this.readOnly) {
      const synced = fdatasyncAsync(this.fd);
      await (ioTracer?.sync(this.path, synced) ?? synced).catch(() => {});
      fs.closeSync(this.fdSync);
    }
    fs.closeSync(this.fd);
  }
}
