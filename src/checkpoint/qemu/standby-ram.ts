/**
 * The secondary's copy of a protected VM's memory: the RAM image and device
 * state of the last committed checkpoint, durable, and replaced atomically at
 * the next commit, like a disk epoch. On failover QEMU starts from these two
 * files (the RAM image as its memory-backend-file, the device state by
 * `migrate-incoming` with x-ignore-shared).
 *
 * Files in the directory:
 *   ram.img              the committed RAM image
 *   dev-<N>.bin          device state of checkpoint N
 *   ram-<N>.journal      the pages checkpoint N changed (frames: meta {t:'p', e, p: [page...]}, data: the pages)
 *   commits.log          commit records, frames {t:'c', epoch, device, journal}: the last whole one holds
 *
 * Notes on the design:
 * - Receiving writes a checkpoint's pages to its journal and its device state
 *   to its own file; nothing touches ram.img.
 * - Commit: sync both files, then append and sync a commit record naming
 *   them (the commit point), then copy the pages (still in memory: the
 *   journal is read back only after a crash) into ram.img, sync it, and
 *   append a record without the journal. A crash after the commit point
 *   leaves a last record that names the journal: opening replays it (page
 *   writes are idempotent). A crash before it leaves the previous checkpoint,
 *   whole (a torn record at the end of the log is cut off).
 * - The log is rewritten (a new file with the current record, synced, then
 *   renamed over it) once it passes LOG_COMPACT_BYTES.
 * - Opening deletes what no commit record names: a checkpoint received but
 *   not committed is gone with the process that was receiving it.
 */
import path from 'node:path';
import { ColoError } from '../../errors.js';
import type { Storage, StorageFile } from '../../sys/storage.js';
import { JournalWriter, scanJournal } from '../format/journal.js';
import { PAGE_BYTES } from './ram.js';

/** Pages per journal frame (1 MiB of data). */
const PAGES_PER_FRAME = 256;
const LOG = 'commits.log';
const LOG_COMPACT_BYTES = 64 * 1024;

interface CommitRecord {
  t: 'c';
  epoch: number;
  /** The RAM's size. */
  size: number;
  device: string | null;
  journal: string | null;
  /** The journal holds every non-zero page: the image is zeroed before it is applied. */
  full?: boolean;
}

interface PageFrame {
  t: 'p';
  e: number;
  p: number[];
}

export class StandbyRam {
  /** The received checkpoint: its files, and its pages still in memory (applied from there at commit). */
  private pending: {
    epoch: number;
    journal: JournalWriter;
    device: string;
    deviceFile: StorageFile;
    pages: Uint32Array;
    data: Buffer;
    full: boolean;
  } | null = null;

  /** A checkpoint is received and not yet committed or discarded. */
  get hasPending(): boolean {
    return this.pending !== null;
  }

  private constructor(
    private readonly storage: Storage,
    readonly dir: string,
    readonly size: number,
    private readonly image: StorageFile,
    private record: CommitRecord,
    private log: JournalWriter,
    private readonly compactBytes: number,
  ) {}

