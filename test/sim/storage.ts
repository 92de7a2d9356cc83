/**
 * A simulated disk with the durability rules of a real one, for the
 * simulator: what fdatasync returned for survives a crash; everything else
 * survives, vanishes or is torn, as the seeded generator decides.
 *
 * Notes on the design (the same model as test/power-loss.ts, in memory):
 * - Data. Each file (inode) holds its durable bytes and the writes and
 *   truncations made since (pending). A datasync covers what was pending
 *   when it *started*; when it completes (a task of the world, a little
 *   later) those become durable. At a crash each file keeps a random prefix
 *   of its pending operations, and the last one kept may be torn at a
 *   512-byte boundary (a disk sector).
 * - Namespace (create, delete, rename): as on a journaling file system,
 *   these persist in order as a prefix; a directory sync makes all earlier
 *   ones durable, and so does a datasync of a file whose creation is still
 *   pending (it forces the metadata journal past it).
 * - A crash ends the incarnation that mounted the disk: its open files and
 *   its view go dead (writes ignored, reads zeroes, syncs never complete),
 *   so code of a killed process that is still queued changes nothing.
 */
import nodePath from 'node:path';
import { ColoError } from '../../src/errors.js';
import type { Storage, StorageFile } from '../../src/sys/storage.js';
import type { Owner, SimWorld } from './world.js';

type DataOp = { kind: 'write'; pos: number; data: Buffer } | { kind: 'truncate'; size: number };
type NameOp = (
  | { kind: 'link'; path: string; inode: Inode }
  | { kind: 'unlink'; path: string }
  | { kind: 'rename'; from: string; to: string }
) & { seq: number };

/** A growable byte array: a file's contents. */
class Content {
  data = Buffer.alloc(0);
  size = 0;
  apply(op: DataOp): void {
    if (op.kind === 'truncate') {
      this.reserve(op.size);
      if (op.size < this.size) this.data.fill(0, op.size, this.size);
      this.size = op.size;
      return;
    }
    const end = op.pos + op.data.length;
    this.reserve(end);
    op.data.copy(this.data, op.pos);
    this.size = Math.max(this.size, end);
  }
  private reserve(n: number): void {
    if (n <= this.data.length) return;
    const next = Buffer.alloc(Math.max(n, this.data.length * 2, 4096));
    this.data.copy(next, 0, 0, this.size);
    this.data = next;
  }
  clone(): Content {
    const c = new Content();
    c.data = Buffer.from(this.data.subarray(0, this.size));
    c.size = this.size;
    return c;
  }
}

class Inode {
  durable = new Content();
  pending: DataOp[] = [];
  current = new Content();
  constructor(readonly id: number) {}

  push(op: DataOp): void {
    this.pending.push(op);
    this.current.apply(op);
  }

  /** The first `n` pending operations reached the disk. */
  makeDurable(n: number): void {
    for (const op of this.pending.slice(0, n)) this.durable.apply(op);
    this.pending = this.pending.slice(n);
  }
}

export interface CrashReport {
  /** Pending data operations lost, kept, and torn. */
  lost: number;
  kept: number;
  torn: number;
  /** Namespace operations lost. */
  namesLost: number;
}

export class SimDisk {
  private nextInode = 1;
  /** The namespace as it is now, and as it is durably. */
  private names = new Map<string, Inode>();
  private durableNames = new Map<string, Inode>();
  private pendingNames: NameOp[] = [];
  /** Namespace operations made so far (a directory sync covers those made before it started). */
  private nameSeq = 0;
  private dirs = new Set<string>(['/']);
  private incarnation = 0;
  /** Storage failures to inject: called before each write, may throw. */
  faults: ((path: string) => void) | null = null;
  /** A slow disk: each sync takes [min, max] ms (null: 0-2 ms)... */
  slowSyncs: [number, number] | null = null;
  /** ...or only the syncs of files whose path contains this (a scripted run's timing). */
  slowOnly: string | null = null;
  crashes = 0;
  /** Calls made on a closed file (a bug of colo-blk, even where its caller copes with the error). */
  readonly misuse: string[] = [];

  constructor(
    readonly world: SimWorld,
    readonly name: string,
  ) {}

