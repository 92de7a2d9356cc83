/**
 * Pending write sets, as an operator reads them: per epoch, its records as
 * logged (offset, length, checksum) and merged (the final state of each range).
 */
import { Buffer } from 'node:buffer';
import { crc32 } from 'node:zlib';
import { ExtentMap } from './extent-map.js';
import { scanJournal, type JournalBounds } from './journal.js';
import { nodeStorage, readFully, type Storage, type StorageFile } from '../../sys/storage.js';

export interface LoggedExtent {
  seq: number;
  op: 'write' | 'zero' | 'trim';
  offset: number;
  length: number;
  /** crc32 of the data (writes only), hex. */
  crc?: string;
}

export interface MergedExtent {
  offset: number;
  length: number;
  kind: 'data' | 'zero' | 'hole';
  crc?: string;
}

export interface JournalReport {
  records: number;
  bytes: number;
  sealed: boolean;
  logged: LoggedExtent[];
  merged: MergedExtent[];
  truncated: boolean;
  tornTail: { offset: number; reason: string } | null;
  corruption: { offset: number; reason: string } | null;
}

const hex = (n: number) => n.toString(16).padStart(8, '0');

/**
 * Read a journal and describe it; at most `limit` extents of each kind are
 * listed. `file`: the journal already open; `bounds`: its own frames, when it
 * may be written over an older file (records.ts `epochJournal`).
 */
export function inspectJournal(
  path: string,
  opts: { limit?: number; storage?: Storage; file?: StorageFile; bounds?: JournalBounds } = {},
): JournalReport {
  const { limit = 10_000, storage = nodeStorage, file, bounds } = opts;
  const map = new ExtentMap();
  const logged: LoggedExtent[] = [];
  let records = 0;
  let bytes = 0;
  let sealed = false;
  let truncated = false;
  const scan = scanJournal<Record<string, unknown>>(
    storage,
    path,
    (r) => {
      const m = r.meta as { t: string; s: number; o: number; l?: number; h?: boolean };
      if (m.t === 'seal') {
        sealed = true;
        return;
      }
      if (m.t !== 'w' && m.t !== 'z' && m.t !== 't') return;
      records++;
      const length = m.t === 'w' ? r.dataLength : (m.l ?? 0);
      if (m.t === 'w') {
        bytes += length;
        map.set(m.o, length, 'data', 0, r.dataPos);
      } else map.set(m.o, length, m.t === 't' || m.h ? 'hole' : 'zero');
      if (logged.length < limit)
        logged.push({
          seq: m.s,
          op: m.t === 'w' ? 'write' : m.t === 'z' ? 'zero' : 'trim',
          offset: m.o,
          length,
          crc: m.t === 'w' && r.data ? hex(crc32(r.data)) : undefined,
        });
      else truncated = true;
    },
    { withData: true, file, bounds },
  );
  const merged: MergedExtent[] = [];
  const fd = file ?? storage.openRead(path);
  try {
    for (const e of map.extents()) {
      if (merged.length >= limit) {
        truncated = true;
        break;
      }
      const m: MergedExtent = { offset: e.start, length: e.end - e.start, kind: e.kind };
      if (e.kind === 'data') {
        const buf = Buffer.allocUnsafe(e.end - e.start);
        readFully(fd, buf, e.pos);
        m.crc = hex(crc32(buf));
      }
      merged.push(m);
    }
  } finally {
    fd.close();
  }
  return {
    records,
    bytes,
    sealed,
    logged,
    merged,
    truncated,
    tornTail: scan.tornTail,
    corruption: scan.corruption,
  };
}
