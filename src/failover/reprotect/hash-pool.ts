/**
 * Block hashing on every core: a pool of worker threads that hash pieces of
 * a disk (a digest truncated to HASH_BYTES per block, ZERO_MARK for a block
 * of zeroes) while the caller reads the next pieces.
 *
 * Notes on the design:
 * - Two digests, both cryptographic (a guest must not be able to make two
 *   different blocks compare equal): BLAKE3, from a native package
 *   (@napi-rs/blake-hash, SIMD: 5.5 GB/s a core on the development machine
 *   against SHA-256's 1.8), and SHA-256 from node:crypto, which every build
 *   has. The two sides of a pair hash alike: the secondary says in its hello
 *   which digests it has and the primary names the one it uses in each hash
 *   request (HashAlg; absent: SHA-256, as peers before BLAKE3 expect).
 * - One worker per core (`os.availableParallelism()`), started on first use.
 *   A worker holds the process open only while it has jobs (ref'd then,
 *   unref'd when idle): an idle pool never keeps a process from exiting, and
 *   a command waiting on its hashes is not left with an empty event loop.
 * - A piece's buffer is transferred to the worker and back (no copy); the
 *   caller gets it back with the hashes, to read the next piece into.
 * - Or the worker reads the bytes itself (hashFile): a range that lies as is
 *   in an open file goes as (descriptor, position, length), and only the
 *   hashes come back. No thread-pool read, no buffer crossing threads, no
 *   wake-up between the read and the hash. A full sync of two identical
 *   4 GiB images (medians of alternated runs): each node on a core of its
 *   own 2.1 -> 2.7 GB/s, unpinned 1.7 -> 2.4 GB/s.
 * - The worker's code is a string evaluated in the worker (CommonJS): it
 *   needs no file of its own, so it runs the same from dist/ and from the
 *   TypeScript sources under test; it loads the BLAKE3 package by the path
 *   resolved here. It is hashInline and isZero again, in the one form a
 *   worker can load: change them together (the hash tests compare the pool
 *   with one thread against a plain digest of every block).
 * - Small jobs are hashed inline: below POOL_MIN_BYTES a message round trip
 *   costs more than the hash. A pool of size 0 hashes everything inline (the
 *   simulator's: worker threads would make its runs depend on real time).
 */
import { Buffer } from 'node:buffer';
import process from 'node:process';
import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { ColoError } from '../../errors.js';

/** Pieces smaller than this are hashed on the calling thread. */
export const POOL_MIN_BYTES = 256 * 1024;
/** Bytes read (and hashed in one job) per piece, whatever the block size. */
export const PIECE = 1024 * 1024;
/** Piece buffers a pool keeps for later calls: a resync hashes a few chunks at once, each `depth` pieces deep. */
const IDLE_BUFFERS = 32;

/** A block digest: 'sha256' is what every build has (and what a hash request without `alg` means). */
export type HashAlg = 'sha256' | 'blake3';
export const HASH_ALGS: readonly HashAlg[] = ['blake3', 'sha256'];

interface Blake3Module {
  blake3(input: Uint8Array): Buffer;
  Blake3Hasher: new () => { update(input: Uint8Array): unknown; digestBuffer(): Buffer };
}

/**
 * The BLAKE3 package and its path (for the workers), or null: not installed
 * (no build for this platform), failing its known answer, or turned off with
 * COLO_BLK_NO_BLAKE3=1 (this node then hashes, and asks its peer to hash,
 * with SHA-256).
 */
function loadBlake3(): { mod: Blake3Module; path: string } | null {
  if (process.env.COLO_BLK_NO_BLAKE3) return null;
  try {
    const require = createRequire(import.meta.url);
    const path = require.resolve('@napi-rs/blake-hash');
    const mod = require(path) as Blake3Module;
    // The digest of no bytes, from the BLAKE3 specification's test vectors.
    const empty = 'af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262';
    if (mod.blake3(Buffer.alloc(0)).toString('hex') !== empty) return null;
    return { mod, path };
  } catch {
    return null;
  }
}

const blake3 = loadBlake3();

/** The digests this process can compute, the fastest first. */
export const localHashAlgs: readonly HashAlg[] = blake3 ? ['blake3', 'sha256'] : ['sha256'];

/** The digest two nodes hash with: the first of `mine` that `theirs` has (SHA-256, which every node has, at worst). */
export function commonHashAlg(mine: readonly HashAlg[], theirs: readonly HashAlg[]): HashAlg {
  return mine.find((a) => theirs.includes(a)) ?? 'sha256';
}

/** A one-shot digest of `b` (at least HASH_BYTES long). */
function digest(alg: HashAlg, b: Uint8Array): Buffer {
  if (alg === 'blake3') return blake3!.mod.blake3(b);
  return createHash('sha256').update(b).digest();
}

