/**
 * Differential test: one seeded random workload issued through our NbdClient
 * to colo-blk (MemoryDevice) and to nbdkit's memory plugin at the same time,
 * in each of the client's reply modes. Every read is compared byte for byte
 * between the two servers and against a local model of the image, block
 * status answers are checked against the model, and the whole image is
 * compared at the end.
 *
 * The workload is pipelined over two connections per server (both servers
 * advertise CAN_MULTI_CONN): ops are sent in batches of up to 16 requests in
 * flight, each on a randomly chosen connection, where no two ops of a batch
 * touch overlapping bytes if either of them changes data (so the result does
 * not depend on the order in which a server runs them or answers them). A
 * batch is sent only after the previous one was fully answered, so a read
 * must see every write completed before it on either connection.
 *
 * Trims: the NBD spec leaves trimmed bytes unspecified. We keep every trim
 * aligned to 64 KiB (offset and length; a trim may also run to the end of the
 * export), the page size of colo-blk's MemoryDevice. Both servers then read a
 * trimmed range back as zeroes (colo-blk drops the whole pages, nbdkit's memory
 * plugin zeroes), so the model zeroes it too and reads of trimmed bytes are
 * compared like any others.
 *
 * Replay: every failure message carries the seed; run it again with
 *   COLO_DIFF_SEED=<seed> npx vitest run test/differential.test.ts -t '<mode>'
 * (COLO_DIFF_OPS=<n> runs a longer workload.)
 */
import { afterAll, expect, it } from 'vitest';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdClient, type ClientExtent, type ConnectOptions } from '../src/net/client.js';
import { StateFlag, TxFlag } from '../src/net/protocol.js';
import { killAll, prng, randomBytes, startServer, type RunningServer } from './helpers.js';
import { sha256, startNbdkitMemory, type Nbdkit } from './interop-helpers.js';
import { describeWith } from './tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
/** Not a multiple of the 64 KiB page size, so the partial last page gets exercised. */
const SIZE = 32 * MiB + 12 * KiB + 512;
const TRIM_ALIGN = 64 * KiB;
/** Ops per reply mode; COLO_DIFF_OPS raises it for a longer soak. */
const OPS = Number(process.env.COLO_DIFF_OPS) || 2000;
const MAX_BATCH = 16;
/** Connections per server; an op goes to a random one of them. */
const CONNS = 2;

const SEED = process.env.COLO_DIFF_SEED
  ? Number(process.env.COLO_DIFF_SEED) >>> 0
  : (Math.random() * 2 ** 32) >>> 0;
console.log(`differential: seed ${SEED} (replay with COLO_DIFF_SEED=${SEED})`);

type Op =
  | { kind: 'write'; off: number; len: number; fua: boolean; data: Buffer }
  | { kind: 'zero'; off: number; len: number; noHole: boolean; fua: boolean; fastZero: boolean }
  | { kind: 'trim'; off: number; len: number; fua: boolean }
  | { kind: 'flush' }
  | { kind: 'read'; off: number; len: number; df: boolean }
  | { kind: 'status'; off: number; len: number; reqOne: boolean }
  | { kind: 'cache'; off: number; len: number };

function describeOp(op: Op): string {
  switch (op.kind) {
    case 'flush':
      return 'flush';
    case 'write':
      return `write off=${op.off} len=${op.len}${op.fua ? ' fua' : ''}`;
    case 'zero':
      return `zero off=${op.off} len=${op.len}${op.noHole ? ' no_hole' : ''}${op.fua ? ' fua' : ''}${op.fastZero ? ' fast_zero' : ''}`;
    case 'trim':
      return `trim off=${op.off} len=${op.len}${op.fua ? ' fua' : ''}`;
    case 'read':
      return `read off=${op.off} len=${op.len}${op.df ? ' df' : ''}`;
    case 'status':
      return `block_status off=${op.off} len=${op.len}${op.reqOne ? ' req_one' : ''}`;
    case 'cache':
      return `cache off=${op.off} len=${op.len}`;
  }
}

/** An op as scheduled: its number in the workload and the connection it goes to. */
interface Planned {
  op: Op;
  index: number;
  conn: number;
}

function mutates(op: Op): boolean {
  return op.kind === 'write' || op.kind === 'zero' || op.kind === 'trim';
}

