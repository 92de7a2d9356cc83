/**
 * A power-loss simulator over an I/O trace (src/block/io-trace.ts).
 *
 * Given the files as they were when tracing started (taken to be durable) and
 * the trace, `powerCut(k)` computes what a disk holds after the power fails
 * between event k-1 and event k:
 *
 * - Data. Per file (per inode: a deleted file keeps its own history), every
 *   write, zeroing or truncation recorded before the *start* of the file's
 *   last fdatasync that *returned* before the cut is on disk. So is every
 *   O_DSYNC write that returned (FUA: durable on return, but no barrier for
 *   the file's other writes). The later ones ("unsynced") reached the disk or
 *   not, as the page cache happened to write them back: all, none, a prefix
 *   or any subset of them, chosen by a seeded generator; and the last one that
 *   did is torn (only a prefix of its bytes, cut at a 512-byte sector boundary
 *   or at any byte), the file's size then ending at the tear or at the full
 *   write. A harsher policy, 'pages', keeps each 4 KiB page of the unsynced
 *   writes or not independently (write-back in any order, as a disk's
 *   volatile cache may also reorder), so a torn frame can be followed by an
 *   intact one.
 * - Metadata (create, delete, rename). Modelled as on a journaling file
 *   system (ext4 data=ordered, XFS): namespace operations persist in the
 *   order they were made, as a prefix of the sequence, never out of order;
 *   and an fdatasync of a newly created file that returned makes its creation
 *   (and so everything before it) durable, because it forces the metadata
 *   journal past that point. Past the last such point a seeded number of
 *   further operations persisted; so did every operation made before a
 *   directory fsync that returned. This is stronger than bare POSIX, which
 *   makes a new directory entry durable only by an fsync of the directory:
 *   colo-blk fsyncs a directory only where a rename must be durable (a
 *   recycled journal, a replaced small file), so under bare POSIX no journal
 *   it creates would survive a power cut — the test would only say that.
 *   (Deletions are never forced: an applied epoch journal or a discarded
 *   overlay may come back after a cut, and recovery must cope.)
 * - LevelDB (meta/) is not traced: it is only an index rebuilt from the
 *   journals, so a simulated state has none (the worst case: recovery must
 *   rebuild everything from the journals alone).
 */
import fs from 'node:fs';
import path from 'node:path';
import type { IoEvent, IoTraceSink } from '../src/block/io-trace.js';

export class TraceRecorder implements IoTraceSink {
  readonly events: IoEvent[] = [];

  record(ev: IoEvent): void {
    this.events.push(ev);
  }

  /** Events so far: an action that completes now happened after events [0, position). */
  get position(): number {
    return this.events.length;
  }
}

/** Every regular file below `root` (absolute path → a copy of its bytes), except under the named subdirectories. */
export function snapshotFiles(root: string, skip: string[] = []): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  const walk = (dir: string) => {
    for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
      const p = path.join(dir, ent.name);
      if (ent.isDirectory()) {
        if (!skip.includes(path.relative(root, p))) walk(p);
      } else if (ent.isFile()) out.set(p, fs.readFileSync(p));
    }
  };
  walk(root);
  return out;
}

/** Write a simulated state (paths below `from`) into the directory `to`. */
export function materialize(files: Map<string, Buffer>, from: string, to: string): void {
  fs.mkdirSync(to, { recursive: true });
  for (const [p, data] of files) {
    const rel = path.relative(from, p);
    if (rel.startsWith('..')) continue;
    const dest = path.join(to, rel);
    fs.mkdirSync(path.dirname(dest), { recursive: true });
    fs.writeFileSync(dest, data);
  }
}

export type Writeback = 'none' | 'all' | 'prefix' | 'subset' | 'pages';

export interface CutOptions {
  /** What happened to each file's unsynced writes; 'mixed' draws one policy per file. */
  writeback: Writeback | 'mixed';
  /** How the last unsynced write that reached the disk was torn. */
  tear: 'none' | 'sector' | 'byte';
  /** How many namespace operations persisted beyond the guaranteed ones. */
  metadata: 'guaranteed' | 'random' | 'all';
}

export interface CutState {
  files: Map<string, Buffer>;
  /** What the generator chose, for failure messages. */
  notes: string[];
}

type DataEvent = Extract<IoEvent, { op: 'write' | 'zero' | 'truncate' }>;

interface Inode {
  name: string;
  base: Buffer;
  /** Trace index of its creation (-1: existed when tracing started). */
  createdAt: number;
  ops: { idx: number; ev: DataEvent }[];
  syncs: { start: number; end: number }[];
}

interface MetaOp {
  idx: number;
  kind: 'create' | 'delete' | 'rename';
  path: string;
  to?: string;
  inode: Inode;
}

const EMPTY = Buffer.alloc(0);
const PAGE = 4096;