  /** Open (creating) the store for a RAM of `size` bytes, finishing a commit a crash interrupted. */
  static async open(
    storage: Storage,
    dir: string,
    size: number,
    opts: { compactBytes?: number } = {},
  ): Promise<StandbyRam> {
    if (size <= 0 || size % PAGE_BYTES !== 0)
      throw new ColoError('EINVAL', `a RAM of ${size} bytes is not a whole number of 4 KiB pages`);
    storage.mkdirp(dir);
    // The last whole commit record; a torn one at the end (a cut mid-append) is cut off.
    let record: CommitRecord = { t: 'c', epoch: 0, size, device: null, journal: null };
    let validEnd = 0;
    const logPath = path.join(dir, LOG);
    if (storage.exists(logPath)) {
      const scan = scanJournal<CommitRecord>(storage, logPath, (r) => {
        if (r.meta.t === 'c') record = r.meta;
      });
      if (scan.corruption)
        throw new ColoError(
          'EIO',
          `${logPath} is damaged at ${scan.corruption.offset}, before its last record`,
        );
      validEnd = scan.validEnd;
    }
    if (record.epoch > 0 && record.size !== size)
      throw new ColoError(
        'EINVAL',
        `${dir} holds the RAM of a ${record.size}-byte VM; this one has ${size} bytes: use another directory`,
      );
    // A shorter image (its extension at creation was never synced) reads as zeroes past its end: extend it.
    const image = storage.open(path.join(dir, 'ram.img'));
    if (image.size() !== size) image.truncate(size);
    const log = JournalWriter.open(storage, logPath, validEnd);
    const store = new StandbyRam(
      storage,
      dir,
      size,
      image,
      record,
      log,
      opts.compactBytes ?? LOG_COMPACT_BYTES,
    );
    if (record.journal) await store.replay(record.journal, record.epoch, record.full === true);
    // Nothing else survives: uncommitted checkpoints, replaced device states, applied journals.
    for (const name of storage.list(dir))
      if (/^(dev-\d+\.bin|ram-\d+\.journal)(\.tmp)?$/.test(name) && name !== store.record.device)
        storage.remove(path.join(dir, name));
    return store;
  }

  /** The last committed checkpoint: its number, and the files QEMU starts from. */
  get committed(): { epoch: number; ram: string; device: string | null } {
    return {
      epoch: this.record.epoch,
      ram: path.join(this.dir, 'ram.img'),
      device: this.record.device ? path.join(this.dir, this.record.device) : null,
    };
  }

  /**
   * Hold checkpoint `epoch`: the pages it changed (their contents in `data`, in order) and the device
   * state. `data` is kept until the commit or the discard: the caller must not reuse it before.
   * `full`: the pages are every non-zero page of the RAM (a pairing): every other page is zero,
   * whatever the image held before.
   */
  receive(epoch: number, pages: ArrayLike<number>, data: Buffer, device: Buffer, full = false): void {
    if (epoch <= this.record.epoch)
      throw new ColoError('EINVAL', `checkpoint ${epoch} is not after the committed ${this.record.epoch}`);
    if (data.length !== pages.length * PAGE_BYTES)
      throw new ColoError(
        'EINVAL',
        `${pages.length} pages need ${pages.length * PAGE_BYTES} bytes, not ${data.length}`,
      );
    for (let i = 0; i < pages.length; i++)
      if (!(Number.isInteger(pages[i]) && pages[i] >= 0 && (pages[i] + 1) * PAGE_BYTES <= this.size))
        throw new ColoError('EINVAL', `page ${pages[i]} is outside a RAM of ${this.size} bytes`);
    this.discard();
    const journalName = `ram-${epoch}.journal`;
    const journal = JournalWriter.open(this.storage, path.join(this.dir, journalName), 0);
    for (let i = 0; i < pages.length; i += PAGES_PER_FRAME) {
      const n = Math.min(PAGES_PER_FRAME, pages.length - i);
      const frame: PageFrame = { t: 'p', e: epoch, p: Array.from({ length: n }, (_, k) => pages[i + k]) };
      journal.append(frame, data.subarray(i * PAGE_BYTES, (i + n) * PAGE_BYTES));
    }
    const deviceName = `dev-${epoch}.bin`;
    const deviceFile = this.storage.open(path.join(this.dir, deviceName));
    deviceFile.truncate(0);
    if (device.length > 0) deviceFile.writev([device], 0);
    this.pending = {
      epoch,
      journal,
      device: deviceName,
      deviceFile,
      pages: Uint32Array.from(pages),
      data,
      full,
    };
  }

