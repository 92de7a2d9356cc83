/**
 * commits.journal: a secondary's durable history, the truth every other piece
 * of its state is derived from (the metadata index only mirrors it). One
 * record per event, fdatasync'd before the event counts:
 *
 *   commit   epochs through `e` are committed; the SVM continues on overlay K
 *            (a resync's commits carry a partial/done mark)
 *   rebase   a resync starts: epoch numbering restarts just below the primary's
 *   promote  this node became a primary of generation `gen` (failover)
 *   fold     a promoted node's overlay K is now a committed layer; K+1 takes writes
 *   forget   this node's data was discarded (--discard-my-data): it holds no
 *            copy of the pair's disk, nor its history, until a full resync is done
 *
 * `open` replays the records into what they say; a torn tail is cut, and
 * corruption in the middle is refused by the caller.
 */
import type { Generation, SyncMode } from '../../failover/history.js';
import type { Storage } from '../../sys/storage.js';
import { JournalWriter, scanJournal, type ScanResult } from '../format/journal.js';
import type { SyncMark } from '../link/messages.js';

export type CommitRecord =
  | { t: 'commit'; e: number; overlay: number; at: number; sync?: SyncMark }
  /** `forced`: promoted by `failover --force` from a disk that held no complete checkpoint. */
  | { t: 'promote'; gen: number; id?: string; at: number; reason: string; committed: number; forced?: true }
  | { t: 'fold'; overlay: number; next: number; at: number }
  /** A resync starts: `e` is the primary's last epoch; `sync` (absent before 2026-12: a full one) what it is. */
  | { t: 'rebase'; e: number; at: number; sync?: { target: string; mode: SyncMode } }
  /** The node's data was discarded: part-way through a full resync (target unknown) until its done mark. */
  | { t: 'forget'; at: number };

export type PromoteRecord = Extract<CommitRecord, { t: 'promote' }>;

/** What the records say, replayed in order. */
export interface CommitState {
  lastCommitted: number;
  /** The SVM's current overlay (at least 1). */
  overlayId: number;
  /** A resync into this node is part-way (a partial commit with no done after it). */
  syncing: { target: string; mode: SyncMode; since: number } | null;
  /** The history of the last completed resync, to adopt. */
  adopted: Generation[] | null;
  promote: PromoteRecord | null;
  /** Overlays folded (on a promoted node), oldest first. */
  foldedIds: number[];
  /** Records replayed (0: a node that was never synchronised, nor committed anything). */
  records: number;
}

export class CommitJournal {
  /** Set after a record failed: the writer is closed, and the file is cut back to here before the next one. */
  private cutBackTo: number | null = null;
  /** Records are written one at a time (a failed one is cut off before the next is appended). */
  private chain: Promise<unknown> = Promise.resolve();

  private constructor(
    private writer: JournalWriter,
    private readonly storage: Storage,
    private readonly path: string,
    /** Records in the journal: replayed at open, and made durable since (0: nothing ever happened here). */
    private recordCount: number,
  ) {}

  get records(): number {
    return this.recordCount;
  }

  /** Open (or create) the journal and replay it. */
  static open(
    storage: Storage,
    path: string,
  ): { journal: CommitJournal; state: CommitState; scan: ScanResult | null } {
    const state: CommitState = {
      lastCommitted: 0,
      overlayId: 0,
      syncing: null,
      adopted: null,
      promote: null,
      foldedIds: [],
      records: 0,
    };
    let scan: ScanResult | null = null;
    if (storage.exists(path))
      scan = scanJournal<CommitRecord>(storage, path, (r) => {
        const m = r.meta;
        state.records++;
        if (m.t === 'commit') {
          state.lastCommitted = m.e;
          state.overlayId = Math.max(state.overlayId, m.overlay);
          if (m.sync?.state === 'partial')
            state.syncing ??= { target: m.sync.target, mode: m.sync.mode, since: m.at };
          if (m.sync?.state === 'done') {
            state.syncing = null;
            state.adopted = m.sync.history ?? null;
          }
        } else if (m.t === 'rebase') {
          state.lastCommitted = m.e;
          // Part-way through a resync until its done mark (a record without the mark: resume in full).
          state.syncing = {
            target: m.sync?.target ?? '',
            mode: m.sync?.mode ?? 'full',
            since: state.syncing?.since ?? m.at,
          };
        } else if (m.t === 'forget') {
          state.adopted = null;
          state.syncing = { target: '', mode: 'full', since: m.at };
        } else if (m.t === 'promote') {
          state.promote = m;
          state.syncing = null; // a forced promotion ends a resync: its disk is served as it is
        } else if (m.t === 'fold') {
          state.foldedIds.push(m.overlay);
          state.overlayId = Math.max(state.overlayId, m.next);
        }
      });
    state.overlayId = Math.max(state.overlayId, 1);
    const end = scan && !scan.corruption ? scan.validEnd : scan ? undefined : 0;
    return {
      journal: new CommitJournal(JournalWriter.open(storage, path, end), storage, path, state.records),
      state,
      scan,
    };
  }

  /**
   * Append a record and make it durable: the event counts from here on. If
   * that fails (a full disk), the event did not happen: the file is cut back
   * to the last good record, durably, before the failure is reported, and a
   * new writer appends the next record (a writer whose write failed keeps
   * failing). Without that, one full disk at a commit left the secondary
   * unable to commit, or be promoted, until a restart. And the failed record
   * is dropped, never written later: the failed writer's close wrote what it
   * kept, so a restart found a fold that had failed and its overlay in use,
   * and a power cut after that lost it again, with the writes made there.
   */
  record(rec: CommitRecord): Promise<void> {
    const run = this.chain.then(() => this.recordNow(rec));
    this.chain = run.catch(() => {});
    return run;
  }

  private async recordNow(rec: CommitRecord): Promise<void> {
    if (this.cutBackTo !== null) {
      this.writer = JournalWriter.open(this.storage, this.path, this.cutBackTo);
      this.cutBackTo = null;
    }
    const before = this.writer.size;
    try {
      this.writer.append(rec);
      await this.writer.sync();
      this.recordCount++;
    } catch (err) {
      this.cutBackTo = before;
      this.writer.abandon();
      try {
        await JournalWriter.cut(this.storage, this.path, before);
      } catch {
        // the next record's writer cuts it (JournalWriter.open at cutBackTo)
      }
      throw err;
    }
  }

  close(): void {
    this.writer.close();
  }
}
