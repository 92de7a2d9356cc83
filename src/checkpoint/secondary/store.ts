/**
 * The secondary's disk state: the checkpoint image, the PVM's buffered epochs
 * and the SVM's overlay, with a durable commit protocol.
 *
 * Notes on the design:
 * - State directory layout:
 *     commits.journal      the commit records (the truth: fdatasync'd)
 *     epochs/<N>.journal   the PVM's mutations of epoch N, as received, then its seal
 *     overlay/<K>.journal  the SVM's own writes since the last commit
 *     meta/                LevelDB (classic-level): an index of the above (epoch
 *                          states, last committed/applied, overlay id), rebuilt
 *                          from the journals whenever it is missing or stale
 *   The checkpoint image itself (svm.img) lives wherever the operator put it.
 * - Epoch lifecycle: receiving → sealed (seal marker arrived, counts checked)
 *   → durable (the journal, seal marker included, fdatasync'd) → committed (a
 *   commit record appended to commits.journal and fdatasync'd) → applied (the
 *   epoch's final bytes written into the image and fdatasync'd; journal
 *   deleted). Every state can be re-derived from the files alone.
 * - Commit is O(1): one small synced append and a switch to a fresh overlay.
 *   The SVM's reads consult committed-but-unapplied epochs (newest first)
 *   until the background apply has written them into the image, so the
 *   checkpoint never waits for the apply.
 * - Apply writes each epoch's *merged* final state (from its extent index), so
 *   applying twice equals applying once (invariant 7), and a crash mid-apply
 *   is repaired by applying again on start.
 * - The SVM view (svmDevice) reads overlay > committed epochs > image and
 *   writes only to the overlay; its FLUSH/FUA make the overlay durable.
 */
import { ColoError, internal } from '../../errors.js';
import { defaultTunables } from '../../limits.js';
import type { BlockDevice } from '../../block/device.js';
import { realClock, realRandom, type Clock, type Random } from '../../sys/clock.js';
import { crashPoint } from '../../crash.js';
import { mergeRanges, subtractRanges, type ActivityLog, type Range } from '../../failover/activity.js';
import { hashPool, type HashAlg, type HashPool } from '../../failover/reprotect/hash-pool.js';
import {
  blockHashes,
  deviceZeroRanges,
  MAX_HASH_BLOCKS,
  MIN_HASH_BLOCK,
} from '../../failover/reprotect/hash.js';
import { imageFileRange, readLayers, SvmDevice } from './svm-view.js';
import type { Generation, History, SyncMode } from '../../failover/history.js';
import { Applier, type ApplyJob } from './applier.js';
import { CommitJournal, type PromoteRecord } from './commit-journal.js';
import { epochKey, IndexMirror } from './index-mirror.js';
import { SpareJournals } from './spare-journals.js';
import type { Storage } from '../../sys/storage.js';
import { Layer } from '../format/layers.js';
import { openMeta, StateDir, type MetaIndex, type MetaOp } from '../state-dir.js';
import type { SyncMark } from '../link/messages.js';
import { epochJournal, type MutationRecord, type SealRecord } from '../format/records.js';

export type EpochState = 'receiving' | 'sealed' | 'durable' | 'committed';

export interface EpochMeta {
  epoch: number;
  state: EpochState;
  records: number;
  bytes: number;
  durableAt?: number;
  committedAt?: number;
}

interface EpochEntry {
  epoch: number;
  layer: Layer;
  state: EpochState;
  seal?: SealRecord;
  /** Sequence number of the first record received for this epoch. */
  firstSeq?: number;
}

/**
 * Commits of a resynchronisation carry a SyncMark (messages.ts): 'partial'
 * makes this node inconsistent (its image is part old, part new: never
 * promotable), 'done' makes it consistent again with the primary's history.
 */
export type { SyncMark } from '../link/messages.js';

export interface RecoveryReport {
  tornTails: { file: string; offset: number; reason: string }[];
  indexRebuilt: boolean;
  /** Committed epochs found not yet applied (applied again, idempotently). */
  reapplied: number[];
  droppedOverlays: number[];
}

/** The image under a store: a block device that may offer an in-kernel copy from a journal file. */
export interface StoreImage extends BlockDevice {
  /** Copy `length` bytes of file `srcFd` at `srcPos` to `offset`; false if it cannot (the caller writes instead). */
  copyFromFile?(srcFd: number, srcPos: number, offset: number, length: number): Promise<boolean>;
  /** Copy a batch of [srcPos, offset, length] ranges of file `srcFd`; false (nothing copied) if it cannot. */
  copyRangesFromFile?(srcFd: number, ranges: Float64Array, count: number): Promise<boolean>;
}

export interface SecondaryStoreOptions {
  /** Time and ids (the simulator's own; real ones by default). */
  clock?: Clock;
  random?: Random;
  /** Threads for block hashing (the process's pool by default). */
  hashing?: HashPool;
  /** The metadata index (opened from the state directory by default). */
  meta?: MetaIndex;
  /** This node's generation history (promotion mints a generation; a finished resync adopts one). */
  history?: History;
  /** Records what this node writes once promoted (for a later re-protection). */
  activity?: ActivityLog;
  /** Called when the background apply fails (the store stops applying). */
  onApplyError?: (err: Error) => void;
  /** Progress of the background apply: bytes done of the epoch's total. */
  onApplyProgress?: (epoch: number, doneBytes: number, totalBytes: number) => void;
  /** On a promoted node, the overlay is folded once it holds this many bytes (default: the tunable). */
  foldBytes?: number;
  /** Applied epoch journals kept to be written over, at most this many bytes (default: the tunable; 0: none). */
  spareJournalBytes?: number;
  /**
   * --discard-my-data: this node's data goes, and with it the history its
   * last resync adopted (a durable 'forget' record): it is resynchronised in
   * full, from whichever primary, and is no copy of the pair's disk until then.
   */
  discardData?: boolean;
  log?: (msg: string) => void;
}

