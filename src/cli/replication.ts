/**
 * CLI commands of the replication pair: `primary`, `secondary`, `checkpoint`,
 * `status` and `inspect`. Every command that reports has --json.
 */
import { performance } from 'node:perf_hooks';
import process from 'node:process';
import fs from 'node:fs';
import path from 'node:path';
import { ClassicLevel } from 'classic-level';
import { ColoError } from '../errors.js';
import type { IoMode } from '../block/file.js';
import type { Tunables } from '../limits.js';
import { controlCall } from '../checkpoint/control.js';
import { inspectJournal, type JournalReport } from '../checkpoint/format/inspect.js';
import { epochJournal } from '../checkpoint/format/records.js';
import { PrimaryNode } from '../checkpoint/primary/node.js';
import { SecondaryNode } from '../checkpoint/secondary/node.js';
import { parseHostPort } from '../util/address.js';
import { formatBytes, parseSize } from '../util/size.js';
import { parseExportSpec } from './exports.js';
import type { CheckpointRecord } from '../checkpoint/coordinator/coordinator.js';
import { checkpointLine, coloStatusText } from './colo.js';
import { stderrLogger, waitForSignal } from './log.js';
import { linkTlsFromFlags, nbdTlsFromFlags, type LinkTlsFlags, type NbdTlsFlags } from './tls.js';

export interface NodeCliOptions extends NbdTlsFlags, LinkTlsFlags {
  heartbeatInterval: string;
  heartbeatTimeout: string;
  listen: string;
  export: string;
  state: string;
  control: string;
  io: string;
  json?: boolean;
  verbose?: boolean;
  quiet?: boolean;
}

/** Smallest `--window`: below a few frames the link would wait on every 'got'. */
const MIN_WINDOW_BYTES = 64 * 1024;

/** `--window`: the replication log on the wire at once (a primary's, or a promoted secondary's). */
function windowOf(text: string): number {
  const bytes = parseSize(text);
  if (bytes < MIN_WINDOW_BYTES)
    throw new ColoError(
      'EUSAGE',
      `--window ${text} is too small: at least 64K (the default, 2M, suits a LAN)`,
    );
  return bytes;
}

/**
 * COLO_BLK_RESYNC_COMMIT_BYTES: a resync's partial-commit interval. A test
 * knob (small disks exercise partial commits with it), read when a node
 * starts, never at import.
 */
function testTunables(): Partial<Tunables> {
  const v = Number(process.env.COLO_BLK_RESYNC_COMMIT_BYTES);
  return v > 0 ? { resyncCommitBytes: v } : {};
}

function singleExport(spec: string) {
  const e = parseExportSpec(spec);
  if (e.path === ':memory:')
    throw new ColoError(
      'EUSAGE',
      'a replicated export needs an image file (not :memory:): the state must survive',
    );
  if (e.readOnly) throw new ColoError('EUSAGE', 'a replicated export cannot be read-only');
  return e;
}

function heartbeatOf(opts: NodeCliOptions) {
  const intervalMs = Number(opts.heartbeatInterval);
  const timeoutMs = Number(opts.heartbeatTimeout);
  if (!(intervalMs >= 10) || !(timeoutMs > intervalMs))
    throw new ColoError(
      'EUSAGE',
      `--heartbeat-interval must be at least 10 ms and --heartbeat-timeout larger than it ` +
        `(got ${opts.heartbeatInterval} and ${opts.heartbeatTimeout})`,
    );
  return { intervalMs, timeoutMs };
}

function announce(json: boolean | undefined, info: Record<string, unknown>, lines: string[]): void {
  if (json) process.stdout.write(JSON.stringify({ event: 'listening', ...info }) + '\n');
  else process.stdout.write(lines.join('\n') + '\n');
}