  /** The storage one incarnation of a node sees. */
  mount(owner: Owner): Storage {
    return new SimStorage(this, this.incarnation, owner);
  }

  /** Is this handle's incarnation still the live one? */
  live(incarnation: number): boolean {
    return incarnation === this.incarnation;
  }

  lookup(path: string): Inode | undefined {
    return this.names.get(path);
  }

  create(path: string): Inode {
    const inode = new Inode(this.nextInode++);
    this.names.set(path, inode);
    this.pendingNames.push({ kind: 'link', path, inode, seq: ++this.nameSeq });
    this.mkdirp(nodePath.dirname(path));
    return inode;
  }

  unlink(path: string): void {
    if (!this.names.has(path)) return;
    this.names.delete(path);
    this.pendingNames.push({ kind: 'unlink', path, seq: ++this.nameSeq });
  }

  rename(from: string, to: string): void {
    const inode = this.names.get(from);
    if (!inode) throw new ColoError('ENOENT', `rename: ${from} does not exist`);
    this.names.delete(from);
    this.names.set(to, inode);
    this.pendingNames.push({ kind: 'rename', from, to, seq: ++this.nameSeq });
  }

  mkdirp(dir: string): void {
    for (let d = dir; d !== '/' && d !== '.'; d = nodePath.dirname(d)) this.dirs.add(d);
  }

  hasDir(dir: string): boolean {
    return this.dirs.has(dir);
  }

  list(dir: string): string[] {
    const out = new Set<string>();
    const prefix = dir.endsWith('/') ? dir : `${dir}/`;
    for (const p of [...this.names.keys(), ...this.dirs])
      if (p.startsWith(prefix)) out.add(p.slice(prefix.length).split('/')[0]);
    return [...out].sort();
  }

  removeTree(dir: string): void {
    const prefix = `${dir}/`;
    for (const p of [...this.names.keys()]) if (p.startsWith(prefix)) this.unlink(p);
    for (const d of [...this.dirs]) if (d === dir || d.startsWith(prefix)) this.dirs.delete(d);
  }

  /** Namespace operations up to now are durable. */
  syncNames(): void {
    this.syncNamesThrough(this.nameSeq);
  }

  /** The namespace operations made so far (for a directory sync started now). */
  get namesMade(): number {
    return this.nameSeq;
  }

  /** Namespace operations up to number `seq` are durable. */
  syncNamesThrough(seq: number): void {
    const n = this.pendingNames.filter((op) => op.seq <= seq).length;
    for (const op of this.pendingNames.slice(0, n)) this.applyName(op, this.durableNames);
    this.pendingNames = this.pendingNames.slice(n);
  }

  /** A datasync of `inode` completed: if its creation is pending, the namespace up to it is durable. */
  syncedInode(inode: Inode): void {
    const i = this.pendingNames.findIndex((op) => op.kind === 'link' && op.inode === inode);
    if (i < 0) return;
    for (const op of this.pendingNames.slice(0, i + 1)) this.applyName(op, this.durableNames);
    this.pendingNames = this.pendingNames.slice(i + 1);
  }

  private applyName(op: NameOp, into: Map<string, Inode>): void {
    if (op.kind === 'link') into.set(op.path, op.inode);
    else if (op.kind === 'unlink') into.delete(op.path);
    else {
      const inode = into.get(op.from);
      into.delete(op.from);
      if (inode) into.set(op.to, inode);
    }
  }

  /** SIGKILL: the process's handles die; what it wrote stays as it is (unsynced: in the page cache). */
  kill(): void {
    this.incarnation++;
  }