export class SecondaryStore {
  private readonly epochs = new Map<number, EpochEntry>();
  private overlay!: Layer;
  private overlayId = 0;
  lastCommitted = 0;
  lastApplied = 0;
  /** Highest sequence number held from the current primary session. */
  highestSeq = 0;
  session: string | null = null;
  private commits!: CommitJournal;
  /** Generation of this node's history; a promotion mints the next one. */
  generation = 1;
  /** Set once this node was promoted to primary (failover). */
  promoted: { generation: number; at: number; reason: string } | null = null;
  /** Set from the first moment of a promotion: no commit, seal or record is taken after it. */
  private promoting = false;
  /** Set while a resync into this node is part-way: the image matches no checkpoint. */
  syncing: { target: string; mode: SyncMode; since: number } | null = null;
  /**
   * A new node: it never received anything (commits.journal holds no record)
   * nor served as a primary (no history). Its image is no copy of the pair's
   * disk until its first resync, which starts with a rebase record. Only a
   * store opened with its node's history can tell (`recover` and unit tests
   * open one without).
   */
  get fresh(): boolean {
    return this.commits.records === 0 && this.opts.history !== undefined && !this.opts.history.last;
  }
  /** Overlays folded on a promoted node, oldest first, until applied to the image. */
  private folded: Layer[] = [];
  private folding: Promise<void> | null = null;
  /** What the last open() had to repair (for `colo-blk recover` and the logs). */
  readonly recovery: RecoveryReport = {
    tornTails: [],
    indexRebuilt: false,
    reapplied: [],
    droppedOverlays: [],
  };
  private closed = false;
  readonly svmDevice: SvmDevice;
  private readonly applier: Applier;
  private readonly index: IndexMirror;
  private readonly spares: SpareJournals;

  private readonly storage: Storage;
  private readonly clock: Clock;

  private constructor(
    readonly state: StateDir,
    readonly image: StoreImage,
    readonly db: MetaIndex,
    private readonly opts: SecondaryStoreOptions,
  ) {
    this.storage = state.storage;
    this.clock = opts.clock ?? realClock;
    this.svmDevice = new SvmDevice(this);
    this.index = new IndexMirror(db, (m) => this.log(m));
    this.spares = new SpareJournals(
      this.storage,
      state.epochsDir,
      opts.spareJournalBytes ?? defaultTunables.spareJournalBytes,
      (m) => this.log(m),
    );
    this.applier = new Applier(image, {
      next: () => this.nextApply(),
      onError: (err) => opts.onApplyError?.(err),
      onProgress: opts.onApplyProgress,
    });
  }

  get dir(): string {
    return this.state.root;
  }

  get size(): number {
    return this.image.size;
  }

  static async open(
    dir: string | StateDir,
    image: StoreImage,
    opts: SecondaryStoreOptions = {},
  ): Promise<SecondaryStore> {
    const state = typeof dir === 'string' ? new StateDir(dir) : dir;
    state.ensure();
    const db = opts.meta ?? (await openMeta(state.root));
    const store = new SecondaryStore(state, image, db, opts);
    await store.recover();
    return store;
  }

  private log(msg: string): void {
    this.opts.log?.(msg);
  }

  private getJson<T>(key: string): Promise<T | undefined> {
    return this.index.get<T>(key);
  }

  private refuseCorrupt(file: string, offset: number, reason: string): never {
    throw new ColoError(
      'EIO',
      `${file} is corrupt at offset ${offset} (${reason}); refusing to use it. Nothing was applied from it. ` +
        `Resynchronise this node from its peer, or move the file away if you accept losing what it holds.`,
    );
  }