/** The seeded op generator. */
class Workload {
  private readonly rand: () => number;
  constructor(
    seed: number,
    private readonly withStatus: boolean,
    private readonly withDf: boolean,
  ) {
    this.rand = prng(seed);
  }

  private below(n: number): number {
    return Math.floor((this.rand() / 2 ** 32) * n);
  }

  private chance(p: number): boolean {
    return this.rand() / 2 ** 32 < p;
  }

  /** Lengths: mostly small and unaligned, some medium, a few large. */
  private length(max: number): number {
    const r = this.below(100);
    let len: number;
    if (r < 35) len = 1 + this.below(4096);
    else if (r < 55) len = 512 * (1 + this.below(128));
    else if (r < 85) len = 1 + this.below(256 * KiB);
    else len = 1 + this.below(max);
    return Math.min(len, SIZE);
  }

  /** Offsets: uniform, 4 KiB or 64 KiB aligned, near a page boundary, or at the end of the export. */
  private offset(len: number): number {
    const room = SIZE - len;
    const r = this.below(100);
    let off: number;
    if (r < 40) off = this.below(room + 1);
    else if (r < 55) off = 4096 * this.below(Math.floor(room / 4096) + 1);
    else if (r < 70) off = TRIM_ALIGN * this.below(Math.floor(room / TRIM_ALIGN) + 1);
    else if (r < 88)
      off = TRIM_ALIGN * (1 + this.below(Math.floor(SIZE / TRIM_ALIGN))) - 1 - this.below(len + 64);
    else off = room - this.below(Math.min(room, 4096) + 1);
    return Math.max(0, Math.min(room, off));
  }

  /** Which connection an op goes to. */
  connection(): number {
    return this.below(CONNS);
  }

  /** How many requests the next batch may keep in flight. */
  batchSize(): number {
    return 1 + this.below(MAX_BATCH);
  }