export async function primaryCommand(
  opts: NodeCliOptions & { peer: string; budget: string; loneAfter: string; window: string },
): Promise<void> {
  const loneAfterMs = Number(opts.loneAfter);
  if (!(loneAfterMs >= 0))
    throw new ColoError('EUSAGE', `--lone-after must be a number of ms, not '${opts.loneAfter}'`);
  const windowBytes = windowOf(opts.window);
  const logger = stderrLogger(opts.verbose ? 'debug' : opts.quiet ? 'quiet' : 'info');
  const e = singleExport(opts.export);
  const node = await PrimaryNode.start({
    listen: parseHostPort(opts.listen, '--listen'),
    exportName: e.name,
    image: e.path,
    size: e.size,
    stateDir: opts.state,
    peer: parseHostPort(opts.peer, '--peer'),
    control: parseHostPort(opts.control, '--control'),
    io: opts.io as IoMode,
    budgetBytes: parseSize(opts.budget),
    heartbeat: heartbeatOf(opts),
    loneAfterMs,
    tunables: { ...testTunables(), replicationWindowBytes: windowBytes },
    nbdTls: nbdTlsFromFlags(opts),
    linkTls: linkTlsFromFlags(opts, 'primary'),
    logger,
  });
  const a = node.addresses;
  announce(
    opts.json,
    { role: 'primary', port: a.nbd.port, controlPort: a.control.port, export: e.name, size: node.image.size },
    [
      `primary: serving nbd://${a.nbd.host}:${a.nbd.port}/${e.name} (${formatBytes(node.image.size)}, ${e.path})`,
      `  replicating to ${opts.peer}; control API on http://${a.control.host}:${a.control.port}`,
    ],
  );
  await waitForSignal(logger);
  await node.close();
}

export async function secondaryCommand(
  opts: NodeCliOptions & {
    replicationListen: string;
    failover: string;
    failoverGrace: string;
    discardMyData?: boolean;
    rejoin?: boolean;
    foldSize: string;
    window: string;
  },
): Promise<void> {
  const failoverGraceMs = Number(opts.failoverGrace);
  if (!(failoverGraceMs >= 0))
    throw new ColoError('EUSAGE', `--failover-grace must be a number of ms, not '${opts.failoverGrace}'`);
  const windowBytes = windowOf(opts.window);
  const logger = stderrLogger(opts.verbose ? 'debug' : opts.quiet ? 'quiet' : 'info');
  const e = singleExport(opts.export);
  const node = await SecondaryNode.start({
    listen: parseHostPort(opts.listen, '--listen'),
    exportName: e.name,
    image: e.path,
    size: e.size,
    stateDir: opts.state,
    replicationListen: parseHostPort(opts.replicationListen, '--replication-listen'),
    control: parseHostPort(opts.control, '--control'),
    io: opts.io as IoMode,
    heartbeat: heartbeatOf(opts),
    failover: opts.failover as 'auto' | 'manual',
    failoverGraceMs,
    discardMyData: opts.discardMyData === true,
    rejoin: opts.rejoin === true,
    tunables: {
      ...testTunables(),
      promotedFoldBytes: parseSize(opts.foldSize),
      replicationWindowBytes: windowBytes,
    },
    nbdTls: nbdTlsFromFlags(opts),
    linkTls: linkTlsFromFlags(opts, 'secondary'),
    logger,
  });
  const a = node.addresses;
  announce(
    opts.json,
    {
      role: 'secondary',
      port: a.nbd.port,
      replicationPort: a.replication.port,
      controlPort: a.control.port,
      export: e.name,
      size: node.image.size,
    },
    [
      `secondary: serving the SVM disk on nbd://${a.nbd.host}:${a.nbd.port}/${e.name} (${formatBytes(node.image.size)}, ${e.path})`,
      `  replication on ${a.replication.host}:${a.replication.port}; control API on http://${a.control.host}:${a.control.port}`,
    ],
  );
  await waitForSignal(logger);
  await node.close();
}

const fmtMs = (v: unknown) => `${Number(v).toFixed(2)} ms`;

export async function failoverCommand(opts: {
  control: string;
  force?: boolean;
  json?: boolean;
}): Promise<void> {
  const r = await controlCall<Record<string, unknown>>(
    parseHostPort(opts.control, '--control'),
    'POST',
    '/failover',
    opts.force ? { force: true } : undefined,
  );
  if (opts.json) process.stdout.write(JSON.stringify(r) + '\n');
  else
    process.stdout.write(
      `failover: this node is now the primary, generation ${r.generation} (in ${Number(r.ms).toFixed(1)} ms); ` +
        `its disk is checkpoint ${r.committed} plus the SVM's own writes; ` +
        `dropped uncommitted epochs: ${(r.droppedEpochs as number[]).join(', ') || 'none'}\n`,
    );
}