  /**
   * Rebuild the state from the journals (the truth), check the LevelDB index
   * against it and rewrite the index if it is missing or stale, and schedule
   * the apply of committed epochs that are not yet in the image.
   */
  private async recover(): Promise<void> {
    const size = await this.getJson<number>('size');
    if (size !== undefined && size !== this.image.size)
      throw new ColoError(
        'EUSAGE',
        `state directory ${this.dir} belongs to a ${size}-byte disk, but the image is ${this.image.size} bytes`,
      );
    // Commit records: the truth.
    const commitsPath = this.state.commits;
    const { journal, state: found, scan } = CommitJournal.open(this.storage, commitsPath);
    this.commits = journal;
    if (scan?.corruption) {
      journal.close();
      this.refuseCorrupt(commitsPath, scan.corruption.offset, scan.corruption.reason);
    }
    if (scan?.tornTail) this.recovery.tornTails.push({ file: commitsPath, ...scan.tornTail });
    this.lastCommitted = found.lastCommitted;
    this.overlayId = found.overlayId;
    this.syncing = found.syncing;
    if (found.promote) {
      this.generation = found.promote.gen;
      this.promoted = { generation: found.promote.gen, at: found.promote.at, reason: found.promote.reason };
    }
    const foldedIds = found.foldedIds;
    this.lastApplied = Math.min((await this.getJson<number>('applied')) ?? 0, this.lastCommitted);
    // history.json follows the commit journal: finish what a crash interrupted.
    this.promoteRecorded = found.promote;
    const adopted = this.opts.discardData ? null : found.adopted;
    if (!found.promote && adopted?.length && this.opts.history?.last?.id !== adopted[adopted.length - 1].id)
      this.historyBehind = adopted;
    this.catchUpHistory();

    const indexed = {
      committed: (await this.getJson<number>('committed')) ?? 0,
      overlay: (await this.getJson<number>('overlay')) ?? 1,
    };
    // Epoch journals: committed ones are applied again (idempotent, in order);
    // sealed ones with matching counts are durable; the rest are incomplete.
    for (const name of this.storage.list(this.state.epochsDir).sort()) {
      if (SpareJournals.isSpare(name)) {
        this.storage.remove(`${this.state.epochsDir}/${name}`); // nothing in it is needed
        continue;
      }
      const n = StateDir.journalNumber(name);
      if (n === null) continue;
      const file = this.state.epoch(n);
      if (n <= this.lastApplied) {
        this.storage.remove(file); // applied before the crash, journal not yet deleted
        continue;
      }
      // The journal may have been written over a spare: frames of other epochs are not its own.
      const { layer, scan, others } = Layer.recover(this.storage, n, file, epochJournal(n));
      if (scan.corruption) {
        layer.close();
        this.refuseCorrupt(file, scan.corruption.offset, scan.corruption.reason);
      }
      if (scan.tornTail) {
        this.recovery.tornTails.push({ file, ...scan.tornTail });
        this.log(`epoch ${n}: cut a torn tail at offset ${scan.tornTail.offset}`);
      }
      const seal = others.find((o) => o.t === 'seal') as SealRecord | undefined;
      const complete = seal !== undefined && seal.n === layer.records && seal.b === layer.dataBytes;
      const state: EpochState = n <= this.lastCommitted ? 'committed' : complete ? 'durable' : 'receiving';
      if (this.promoted && state !== 'committed') {
        layer.destroy(); // a promotion discards every uncommitted PVM write
        continue;
      }
      if (state === 'committed') this.recovery.reapplied.push(n);
      this.epochs.set(n, { epoch: n, layer, state, seal: complete ? seal : undefined });
    }
    // The overlay: the current one is kept (the SVM's flushed writes survive a restart);
    // older ones were discarded by a commit and are deleted.
    for (const id of foldedIds) {
      const file = this.overlayPath(id);
      if (!this.storage.exists(file)) continue; // folded and applied before the crash
      const { layer, scan } = Layer.recover(this.storage, id, file);
      if (scan.corruption) {
        layer.close();
        this.refuseCorrupt(file, scan.corruption.offset, scan.corruption.reason);
      }
      this.folded.push(layer);
    }
    for (const name of this.storage.list(this.state.overlayDir)) {
      const id = StateDir.journalNumber(name);
      if (id !== null && id !== this.overlayId && !this.folded.some((l) => l.id === id)) {
        this.storage.remove(this.state.overlay(id));
        this.recovery.droppedOverlays.push(id);
      }
    }
    const overlayPath = this.overlayPath(this.overlayId);
    if (this.storage.exists(overlayPath)) {
      const { layer, scan } = Layer.recover(this.storage, this.overlayId, overlayPath);
      if (scan.corruption) {
        layer.close();
        this.refuseCorrupt(overlayPath, scan.corruption.offset, scan.corruption.reason);
      }
      if (scan.tornTail) this.recovery.tornTails.push({ file: overlayPath, ...scan.tornTail });
      this.overlay = layer;
    } else this.overlay = Layer.create(this.storage, this.overlayId, overlayPath);
    // A promoted node's own writes are its peer's missing data: whatever survives of them (the
    // overlay and folded overlays not yet applied) is recorded in the activity log again, durably,
    // so that no restart can forget a region a later resync must send (invariant 8).
    if (this.promoted && this.opts.activity) {
      for (const layer of [this.overlay, ...this.folded])
        for (const x of layer.index.extents()) this.opts.activity.mark(x.start, x.end - x.start, 0);
      await this.opts.activity.persist();
    }
    // The index must agree with the journals; rewrite it whole if it does not.
    const stale =
      size === undefined || indexed.committed !== this.lastCommitted || indexed.overlay !== this.overlayId;
    if (stale && (size !== undefined || this.lastCommitted > 0)) {
      this.recovery.indexRebuilt = true;
      this.log('the metadata index was missing or stale: rebuilt it from the journals');
    }
    await this.rewriteIndex();
    // The journals read above were made durable as they were opened (JournalWriter.open); their
    // names too: a killed process may have created one it never synced into its directory.
    for (const d of [this.state.root, this.state.epochsDir, this.state.overlayDir]) this.storage.syncDir(d);
    if (this.opts.discardData && !this.promoted) {
      // Durably, before anything else: a restart without the flag must not adopt that history again.
      const at = this.clock.now();
      await this.commits.record({ t: 'forget', at });
      this.syncing = { target: '', mode: 'full', since: at };
    }
    this.kickApply();
  }

  /**
   * Update the index without waiting: it is derived from the journals, which
   * are the durable record, so the checkpoint path does not wait for it. A
   * failure is logged; the next start rebuilds the index.
   */
  private updateIndex(ops: MetaOp[]): void {
    this.index.update(ops);
  }

  /** Write the LevelDB index from the in-memory state (derived from the journals). */
  private rewriteIndex(): Promise<void> {
    return this.index.rewrite({
      size: this.image.size,
      committed: this.lastCommitted,
      applied: this.lastApplied,
      overlay: this.overlayId,
      generation: this.generation,
      epochs: [...this.epochs.values()].map((e) => ({ epoch: e.epoch, meta: this.epochMeta(e) })),
    });
  }

  private overlayPath(id: number): string {
    return this.state.overlay(id);
  }

  private epochPath(n: number): string {
    return this.state.epoch(n);
  }

  // ---------------------------------------------------------------------------
  // The PVM's stream

  /**
   * The one place PVM epochs are dropped: every epoch not yet durable
   * ('keep-durable': a new session of the primary, or a failed append or seal
   * that the primary will resend), or every epoch not yet committed
   * ('keep-committed': a resync's rollback, a promotion). The journals go now
   * (a resend recreates the same paths), or in the background ('later').
   * Returns the epochs dropped and the first sequence number they held.
   */
  private dropEpochs(
    keep: 'keep-durable' | 'keep-committed',
    remove: 'now' | 'later' = 'now',
  ): { dropped: number[]; firstSeq: number } {
    const dropped: number[] = [];
    let firstSeq = Infinity;
    for (const e of [...this.epochs.values()]) {
      if (e.state === 'committed' || (keep === 'keep-durable' && e.state === 'durable')) continue;
      firstSeq = Math.min(firstSeq, e.firstSeq ?? Infinity);
      if (remove === 'later') e.layer.destroy();
      else {
        e.layer.close();
        this.storage.remove(e.layer.path);
      }
      this.epochs.delete(e.epoch);
      dropped.push(e.epoch);
    }
    return { dropped, firstSeq };
  }

