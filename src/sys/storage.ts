/**
 * The files a node keeps its state in, behind a small interface, so that the
 * replication code can run over the real file system (NodeStorage) or over a
 * simulated one that a test crashes at will (test/sim/storage.ts).
 *
 * Notes on the design:
 * - Only what the state code needs: positional reads and writes, truncate,
 *   fdatasync (async: in the thread pool; a simulated disk completes it when
 *   its scheduler says so), and the namespace operations (list, remove,
 *   rename, a directory sync). Reads and writes are synchronous, as the
 *   journals have always done them (page-cache speed, one writev per turn).
 * - "Durable" means exactly what fdatasync returned for. Everything else may
 *   be lost, kept or torn by a crash: the simulated storage does each.
 * - The I/O trace hooks (block/io-trace.ts) live here, in the real storage,
 *   so every module that writes through it is traced for the power-loss tests.
 * - Disk images are block devices (block/file.ts), not files of this
 *   interface: they have their own I/O paths (thread pool, fallocate).
 */
import { Buffer } from 'node:buffer';
import fs from 'node:fs';
import nodePath from 'node:path';
import { ioTracer } from '../block/io-trace.js';
import { ColoError, toColoError } from '../errors.js';

export interface StorageFile {
  readonly path: string;
  /** The OS descriptor, when there is one (the kernel can then copy from it: copy_file_range). */
  readonly fd: number | null;
  size(): number;
  /** Read into `buf` at `pos`; returns the bytes read (fewer only at the end of the file). */
  read(buf: Buffer, pos: number): number;
  /** Write every buffer, in order, at `pos` (all of it, or throw). */
  writev(buffers: readonly Buffer[], pos: number): void;
  truncate(size: number): void;
  /** Make everything written so far durable. */
  datasync(): Promise<void>;
  datasyncSync(): void;
  close(): void;
}

export interface Storage {
  /** Open for reading and writing, creating the file if it does not exist. */
  open(path: string): StorageFile;
  /** Open an existing file for reading. */
  openRead(path: string): StorageFile;
  exists(path: string): boolean;
  mkdirp(dir: string): void;
  /** Names in a directory ([] if it does not exist). */
  list(dir: string): string[];
  /** Delete a file now (no error if it is gone). */
  remove(path: string): void;
  /** Delete a file off the caller's path (unlinking a large file takes milliseconds); resolves once it is gone. */
  removeLater(path: string): Promise<void>;
  /** Delete a directory and everything below it. */
  removeTree(dir: string): void;
  rename(from: string, to: string): void;
  /** Make the directory's entries (creations, renames) durable. */
  syncDir(dir: string): void;
  /** The same off the caller's path (an fsync of a directory may wait for a file system journal commit). */
  syncDirLater(dir: string): Promise<void>;
  /** Whole-file helpers for small files. */
  readFile(path: string): Buffer;
  /** Replace a small file atomically and durably (temporary file, sync, rename, directory sync). */
  writeFileDurable(path: string, data: Buffer | string): void;
  /** Write a small file with no durability promise (informational files). */
  writeFile(path: string, data: Buffer | string): void;
}

class NodeFile implements StorageFile {
  private closed = false;
  constructor(
    readonly path: string,
    readonly fd: number,
  ) {}

  /** A call after close would reach whatever file has the descriptor number since (or fail: EBADF). */
  private checkOpen(): void {
    if (this.closed) throw new ColoError('ESHUTDOWN', `${this.path} is closed`);
  }

  size(): number {
    this.checkOpen();
    return fs.fstatSync(this.fd).size;
  }