interface ResyncView {
  mode: string;
  state: string;
  totalBytes: number;
  doneBytes: number;
  sentBytes: number;
  hashBytes: number;
  equalBytes: number;
  /** Absent from nodes before BLAKE3 (they hash with SHA-256). */
  hashAlg?: string;
  startedAt: number;
  finishedAt: number | null;
  error: string | null;
}

interface PrimaryView {
  peerState: string;
  resync: ResyncView | null;
  refused: string | null;
  peerDecision: { action: string; mode?: string; reason: string } | null;
  generation: number;
  generationId: string;
  link: { lastError: string | null };
}

function bar(frac: number, width = 30): string {
  const n = Math.round(Math.max(0, Math.min(1, frac)) * width);
  return `[${'#'.repeat(n)}${'.'.repeat(width - n)}]`;
}

/**
 * `colo-blk reprotect`: pair a running primary (a promoted secondary, or a
 * primary that went on alone) with a secondary, and follow the resync until
 * the secondary is synchronised and checkpoints run again.
 */
export interface ReprotectOptions {
  control: string;
  peer?: string;
  svm?: string;
  svmControl?: string;
  secondaryControl?: string;
  json?: boolean;
  timeout: string;
  wait: boolean;
}

export async function reprotectCommand(opts: ReprotectOptions): Promise<void> {
  const addr = parseHostPort(opts.control, '--control');
  const role = (await controlCall<{ role: string }>(addr, 'GET', '/status')).role;
  if (role === 'colo') return reprotectColo(opts);
  if (opts.svm || opts.svmControl || opts.secondaryControl)
    throw new ColoError(
      'EUSAGE',
      `--svm, --svm-control and --secondary-control re-protect a colo process; ${opts.control} is a ${role} node`,
    );
  return reprotectDisk(opts);
}

/**
 * Re-protect the whole VM on a colo process: the disk first (if --peer: the
 * promoted primary resynchronises the new secondary), then the SVM is paired
 * by a full checkpoint.
 */
async function reprotectColo(opts: ReprotectOptions): Promise<void> {
  const addr = parseHostPort(opts.control, '--control');
  if (!opts.svm || !opts.svmControl || !opts.secondaryControl)
    throw new ColoError(
      'EUSAGE',
      're-protecting a colo process needs the new SVM: --svm, --svm-control and --secondary-control (and --peer, the new secondary disk node, if the disk pair is not re-protected yet)',
    );
  for (const [v, what] of [
    [opts.svm, '--svm'],
    [opts.svmControl, '--svm-control'],
    [opts.secondaryControl, '--secondary-control'],
  ])
    parseHostPort(v, what);
  const started = performance.now();
  if (opts.peer) {
    const st = await controlCall<{ primaryDisk: string }>(addr, 'GET', '/status');
    await reprotectDisk({ ...opts, control: st.primaryDisk }, false);
  }
  const r = await controlCall<{ state: string }>(
    addr,
    'POST',
    '/reprotect',
    { svm: opts.svm, svmControl: opts.svmControl, secondaryControl: opts.secondaryControl },
    Number(opts.timeout),
  );
  if (opts.json)
    process.stdout.write(
      JSON.stringify({ ...r, svm: opts.svm, ms: Math.round(performance.now() - started) }) + '\n',
    );
  else
    process.stdout.write(
      `reprotect: the VM is ${r.state}: SVM ${opts.svm} paired by a full checkpoint in ${Math.round(performance.now() - started)} ms\n`,
    );
}