/** A digest fed piece by piece (a block larger than a piece). */
export function hasher(alg: HashAlg): { update(b: Uint8Array): void; digest(): Buffer } {
  if (alg === 'blake3') {
    const h = new blake3!.mod.Blake3Hasher();
    return { update: (b) => void h.update(b), digest: () => h.digestBuffer() };
  }
  const h = createHash('sha256');
  return { update: (b) => void h.update(b), digest: () => h.digest() };
}

const WORKER_CODE = `
const { parentPort, workerData } = require('node:worker_threads');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const blake3 = workerData.blake3 ? require(workerData.blake3).blake3 : null;
const ZEROES = Buffer.alloc(65536);
function isZero(b) {
  for (let at = 0; at < b.length; at += ZEROES.length) {
    const end = Math.min(b.length, at + ZEROES.length);
    if (!b.subarray(at, end).equals(ZEROES.subarray(0, end - at))) return false;
  }
  return true;
}
function hashBlocks(buf, m, out, first) {
  const n = Math.ceil(buf.length / m.block);
  for (let i = 0; i < n; i++) {
    const b = buf.subarray(i * m.block, Math.min((i + 1) * m.block, buf.length));
    if (isZero(b)) continue;
    const d = m.alg === 'blake3' ? blake3(b) : createHash('sha256').update(b).digest();
    d.copy(out, (first + i) * m.hashBytes, 0, m.hashBytes);
  }
}
let piece = null;
function hashFile(m) {
  const out = Buffer.alloc(Math.ceil(m.length / m.block) * m.hashBytes);
  if (piece === null || piece.length < m.piece) piece = Buffer.allocUnsafe(m.piece);
  const per = Math.max(1, Math.floor(m.piece / m.block)) * m.block;
  for (let at = 0; at < m.length; at += per) {
    const view = piece.subarray(0, Math.min(per, m.length - at));
    for (let done = 0; done < view.length;) {
      const n = fs.readSync(m.fd, view, done, view.length - done, m.position + at + done);
      if (n === 0) {
        view.fill(0, done); // past the end of a short file
        break;
      }
      done += n;
    }
    hashBlocks(view, m, out, at / m.block);
  }
  return out;
}
parentPort.on('message', (m) => {
  if (m.fd !== undefined) {
    let hashes;
    try {
      hashes = hashFile(m);
    } catch (err) {
      parentPort.postMessage({ id: m.id, error: String(err && err.message), code: err && err.code });
      return;
    }
    parentPort.postMessage({ id: m.id, hashes });
    return;
  }
  const buf = Buffer.from(m.ab, 0, m.length);
  const out = Buffer.alloc(Math.ceil(m.length / m.block) * m.hashBytes);
  hashBlocks(buf, m, out, 0);
  parentPort.postMessage({ id: m.id, ab: m.ab, hashes: out }, [m.ab]);
});
`;

/** What a worker answers a job with. */
interface JobReply {
  id: number;
  hashes?: Uint8Array;
  /** A buffer job's buffer, back. */
  ab?: ArrayBuffer;
  /** A file job's failure (its read): message and errno code. */
  error?: string;
  code?: string;
}

interface Job {
  resolve: (r: JobReply) => void;
  reject: (err: Error) => void;
}

interface PoolWorker {
  worker: Worker;
  jobs: number;
}

/** Hash `buf` in blocks: one digest per block, zero blocks as all-zero digests. */
export function hashInline(buf: Buffer, block: number, hashBytes: number, alg: HashAlg = 'sha256'): Buffer {
  const n = Math.ceil(buf.length / block);
  const out = Buffer.alloc(n * hashBytes);
  for (let i = 0; i < n; i++) {
    const b = buf.subarray(i * block, Math.min((i + 1) * block, buf.length));
    if (!isZero(b)) digest(alg, b).copy(out, i * hashBytes, 0, hashBytes);
  }
  return out;
}

const ZEROES = Buffer.alloc(64 * 1024);
export function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZEROES.length) {
    const end = Math.min(buf.length, at + ZEROES.length);
    if (!buf.subarray(at, end).equals(ZEROES.subarray(0, end - at))) return false;
  }
  return true;
}

function hashesOf(m: JobReply): Buffer {
  const h = m.hashes!;
  return Buffer.from(h.buffer, h.byteOffset, h.byteLength);
}

export class HashPool {
  private workers: PoolWorker[] = [];
  private readonly pending = new Map<number, Job & { w: PoolWorker }>();
  private nextId = 1;
  /**
   * Piece buffers kept between calls (at most IDLE_BUFFERS): a fresh megabyte costs its page
   * faults, which halved the rate of hashing 4 MiB at a time.
   */
  private idle: ArrayBuffer[] = [];