/** A data operation, or the part [from, keepBytes) of it that reached the disk. */
interface Piece {
  idx: number;
  ev: DataEvent;
  from?: number;
  keepBytes?: number;
  /** A torn write whose file size grew to its full end all the same. */
  fullSize?: boolean;
}

function pickInt(rand: () => number, lo: number, hi: number): number {
  // inclusive bounds
  return lo + (rand() % (hi - lo + 1));
}

/**
 * The files after a power cut between events k-1 and k. `rand` returns
 * 32-bit unsigned integers (test/helpers.ts prng).
 */
export function powerCut(
  initial: Map<string, Buffer>,
  events: IoEvent[],
  k: number,
  opts: CutOptions,
  rand: () => number,
): CutState {
  const notes: string[] = [`cut before event ${k} of ${events.length}`];
  const ns = new Map<string, Inode>();
  const mkInode = (name: string, base: Buffer, createdAt: number): Inode => ({
    name,
    base,
    createdAt,
    ops: [],
    syncs: [],
  });
  for (const [p, data] of initial) ns.set(p, mkInode(p, data, -1));
  const startNs = new Map(ns);
  const metaOps: MetaOp[] = [];
  const syncById = new Map<number, { inode: Inode; s: { start: number; end: number } }>();
  /** Directory syncs: the trace index where each started, by id, and those that returned. */
  const dirSyncStart = new Map<number, number>();
  let dirSynced = -1;
  const need = (p: string, i: number): Inode => {
    const ino = ns.get(p);
    if (!ino) throw new Error(`trace event ${i} (${events[i].op}) names ${p}, which is not a known file`);
    return ino;
  };
  for (let i = 0; i < k; i++) {
    const ev = events[i];
    switch (ev.op) {
      case 'create': {
        const ino = mkInode(ev.path, EMPTY, i);
        ns.set(ev.path, ino);
        metaOps.push({ idx: i, kind: 'create', path: ev.path, inode: ino });
        break;
      }
      case 'delete': {
        const ino = need(ev.path, i);
        ns.delete(ev.path);
        metaOps.push({ idx: i, kind: 'delete', path: ev.path, inode: ino });
        break;
      }
      case 'rename': {
        const ino = need(ev.path, i);
        ns.delete(ev.path);
        ns.set(ev.to, ino);
        metaOps.push({ idx: i, kind: 'rename', path: ev.path, to: ev.to, inode: ino });
        break;
      }
      case 'write':
      case 'zero':
      case 'truncate':
        need(ev.path, i).ops.push({ idx: i, ev });
        break;
      case 'sync': {
        const inode = need(ev.path, i);
        const s = { start: i, end: Infinity };
        inode.syncs.push(s);
        syncById.set(ev.id, { inode, s });
        break;
      }
      case 'synced': {
        const s = syncById.get(ev.id);
        if (s) s.s.end = i;
        break;
      }
      case 'dirsync':
        dirSyncStart.set(ev.id, i);
        break;
      case 'dirsynced':
        dirSynced = Math.max(dirSynced, dirSyncStart.get(ev.id) ?? -1);
        break;
    }
  }

  // Metadata: an ordered prefix, at least up to the creation of the last file synced since.
  // (And every operation made before a directory sync that returned.)
  let guaranteed = 0;
  metaOps.forEach((m, j) => {
    if (m.kind === 'create' && m.inode.syncs.some((s) => s.end < k && s.start > m.idx)) guaranteed = j + 1;
    if (m.idx < dirSynced) guaranteed = j + 1;
  });
  const persisted =
    opts.metadata === 'guaranteed'
      ? guaranteed
      : opts.metadata === 'all'
        ? metaOps.length
        : pickInt(rand, guaranteed, metaOps.length);
  if (metaOps.length)
    notes.push(
      `metadata: ${persisted} of ${metaOps.length} namespace operations persisted (${guaranteed} forced)`,
    );
  const names = new Map(startNs);
  for (const m of metaOps.slice(0, persisted)) {
    if (m.kind === 'create') names.set(m.path, m.inode);
    else if (m.kind === 'delete') names.delete(m.path);
    else {
      names.delete(m.path);
      names.set(m.to!, m.inode);
    }
  }
  for (const m of metaOps.slice(persisted)) notes.push(`  lost: ${m.kind} ${path.basename(m.path)}`);

  const files = new Map<string, Buffer>();
  for (const [p, ino] of names) files.set(p, contentAt(ino, k, opts, rand, notes));
  return { files, notes };
}

