/**
 * `colo-blk recover --state DIR`: bring a stopped node's state back to a
 * consistent checkpoint and say what was done.
 *
 * Secondary: every journal is verified frame by frame; torn tails (an append
 * cut by a crash) are cut; corruption in the middle is refused loudly and
 * nothing is applied from that file; the LevelDB index is rebuilt if it is
 * missing or stale; committed epochs not yet in the image are applied
 * (idempotently, with progress). Primary: journals are verified and torn tails
 * cut; epochs the secondary had not acknowledged are listed.
 * Running it twice equals running it once: the second run finds nothing to do.
 */
import process from 'node:process';
import fs from 'node:fs';
import path from 'node:path';
import { ColoError, toColoError } from '../errors.js';
import { nodeStorage } from '../sys/storage.js';
import { FileDevice } from '../block/file.js';
import { JournalWriter, scanJournal } from '../checkpoint/format/journal.js';
import { SecondaryStore } from '../checkpoint/secondary/store.js';
import { formatBytes } from '../util/size.js';

interface NodeFile {
  role: 'primary' | 'secondary' | 'promoted';
  image: string;
  size: number;
}

export interface RecoverReport {
  ok: boolean;
  role: string;
  state: string;
  image: string;
  tornTails: { file: string; offset: number; reason: string }[];
  indexRebuilt: boolean;
  applied: number[];
  appliedBytes: number;
  droppedOverlays: number[];
  committedEpoch?: number;
  /** A promoted node: its generation, and the writes of its own still in its overlay (they stay there). */
  promoted?: { generation: number; overlayWrites: number; overlayBytes: number };
  pending: { epoch: number; state: string; writes: number; bytes: number }[];
  actions: string[];
}

function readNodeFile(dir: string): NodeFile {
  const file = path.join(dir, 'node.json');
  if (!fs.existsSync(file))
    throw new ColoError('ENOENT', `${dir} is not a colo-blk state directory (no node.json)`);
  return JSON.parse(fs.readFileSync(file, 'utf8')) as NodeFile;
}

async function recoverSecondary(
  dir: string,
  node: NodeFile,
  progress: (s: string) => void,
): Promise<RecoverReport> {
  const image = await FileDevice.open(node.image).catch((err) => {
    throw new ColoError(
      toColoError(err).code,
      `cannot open the checkpoint image: ${toColoError(err).message}`,
    );
  });
  let appliedBytes = 0;
  let lastShown = -1;
  const store = await SecondaryStore.open(dir, image, {
    onApplyProgress: (epoch, done, total) => {
      const pct = total ? Math.floor((done / total) * 100) : 100;
      if (done === total) appliedBytes += total;
      if (pct !== lastShown && (pct % 10 === 0 || done === total)) {
        lastShown = pct;
        progress(`applying epoch ${epoch}: ${pct}% (${formatBytes(done)} of ${formatBytes(total)})`);
      }
    },
  }).catch(async (err) => {
    await image.close();
    throw err;
  });
  try {
    await store.drainApply();
    const r = store.recovery;
    const actions: string[] = [];
    for (const t of r.tornTails)
      actions.push(`cut a torn tail of ${t.file} at offset ${t.offset} (${t.reason})`);
    if (r.indexRebuilt) actions.push('rebuilt the metadata index (LevelDB) from the journals');
    for (const e of r.reapplied) actions.push(`applied committed epoch ${e} to ${node.image}`);
    for (const o of r.droppedOverlays)
      actions.push(`deleted overlay ${o}, discarded by a commit before the crash`);
    return {
      ok: true,
      role: store.promoted ? 'promoted' : 'secondary',
      promoted: store.promoted
        ? {
            generation: store.promoted.generation,
            overlayWrites: store.overlayLayer.records,
            overlayBytes: store.overlayLayer.dataBytes,
          }
        : undefined,
      state: dir,
      image: node.image,
      tornTails: r.tornTails,
      indexRebuilt: r.indexRebuilt,
      applied: r.reapplied,
      appliedBytes,
      droppedOverlays: r.droppedOverlays,
      committedEpoch: store.lastCommitted,
      pending: store
        .pendingEpochs()
        .map((e) => ({ epoch: e.epoch, state: e.state, writes: e.records, bytes: e.bytes })),
      actions,
    };
  } finally {
    await store.close();
    await image.close();
  }
}