  /** Highest epoch this node holds durably (or has committed). */
  get durableEpoch(): number {
    let n = this.lastCommitted;
    for (const e of this.epochs.values())
      if (e.state === 'durable' || e.state === 'committed') n = Math.max(n, e.epoch);
    return n;
  }

  /**
   * A primary (re)connected. The same session resumes where it was (resent
   * records are dropped by sequence); a new session means the old primary run
   * is gone, so epochs it never made durable here can never complete: drop them.
   */
  startSession(session: string, primaryEpoch: number): { dropped: number[] } {
    if (this.promoted || this.promoting) throw this.staleError();
    if (primaryEpoch <= this.durableEpoch)
      throw new ColoError(
        'EUSAGE',
        `the primary is at epoch ${primaryEpoch}, but this secondary already holds epoch ${this.durableEpoch} durably: ` +
          `the primary's state is older than this node's (a stale primary, or another primary's secondary)`,
      );
    if (session === this.session) return { dropped: [] };
    const { dropped } = this.dropEpochs('keep-durable');
    this.session = session;
    this.highestSeq = 0;
    return { dropped };
  }

  private entry(n: number): EpochEntry {
    let e = this.epochs.get(n);
    if (!e) {
      if (n <= this.lastCommitted)
        throw new ColoError(
          'EPROTO',
          `the primary sent epoch ${n}, which is already committed here (last committed ${this.lastCommitted})`,
        );
      const file = this.epochPath(n);
      const named = this.spares.take(file);
      const layer = named
        ? Layer.overwrite(this.storage, n, file, named)
        : Layer.create(this.storage, n, file);
      e = { epoch: n, layer, state: 'receiving' };
      this.epochs.set(n, e);
    }
    return e;
  }

  /**
   * Store one PVM mutation. Records at or below the highest sequence number
   * already held are duplicates from a resend and are ignored (returns false).
   */
  receive(rec: MutationRecord, frame: readonly Buffer[], dataLength: number): boolean {
    if (this.promoted || this.promoting) throw this.staleError();
    if (rec.s <= this.highestSeq) return false;
    const e = this.entry(rec.e);
    if (e.state !== 'receiving')
      throw new ColoError('EPROTO', `mutation for epoch ${rec.e}, which is already ${e.state}`);
    if (rec.o + (rec.t === 'w' ? dataLength : rec.l) > this.size)
      throw new ColoError('EPROTO', `mutation beyond the end of the disk at ${rec.o}`);
    if (this.highestSeq > 0 && rec.s !== this.highestSeq + 1)
      throw new ColoError(
        'EPROTO',
        `record ${rec.s} of epoch ${rec.e} follows record ${this.highestSeq}: records were lost on the way and must be resent`,
      );
    try {
      e.layer.appendFrame(rec, frame, dataLength);
    } catch (err) {
      // The journal could not take it (disk full...): it is unusable now. Forget every
      // epoch not yet durable, so that the primary's resend rebuilds them from scratch.
      this.rewind();
      throw err;
    }
    e.firstSeq ??= rec.s;
    this.highestSeq = rec.s;
    return true;
  }

  /**
   * Drop every epoch that is not durable yet (journal deleted now, so a resend
   * can recreate it) and go back to the sequence number before the oldest of
   * them: the primary's resend after a reconnect then brings them again.
   */
  rewind(): number[] {
    const { dropped, firstSeq } = this.dropEpochs('keep-durable');
    if (firstSeq !== Infinity) this.highestSeq = Math.min(this.highestSeq, firstSeq - 1);
    if (dropped.length)
      this.log(`dropped epoch ${dropped.join(', ')} (not durable); waiting for the primary to resend`);
    return dropped;
  }

  /** The seal marker of epoch N: check the counts, make N durable, record it. */
  async seal(seal: SealRecord): Promise<EpochMeta> {
    if (this.promoted || this.promoting) throw this.staleError();
    const e = this.entry(seal.e);
    if (e.state === 'durable' || e.state === 'committed') return this.epochMeta(e);
    try {
      const unsealed = [...this.epochs.values()].filter(
        (o) => o.epoch < seal.e && (o.state === 'receiving' || o.state === 'sealed'),
      );
      if (unsealed.length > 0)
        throw new ColoError(
          'EIO',
          `epoch ${seal.e} cannot be made durable: epoch ${unsealed.map((o) => o.epoch).join(', ')} before it ` +
            `was never sealed on this node (its seal was lost on the way)`,
        );
      if (e.layer.records !== seal.n || e.layer.dataBytes !== seal.b)
        throw new ColoError(
          'EIO',
          `epoch ${seal.e} is incomplete: the primary sent ${seal.n} mutations (${seal.b} bytes), ` +
            `this node holds ${e.layer.records} (${e.layer.dataBytes} bytes)`,
        );
      if (!e.seal) {
        e.layer.appendMarker(seal);
        e.seal = seal;
      }
      e.state = 'sealed';
      crashPoint('secondary-before-durable-sync');
      await e.layer.sync();
    } catch (err) {
      this.rewind(); // the primary resends the epoch whole
      throw err;
    }
    e.state = 'durable';
    // The synced journal (with its seal marker) is the durable record; this is its index.
    const meta: EpochMeta = { ...this.epochMeta(e), durableAt: this.clock.now() };
    this.updateIndex([{ type: 'put', key: epochKey(e.epoch), value: JSON.stringify(meta) }]);
    return meta;
  }

  /**
   * Commit every durable epoch up to N: one durable record (appended to
   * commits.journal and fdatasync'd), then the SVM's overlay is discarded.
   * The image is updated in the background.
   */
  commit(
    n: number,
    sync?: SyncMark,
  ): Promise<{ epochs: number[]; overlayDiscarded: { records: number; bytes: number } }> {
    // One at a time: the link's commit and a failover's (see promote) may race.
    const run = this.commitChain.then(() => this.commitOnce(n, sync));
    this.commitChain = run.catch(() => {});
    return run;
  }

  private commitChain: Promise<unknown> = Promise.resolve();