async function reprotectDisk(opts: ReprotectOptions, report = true): Promise<void> {
  const addr = parseHostPort(opts.control, '--control');
  if (!opts.peer)
    throw new ColoError('EUSAGE', "--peer is required: the secondary's --replication-listen address");
  parseHostPort(opts.peer, '--peer');
  const timeoutMs = Number(opts.timeout);
  if (!(timeoutMs > 0))
    throw new ColoError('EUSAGE', `--timeout must be a number of ms, not '${opts.timeout}'`);
  const started = performance.now();
  await controlCall(addr, 'POST', '/reprotect', { peer: opts.peer });
  const tty = process.stderr.isTTY;
  let lastPrinted = -1;
  let s: PrimaryView = await controlCall<PrimaryView>(addr, 'GET', '/status');
  while (opts.wait) {
    s = await controlCall<PrimaryView>(addr, 'GET', '/status');
    const r = s.resync;
    if (r && r.startedAt >= started - 1000 && r.state === 'running') {
      const frac = r.doneBytes / Math.max(1, r.totalBytes);
      const line =
        `reprotect: ${r.mode} resync ${bar(frac)} ${(100 * frac).toFixed(0)}% ` +
        `${formatBytes(r.doneBytes)}/${formatBytes(r.totalBytes)}, sent ${formatBytes(r.sentBytes)}, ` +
        `hashes ${formatBytes(r.hashBytes)}`;
      if (tty) process.stderr.write(`\r${line}`);
      else if (Math.floor(frac * 10) > lastPrinted) {
        lastPrinted = Math.floor(frac * 10);
        process.stderr.write(line + '\n');
      }
    }
    if (
      s.peerState === 'protected' &&
      (!r || r.startedAt >= started - 1000 || s.peerDecision?.action === 'none')
    )
      break;
    if (s.peerState === 'refused' || s.peerState === 'deposed')
      throw new ColoError(
        s.peerState === 'refused' ? 'ESPLIT' : 'ESTALE',
        `reprotect: the secondary refused this primary: ${s.refused ?? s.link.lastError}`,
      );
    if (performance.now() - started > timeoutMs)
      throw new ColoError(
        'EIO',
        `reprotect: not synchronised after ${timeoutMs} ms (peer ${s.peerState}` +
          `${s.link.lastError ? `: ${s.link.lastError}` : ''}); it goes on in the background — follow it with colo-blk status`,
      );
    await new Promise((r) => setTimeout(r, 200));
  }
  if (tty && opts.wait) process.stderr.write('\n');
  const r = s.resync;
  if (!report) return;
  if (opts.json) {
    process.stdout.write(
      JSON.stringify({
        peer: opts.peer,
        state: s.peerState,
        decision: s.peerDecision,
        resync: r,
        ms: Math.round(performance.now() - started),
      }) + '\n',
    );
    return;
  }
  if (!opts.wait) {
    process.stdout.write(
      `reprotect: connecting to ${opts.peer}; follow it with colo-blk status --control ${opts.control}\n`,
    );
    return;
  }
  process.stdout.write(
    `reprotect: ${opts.peer} is synchronised with generation ${s.generation} (${s.generationId})` +
      (r
        ? ` — ${r.mode} resync: sent ${formatBytes(r.sentBytes)}, ${formatBytes(r.equalBytes)} found equal by ` +
          `${formatBytes(r.hashBytes)} of ${r.hashAlg ?? 'sha256'} hashes, in ${(((r.finishedAt ?? Date.now()) - r.startedAt) / 1000).toFixed(1)} s`
        : ` — ${s.peerDecision?.reason ?? 'nothing to resend'}`) +
      `; checkpoints run again\n`,
  );
}

export async function checkpointCommand(opts: {
  control: string;
  json?: boolean;
  timeout: string;
}): Promise<void> {
  const addr = parseHostPort(opts.control, '--control');
  const r = await controlCall<Record<string, number>>(addr, 'POST', '/checkpoint', {
    timeoutMs: Number(opts.timeout),
  });
  if (opts.json) process.stdout.write(JSON.stringify(r) + '\n');
  else if ('phases' in r)
    // a colo process: a whole checkpoint (memory and disk)
    process.stdout.write(checkpointLine(r as unknown as CheckpointRecord) + '\n');
  else
    process.stdout.write(
      `checkpoint: epoch ${r.epoch} committed — ${r.writes} writes, ${formatBytes(r.bytes)}; ` +
        `seal ${fmtMs(r.sealMs)}, durable ${fmtMs(r.durableMs)}, commit ${fmtMs(r.commitMs)}, total ${fmtMs(r.totalMs)}\n`,
    );
}

