/** `colo-blk colo`: the comparer and the checkpoint coordinator (src/checkpoint/coordinator/). */
import process from 'node:process';
import { ColoError } from '../errors.js';
import {
  verdict,
  type CheckpointRecord,
  type FailoverRecord,
} from '../checkpoint/coordinator/coordinator.js';
import { MAX_TIMEOUT_MS } from '../checkpoint/control.js';
import { COLO_DEFAULTS, ColoNode } from '../checkpoint/coordinator/node.js';
import type { Mode } from '../net/comparer/comparer.js';
import { parseHostPort } from '../util/address.js';
import { formatBytes, parseSize } from '../util/size.js';
import { stderrLogger, waitForSignal } from './log.js';

export interface ColoCliOptions {
  listen: string;
  pvm: string;
  svm?: string;
  pvmControl: string;
  svmControl?: string;
  primaryControl: string;
  secondaryControl?: string;
  control: string;
  mode: string;
  interval?: string;
  compareTimeout: string;
  maxPending: string;
  heartbeat: string;
  failoverAfter: string;
  timeout: string;
  verify?: boolean;
  earlyResume?: boolean;
  json?: boolean;
  verbose?: boolean;
  quiet?: boolean;
}

function ms(text: string, what: string, min = 0, max = Infinity): number {
  const n = Number(text);
  if (!(Number.isFinite(n) && n >= min && n <= max)) {
    const bounds = [min ? `at least ${min}` : '', max < Infinity ? `at most ${max}` : ''].filter(Boolean);
    throw new ColoError(
      'EUSAGE',
      `${what} must be a number of milliseconds${bounds.length ? ` (${bounds.join(', ')})` : ''}, not '${text}'`,
    );
  }
  return n;
}

const f = (x: number) => (x < 10 ? x.toFixed(1) : x.toFixed(0));

export function checkpointLine(r: CheckpointRecord): string {
  const p = r.phases;
  return (
    `checkpoint ${r.n} [${r.reasons.join(',')}] epoch ${r.epoch}: memory ${formatBytes(r.memoryBytes)}${r.full ? ' (full)' : ''}, ` +
    `disk ${formatBytes(r.diskBytes)} (${r.diskWrites} writes), released ${formatBytes(r.releasedBytes)}; ` +
    `paused ${f(r.pauseMs)} ms (pause ${f(p.pause)}, ` +
    (p.capture
      ? `seal ${f(p.seal)} ∥ capture ${f(p.capture)}; running again: durable ${f(p.durable)} ∥ send ${f(p.send)}, `
      : `seal ${f(p.seal)} + durable ${f(p.durable)} ∥ send ${f(p.send)}, `) +
    `drain ${f(p.drain)}, release ${f(p.release)}, load ∥ commit ${f(p.load)}, resume ${f(p.resume)})` +
    (r.svmPauseMs === null ? '' : `; the SVM paused ${f(r.svmPauseMs)} ms`) +
    (r.verified
      ? `; SVM ${r.verified.state !== false && r.verified.disk !== false ? '= PVM' : '≠ PVM'} (state ${verdict(r.verified.state)}, disk ${verdict(r.verified.disk)})`
      : '')
  );
}

export function failoverLine(r: FailoverRecord): string {
  return (
    `FAILOVER in ${f(r.ms)} ms (detect ${f(r.phases.detect)}, promote ${f(r.phases.promote)}, load ${f(r.phases.load)}, switch ${f(r.phases.switch)}): ` +
    `the SVM serves ${r.survived} connection(s) from epoch ${r.committedEpoch}, generation ${r.generation}` +
    `${r.loadedDecided ? ' (the checkpoint decided before the loss was completed)' : ''}${r.lost ? `; ${r.lost} unprotected connection(s) lost` : ''}: ${r.reason}`
  );
}