  private async commitOnce(
    n: number,
    sync?: SyncMark,
  ): Promise<{ epochs: number[]; overlayDiscarded: { records: number; bytes: number } }> {
    if (this.promoted || this.promoting) throw this.staleError();
    try {
      this.catchUpHistory();
    } catch {
      // still lagging: it is not needed to commit, and promoting waits for it
    }
    if (n <= this.lastCommitted) {
      if (sync?.state === 'done' && this.syncing) await this.finishSync(n, sync);
      return { epochs: [], overlayDiscarded: { records: 0, bytes: 0 } };
    }
    const toCommit = [...this.epochs.values()].filter((e) => e.epoch <= n && e.state !== 'committed');
    const notDurable = toCommit.filter((e) => e.state !== 'durable');
    if (notDurable.length === 0 && n > this.durableEpoch)
      // Not held at all (never received, or dropped by a rewind for a resend).
      throw new ColoError('EIO', `cannot commit epoch ${n}: it is not durable on this node`);
    if (notDurable.length > 0)
      throw new ColoError(
        'EIO',
        `cannot commit epoch ${n}: epoch ${notDurable.map((e) => e.epoch).join(', ')} is not durable on this node`,
      );
    const nextOverlay = this.overlayId + 1;
    const now = this.clock.now();
    const ops: MetaOp[] = [
      { type: 'put', key: 'committed', value: String(n) },
      { type: 'put', key: 'overlay', value: String(nextOverlay) },
    ];
    for (const e of toCommit)
      ops.push({
        type: 'put',
        key: epochKey(e.epoch),
        value: JSON.stringify({ ...this.epochMeta(e), state: 'committed', committedAt: now }),
      });
    crashPoint('secondary-before-commit-record');
    await this.commits.record({ t: 'commit', e: n, overlay: nextOverlay, at: now, sync });
    crashPoint('secondary-after-commit-record');
    if (sync?.state === 'partial') {
      this.syncing ??= { target: sync.target, mode: sync.mode, since: now };
      crashPoint('secondary-after-partial-sync-commit');
    }
    if (sync?.state === 'done') this.adoptSync(sync);
    this.updateIndex(ops); // the index; the journal above is the record
    // The commit record is durable: from here on N counts, whatever happens.
    for (const e of toCommit) e.state = 'committed';
    this.lastCommitted = n;
    const old = this.overlay;
    const discarded = { records: old.records, bytes: old.dataBytes };
    this.overlay = Layer.create(this.storage, nextOverlay, this.overlayPath(nextOverlay));
    this.overlayId = nextOverlay;
    // Deleting the old overlay's file can take a while for a big one: off the commit path.
    old.close();
    setImmediate(() => this.storage.removeLater(old.path));
    setImmediate(() => this.kickApply()); // after the answer has gone out
    return { epochs: toCommit.map((e) => e.epoch), overlayDiscarded: discarded };
  }

  /** A 'done' mark for an epoch already committed (a resync that sent nothing more). */
  private async finishSync(n: number, sync: SyncMark): Promise<void> {
    await this.commits.record({ t: 'commit', e: n, overlay: this.overlayId, at: this.clock.now(), sync });
    this.adoptSync(sync);
  }

  /** The resync is complete and committed: this node is consistent, with the primary's history. */
  private adoptSync(sync: SyncMark): void {
    this.syncing = null;
    if (sync.history?.length) {
      // The commit record carries the history and is durable already: a history.json that cannot
      // be written now (a full disk) is written before anything here reads the history again
      // (catchUpHistory), as open() does after a crash. Throwing here left the commit half done.
      this.historyBehind = sync.history;
      try {
        this.catchUpHistory();
      } catch (err) {
        this.log(
          `could not write the history the resync brought (${(err as Error).message}); ` +
            `it is written before this node uses its history`,
        );
      }
    }
    // What this node wrote before (as an old primary) is rolled back now.
    void this.opts.activity
      ?.reset()
      .catch((err: Error) => this.log(`activity log reset failed: ${err.message}`));
    this.log(`resync complete: consistent with the primary's ${sync.history?.at(-1)?.id ?? 'history'}`);
  }

  // ---------------------------------------------------------------------------
  // Resynchronisation (this node is the target)

  /**
   * A resync into this node starts: whatever the SVM wrote and whatever the old
   * primary sent but never committed is dropped (rolled back); committed epochs
   * are applied first, and epoch numbering restarts just below the primary's
   * next epoch (a durable 'rebase' record), whatever numbers the old history used.
   */
  startResync(
    primaryEpoch: number,
    sync: { target: string; mode: SyncMode },
  ): Promise<{ dropped: number[]; overlay: { records: number; bytes: number } }> {
    if (this.promoted || this.promoting) return Promise.reject(this.staleError());
    // A promotion asked for meanwhile waits until this is done (it never interleaves with the rebase),
    // and is then refused: from the rebase on, this node is part-way through the resync. A commit
    // still under way (the old connection's, whose record is being written) finishes first: the
    // rollback would otherwise drop the epoch it is committing, and the record then claimed it.
    const run = this.commitChain.then(() => this.startResyncNow(primaryEpoch, sync));
    // Only a marker that it runs: its failure is the caller's to handle (a promise derived with
    // finally alone would reject with nobody listening, and an unhandled rejection ends the process).
    this.resyncStart = run.then(
      () => (this.resyncStart = null),
      () => (this.resyncStart = null),
    );
    return run;
  }

  /** Set while a resync start (rollback and rebase) is running. */
  private resyncStart: Promise<unknown> | null = null;