  /**
   * Power cut: every live handle dies; each file keeps its durable bytes plus
   * a random prefix of its pending operations (the last kept one maybe torn);
   * the namespace keeps a random prefix of its pending operations.
   */
  crash(policy: 'random' | 'lose-unsynced' = 'random'): CrashReport {
    const rng = this.world.rng;
    this.incarnation++;
    this.crashes++;
    const report: CrashReport = { lost: 0, kept: 0, torn: 0, namesLost: 0 };
    const inodes = new Set<Inode>([...this.names.values(), ...this.durableNames.values()]);
    for (const op of this.pendingNames) if (op.kind === 'link') inodes.add(op.inode);
    for (const inode of inodes) {
      const n = inode.pending.length;
      if (n === 0) continue;
      const kind = policy === 'lose-unsynced' ? 0 : rng.int(4); // 0: nothing, 1: all, 2-3: a prefix
      let keep = kind === 0 ? 0 : kind === 1 ? n : rng.int(n + 1);
      let ops = inode.pending.slice(0, keep);
      if (keep > 0 && kind !== 1 && rng.chance(0.5)) {
        const last = ops[keep - 1];
        if (last.kind === 'write' && last.data.length > 512) {
          const sectors = Math.ceil(last.data.length / 512);
          const cut = rng.int(sectors) * 512;
          ops = [
            ...ops.slice(0, keep - 1),
            { kind: 'write', pos: last.pos, data: last.data.subarray(0, cut) },
          ];
          report.torn++;
        }
      }
      for (const op of ops) inode.durable.apply(op);
      report.kept += keep;
      report.lost += n - keep;
      keep = 0;
      inode.pending = [];
      inode.current = inode.durable.clone();
    }
    const keepNames = policy === 'lose-unsynced' ? 0 : rng.int(this.pendingNames.length + 1);
    report.namesLost = this.pendingNames.length - keepNames;
    for (const op of this.pendingNames.slice(0, keepNames)) this.applyName(op, this.durableNames);
    this.pendingNames = [];
    this.names = new Map(this.durableNames);
    return report;
  }

  /** The current bytes of a file (tests and checks). */
  read(path: string): Buffer | null {
    const inode = this.names.get(path);
    return inode ? Buffer.from(inode.current.data.subarray(0, inode.current.size)) : null;
  }
}

/**
 * A sync that completes when the world's scheduler says (0-2 ms later, or as
 * slow as the disk is made): `done` runs then, unless the incarnation died
 * meanwhile (then it never completes).
 */
function completeLater(
  disk: SimDisk,
  path: string,
  owner: Owner,
  dead: () => boolean,
  done: () => void,
  closed: () => boolean = () => false,
): Promise<void> {
  if (dead()) return new Promise(() => {});
  const world = disk.world;
  const slow = disk.slowSyncs && (disk.slowOnly === null || path.includes(disk.slowOnly));
  const [min, max] = slow ? disk.slowSyncs! : [0, 2];
  return new Promise((resolve, reject) =>
    world.schedule(
      world.rng.range(min, max),
      () => {
        if (dead()) return;
        // The thread pool got to it after the descriptor was closed (the worse of the two outcomes).
        if (closed()) return reject(badDescriptor(disk, path, 'fdatasync'));
        done();
        resolve();
      },
      owner,
    ),
  );
}

/**
 * What the OS answers a call on a closed descriptor (or, worse and silently, one
 * reused for another file since): noted on the disk, for the scenario to report.
 */
function badDescriptor(disk: SimDisk, path: string, call: string): ColoError {
  disk.misuse.push(`${call} of ${path} after its close, at ${disk.world.t} ms`);
  return new ColoError('EINTERNAL', `${path}: ${call} after close (EBADF: a bug of colo-blk)`);
}

class SimFile implements StorageFile {
  readonly fd = null;
  private closed = false;
  constructor(
    private readonly disk: SimDisk,
    private readonly incarnation: number,
    private readonly owner: Owner,
    readonly path: string,
    private readonly inode: Inode,
  ) {}

  private get dead(): boolean {
    return !this.disk.live(this.incarnation) || !this.owner.alive;
  }

  size(): number {
    return this.dead ? 0 : this.inode.current.size;
  }

  read(buf: Buffer, pos: number): number {
    if (this.closed) throw badDescriptor(this.disk, this.path, 'read');
    if (this.dead) {
      buf.fill(0);
      return buf.length;
    }
    const cur = this.inode.current;
    if (pos >= cur.size) return 0;
    return cur.data.copy(buf, 0, pos, Math.min(cur.size, pos + buf.length));
  }

  writev(buffers: readonly Buffer[], pos: number): void {
    if (this.dead) return;
    if (this.closed) throw badDescriptor(this.disk, this.path, 'write');
    this.disk.faults?.(this.path);
    this.inode.push({ kind: 'write', pos, data: Buffer.concat(buffers as Buffer[]) });
  }