function recoverPrimary(dir: string, node: NodeFile): RecoverReport {
  const epochDir = path.join(dir, 'epochs');
  const files = fs.existsSync(epochDir)
    ? fs.readdirSync(epochDir).filter((f) => /^\d+\.journal$/.test(f))
    : [];
  const report: RecoverReport = {
    ok: true,
    role: 'primary',
    state: dir,
    image: node.image,
    tornTails: [],
    indexRebuilt: false,
    applied: [],
    appliedBytes: 0,
    droppedOverlays: [],
    pending: [],
    actions: [],
  };
  for (const name of files.sort((a, b) => parseInt(a) - parseInt(b))) {
    const file = path.join(epochDir, name);
    let writes = 0;
    let bytes = 0;
    let sealed = false;
    const scan = scanJournal<{ t: string }>(nodeStorage, file, (r) => {
      if (r.meta.t === 'seal') sealed = true;
      else {
        writes++;
        if (r.meta.t === 'w') bytes += r.dataLength;
      }
    });
    if (scan.corruption)
      throw new ColoError(
        'EIO',
        `${file} is corrupt at offset ${scan.corruption.offset} (${scan.corruption.reason}). ` +
          `It is only a resend buffer: resynchronise the secondary from this primary's image.`,
      );
    if (scan.tornTail) {
      JournalWriter.open(nodeStorage, file, scan.validEnd).close();
      report.tornTails.push({ file, ...scan.tornTail });
      report.actions.push(`cut a torn tail of ${file} at offset ${scan.tornTail.offset}`);
    }
    report.pending.push({ epoch: parseInt(name), state: sealed ? 'sealed' : 'open', writes, bytes });
  }
  if (report.pending.length)
    report.actions.push(
      `epochs ${report.pending.map((p) => p.epoch).join(', ')} were not acknowledged durable by the secondary: ` +
        `their writes are in ${node.image} but may be missing there; resynchronise the secondary before trusting it`,
    );
  return report;
}

export async function recoverCommand(opts: { state: string; json?: boolean }): Promise<void> {
  const progress = (s: string) => process.stderr.write(`recover: ${s}\n`);
  let report: RecoverReport;
  try {
    const node = readNodeFile(opts.state);
    // A promoted node's directory is a secondary's store (promoted): recovered as one, never
    // scanned as a primary's resend buffer (its epochs are committed checkpoints, not unsent writes).
    report =
      node.role === 'primary'
        ? recoverPrimary(opts.state, node)
        : await recoverSecondary(opts.state, node, progress);
  } catch (err) {
    const e = toColoError(err);
    if (opts.json)
      process.stdout.write(JSON.stringify({ ok: false, error: { code: e.code, message: e.message } }) + '\n');
    throw e;
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify(report) + '\n');
    return;
  }
  const out = [`recover: ${report.role} state ${report.state} (image ${report.image})`];
  if (report.actions.length === 0) out.push('  nothing to do: the state is consistent');
  for (const a of report.actions) out.push(`  - ${a}`);
  if (report.promoted)
    out.push(
      `  promoted to primary (generation ${report.promoted.generation}): the image holds checkpoint ` +
        `${report.committedEpoch} and every write folded since; its latest ${report.promoted.overlayWrites} ` +
        `write(s) (${formatBytes(report.promoted.overlayBytes)}) stay in its overlay, as they should`,
    );
  else if (report.committedEpoch !== undefined)
    out.push(`  the image holds checkpoint ${report.committedEpoch}`);
  for (const p of report.pending)
    out.push(`  pending epoch ${p.epoch}: ${p.state}, ${p.writes} writes, ${formatBytes(p.bytes)}`);
  process.stdout.write(out.join('\n') + '\n');
}