  private async startResyncNow(
    primaryEpoch: number,
    sync: { target: string; mode: SyncMode },
  ): Promise<{ dropped: number[]; overlay: { records: number; bytes: number } }> {
    const { dropped } = this.dropEpochs('keep-committed');
    await this.drainApply();
    // Nothing may linger under the old numbering: not an applied journal whose deletion is queued
    // (it would land on a new epoch of the same number), not a spare (its frames would pass for one).
    while (this.retiring.length) await this.removing;
    for (const name of this.storage.list(this.state.epochsDir))
      this.storage.remove(`${this.state.epochsDir}/${name}`);
    this.spares.clear();
    const base = primaryEpoch - 1;
    // Epoch `base` now names the primary's checkpoint, which this disk does not hold until the
    // resync's last commit: the node is part-way through a resync from this record on (it refuses
    // promotion; a promotion numbered its generation's base as `base`, and the rejoining old
    // primary then kept what it wrote before `base` that this node never got).
    const now = this.clock.now();
    await this.commits.record({ t: 'rebase', e: base, at: now, sync });
    crashPoint('secondary-after-rebase');
    this.syncing = { target: sync.target, mode: sync.mode, since: this.syncing?.since ?? now };
    this.lastCommitted = base;
    this.lastApplied = base;
    await this.db.batch(
      [
        { type: 'put', key: 'committed', value: String(base) },
        { type: 'put', key: 'applied', value: String(base) },
      ],
      { sync: true },
    );
    const old = this.overlay;
    const overlay = { records: old.records, bytes: old.dataBytes };
    old.close();
    this.overlay = Layer.create(this.storage, this.overlayId, this.overlayPath(this.overlayId));
    this.session = null;
    this.highestSeq = 0;
    this.log(
      `resync starts at epoch ${primaryEpoch}: dropped uncommitted epochs ${dropped.join(', ') || 'none'} ` +
        `and the SVM overlay (${overlay.records} writes)`,
    );
    return { dropped, overlay };
  }

  /** The block digests this node hashes with (told to the primary in the hello). */
  get hashAlgs(): readonly HashAlg[] {
    return (this.opts.hashing ?? hashPool).algs;
  }

  /**
   * Hashes of the PVM's disk as this node holds it at this point of the
   * stream: image, then every epoch received (committed or not), newest last.
   */
  async pvmHashes(offset: number, length: number, block: number, alg: HashAlg = 'sha256'): Promise<Buffer> {
    if (!Number.isSafeInteger(block) || block < MIN_HASH_BLOCK || Math.ceil(length / block) > MAX_HASH_BLOCKS)
      throw new ColoError(
        'EINVAL',
        `a hash request of ${length} bytes in blocks of ${block}: blocks must be at least ${MIN_HASH_BLOCK} bytes, ` +
          `at most ${MAX_HASH_BLOCKS} of them`,
      );
    if (offset + length > this.size)
      throw new ColoError(
        'EINVAL',
        `a hash request for ${offset}+${length} beyond the disk's ${this.size} bytes`,
      );
    // The layers are looked up again for every chunk read: between two chunks the background apply
    // may finish an epoch and close its journal (its data is in the image by then).
    const layers = () => [...this.epochs.values()].sort((a, b) => b.epoch - a.epoch).map((e) => e.layer);
    return blockHashes((buf, off) => readLayers(layers(), this.image, buf, off), offset, length, block, {
      zeroes: (off, len) => this.pvmZeroRanges(off, len),
      file: (off, len) => imageFileRange(layers(), this.image, off, len),
      pool: this.opts.hashing,
      alg,
    });
  }

  /**
   * Ranges of the PVM's disk, as held here, that read as zeroes without
   * reading them: holes of the image that no received epoch writes into. The
   * epochs are listed before the image is asked, so an apply finishing in
   * between only moves data into the image, where its extents show it.
   */
  private async pvmZeroRanges(offset: number, length: number): Promise<Range[]> {
    const held: Range[] = [];
    for (const e of this.epochs.values())
      for (const seg of e.layer.lookup(offset, length))
        if (seg.extent) held.push({ offset: seg.start, length: seg.end - seg.start });
    const holes = await deviceZeroRanges(this.image, offset, length);
    return subtractRanges(holes, mergeRanges(held));
  }

  private epochMeta(e: EpochEntry): EpochMeta {
    return { epoch: e.epoch, state: e.state, records: e.layer.records, bytes: e.layer.dataBytes };
  }

  // ---------------------------------------------------------------------------
  // Failover

  private staleError(): ColoError {
    if (!this.promoted)
      return new ColoError(
        'ESTALE',
        'this node is being promoted to primary; it accepts no primary any more',
      );
    const p = this.promoted;
    return new ColoError(
      'ESTALE',
      `this node was promoted to primary (generation ${p.generation}) at ${new Date(p.at).toISOString()} ` +
        `(${p.reason}); it accepts no primary any more, and a primary of an older generation must not serve writes`,
    );
  }

  /**
   * Become a standalone primary: mint the next generation (durable before
   * anything else), discard every uncommitted PVM write, and keep the SVM's
   * own writes, which from now on are the disk's real data (invariant 5).
   * Disk and memory resume from the same point: the last commit.
   *
   * `commitThrough`: a COLO coordinator released the output of that epoch
   * (the secondary had it durably, and the SVM its memory state), but the
   * primary died before it could send the commit. The epoch is committed here
   * first, on the coordinator's word: disk and memory then resume from that
   * checkpoint, the one the clients saw.
   */
  promote(
    reason: string,
    commitThrough?: number,
    force = false,
  ): Promise<{ generation: number; at: number; droppedEpochs: number[]; committed: number }> {
    // Two requests at once (automatic and manual, say) get the same promotion.
    if (!this.promotion)
      this.promotion = this.promoteOnce(reason, commitThrough, force).catch((err: Error) => {
        this.promotion = null;
        throw err;
      });
    return this.promotion;
  }

  /** A resync's history, committed in commits.journal, that history.json does not hold yet (adoptSync). */
  private historyBehind: Generation[] | null = null;

  /** The promote record, once durable (a promotion that failed after it is finished by a retry). */
  private promoteRecorded: PromoteRecord | null = null;