function ago(ts: unknown): string {
  if (typeof ts !== 'number') return '';
  const s = (Date.now() - ts) / 1000;
  return `${new Date(ts).toISOString()} (${s < 60 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(1)} min`} ago)`;
}

export async function statusCommand(opts: { control: string; json?: boolean }): Promise<void> {
  const addr = parseHostPort(opts.control, '--control');
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  const s = await controlCall<any>(addr, 'GET', '/status');
  if (opts.json) {
    process.stdout.write(JSON.stringify(s) + '\n');
    return;
  }
  if (s.role === 'colo') {
    process.stdout.write(coloStatusText(s));
    return;
  }
  if (s.role === 'guest') {
    process.stdout.write(
      `role          guest (stand-in VM)\nstate         ${s.keys} keys, ${s.ops} operations, log at ${s.logPos}; ` +
        `${s.dirtyKeys} keys (${formatBytes(s.dirtyBytes)}) changed since checkpoint ${s.checkpoints}\n` +
        `connections   ${Object.keys(s.conns ?? {}).length}; ${s.requests} requests served\n`,
    );
    return;
  }
  const out: string[] = [];
  out.push(
    `role          ${s.role} (generation ${s.generation}${s.generationId ? `, ${s.generationId}` : ''})  node ${s.node ?? '?'}`,
  );
  out.push(`export        ${s.export}  ${formatBytes(s.size)}  ${s.image}`);
  if (s.promoted === undefined) {
    // a primary node (a promoted secondary reports in the secondary's format, with PROMOTED)
    const peerText: Record<string, string> = {
      protected: 'protected: the secondary is synchronised',
      syncing: 'resynchronising the secondary',
      connecting: 'connecting to the secondary',
      down: 'the secondary is unreachable (the epoch log is kept for it)',
      lone: 'ALONE: no secondary; writes are unprotected and recorded for a later resync',
      refused: 'REFUSED by the secondary',
      deposed: 'DEPOSED',
    };
    out.push(`peer          ${peerText[s.peerState] ?? s.peerState}`);
    const r = s.resync;
    if (r) {
      const pct = Math.floor((100 * r.doneBytes) / Math.max(1, r.totalBytes));
      out.push(
        `resync        ${r.mode}, ${r.state}${r.state === 'running' ? ` ${pct}%` : ''}: ${formatBytes(r.doneBytes)} of ` +
          `${formatBytes(r.totalBytes)} checked, ${formatBytes(r.sentBytes)} sent, ${formatBytes(r.equalBytes)} equal by ` +
          `${formatBytes(r.hashBytes)} of ${r.hashAlg ?? 'sha256'} hashes${r.error ? `; ${r.error}` : ''}`,
      );
    }
    if (s.unprotected && (s.unprotected.exactBytes > 0 || s.peerState !== 'protected'))
      out.push(
        `out of sync   ${formatBytes(s.unprotected.exactBytes)} written that the secondary lacks ` +
          `(${formatBytes(s.unprotected.hotBytes)} of extents recorded on disk, ` +
          `${formatBytes(s.unprotected.unknownBytes)} of them to compare by hash at a resync)`,
      );
    if (s.refused) out.push(`REFUSED       ${s.refused}`);
    out.push(`epoch         ${s.epoch} open`);
    out.push(
      `link          ${s.link.state} ${s.link.state === 'connected' ? 'to' : 'from'} ${s.link.peer} ${s.link.since ? `since ${ago(s.link.since)}` : ''}`,
    );
    if (s.link.lastError) out.push(`  last error  ${s.link.lastError}`);
    out.push(
      `mirrored      ${formatBytes(s.link.bytesSent)} sent; durable epoch ${s.link.durableEpoch}, committed ${s.link.committedEpoch}`,
    );
    out.push(
      `lag           ${formatBytes(s.lag.unsentBytes)} unsent, ${formatBytes(s.lag.inFlightBytes)} on the wire, ${formatBytes(s.lag.heldBytes)} held, ${s.lag.epochs} epoch(s) uncommitted`,
    );
    if (s.outOfSync) out.push(`OUT OF SYNC   since ${ago(s.outOfSync.since)}: ${s.outOfSync.reason}`);
    if (s.deposed) out.push(`DEPOSED       writes are refused: ${s.deposed}`);
    if (s.lastCheckpoint)
      out.push(
        `last ckpt     epoch ${s.lastCheckpoint.epoch} ${ago(s.lastCheckpoint.at)}: total ${fmtMs(s.lastCheckpoint.totalMs)}` +
          ` (seal ${fmtMs(s.lastCheckpoint.sealMs)}, durable ${fmtMs(s.lastCheckpoint.durableMs)}, commit ${fmtMs(s.lastCheckpoint.commitMs)})`,
      );
    if (s.lastFailure) out.push(`last failure  ${ago(s.lastFailure.at)}: ${s.lastFailure.message}`);
    out.push(`checkpoints   ${s.checkpoints} done, ${s.checkpointFailures} failed`);
  } else {
    if (s.promoted) out.push(`PROMOTED      to primary ${ago(s.promoted.at)}: ${s.promoted.reason}`);
    else if (s.failoverPending) out.push(`FAILOVER      pending: promoting unless the primary comes back`);
    if (s.fresh)
      out.push(
        `NEW           never synchronised with a primary: this disk is no copy of the pair's; not promotable`,
      );
    if (s.syncing)
      out.push(
        `RESYNCING     since ${ago(s.syncing.since)} (${s.syncing.mode}${s.syncing.target === '' ? ', its data discarded' : ''}): ` +
          `this disk matches no checkpoint; not promotable`,
      );
    if (s.refusal)
      out.push(`REFUSED       a primary ${ago(s.refusal.at)} (${s.refusal.code}): ${s.refusal.message}`);
    if (s.promoted && s.unprotected)
      out.push(
        `out of sync   ${formatBytes(s.unprotected.exactBytes)} written since the promotion (no secondary protects it; colo-blk reprotect)`,
      );
    out.push(
      `epochs        committed ${s.committedEpoch}, applied ${s.appliedEpoch}, durable ${s.durableEpoch}`,
    );
    out.push(
      `link          ${s.link.state}${s.link.peer ? ` (primary ${s.link.peer})` : ''}, ${formatBytes(s.link.bytesReceived)} received`,
    );
    if (s.link.primaryLost)
      out.push(`PRIMARY LOST  ${ago(s.link.primaryLost.at)}: ${s.link.primaryLost.reason}`);
    else if (s.link.lastError) out.push(`  last error  ${s.link.lastError}`);
    out.push(
      `overlay       ${s.overlay.writes} SVM writes, ${formatBytes(s.overlay.bytes)} ${s.promoted ? "(the disk's own data, folded into the image as it grows)" : '(discarded at the next commit)'}`,
    );
    out.push(
      `lag           ${formatBytes(s.lag.uncommittedBytes)} uncommitted, ${formatBytes(s.lag.unappliedBytes)} committed but not yet applied`,
    );
    if (s.applyError) out.push(`APPLY FAILED  ${s.applyError}`);
  }
  out.push(`pending       ${s.pending.length === 0 ? 'none' : `${s.pending.length} epoch(s)`}`);
  for (const p of s.pending)
    out.push(
      `  epoch ${String(p.epoch).padEnd(8)} ${p.state.padEnd(10)} ${String(p.writes).padStart(8)} writes  ${formatBytes(p.bytes)}`,
    );
  out.push(`nbd clients   ${s.connections}`);
  process.stdout.write(out.join('\n') + '\n');
}