  /** Pages (ascending) into the image: one write per run of consecutive pages. */
  private writePages(pages: ArrayLike<number>, data: Buffer): void {
    for (let i = 0; i < pages.length;) {
      let j = i + 1;
      while (j < pages.length && pages[j] === pages[j - 1] + 1) j++;
      this.image.writev([data.subarray(i * PAGE_BYTES, j * PAGE_BYTES)], pages[i] * PAGE_BYTES);
      i = j;
    }
  }

  /** A full checkpoint replaces the whole image: zero it (sparse) before its pages go in. */
  private zeroImage(): void {
    this.image.truncate(0);
    this.image.truncate(this.size);
  }

  /** After a crash past a commit point: copy the committed journal's pages into ram.img. */
  private async replay(journalName: string, epoch: number, full: boolean): Promise<void> {
    if (full) this.zeroImage();
    const scan = scanJournal<PageFrame>(
      this.storage,
      path.join(this.dir, journalName),
      (rec) => {
        if (rec.meta.t !== 'p' || rec.meta.e !== epoch || rec.data === undefined)
          throw new ColoError(
            'EPROTO',
            `${journalName}: a record that is not a page list of checkpoint ${epoch}`,
          );
        this.writePages(rec.meta.p, rec.data);
      },
      { withData: true },
    );
    if (scan.tornTail || scan.corruption)
      throw new ColoError(
        'EIO',
        `${journalName} is damaged at ${(scan.tornTail ?? scan.corruption)!.offset} though it was synced before its commit`,
      );
    await this.applied(journalName, epoch);
  }

  /** The pages are in ram.img: sync it, and drop the journal from the record. */
  private async applied(journalName: string, epoch: number): Promise<void> {
    await this.image.datasync();
    await this.writeRecord({ t: 'c', epoch, size: this.size, device: this.record.device, journal: null });
    this.storage.remove(path.join(this.dir, journalName));
  }

  /** Make the received checkpoint the committed one: atomic, durable when this resolves. */
  async commit(epoch: number): Promise<void> {
    const p = this.pending;
    if (!p || p.epoch !== epoch) throw new ColoError('EINVAL', `checkpoint ${epoch} was not received`);
    await Promise.all([p.journal.sync(), p.deviceFile.datasync()]);
    p.journal.close();
    p.deviceFile.close();
    const previous = this.record.device;
    this.pending = null;
    await this.writeRecord({
      t: 'c',
      epoch,
      size: this.size,
      device: p.device,
      journal: `ram-${epoch}.journal`,
      ...(p.full ? { full: true } : {}),
    });
    // The pages are still in memory: the journal is only read back after a crash.
    if (p.full) this.zeroImage();
    this.writePages(p.pages, p.data);
    await this.applied(this.record.journal!, epoch);
    if (previous && previous !== p.device) this.storage.remove(path.join(this.dir, previous));
  }

  /** Append a commit record and make it durable (compacting the log when it has grown). */
  private async writeRecord(r: CommitRecord): Promise<void> {
    this.record = r;
    if (this.log.size >= this.compactBytes && !r.journal) {
      const fresh = path.join(this.dir, `${LOG}.new`);
      this.storage.remove(fresh);
      const w = JournalWriter.open(this.storage, fresh, 0);
      w.append(r);
      await w.sync();
      w.close();
      this.log.close();
      this.storage.rename(fresh, path.join(this.dir, LOG));
      this.log = JournalWriter.open(this.storage, path.join(this.dir, LOG));
      return;
    }
    this.log.append(r);
    await this.log.sync();
  }

  /** Drop a received checkpoint that will not be committed. */
  discard(): void {
    const p = this.pending;
    if (!p) return;
    this.pending = null;
    p.journal.close();
    p.deviceFile.close();
    this.storage.remove(path.join(this.dir, `ram-${p.epoch}.journal`));
    this.storage.remove(path.join(this.dir, p.device));
  }

  close(): void {
    this.discard();
    this.image.close();
    this.log.close();
  }
}