  /**
   * Make history.json say what commits.journal says: the history a resync's
   * last commit brought, then the generation a promote record minted. After a
   * crash (open), and after a write that failed on a full disk (adoptSync,
   * promoteOnce). Throws if it still cannot be written.
   */
  private catchUpHistory(): void {
    const history = this.opts.history;
    if (!history) return;
    if (this.historyBehind) {
      history.adopt(this.historyBehind);
      this.historyBehind = null;
    }
    const p = this.promoteRecorded;
    if (!p) return;
    const id = p.id ?? `legacy-${p.gen}`;
    if (!history.generations.some((g) => g.id === id))
      history.append({
        n: p.gen,
        id,
        by: history.node,
        base: p.committed,
        at: p.at,
        reason: `promoted: ${p.reason}`,
        ...(p.forced ? { forced: true } : {}),
      });
  }

  private promotion: Promise<{
    generation: number;
    at: number;
    droppedEpochs: number[];
    committed: number;
  }> | null = null;

  private async promoteOnce(
    reason: string,
    commitThrough?: number,
    force = false,
  ): Promise<{ generation: number; at: number; droppedEpochs: number[]; committed: number }> {
    if (force && commitThrough !== undefined)
      throw new ColoError(
        'EINVAL',
        'a forced promotion commits nothing first: give force or commit, not both',
      );
    while (this.resyncStart) await this.resyncStart.catch(() => {});
    // A new generation is numbered after the last one this node knows: history.json must be current.
    this.catchUpHistory();
    if (
      !this.promoted &&
      !this.promoteRecorded &&
      commitThrough !== undefined &&
      commitThrough > this.lastCommitted
    ) {
      if (this.syncing)
        throw new ColoError(
          'EBUSY',
          `cannot commit epoch ${commitThrough} before promoting: this node is part-way through a resync`,
        );
      await this.commit(commitThrough);
    }
    if (this.promoted)
      return {
        generation: this.promoted.generation,
        at: this.promoted.at,
        droppedEpochs: [],
        committed: this.lastCommitted,
      };
    // `failover --force`: the operator serves this disk as it is (its primary is lost for good).
    // Asked only before the record: once it is durable the node is promoted, whatever it was.
    const forced = !this.promoteRecorded && force && (this.fresh || this.syncing !== null);
    const checks = !this.promoteRecorded && !forced;
    if (checks && this.fresh)
      throw new ColoError(
        'EBUSY',
        'refusing to promote: this node has never been synchronised with a primary, nor served as one (its ' +
          "state directory is new): its disk is no copy of the pair's. If this disk is the one to serve, start this node as the " +
          'primary instead (colo-blk primary), or promote it with colo-blk failover --force.',
      );
    if (checks && this.syncing?.target === '')
      throw new ColoError(
        'EBUSY',
        `refusing to promote: this node's data was discarded (--discard-my-data, ` +
          `${new Date(this.syncing.since).toISOString()}) and its full resync has not completed: its disk is no ` +
          `copy of the pair's (colo-blk failover --force serves it as it is).`,
      );
    if (checks && this.syncing)
      throw new ColoError(
        'EBUSY',
        `refusing to promote: this node is part-way through a resync (${this.syncing.mode}, since ` +
          `${new Date(this.syncing.since).toISOString()}); its disk matches no checkpoint. Promote it only ` +
          `after the resync completes (or, if its primary is lost for good, with colo-blk failover --force: ` +
          `its disk is then served as it is, part old, part new).`,
      );
    let rec = this.promoteRecorded;
    if (!rec) {
      // From here on nothing from the old primary is taken: a commit racing this promotion
      // must not land after the promote record (N counts only if its record came first).
      this.promoting = true;
      try {
        crashPoint('secondary-before-promote-record');
        const generation = Math.max(this.generation, this.opts.history?.last?.n ?? 0) + 1;
        // What the SVM wrote since the last commit is this generation's first divergence from the old primary.
        const activity = this.opts.activity;
        if (activity) {
          for (const x of this.overlay.index.extents()) activity.mark(x.start, x.end - x.start, 0);
          await activity.persist();
        }
        const r: PromoteRecord = {
          t: 'promote',
          gen: generation,
          id: (this.opts.random ?? realRandom).id(6),
          at: this.clock.now(),
          reason,
          committed: this.lastCommitted,
        };
        if (forced) r.forced = true;
        const was = this.fresh ? 'a new node' : `part-way through a ${this.syncing?.mode ?? ''} resync`;
        await this.commits.record(r);
        rec = this.promoteRecorded = r;
        if (forced)
          this.log(
            `FORCED: promoted from a disk that held no complete checkpoint (${was}); a node that rejoins is resynchronised in full`,
          );
      } catch (err) {
        // No promote record: nothing happened, and the old primary's commits may land again.
        this.promoting = false;
        throw err;
      }
    }
    // The record is durable: this node is promoted. If what follows fails (history.json on a full
    // disk), a retried promotion finishes it from here, as a restart would (open()).
    const { gen: generation, at } = rec;
    // As a restart would read a forced one's record: the resync is over, the disk is this node's own.
    if (rec.forced) this.syncing = null;
    this.catchUpHistory();
    crashPoint('secondary-after-promote-record');
    const droppedEpochs = this.dropEpochs('keep-committed', 'later').dropped;
    this.spares.discard(); // no epoch will be written here again
    this.generation = generation;
    this.promoted = { generation, at, reason: rec.reason };
    this.session = null;
    this.updateIndex([{ type: 'put', key: 'generation', value: String(generation) }]);
    this.log(
      `promoted to primary, generation ${generation}: ${rec.reason}; dropped uncommitted epochs ${droppedEpochs.join(', ') || 'none'}`,
    );
    return { generation, at, droppedEpochs, committed: this.lastCommitted };
  }

  /**
   * On a promoted node the overlay is the disk's data; once it is large it is
   * folded: a durable fold record makes it a committed layer, applied to the
   * image in the background like an epoch, and a fresh overlay takes the writes.
   */
  maybeFold(): void {
    if (!this.promoted || this.folding || this.closed) return;
    if (this.overlay.dataBytes < (this.opts.foldBytes ?? defaultTunables.promotedFoldBytes)) return;
    this.folding = this.fold()
      .catch((err: Error) => this.log(`folding the overlay failed (will retry): ${err.message}`))
      .finally(() => (this.folding = null));
  }