interface EpochReport extends JournalReport {
  epoch: number;
  state: string;
}

/** Read the pending write sets of a stopped node from its state directory. */
async function inspectStateDir(
  dir: string,
  limit: number,
): Promise<{ role: string; epochs: EpochReport[]; overlay?: JournalReport }> {
  const nodeFile = path.join(dir, 'node.json');
  if (!fs.existsSync(nodeFile))
    throw new ColoError('ENOENT', `${dir} is not a colo-blk state directory (no node.json)`);
  const node = JSON.parse(fs.readFileSync(nodeFile, 'utf8')) as { role: string };
  const states = new Map<number, string>();
  let committed = 0;
  if (node.role === 'secondary') {
    const db = new ClassicLevel<string, string>(path.join(dir, 'meta'), { valueEncoding: 'utf8' });
    try {
      await db.open();
    } catch {
      throw new ColoError(
        'EUSAGE',
        `${dir} is in use by a running node; inspect it through its control API: --control HOST:PORT`,
      );
    }
    try {
      committed = Number((await db.get('committed')) ?? 0);
      for await (const [, v] of db.iterator({ gte: 'epoch!', lt: 'epoch"' })) {
        const m = JSON.parse(v) as { epoch: number; state: string };
        states.set(m.epoch, m.state);
      }
    } finally {
      await db.close();
    }
  }
  const epochs: EpochReport[] = [];
  const epochDir = path.join(dir, 'epochs');
  const files = fs.existsSync(epochDir) ? fs.readdirSync(epochDir) : [];
  for (const name of files.sort((a, b) => parseInt(a) - parseInt(b))) {
    const m = /^(\d+)\.journal$/.exec(name);
    if (!m) continue;
    const n = Number(m[1]);
    const report = inspectJournal(path.join(epochDir, name), { limit, bounds: epochJournal(n) });
    let state = states.get(n) ?? (report.sealed ? 'sealed' : 'open');
    if (n <= committed) state = 'committed-not-yet-applied';
    if (node.role === 'secondary' && state === 'open') state = 'receiving';
    epochs.push({ epoch: n, state, ...report });
  }
  let overlay: JournalReport | undefined;
  if (node.role === 'secondary') {
    const ovDir = path.join(dir, 'overlay');
    const cur = fs.existsSync(ovDir) ? fs.readdirSync(ovDir).filter((f) => f.endsWith('.journal')) : [];
    if (cur.length)
      overlay = inspectJournal(path.join(ovDir, cur.sort((a, b) => parseInt(b) - parseInt(a))[0]), { limit });
  }
  return { role: node.role, epochs, overlay };
}