  constructor(
    readonly size = Math.max(1, os.availableParallelism()),
    /** The digests it computes (tests and the simulator leave BLAKE3 out to stand for a node without it). */
    readonly algs: readonly HashAlg[] = localHashAlgs,
  ) {
    for (const a of algs)
      if (!localHashAlgs.includes(a)) throw new Error(`a hash pool cannot compute ${a} in this process`);
  }

  /** Throws ENOTSUP unless this pool hashes with `alg`. */
  check(alg: HashAlg): void {
    if (!this.algs.includes(alg)) throw new ColoError('ENOTSUP', `this node does not hash with ${alg}`);
  }

  /** How many pieces a caller should keep in flight. */
  get depth(): number {
    return Math.max(1, 2 * this.size);
  }

  private start(): void {
    for (let i = 0; i < this.size; i++) {
      // No execArgv of the process: --input-type=module (say) would make the CommonJS code a module.
      const worker = new Worker(WORKER_CODE, {
        eval: true,
        execArgv: [],
        workerData: { blake3: blake3?.path ?? null },
      });
      const pw: PoolWorker = { worker, jobs: 0 };
      worker.on('message', (m: JobReply) => {
        const job = this.pending.get(m.id);
        if (!job) return;
        this.pending.delete(m.id);
        if (--pw.jobs === 0) worker.unref();
        job.resolve(m);
      });
      worker.on('error', (err) => this.fail(pw, err));
      worker.on('exit', (code) => this.fail(pw, new Error(`a hashing worker exited (${code})`)));
      // After the listeners: adding a 'message' listener refs the worker again.
      worker.unref();
      this.workers.push(pw);
    }
  }

  private fail(pw: PoolWorker, err: Error): void {
    this.workers = this.workers.filter((w) => w !== pw);
    for (const [id, job] of this.pending)
      if (job.w === pw) {
        this.pending.delete(id);
        job.reject(err);
      }
  }

  /**
   * Hash the first `length` bytes of `buffer` (transferred: the caller must
   * not touch it until it comes back in the result).
   */
  async hash(
    buffer: ArrayBuffer,
    length: number,
    block: number,
    hashBytes: number,
    alg: HashAlg = 'sha256',
  ): Promise<{ hashes: Buffer; buffer: ArrayBuffer }> {
    this.check(alg);
    if (length < POOL_MIN_BYTES || this.size === 0)
      return { hashes: hashInline(Buffer.from(buffer, 0, length), block, hashBytes, alg), buffer };
    const m = await this.post({ ab: buffer, length, block, hashBytes, alg }, [buffer]);
    return { hashes: hashesOf(m), buffer: m.ab! };
  }

  /**
   * Hash `length` bytes of the open file `fd` from `position` (zeroes past its
   * end), read by the worker that hashes them: the bytes never cross a thread.
   * `fd` must stay open until the promise settles; `block` at most PIECE; a
   * pool of workers only (blockHashes hashes inline without them).
   */
  async hashFile(
    fd: number,
    position: number,
    length: number,
    block: number,
    hashBytes: number,
    alg: HashAlg = 'sha256',
  ): Promise<Buffer> {
    this.check(alg);
    if (block > PIECE) throw new Error(`hashFile: a block of ${block} bytes is larger than a piece`);
    if (this.size === 0) throw new Error('hashFile: a pool without workers hashes no file');
    const m = await this.post({ fd, position, length, block, hashBytes, alg, piece: PIECE });
    if (m.error !== undefined) throw Object.assign(new Error(m.error), m.code ? { code: m.code } : {});
    return hashesOf(m);
  }

  /** Send a job to the least busy worker (starting them on first use); its reply. */
  private post(msg: Record<string, unknown>, transfer: ArrayBuffer[] = []): Promise<JobReply> {
    if (this.workers.length === 0) this.start();
    const w = this.workers.reduce((a, b) => (b.jobs < a.jobs ? b : a));
    const id = this.nextId++;
    if (w.jobs++ === 0) w.worker.ref();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, w });
      w.worker.postMessage({ id, ...msg }, transfer);
    });
  }

  /** A buffer of PIECE bytes to read a piece into: one an earlier call gave back, or a new one. */
  buffer(): ArrayBuffer {
    return this.idle.pop() ?? new ArrayBuffer(PIECE);
  }

  /** Keep a piece buffer for later calls (one sent to a worker and not back has no bytes: dropped). */
  recycle(ab: ArrayBuffer): void {
    if (ab.byteLength === PIECE && this.idle.length < IDLE_BUFFERS) this.idle.push(ab);
  }

  /** Stop the workers (tests; a process exits without it). */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    await Promise.all(ws.map((w) => w.worker.terminate()));
  }
}

/** The process's pool. */
export const hashPool = new HashPool();