export async function coloCommand(opts: ColoCliOptions): Promise<void> {
  const logger = stderrLogger(opts.verbose ? 'debug' : opts.quiet ? 'quiet' : 'info');
  const mode = opts.mode as Mode;
  if (!['colo', 'remus', 'none'].includes(mode))
    throw new ColoError('EUSAGE', `--mode must be colo, remus or none, not '${opts.mode}'`);
  const opt = (v: string | undefined, what: string) => (v ? parseHostPort(v, what) : null);
  const node = await ColoNode.start({
    listen: parseHostPort(opts.listen, '--listen'),
    control: parseHostPort(opts.control, '--control'),
    mode,
    pvm: parseHostPort(opts.pvm, '--pvm'),
    pvmControl: parseHostPort(opts.pvmControl, '--pvm-control'),
    svm: opt(opts.svm, '--svm'),
    svmControl: opt(opts.svmControl, '--svm-control'),
    primaryControl: parseHostPort(opts.primaryControl, '--primary-control'),
    secondaryControl: opt(opts.secondaryControl, '--secondary-control'),
    intervalMs: opts.interval ? ms(opts.interval, '--interval', 1) : COLO_DEFAULTS.intervalMs[mode],
    compareTimeoutMs: ms(opts.compareTimeout, '--compare-timeout', 1),
    maxPendingBytes: parseSize(opts.maxPending),
    heartbeatMs: ms(opts.heartbeat, '--heartbeat', 10),
    failoverAfterMs: ms(opts.failoverAfter, '--failover-after', 10),
    // The disk nodes take waits of up to MAX_TIMEOUT_MS.
    phaseTimeoutMs: ms(opts.timeout, '--timeout', 100, MAX_TIMEOUT_MS),
    verify: opts.verify === true,
    earlyResume: opts.earlyResume !== false,
    logger,
  });
  const a = node.addresses;
  const out = (line: string) => process.stdout.write(line + '\n');
  if (opts.json)
    out(
      JSON.stringify({
        event: 'listening',
        role: 'colo',
        mode,
        port: a.listen.port,
        controlPort: a.control.port,
      }),
    );
  else
    out(
      `colo: clients connect to ${a.listen.host}:${a.listen.port} (mode ${mode}); PVM ${opts.pvm}` +
        `${opts.svm ? `, SVM ${opts.svm}` : ''}; control API on http://${a.control.host}:${a.control.port}`,
    );
  const co = node.coordinator;
  // A live line per checkpoint (text: at most 10 a second, then a count of the rest).
  let shown = 0;
  let skipped = 0;
  let second = 0;
  co.on('checkpoint', (r: CheckpointRecord) => {
    if (opts.json) return out(JSON.stringify({ event: 'checkpoint', ...r }));
    const now = Math.floor(Date.now() / 1000);
    if (now !== second) {
      if (skipped) out(`  (${skipped} more checkpoint(s) in that second)`);
      second = now;
      shown = 0;
      skipped = 0;
    }
    if (shown++ < 10) out(checkpointLine(r));
    else skipped++;
  });
  co.on('failover', (r: FailoverRecord) =>
    out(opts.json ? JSON.stringify({ event: 'failover', ...r }) : failoverLine(r)),
  );
  co.on('state', (state: string) =>
    out(opts.json ? JSON.stringify({ event: 'state', state }) : `state: ${state}`),
  );
  await waitForSignal(logger);
  await node.close();
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
export function coloStatusText(s: any): string {
  const c = s.comparer;
  const lines = [
    `role          colo (comparer and checkpoint coordinator), mode ${s.mode}`,
    `state         ${s.state}${s.lastError ? `  (${s.lastError})` : ''}`,
    `PVM           ${s.pvm}; primary disk ${s.primaryDisk} (peer ${s.diskPeerState})`,
    `SVM           ${s.svm ?? 'none'}${s.secondaryDisk ? `; secondary disk ${s.secondaryDisk}` : ''}`,
    `checkpoints   ${s.checkpoints} done, ${s.checkpointFailures} failed${s.verifyFailures ? `, ${s.verifyFailures} VERIFY FAILURES` : ''}; by reason: ${
      Object.entries(s.byReason)
        .map(([k, v]) => `${k} ${v}`)
        .join(', ') || 'none'
    }`,
    `pause         p50 ${s.pauseMs.p50 ?? '-'} ms, p99 ${s.pauseMs.p99 ?? '-'} ms${s.svmPauseMs.p50 === null ? '' : ` (SVM p50 ${s.svmPauseMs.p50} ms)`}; sent ${formatBytes(s.memoryBytes)} of memory, ${formatBytes(s.diskBytes)} of disk`,
    `connections   ${c.connections} open (${c.connectionsOpened} in all, ${c.connectionsLost} lost); ${formatBytes(c.heldBytes)} held, ${formatBytes(c.unmatchedSvmBytes)} SVM unmatched, ${c.divergedConnections} diverged, ${c.unprotectedConnections} unprotected`,
    `released      ${formatBytes(c.bytesReleased)} of ${formatBytes(c.bytesIn)} in`,
  ];
  if (s.lastCheckpoint) lines.push(`last          ${checkpointLine(s.lastCheckpoint)}`);
  for (const fo of s.failovers ?? []) lines.push(`failover      ${failoverLine(fo)}`);
  return lines.join('\n') + '\n';
}
