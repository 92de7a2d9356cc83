/**
 * Block hashing on every core: a pool of worker threads that hash pieces of
 * a disk (SHA-256 truncated to HASH_BYTES per block, ZERO_MARK for a block of
 * zeroes) while the caller reads the next pieces.
 *
 * Notes on the design:
 * - One worker per core (`os.availableParallelism()`), started on first use
 *   and unref'd, so an idle process is not held open by them.
 * - A piece's buffer is transferred to the worker and back (no copy); the
 *   caller gets it back with the hashes, to read the next piece into.
 * - The worker's code is a string evaluated in the worker (CommonJS, only
 *   node:crypto): it needs no file of its own, so it runs the same from dist/
 *   and from the TypeScript sources under test. It is hashInline and isZero
 *   again, in the one form a worker can load: change them together (the
 *   hash tests compare the pool with one thread against a plain SHA-256).
 * - Small jobs are hashed inline: below POOL_MIN_BYTES a message round trip
 *   costs more than the hash. A pool of size 0 hashes everything inline (the
 *   simulator's: worker threads would make its runs depend on real time).
 */
import { createHash } from 'node:crypto';
import os from 'node:os';
import { Worker } from 'node:worker_threads';

/** Pieces smaller than this are hashed on the calling thread. */
export const POOL_MIN_BYTES = 256 * 1024;

const WORKER_CODE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const ZEROES = Buffer.alloc(65536);
function isZero(b) {
  for (let at = 0; at < b.length; at += ZEROES.length) {
    const end = Math.min(b.length, at + ZEROES.length);
    if (!b.subarray(at, end).equals(ZEROES.subarray(0, end - at))) return false;
  }
  return true;
}
parentPort.on('message', (m) => {
  const buf = Buffer.from(m.ab, 0, m.length);
  const n = Math.ceil(m.length / m.block);
  const out = Buffer.alloc(n * m.hashBytes);
  for (let i = 0; i < n; i++) {
    const b = buf.subarray(i * m.block, Math.min((i + 1) * m.block, m.length));
    if (!isZero(b)) createHash('sha256').update(b).digest().copy(out, i * m.hashBytes, 0, m.hashBytes);
  }
  parentPort.postMessage({ id: m.id, ab: m.ab, hashes: out }, [m.ab]);
});
`;

interface Job {
  resolve: (r: { hashes: Buffer; buffer: ArrayBuffer }) => void;
  reject: (err: Error) => void;
}

interface PoolWorker {
  worker: Worker;
  jobs: number;
}

/** Hash `length` bytes of `ab` in blocks: one digest per block, zero blocks as all-zero digests. */
export function hashInline(buf: Buffer, block: number, hashBytes: number): Buffer {
  const n = Math.ceil(buf.length / block);
  const out = Buffer.alloc(n * hashBytes);
  for (let i = 0; i < n; i++) {
    const b = buf.subarray(i * block, Math.min((i + 1) * block, buf.length));
    if (!isZero(b))
      createHash('sha256')
        .update(b)
        .digest()
        .copy(out, i * hashBytes, 0, hashBytes);
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

export class HashPool {
  private workers: PoolWorker[] = [];
  private readonly pending = new Map<number, Job & { w: PoolWorker }>();
  private nextId = 1;

  constructor(readonly size = Math.max(1, os.availableParallelism())) {}

  /** How many pieces a caller should keep in flight. */
  get depth(): number {
    return Math.max(1, 2 * this.size);
  }

  private start(): void {
    for (let i = 0; i < this.size; i++) {
      const worker = new Worker(WORKER_CODE, { eval: true });
      worker.unref();
      const pw: PoolWorker = { worker, jobs: 0 };
      worker.on('message', (m: { id: number; ab: ArrayBuffer; hashes: Uint8Array }) => {
        const job = this.pending.get(m.id);
        if (!job) return;
        this.pending.delete(m.id);
        pw.jobs--;
        job.resolve({
          hashes: Buffer.from(m.hashes.buffer, m.hashes.byteOffset, m.hashes.byteLength),
          buffer: m.ab,
        });
      });
      worker.on('error', (err) => this.fail(pw, err));
      worker.on('exit', (code) => this.fail(pw, new Error(`a hashing worker exited (${code})`)));
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
  hash(
    buffer: ArrayBuffer,
    length: number,
    block: number,
    hashBytes: number,
  ): Promise<{ hashes: Buffer; buffer: ArrayBuffer }> {
    if (length < POOL_MIN_BYTES || this.size === 0)
      return Promise.resolve({
        hashes: hashInline(Buffer.from(buffer, 0, length), block, hashBytes),
        buffer,
      });
    if (this.workers.length === 0) this.start();
    const w = this.workers.reduce((a, b) => (b.jobs < a.jobs ? b : a));
    const id = this.nextId++;
    w.jobs++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, w });
      w.worker.postMessage({ id, ab: buffer, length, block, hashBytes }, [buffer]);
    });
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