  next(): Op {
    const r = this.below(100);
    if (r < 25) {
      const len = this.length(1 * MiB);
      return { kind: 'write', off: this.offset(len), len, fua: false, data: randomBytes(len, this.rand) };
    }
    if (r < 33) {
      const len = this.length(512 * KiB);
      return { kind: 'write', off: this.offset(len), len, fua: true, data: randomBytes(len, this.rand) };
    }
    if (r < 45) {
      const len = this.chance(0.1) ? 1 + this.below(8 * MiB) : this.length(2 * MiB);
      return {
        kind: 'zero',
        off: this.offset(len),
        len,
        noHole: this.chance(0.5),
        fua: this.chance(0.2),
        fastZero: this.chance(0.1),
      };
    }
    if (r < 53) {
      const pages = Math.floor(SIZE / TRIM_ALIGN);
      const off = TRIM_ALIGN * this.below(pages + 1);
      const len = Math.min(TRIM_ALIGN * (1 + this.below(32)), SIZE - off);
      if (len === 0) return { kind: 'flush' };
      return { kind: 'trim', off, len, fua: this.chance(0.2) };
    }
    if (r < 58) return { kind: 'flush' };
    if (r < 60) {
      const len = this.length(1 * MiB);
      return { kind: 'cache', off: this.offset(len), len };
    }
    if (r < 66 && this.withStatus) {
      const len = this.chance(0.2) ? 1 + this.below(SIZE) : this.length(4 * MiB);
      return { kind: 'status', off: this.offset(len), len, reqOne: this.chance(0.3) };
    }
    const len = this.length(1 * MiB);
    return { kind: 'read', off: this.offset(len), len, df: this.withDf && this.chance(0.2) };
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

const ZEROES = Buffer.alloc(1 * MiB);

function isZero(buf: Buffer): boolean {
  for (let pos = 0; pos < buf.length; pos += ZEROES.length) {
    const n = Math.min(ZEROES.length, buf.length - pos);
    if (!buf.subarray(pos, pos + n).equals(ZEROES.subarray(0, n))) return false;
  }
  return true;
}

type Result = Buffer | ClientExtent[] | void;

function exec(client: NbdClient, op: Op): Promise<Result> {
  switch (op.kind) {
    case 'write':
      return client.write(op.data, op.off, { fua: op.fua });
    case 'zero':
      return client.zero(op.off, op.len, { noHole: op.noHole, fua: op.fua, fastZero: op.fastZero });
    case 'trim':
      return client.trim(op.off, op.len, { fua: op.fua });
    case 'flush':
      return client.flush();
    case 'read':
      return client.read(op.off, op.len, { df: op.df });
    case 'status':
      return client.blockStatus(op.off, op.len, { reqOne: op.reqOne });
    case 'cache':
      return client.cache(op.off, op.len);
  }
}

function applyToModel(model: Buffer, op: Op): void {
  if (op.kind === 'write') op.data.copy(model, op.off);
  else if (op.kind === 'zero' || op.kind === 'trim') model.fill(0, op.off, op.off + op.len);
}

/**
 * A block-status answer must describe the range from its start, in extents of
 * non-zero length, and whatever it flags ZERO must read as zero.
 */
function checkStatus(
  model: Buffer,
  op: Extract<Op, { kind: 'status' }>,
  extents: ClientExtent[],
  strict: boolean,
): string | null {
  if (extents.length === 0) return 'no extents';
  if (op.reqOne && extents.length !== 1) return `${extents.length} extents with REQ_ONE`;
  let pos = op.off;
  for (const [i, e] of extents.entries()) {
    if (!(e.length > 0)) return `extent ${i} has length ${e.length}`;
    if (i < extents.length - 1 && pos + e.length >= op.off + op.len)
      return `extent ${i} reaches the end of the request but more follow`;
    const end = Math.min(pos + e.length, op.off + op.len, SIZE);
    if (e.flags & StateFlag.ZERO && !isZero(model.subarray(pos, end)))
      return `extent ${i} [${pos}, ${pos + e.length}) is flagged ZERO but the model has data at ${
        pos + firstDiff(model.subarray(pos, end), Buffer.alloc(end - pos))
      }`;
    pos += e.length;
  }
  if (pos > SIZE) return `extents run to ${pos}, past the end of the export (${SIZE})`;
  // colo-blk promises never to describe more than was asked (BlockDevice.extents).
  if (strict && pos > op.off + op.len)
    return `extents cover ${pos - op.off} bytes, more than the ${op.len} asked`;
  return null;
}

const modes: {
  mode: 'extended' | 'structured' | 'simple';
  opts: Partial<ConnectOptions>;
  kitMode: string;
}[] = [
  // nbdkit 1.32 has no extended headers: the client falls back to structured replies there.
  { mode: 'extended', opts: {}, kitMode: 'structured' },
  { mode: 'structured', opts: { extended: false }, kitMode: 'structured' },
  { mode: 'simple', opts: { extended: false, structured: false }, kitMode: 'simple' },
];

afterAll(async () => {
  await killAll();
});

describeWith(['nbdkit'], 'differential: colo-blk MemoryDevice vs nbdkit memory', () => {
  it.each(modes)('$mode replies: same bytes for a random workload', async ({ mode, opts, kitMode }) => {
    const seed = SEED;
    const tag = `seed=${seed} mode=${mode}`;
    let srv: RunningServer | undefined;
    let kit: Nbdkit | undefined;
    const clients: NbdClient[] = [];
    try {
      srv = await startServer(new MemoryDevice(SIZE));
      kit = await startNbdkitMemory(SIZE);
      // CONNS connections to each server (both advertise CAN_MULTI_CONN); each op goes to one of them.
      const coloConns: NbdClient[] = [];
      const refConns: NbdClient[] = [];
      for (let i = 0; i < CONNS; i++) {
        const c = await NbdClient.connect({ port: srv.port, exportName: 'disk0', ...opts });
        clients.push(c);
        coloConns.push(c);
        const r = await NbdClient.connect({ port: kit.port, exportName: '', ...opts });
        clients.push(r);
        refConns.push(r);
        expect(c.mode, tag).toBe(mode);
        expect(r.mode, tag).toBe(kitMode);
        expect(c.size).toBe(SIZE);
        expect(r.size).toBe(SIZE);
        expect(c.hasFlag(TxFlag.CAN_MULTI_CONN), tag).toBe(true);
        expect(r.hasFlag(TxFlag.CAN_MULTI_CONN), tag).toBe(true);
      }
      const [colo, ref] = [coloConns[0], refConns[0]];

      const model = Buffer.alloc(SIZE);
      const work = new Workload(seed, mode !== 'simple', mode !== 'simple');
      const counts: Record<string, number> = {};
      let bytesCompared = 0;
      let opIndex = 0;

      const runBatch = async (batch: Planned[]) => {
        const results = await Promise.all(
          batch.map(({ op, index, conn }) =>
            Promise.all([
              exec(coloConns[conn], op).catch((err: Error) => {
                throw new Error(
                  `${tag} op #${index} ${describeOp(op)} conn ${conn}: colo-blk failed: ${err.message}`,
                );
              }),
              exec(refConns[conn], op).catch((err: Error) => {
                throw new Error(
                  `${tag} op #${index} ${describeOp(op)} conn ${conn}: nbdkit failed: ${err.message}`,
                );
              }),
            ]),
          ),
        );
        // Ops in a batch touch disjoint bytes, so every check can use the model before the batch's changes.
        for (const [i, { op, index, conn }] of batch.entries()) {
          const [a, b] = results[i];
          const where = `${tag} op #${index} ${describeOp(op)} conn ${conn}`;
          if (op.kind === 'read') {
            const want = model.subarray(op.off, op.off + op.len);
            const got = a as Buffer;
            const other = b as Buffer;
            const d1 = firstDiff(got, want);
            if (d1 >= 0)
              throw new Error(
                `${where}: colo-blk differs from the model at offset ${op.off + d1}: got 0x${got[d1]?.toString(16)}, want 0x${want[d1]?.toString(16)} (nbdkit has 0x${other[d1]?.toString(16)})`,
              );
            const d2 = firstDiff(other, want);
            if (d2 >= 0)
              throw new Error(
                `${where}: nbdkit differs from the model at offset ${op.off + d2}: got 0x${other[d2]?.toString(16)}, want 0x${want[d2]?.toString(16)}`,
              );
            bytesCompared += op.len;
          } else if (op.kind === 'status') {
            const e1 = checkStatus(model, op, a as ClientExtent[], true);
            if (e1) throw new Error(`${where}: colo-blk block status: ${e1}: ${JSON.stringify(a)}`);
            const e2 = checkStatus(model, op, b as ClientExtent[], false);
            if (e2) throw new Error(`${where}: nbdkit block status: ${e2}: ${JSON.stringify(b)}`);
          }
        }
        for (const { op } of batch) applyToModel(model, op);
      };

      let batch: Planned[] = [];
      let batchLimit = 1;
      const overlaps = (op: Op) =>
        'off' in op &&
        batch.some(
          ({ op: o }) =>
            'off' in o && (mutates(op) || mutates(o)) && op.off < o.off + o.len && o.off < op.off + op.len,
        );
      for (; opIndex < OPS; opIndex++) {
        const op = work.next();
        counts[op.kind] = (counts[op.kind] ?? 0) + 1;
        if (batch.length >= batchLimit || overlaps(op)) {
          await runBatch(batch);
          batch = [];
          batchLimit = work.batchSize();
        }
        batch.push({ op, index: opIndex, conn: work.connection() });
      }
      await runBatch(batch);
      await Promise.all([colo.flush(), ref.flush()]);

      // Final full-image comparison: both servers against the model, chunk by chunk.
      const chunk = 4 * MiB;
      const imgA: Buffer[] = [];
      const imgB: Buffer[] = [];
      for (let off = 0; off < SIZE; off += chunk) {
        const len = Math.min(chunk, SIZE - off);
        const [a, b] = await Promise.all([colo.read(off, len), ref.read(off, len)]);
        const want = model.subarray(off, off + len);
        const d1 = firstDiff(a, want);
        if (d1 >= 0)
          throw new Error(`${tag} final image: colo-blk differs from the model at offset ${off + d1}`);
        const d2 = firstDiff(b, want);
        if (d2 >= 0)
          throw new Error(`${tag} final image: nbdkit differs from the model at offset ${off + d2}`);
        imgA.push(a);
        imgB.push(b);
      }
      expect(sha256(Buffer.concat(imgA)), tag).toBe(sha256(model));
      expect(sha256(Buffer.concat(imgB)), tag).toBe(sha256(model));

      // The workload did what it was meant to do.
      for (const kind of ['write', 'zero', 'trim', 'flush', 'read', 'cache'])
        expect(counts[kind], `${tag} ${kind} ops`).toBeGreaterThan(10);
      if (mode !== 'simple') expect(counts.status, `${tag} block status ops`).toBeGreaterThan(10);
      expect(bytesCompared, tag).toBeGreaterThan(10 * MiB);
      expect(isZero(model), tag).toBe(false);
    } finally {
      for (const c of clients) await c.close().catch(() => c.destroy());
      await srv?.close();
      await kit?.stop();
    }
  });
});