  truncate(size: number): void {
    if (this.closed) throw badDescriptor(this.disk, this.path, 'ftruncate');
    if (this.dead) return;
    this.inode.push({ kind: 'truncate', size });
  }

  datasync(): Promise<void> {
    if (this.closed) return Promise.reject(badDescriptor(this.disk, this.path, 'fdatasync'));
    const n = this.inode.pending.length;
    return completeLater(
      this.disk,
      this.path,
      this.owner,
      () => this.dead,
      () => {
        this.inode.makeDurable(n);
        this.disk.syncedInode(this.inode);
      },
      () => this.closed,
    );
  }

  datasyncSync(): void {
    if (this.closed) throw badDescriptor(this.disk, this.path, 'fdatasync');
    if (this.dead) return;
    this.inode.makeDurable(this.inode.pending.length);
    this.disk.syncedInode(this.inode);
  }

  close(): void {
    this.closed = true;
  }
}

/** One incarnation's view of a SimDisk. */
class SimStorage implements Storage {
  constructor(
    private readonly disk: SimDisk,
    private readonly incarnation: number,
    private readonly owner: Owner,
  ) {}

  private get dead(): boolean {
    return !this.disk.live(this.incarnation) || !this.owner.alive;
  }

  private file(path: string, inode: Inode): SimFile {
    return new SimFile(this.disk, this.incarnation, this.owner, path, inode);
  }

  open(path: string): StorageFile {
    if (this.dead) return this.file(path, new Inode(-1));
    if (!this.disk.hasDir(nodePath.dirname(path)))
      throw new ColoError('ENOENT', `${nodePath.dirname(path)}: no such directory`);
    return this.file(path, this.disk.lookup(path) ?? this.disk.create(path));
  }

  openRead(path: string): StorageFile {
    const inode = this.dead ? undefined : this.disk.lookup(path);
    if (!inode) throw new ColoError('ENOENT', `${path}: no such file`);
    return this.file(path, inode);
  }

  exists(path: string): boolean {
    return !this.dead && (this.disk.lookup(path) !== undefined || this.disk.hasDir(path));
  }

  mkdirp(dir: string): void {
    if (!this.dead) this.disk.mkdirp(dir);
  }

  list(dir: string): string[] {
    return this.dead ? [] : this.disk.list(dir);
  }

  remove(path: string): void {
    if (!this.dead) this.disk.unlink(path);
  }

  removeLater(path: string): Promise<void> {
    const world = this.disk.world;
    return new Promise((resolve) =>
      world.schedule(
        world.rng.range(0, 1),
        () => {
          this.remove(path);
          resolve();
        },
        this.owner,
      ),
    );
  }

  removeTree(dir: string): void {
    if (!this.dead) this.disk.removeTree(dir);
  }

  rename(from: string, to: string): void {
    if (!this.dead) this.disk.rename(from, to);
  }

  syncDir(): void {
    if (!this.dead) this.disk.syncNames();
  }

  syncDirLater(): Promise<void> {
    const upTo = this.disk.namesMade;
    return completeLater(
      this.disk,
      '/', // the directory
      this.owner,
      () => this.dead,
      () => this.disk.syncNamesThrough(upTo),
    );
  }

  readFile(path: string): Buffer {
    const data = this.dead ? null : this.disk.read(path);
    if (!data) throw new ColoError('ENOENT', `${path}: no such file`);
    return data;
  }

  writeFileDurable(path: string, data: Buffer | string): void {
    if (this.dead) return;
    const tmp = `${path}.tmp`;
    this.disk.unlink(tmp);
    const f = this.open(tmp);
    f.writev([typeof data === 'string' ? Buffer.from(data) : data], 0);
    f.datasyncSync();
    f.close();
    this.rename(tmp, path);
    this.syncDir();
  }

  writeFile(path: string, data: Buffer | string): void {
    if (this.dead) return;
    this.disk.unlink(path);
    const f = this.open(path);
    f.writev([typeof data === 'string' ? Buffer.from(data) : data], 0);
    f.close();
  }
}