  read(buf: Buffer, pos: number): number {
    this.checkOpen();
    let done = 0;
    while (done < buf.length) {
      const n = fs.readSync(this.fd, buf, done, buf.length - done, pos + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  writev(buffers: readonly Buffer[], pos: number): void {
    this.checkOpen();
    let total = 0;
    for (const b of buffers) total += b.length;
    let written = fs.writevSync(this.fd, buffers as Buffer[], pos);
    if (written < total) {
      // Short write: finish it from one contiguous copy.
      const whole = Buffer.concat(buffers as Buffer[]);
      while (written < total)
        written += fs.writeSync(this.fd, whole, written, total - written, pos + written);
    }
    ioTracer?.write(this.path, pos, buffers);
  }

  truncate(size: number): void {
    this.checkOpen();
    fs.ftruncateSync(this.fd, size);
    ioTracer?.truncate(this.path, size);
  }

  datasync(): Promise<void> {
    if (this.closed) return Promise.reject(new ColoError('ESHUTDOWN', `${this.path} is closed`));
    const done = new Promise<void>((resolve, reject) =>
      fs.fdatasync(this.fd, (err) => (err ? reject(toColoError(err)) : resolve())),
    );
    return ioTracer?.sync(this.path, done) ?? done;
  }

  datasyncSync(): void {
    this.checkOpen();
    fs.fdatasyncSync(this.fd);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}

/** The real file system. */
export class NodeStorage implements Storage {
  open(path: string): StorageFile {
    const creating = ioTracer !== null && !fs.existsSync(path);
    let fd: number;
    try {
      fd = fs.openSync(path, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
    } catch (err) {
      throw toColoError(err);
    }
    if (creating) ioTracer?.create(path);
    return new NodeFile(path, fd);
  }

  openRead(path: string): StorageFile {
    try {
      return new NodeFile(path, fs.openSync(path, 'r'));
    } catch (err) {
      throw toColoError(err);
    }
  }

  exists(path: string): boolean {
    return fs.existsSync(path);
  }

  mkdirp(dir: string): void {
    fs.mkdirSync(dir, { recursive: true });
  }

  list(dir: string): string[] {
    try {
      return fs.readdirSync(dir);
    } catch (err) {
      if ((err as { code?: string }).code === 'ENOENT') return [];
      throw toColoError(err);
    }
  }

  remove(path: string): void {
    fs.rmSync(path, { force: true });
  }

  removeLater(path: string): Promise<void> {
    return new Promise((resolve) => fs.rm(path, { force: true }, () => resolve()));
  }

  removeTree(dir: string): void {
    fs.rmSync(dir, { recursive: true, force: true });
  }

  rename(from: string, to: string): void {
    fs.renameSync(from, to);
  }

  syncDir(dir: string): void {
    const fd = fs.openSync(dir, 'r');
    try {
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    ioTracer?.dirSynced(dir);
  }

  syncDirLater(dir: string): Promise<void> {
    const done = (async () => {
      const handle = await fs.promises.open(dir, 'r');
      try {
        await handle.sync();
      } finally {
        await handle.close();
      }
    })().catch((err) => {
      throw toColoError(err);
    });
    return ioTracer?.dirSync(dir, done) ?? done;
  }

  readFile(path: string): Buffer {
    try {
      return fs.readFileSync(path);
    } catch (err) {
      throw toColoError(err);
    }
  }

  writeFileDurable(path: string, data: Buffer | string): void {
    const tmp = `${path}.tmp`;
    const fd = fs.openSync(tmp, 'w');
    try {
      fs.writeSync(fd, typeof data === 'string' ? Buffer.from(data) : data);
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, path);
    this.syncDir(nodePath.dirname(path));
  }

  writeFile(path: string, data: Buffer | string): void {
    fs.writeFileSync(path, data);
  }
}

export const nodeStorage: Storage = new NodeStorage();

/** Read exactly buf.length bytes at `pos`, or fail. */
export function readFully(file: StorageFile, buf: Buffer, pos: number): void {
  const n = file.read(buf, pos);
  if (n < buf.length)
    throw new ColoError('EIO', `unexpected end of ${file.path} reading ${buf.length} bytes at ${pos}`);
}