function contentAt(ino: Inode, k: number, opts: CutOptions, rand: () => number, notes: string[]): Buffer {
  let barrier = -1;
  for (const s of ino.syncs) if (s.end < k) barrier = Math.max(barrier, s.start);
  const kept: Piece[] = [];
  const unsynced: { idx: number; ev: DataEvent }[] = [];
  for (const op of ino.ops) {
    if (op.idx < barrier || (op.ev.op === 'write' && op.ev.dsync)) kept.push(op);
    else unsynced.push(op);
  }
  let policy = opts.writeback;
  if (policy === 'mixed') policy = (['none', 'all', 'prefix', 'subset'] as const)[rand() % 4];
  let picked: number[] = [];
  const all = unsynced.map((_, i) => i);
  if (policy === 'all') picked = all;
  else if (policy === 'prefix') picked = all.slice(0, pickInt(rand, 0, unsynced.length));
  else if (policy === 'subset') picked = all.filter(() => rand() % 2 === 0);
  const chosen: Piece[] = picked.map((i) => ({ ...unsynced[i] }));
  let tearNote = '';
  if (policy === 'pages') {
    // Page-cache write-back in any order: each 4 KiB page of the unsynced writes reached the disk or not.
    let end = 0;
    for (const op of unsynced) {
      if (op.ev.op === 'truncate') {
        if (rand() % 2 === 0) chosen.push({ ...op });
        continue;
      }
      const { offset } = op.ev;
      const length = op.ev.op === 'write' ? op.ev.data.length : op.ev.length;
      end = Math.max(end, offset + length);
      for (let from = 0; from < length;) {
        const to = Math.min(length, (Math.floor((offset + from) / PAGE) + 1) * PAGE - offset);
        if (rand() % 2 === 0) chosen.push({ ...op, from, keepBytes: to });
        from = to;
      }
    }
    if (rand() % 2 === 0)
      chosen.push({ idx: Infinity, ev: { op: 'write', path: ino.name, offset: end, data: EMPTY } });
    tearNote = `, ${chosen.length} pieces`;
  }
  const last = chosen[chosen.length - 1];
  if (last && policy !== 'pages' && opts.tear !== 'none' && last.ev.op !== 'truncate') {
    const offset = last.ev.offset;
    const length = last.ev.op === 'write' ? last.ev.data.length : last.ev.length;
    let keep: number;
    if (opts.tear === 'byte') keep = pickInt(rand, 0, Math.max(0, length - 1));
    else {
      // Sector boundaries (absolute file offsets) in [offset, offset + length).
      const first = Math.ceil(offset / 512) * 512;
      const count = first < offset + length ? Math.floor((offset + length - 1 - first) / 512) + 1 : 0;
      keep = count === 0 ? 0 : first + 512 * pickInt(rand, 0, count - 1) - offset;
    }
    last.keepBytes = keep;
    last.fullSize = rand() % 2 === 0;
    tearNote = `, last torn to ${keep} of ${length} bytes at ${offset}${last.fullSize ? ' (size kept)' : ''}`;
  }
  if (unsynced.length)
    notes.push(
      `${path.basename(path.dirname(ino.name))}/${path.basename(ino.name)}: ${kept.length} durable ops; ` +
        `unsynced: ${policy}, kept ${chosen.length} of ${unsynced.length}` +
        (picked.length && picked.length < unsynced.length ? ` (#${picked.join(',#')})` : '') +
        tearNote,
    );
  const ops = [...kept, ...chosen].sort((a, b) => a.idx - b.idx || (a.from ?? 0) - (b.from ?? 0));
  let buf = Buffer.from(ino.base);
  const ensure = (size: number) => {
    if (size > buf.length) buf = Buffer.concat([buf, Buffer.alloc(size - buf.length)]);
  };
  for (const op of ops) {
    const ev = op.ev;
    if (ev.op === 'truncate') {
      buf = ev.size <= buf.length ? Buffer.from(buf.subarray(0, ev.size)) : (ensure(ev.size), buf);
    } else if (ev.op === 'write') {
      const n = op.keepBytes ?? ev.data.length;
      const from = op.from ?? 0;
      ensure(ev.offset + (op.keepBytes !== undefined && op.fullSize ? ev.data.length : n));
      ev.data.copy(buf, ev.offset + from, from, n);
    } else {
      const n = op.keepBytes ?? ev.length;
      const start = ev.offset + (op.from ?? 0);
      const end = Math.min(buf.length, ev.offset + n); // punch/zero-range keep the file size
      if (end > start) buf.fill(0, start, end);
    }
  }
  return buf;
}

/** Interesting cut points: both sides of every completed sync, the given positions, and `extra` random ones. */
export function cutPoints(
  events: IoEvent[],
  positions: number[],
  extra: number,
  rand: () => number,
): number[] {
  const set = new Set<number>();
  events.forEach((ev, i) => {
    if (ev.op === 'synced') {
      set.add(i);
      set.add(i + 1);
    }
  });
  for (const p of positions) set.add(p);
  for (let i = 0; i < extra; i++) set.add(rand() % (events.length + 1));
  return [...set].filter((k) => k >= 0 && k <= events.length).sort((a, b) => a - b);
}