export async function inspectCommand(opts: {
  state?: string;
  control?: string;
  epoch?: string;
  limit: string;
  merged?: boolean;
  json?: boolean;
}): Promise<void> {
  if (!opts.state === !opts.control)
    throw new ColoError(
      'EUSAGE',
      'give exactly one of --state DIR (a stopped node) or --control HOST:PORT (a running one)',
    );
  const limit = Number(opts.limit);
  if (!Number.isSafeInteger(limit) || limit < 0)
    throw new ColoError('EUSAGE', `--limit must be a whole number, not '${opts.limit}'`);
  const epoch = opts.epoch === undefined ? undefined : Number(opts.epoch);
  let r: { role: string; epochs: EpochReport[]; overlay?: JournalReport };
  if (opts.control) {
    const q = new URLSearchParams({ limit: String(opts.json ? 10_000 : limit) });
    if (epoch !== undefined) q.set('epoch', String(epoch));
    r = await controlCall(parseHostPort(opts.control, '--control'), 'GET', `/inspect?${q}`);
  } else {
    r = await inspectStateDir(opts.state!, opts.json ? 10_000 : limit);
    if (epoch !== undefined) {
      r.epochs = r.epochs.filter((e) => e.epoch === epoch);
      if (r.epochs.length === 0)
        throw new ColoError('ENOENT', `epoch ${epoch} is not pending in ${opts.state}`);
    }
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify(r) + '\n');
    return;
  }
  const out: string[] = [`${r.role}: ${r.epochs.length} pending epoch(s)`];
  const table = (title: string, rep: JournalReport) => {
    out.push(`  ${title}: ${rep.records} writes, ${formatBytes(rep.bytes)}${rep.sealed ? ', sealed' : ''}`);
    if (rep.tornTail)
      out.push(
        `    torn tail at offset ${rep.tornTail.offset} (${rep.tornTail.reason}): will be cut on start`,
      );
    if (rep.corruption) out.push(`    CORRUPT at offset ${rep.corruption.offset}: ${rep.corruption.reason}`);
    const rows = opts.merged ? rep.merged : rep.logged;
    out.push(
      `    ${opts.merged ? 'merged extents' : 'as logged'} (${Math.min(rows.length, limit)} of ${opts.merged ? rep.merged.length : rep.records}):`,
    );
    if (opts.merged) {
      out.push(`      ${'offset'.padStart(14)} ${'length'.padStart(10)}  kind  crc32`);
      for (const x of rep.merged.slice(0, limit))
        out.push(
          `      ${String(x.offset).padStart(14)} ${String(x.length).padStart(10)}  ${x.kind.padEnd(5)} ${x.crc ?? ''}`,
        );
    } else {
      out.push(`      ${'seq'.padStart(8)}  op     ${'offset'.padStart(14)} ${'length'.padStart(10)}  crc32`);
      for (const x of rep.logged.slice(0, limit))
        out.push(
          `      ${String(x.seq).padStart(8)}  ${x.op.padEnd(6)} ${String(x.offset).padStart(14)} ${String(x.length).padStart(10)}  ${x.crc ?? ''}`,
        );
    }
  };
  for (const e of r.epochs) table(`epoch ${e.epoch} [${e.state}]`, e);
  if (r.overlay) table('SVM overlay', r.overlay);
  if (!opts.merged) out.push('(--merged shows the final state of each range; --json gives everything)');
  process.stdout.write(out.join('\n') + '\n');
}