  private async fold(): Promise<void> {
    // The folded writes reach the image: their regions must be on record first.
    await this.opts.activity?.persist();
    crashPoint('promoted-before-fold-record');
    const next = this.overlayId + 1;
    await this.commits.record({ t: 'fold', overlay: this.overlayId, next, at: this.clock.now() });
    crashPoint('secondary-after-fold-record');
    // Durable: switch. Writes that came in meanwhile are in the folded overlay, which is right.
    this.folded.push(this.overlay);
    this.overlay = Layer.create(this.storage, next, this.overlayPath(next));
    this.overlayId = next;
    this.updateIndex([{ type: 'put', key: 'overlay', value: String(next) }]);
    this.kickApply();
  }

  /**
   * On a promoted node that stops being one (it restarts as a plain primary):
   * fold the current overlay too and wait until the image holds everything.
   */
  async foldAll(): Promise<void> {
    if (!this.promoted) throw internal('only a promoted node folds its overlay');
    if (this.folding) await this.folding;
    if (this.overlay.records > 0) {
      await this.overlay.sync();
      await this.fold();
    }
    await this.drainApply();
  }

  /** Folded overlays not yet in the image, newest first. */
  foldedLayers(): Layer[] {
    return [...this.folded].reverse();
  }

  // ---------------------------------------------------------------------------
  // Background apply

  private kickApply(): void {
    this.applier.kick();
  }

  /** The next layer for the applier: committed epochs first (all older than a promotion), then folded overlays. */
  private nextApply(): ApplyJob | null {
    const e = [...this.epochs.values()]
      .filter((x) => x.state === 'committed')
      .sort((a, b) => a.epoch - b.epoch)[0];
    if (e)
      return {
        layer: e.layer,
        label: e.epoch,
        done: () => {
          crashPoint('secondary-before-applied-record');
          // The image is durable; the journal can go. (The index entry needs no sync:
          // if it is lost, the journal is gone too, or it is applied again, harmlessly.)
          this.updateIndex([
            { type: 'put', key: 'applied', value: String(e.epoch) },
            { type: 'del', key: epochKey(e.epoch) },
          ]);
          this.lastApplied = e.epoch;
          this.epochs.delete(e.epoch);
          this.retire(e.layer, true);
        },
      };
    const folded = this.folded[0];
    if (folded)
      return {
        layer: folded,
        label: 0,
        done: () => {
          this.folded.shift();
          this.retire(folded);
        },
      };
    return null;
  }

  /**
   * An applied layer's journal goes, in the order the layers were applied.
   * Recovery re-applies every committed layer whose journal is still there
   * (and a folded overlay is known as applied only by its journal being
   * gone), so a later journal must never be gone while an earlier one
   * survives a crash: that earlier layer would be applied again over newer
   * bytes. Removals run one after the other, never concurrently (found by
   * the simulator: two asynchronous removals finished out of order, and a
   * crash kept only the later one).
   */
  private retire(layer: Layer, spare = false): void {
    const bytes = spare ? layer.journal.fileBytes : null;
    layer.close();
    this.retiring.push({ path: layer.path, bytes });
    if (this.retiring.length === 1) this.removing = this.removeRetired();
  }

  /** Applied journals to delete, or to keep as spares (`bytes` set: an epoch's), in the order applied. */
  private retiring: { path: string; bytes: number | null }[] = [];
  /** The removals running; close waits for them, so none lands after (on a path a new store may reuse). */
  private removing: Promise<void> = Promise.resolve();

  /**
   * Off the event loop: unlinking a journal of tens of MiB takes milliseconds
   * of kernel time, which would otherwise delay the next seal or commit. An
   * epoch's journal is kept as a spare instead while there is room (a
   * rename: spare-journals.ts).
   */
  private async removeRetired(): Promise<void> {
    while (this.retiring.length) {
      const { path, bytes } = this.retiring[0];
      const kept = !this.closed && bytes !== null && this.keepSpare(path, bytes);
      if (!this.closed && !kept) await this.storage.removeLater(path);
      this.retiring.shift();
    }
  }

  private keepSpare(path: string, bytes: number): boolean {
    try {
      return this.spares.keep(path, bytes);
    } catch (err) {
      this.log(`keeping ${path} as a spare failed (${(err as Error).message}): deleting it`);
      return false;
    }
  }

  /** Wait until every committed epoch is in the image. */
  drainApply(): Promise<void> {
    return this.applier.drain();
  }

  // ---------------------------------------------------------------------------
  // Reads for the SVM view

  /** Committed, not yet applied epochs, newest first. */
  committedLayers(): Layer[] {
    return [...this.epochs.values()]
      .filter((e) => e.state === 'committed')
      .sort((a, b) => b.epoch - a.epoch)
      .map((e) => e.layer);
  }

  /** From the first moment of a promotion, the SVM's writes are this node's own: they are recorded. */
  get tracksActivity(): boolean {
    return this.promoted !== null || this.promoting;
  }

  get activity(): ActivityLog | undefined {
    return this.opts.activity;
  }

  get history(): History | undefined {
    return this.opts.history;
  }

  get overlayLayer(): Layer {
    return this.overlay;
  }

  /** Per-epoch view for status and inspect. */
  pendingEpochs(): EpochMeta[] {
    return [...this.epochs.values()].sort((a, b) => a.epoch - b.epoch).map((e) => this.epochMeta(e));
  }

  /** Applied epoch journals kept to be written over (spare-journals.ts). */
  get spareJournals(): { files: number; ready: number; bytes: number; reused: number } {
    return this.spares.held;
  }

  epochLayer(n: number): Layer | undefined {
    return this.epochs.get(n)?.layer;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.applier.close();
    await this.removing;
    for (const e of this.epochs.values()) e.layer.close();
    if (this.folding) await this.folding;
    for (const l of this.folded) l.close();
    await this.index.flushed();
    await this.overlay.sync().catch(() => {});
    this.overlay.close();
    this.commits.close();
    if (this.opts.meta === undefined) await this.db.close(); // the caller owns an index it passed in
  }
}
