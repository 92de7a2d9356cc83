/**
 * Turning results into text: the machine description, the tables printed to
 * stdout, and docs/BENCHMARKS.md (whose Analysis section is kept across runs).
 */
import process from 'node:process';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import type { Outcome, ScenarioOutcome, Table, Target, Unit } from './types.js';

export const ANALYSIS_START = '<!-- analysis:start -->';
export const ANALYSIS_END = '<!-- analysis:end -->';

export interface Machine {
  cpu: string;
  cores: number;
  memoryGiB: number;
  kernel: string;
  os: string;
  node: string;
  loadAvgStart: number[];
  loadAvgEnd?: number[];
}

export interface ServerRecord {
  name: string;
  role: 'subject' | 'peer';
  summary: string;
  version: string;
  command: string;
  /** Set when the server could not be started or verified; every workload then failed. */
  startError?: string;
  multiConn?: boolean;
  /** Seconds from spawn to verified. */
  startS?: number;
  /** The workloads that apply to it (all when absent); the others show "—". */
  workloads?: string[];
}

export interface ScenarioRecord {
  id: string;
  title: string;
  method: string;
  durationS?: number;
  outcome: ScenarioOutcome;
}

/** colo-blk-replicated ÷ colo-blk (same run) on one write workload. */
export interface OverheadRow {
  workload: string;
  title: string;
  unit: Unit;
  /** The two servers compared, and whether they ran pinned (secondary on its own CPU). */
  replicatedServer: string;
  plainServer: string;
  pinned: boolean;
  /** CPU-seconds per GiB written, from /proc over the whole workload (bytes: fio's rate × its wall time). */
  cpuPerGiB?: { primary: number | null; secondary: number | null; plain: number | null };
  replicated: number | null;
  plain: number | null;
  ratio: number | null;
  /**
   * The ratio of each pass (the pair's run ÷ the baseline's run of the same pass over the servers), when
   * both ran every pass: the spread of the machine between the two, which the best-of ratio hides.
   */
  passRatios?: number[];
  /** Why there is no ratio, when there is none. */
  missing?: string;
  /** Set when replication broke during the workload: the figure is not that of a replicating pair. */
  problem?: string;
  /** The checkpoints run while the workload ran (the benchmark's loop, one every 100 ms): total time. */
  checkpointMs?: { p50: number; p99: number };
}

/** The issue's targets for checkpoints while fio writes (the disk part, a checkpoint every 100 ms). */
export const CHECKPOINT_UNDER_LOAD_P50_MS = 5;
export const CHECKPOINT_UNDER_LOAD_P99_MS = 20;

/** What went wrong with replication during a colo-blk-replicated workload, from its tally; null if nothing. */
export function replicationProblem(o: Outcome | undefined): string | null {
  if (!o?.ok) return null;
  const t = o.detail?.server as Record<string, unknown> | undefined;
  if (!t || t.checkpoints === undefined) return null;
  const parts: string[] = [];
  const failed = Number(t.checkpointFailures ?? 0);
  const done = Number(t.checkpoints ?? 0);
  if (failed > 0)
    parts.push(`${failed} of ${failed + done} checkpoints failed (first: ${String(t.firstFailure)})`);
  else if (done === 0) parts.push('no checkpoint completed');
  if (Number(t.linkReconnects ?? 0) > 0) parts.push(`the link reconnected ${String(t.linkReconnects)}×`);
  if (t.outOfSync)
    parts.push(
      `the primary marked the secondary out of sync (${String((t.outOfSync as { reason?: string }).reason ?? '')})`,
    );
  return parts.length ? parts.join('; ') : null;
}

export interface WorkloadRecord {
  id: string;
  group: string;
  title: string;
  unit: Unit;
  tool: string;
  command: string;
}

export interface Comparison {
  bestPeer: { server: string; value: number } | null;
  /** Each colo-blk variant's figure divided by the best peer's; null when either is missing. */
  ratios: Record<string, number | null>;
  fastest: string | null;
}

export interface BenchResult {
  started: string;
  durationS: number;
  mode: 'full' | 'quick';
  subset: { servers: string[] | null; workloads: string[] | null };
  machine: Machine;
  tools: Record<string, string>;
  image: { path: string; sizeBytes: number; setup: string };
  servers: ServerRecord[];
  workloads: WorkloadRecord[];
  results: Record<string, Record<string, Outcome>>;
  comparison: Record<string, Comparison>;
  /** colo-blk-replicated ÷ colo-blk; empty when either was not run. */
  replicationOverhead: OverheadRow[];
  scenarios: ScenarioRecord[];
  /** Every target of the run with PASS/MISS (pass null: not measured). */
  targets: (Target & { section: string })[];
  notes: string[];
}

export const REPLICATION_TARGET = 0.8;

/** Whether a workload applies to a server (a server def may list the ones it runs). */
export const applies = (s: { workloads?: string[] }, workloadId: string) =>
  !s.workloads || s.workloads.includes(workloadId);

export function replicationOverhead(
  results: Record<string, Record<string, Outcome>>,
  servers: ServerRecord[],
  workloads: WorkloadRecord[],
  replicated = 'colo-blk-replicated',
  plain = 'colo-blk',
): OverheadRow[] {
  const rep = servers.find((s) => s.name === replicated);
  if (!rep || !servers.some((s) => s.name === plain)) return [];
  return workloads
    .filter((w) => applies(rep, w.id))
    .map((w) => {
      const a = results[w.id]?.[replicated];
      const b = results[w.id]?.[plain];
      const row: OverheadRow = {
        workload: w.id,
        title: w.title,
        unit: w.unit,
        replicatedServer: replicated,
        plainServer: plain,
        pinned: replicated.endsWith('-pinned'),
        cpuPerGiB: {
          primary: cpuPerGiB(a, 'primaryCpuS'),
          secondary: cpuPerGiB(a, 'secondaryCpuS'),
          plain: cpuPerGiB(b, 'serverCpuS'),
        },
        replicated: a?.ok ? a.value : null,
        plain: b?.ok ? b.value : null,
        ratio: a?.ok && b?.ok ? a.value / b.value : null,
      };
      const passes = passRatios(a, b);
      if (passes) row.passRatios = passes;
      const problem = replicationProblem(a);
      if (problem) row.problem = problem;
      const t = a?.ok ? (a.detail?.server as Record<string, unknown> | undefined) : undefined;
      if (typeof t?.checkpointP50Ms === 'number' && typeof t.checkpointP99Ms === 'number')
        row.checkpointMs = { p50: t.checkpointP50Ms, p99: t.checkpointP99Ms };
      if (row.ratio === null)
        row.missing = !a?.ok
          ? `${replicated}: ${a ? (a as { error: string }).error : 'not run'}`
          : `${plain}: ${b ? (b as { error: string }).error : 'not run'}`;
      return row;
    });
}

/** Pass by pass, a's run ÷ b's (higher is better); null unless both have a figure for every pass, and more than one. */
export function passRatios(a: Outcome | undefined, b: Outcome | undefined): number[] | null {
  const ra = a?.ok ? a.detail?.runs : undefined;
  const rb = b?.ok ? b.detail?.runs : undefined;
  if (!Array.isArray(ra) || !Array.isArray(rb) || ra.length !== rb.length || ra.length < 2) return null;
  const out: number[] = [];
  for (let i = 0; i < ra.length; i++) {
    const x: unknown = ra[i];
    const y: unknown = rb[i];
    if (typeof x !== 'number' || typeof y !== 'number' || y <= 0) return null;
    out.push(x / y);
  }
  return out;
}

/** CPU-seconds per GiB of one process during a workload: its CPU tally ÷ (fio's byte rate × the tally's wall time). */
function cpuPerGiB(o: Outcome | undefined, key: string): number | null {
  if (!o?.ok) return null;
  const t = o.detail?.server as Record<string, unknown> | undefined;
  const rate = o.detail?.bytesPerS;
  const cpu = t?.[key];
  const wall = t?.wallS;
  if (typeof cpu !== 'number' || typeof wall !== 'number' || typeof rate !== 'number' || rate <= 0)
    return null;
  return cpu / ((rate * wall) / 2 ** 30);
}

/** The overhead rows of the unpinned pair and of the pinned one (each against its own baseline). */
export function allOverheadRows(
  results: Record<string, Record<string, Outcome>>,
  servers: ServerRecord[],
  workloads: WorkloadRecord[],
): OverheadRow[] {
  return [
    ...replicationOverhead(results, servers, workloads),
    ...replicationOverhead(results, servers, workloads, 'colo-blk-replicated-pinned', 'colo-blk-pinned'),
  ];
}

const placement = (row: OverheadRow) => (row.pinned ? 'pinned' : 'unpinned');

/** The verdict of one overhead row: a pair whose replication broke does not meet the target. */
export const overheadPass = (row: OverheadRow): boolean | null =>
  row.ratio === null ? null : !row.problem && row.ratio >= REPLICATION_TARGET;

/**
 * The relay of the limits scenario (bench/limits.ts): replicating ÷ alone with plain system calls, 1 MiB
 * chunks, pinned as the pinned pair. The floor any design pays here, set beside the 1 MiB pinned rows.
 */
export interface RelayCeiling {
  /** Throughput, replicating ÷ alone. */
  ratio: number;
  /** CPU-seconds per GiB that sending each chunk on added to the relay's receive + write. */
  addedCpuPerGiB: number;
  /** CPU-seconds per GiB of the sink (receive + write a journal). */
  sinkCpuPerGiB: number;
}

/** The workload the relay models: 1 MiB sequential writes. */
const RELAY_WORKLOAD = 'fio-seq-write';

export function overheadTargets(rows: OverheadRow[], relay?: RelayCeiling): Target[] {
  return rows.flatMap((row) => {
    // What a C relay reaches here on the same measures, for the rows it models.
    const relayed = relay && row.pinned && row.workload === RELAY_WORKLOAD ? relay : undefined;
    const out: Target[] = [
      {
        what: `replication overhead, ${row.workload}, ${placement(row)} (${row.replicatedServer} ÷ ${row.plainServer})`,
        target: `≥ ${REPLICATION_TARGET}×, replicating throughout`,
        measured:
          row.ratio === null
            ? null
            : formatRatio(row.ratio) +
              (row.passRatios ? ` (pass by pass: ${passesText(row.passRatios)})` : '') +
              (row.problem ? ` but replication broke: ${row.problem}` : '') +
              (relayed ? `; a C relay here: ${formatRatio(relayed.ratio)}` : ''),
        pass: overheadPass(row),
      },
    ];
    if (row.checkpointMs) {
      const { p50, p99 } = row.checkpointMs;
      out.push(
        {
          what: `checkpoint p50 while ${row.workload} runs, ${placement(row)} (one every 100 ms)`,
          target: `≤ ${CHECKPOINT_UNDER_LOAD_P50_MS} ms`,
          measured: `${p50} ms`,
          pass: p50 <= CHECKPOINT_UNDER_LOAD_P50_MS,
        },
        {
          what: `checkpoint p99 while ${row.workload} runs, ${placement(row)} (one every 100 ms)`,
          target: `≤ ${CHECKPOINT_UNDER_LOAD_P99_MS} ms`,
          measured: `${p99} ms`,
          pass: p99 <= CHECKPOINT_UNDER_LOAD_P99_MS,
        },
      );
    }
    const c = row.cpuPerGiB;
    if (row.pinned && c) {
      const f = (x: number) => `${x.toFixed(2)} s/GiB`;
      out.push(
        {
          what: `CPU per replicated GiB, ${row.workload}: the primary ÷ colo-blk alone (pinned)`,
          target: '≤ 1.3×',
          measured:
            c.primary !== null && c.plain !== null
              ? `${formatRatio(c.primary / c.plain)} (${f(c.primary)} vs ${f(c.plain)}` +
                (relayed
                  ? `; sending adds ${f(relayed.addedCpuPerGiB)} to a C relay: ` +
                    `${formatRatio((c.plain + relayed.addedCpuPerGiB) / c.plain)} of this alone`
                  : '') +
                ')'
              : null,
          pass: c.primary !== null && c.plain !== null ? c.primary / c.plain <= 1.3 : null,
        },
        {
          what: `CPU per replicated GiB, ${row.workload}: the secondary vs colo-blk alone (pinned)`,
          target: '≤ 1.0×',
          measured:
            c.secondary !== null && c.plain !== null
              ? `${formatRatio(c.secondary / c.plain)} (${f(c.secondary)} vs ${f(c.plain)}` +
                (relayed
                  ? `; a C sink takes ${f(relayed.sinkCpuPerGiB)}: ` +
                    `${formatRatio(relayed.sinkCpuPerGiB / c.plain)} of this alone`
                  : '') +
                ')'
              : null,
          pass: c.secondary !== null && c.plain !== null ? c.secondary / c.plain <= 1.0 : null,
        },
      );
    }
    return out;
  });
}

/** "1.2 + 0.8 in 6.1 s (0.9)": CPU seconds of the pair during a workload, and of plain colo-blk. */
function cpuCell(t: Record<string, unknown>, plain: Outcome | undefined): string {
  if (typeof t.primaryCpuS !== 'number') return '—';
  const alone = plain?.ok
    ? (plain.detail?.server as Record<string, unknown> | undefined)?.serverCpuS
    : undefined;
  return (
    `${t.primaryCpuS} + ${String(t.secondaryCpuS ?? '?')} in ${String(t.wallS)} s` +
    (typeof alone === 'number' ? ` (${alone})` : '')
  );
}

export const verdict = (pass: boolean | null) => (pass === null ? 'not measured' : pass ? 'PASS' : 'MISS');

export function describeMachine(): Machine {
  let cpuinfo = '';
  try {
    cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    // not Linux; os.cpus() below
  }
  const field = (name: string) => new RegExp(`^${name}\\s*:\\s*(.+)$`, 'm').exec(cpuinfo)?.[1].trim();
  let cpu = field('model name') ?? os.cpus()[0]?.model ?? 'unknown';
  const family = field('cpu family');
  const model = field('model');
  if (family && model) cpu += ` (family ${family}, model ${model})`;
  let hypervisor: string | undefined;
  try {
    hypervisor = /^Hypervisor vendor:\s*(.+)$/m.exec(execFileSync('lscpu', { encoding: 'utf8' }))?.[1].trim();
  } catch {
    // no lscpu; the cpuinfo flag below still tells a guest from bare metal
  }
  if (hypervisor) cpu += `, ${hypervisor} guest`;
  else if (/^flags\s*:.*\bhypervisor\b/m.test(cpuinfo)) cpu += ', virtual machine';
  return {
    cpu,
    cores: os.availableParallelism(),
    memoryGiB: Math.round((os.totalmem() / 2 ** 30) * 10) / 10,
    kernel: os.release(),
    os: `${os.type()} ${os.version()}`,
    node: process.version,
    loadAvgStart: os.loadavg().map((x) => Math.round(x * 100) / 100),
  };
}

export function compare(
  results: Record<string, Outcome>,
  servers: { name: string; role: 'subject' | 'peer' }[],
): Comparison {
  let bestPeer: Comparison['bestPeer'] = null;
  let fastest: { server: string; value: number } | null = null;
  for (const s of servers) {
    const o = results[s.name];
    if (!o?.ok) continue;
    if (s.role === 'peer' && (!bestPeer || o.value > bestPeer.value))
      bestPeer = { server: s.name, value: o.value };
    if (!fastest || o.value > fastest.value) fastest = { server: s.name, value: o.value };
  }
  const ratios: Record<string, number | null> = {};
  for (const s of servers.filter((x) => x.role === 'subject')) {
    const o = results[s.name];
    ratios[s.name] = o?.ok && bestPeer ? o.value / bestPeer.value : null;
  }
  return { bestPeer, ratios, fastest: fastest?.server ?? null };
}

export function formatValue(value: number, unit: Unit): string {
  if (unit === 'IOPS') return Math.round(value).toLocaleString('en-US');
  return value >= 100 ? Math.round(value).toLocaleString('en-US') : value.toFixed(1);
}

export const formatRatio = (r: number) => `${r.toFixed(2)}×`;

/** Each pass's ratio, in pass order. */
const passesText = (ratios: number[]) => ratios.map(formatRatio).join(', ');

function failureText(o: Outcome, max: number): string {
  if (o.ok) return '';
  const text = `failed: ${o.error}`;
  return text.length > max ? text.slice(0, max - 1) + '…' : text;
}

/** One plain-text table per workload, for stdout. */
export function textTables(r: BenchResult): string {
  const out: string[] = [];
  const width = Math.max(...r.servers.map((s) => s.name.length), 6);
  for (const w of r.workloads) {
    const cmp = r.comparison[w.id];
    out.push(`${w.title}  [${w.unit}, higher is better]`);
    for (const s of r.servers) {
      const o = r.results[w.id]?.[s.name];
      let line = `  ${s.name.padEnd(width)}  `;
      if (!applies(s, w.id)) line += '—'.padStart(10);
      else if (!o) line += 'not run';
      else if (!o.ok) line += failureText(o, 100);
      else {
        line += formatValue(o.value, w.unit).padStart(10);
        if (s.role === 'subject') {
          const ratio = cmp.ratios[s.name];
          line +=
            ratio === null || !cmp.bestPeer
              ? '   (no peer figure to compare with)'
              : `   ${formatRatio(ratio)} best peer (${cmp.bestPeer.server})`;
        } else if (cmp.bestPeer?.server === s.name) line += '   best peer';
      }
      out.push(line.trimEnd());
    }
    out.push('');
  }
  if (r.replicationOverhead.length) {
    out.push(`Replication overhead: replicated ÷ alone (same run)  [target ≥ ${REPLICATION_TARGET}×]`);
    for (const row of r.replicationOverhead)
      out.push(
        `  ${row.workload.padEnd(16)} ${placement(row).padEnd(9)} ` +
          (row.ratio === null
            ? `not measured (${row.missing})`
            : `${formatValue(row.replicated!, row.unit)} ÷ ${formatValue(row.plain!, row.unit)} ${row.unit} = ` +
              `${formatRatio(row.ratio)}   ${verdict(overheadPass(row))}` +
              (row.passRatios ? `  (pass by pass: ${passesText(row.passRatios)})` : '') +
              (row.problem ? `  (replication broke: ${row.problem})` : '')),
      );
    out.push('');
  }
  for (const sc of r.scenarios) {
    out.push(`${sc.title}  (--only ${sc.id})`);
    if (!sc.outcome.ok) {
      out.push(`  failed: ${sc.outcome.error}`, '');
      continue;
    }
    for (const t of sc.outcome.tables) {
      if (t.caption) out.push(`  ${t.caption}`);
      out.push(...textTable(t.table).map((l) => `  ${l}`));
    }
    for (const t of sc.outcome.targets)
      out.push(`  target: ${t.what} ${t.target}: ${t.measured ?? '—'}   ${verdict(t.pass)}`);
    for (const n of sc.outcome.notes) out.push(`  - ${n}`);
    out.push('');
  }
  return out.join('\n');
}

/** A table as aligned plain-text lines (first column left-aligned, the others right-aligned). */
function textTable(t: Table): string[] {
  const widths = t.columns.map((c, i) => Math.max(c.length, ...t.rows.map((r) => r[i].length)));
  const align = (i: number) => t.align?.[i] ?? (i === 0 ? 'l' : 'r');
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (align(i) === 'l' ? c.padEnd(widths[i]) : c.padStart(widths[i])))
      .join('  ')
      .trimEnd();
  return [line(t.columns), ...t.rows.map(line)];
}

function markdownGrid(t: Table): string {
  const align = (i: number) => t.align?.[i] ?? (i === 0 ? 'l' : 'r');
  const rows = [t.columns, t.columns.map((_, i) => (align(i) === 'l' ? '---' : '---:')), ...t.rows];
  return rows.map((cells) => `| ${cells.map(mdEscape).join(' | ')} |`).join('\n');
}

function targetsTable(targets: (Target & { section?: string })[], withSection: boolean): string {
  return markdownGrid({
    columns: [...(withSection ? ['Section'] : []), 'Target', 'Wanted', 'Measured', 'Verdict'],
    align: [...(withSection ? ['l' as const] : []), 'l', 'l', 'r', 'l'],
    rows: targets.map((t) => [
      ...(withSection ? [t.section ?? ''] : []),
      t.what,
      t.target,
      t.measured ?? '—',
      t.pass === null ? 'not measured' : t.pass ? '**PASS**' : '**MISS**',
    ]),
  });
}

const mdEscape = (s: string) => s.replace(/\|/g, '\\|').replace(/\n/g, ' ');

/** The summary matrix: a row per workload, a column per server, then colo-blk's ratios. */
export function markdownTable(r: BenchResult): string {
  const subjects = r.servers.filter((s) => s.role === 'subject');
  const head = [
    'Workload',
    'Unit',
    ...r.servers.map((s) => s.name),
    ...subjects.map((s) => `${s.name} ÷ best peer`),
  ];
  const rows = [head, head.map((_, i) => (i < 2 ? '---' : '---:'))];
  for (const w of r.workloads) {
    const cmp = r.comparison[w.id];
    const cells = [w.title, w.unit];
    for (const s of r.servers) {
      const o = r.results[w.id]?.[s.name];
      if (!applies(s, w.id)) cells.push('—');
      else if (!o) cells.push('not run');
      else if (!o.ok) cells.push(failureText(o, 80));
      else {
        const v = formatValue(o.value, w.unit);
        cells.push(cmp.fastest === s.name ? `**${v}**` : v);
      }
    }
    for (const s of subjects) {
      const ratio = cmp.ratios[s.name];
      cells.push(ratio === null ? '–' : `${formatRatio(ratio)} (${cmp.bestPeer!.server})`);
    }
    rows.push(cells.map(mdEscape));
  }
  return rows.map((cells) => `| ${cells.join(' | ')} |`).join('\n');
}

/** The hand-written Analysis section of an existing BENCHMARKS.md, markers excluded; null if none. */
export function existingAnalysis(file: string): string | null {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  const a = text.indexOf(ANALYSIS_START);
  const b = text.indexOf(ANALYSIS_END, a + ANALYSIS_START.length);
  if (a < 0 || b < 0) return null;
  return text.slice(a + ANALYSIS_START.length, b);
}

const DEFAULT_ANALYSIS = `
_Not written yet._ Where does colo-blk's time go on the workloads where it trails the
best peer? (Profile with \`node --cpu-prof bin/colo-blk.js serve …\` while one workload
runs, and compare syscall counts with \`strace -c -f\` against nbdkit.) Text between the
markers is kept when \`npm run bench\` rewrites this file.
`;

export function markdownReport(r: BenchResult, analysis: string | null): string {
  const m = r.machine;
  const lines: string[] = [];
  const push = (...xs: string[]) => lines.push(...xs);
  push(
    '# colo-blk benchmarks',
    '',
    '<!-- Written by `npm run bench` (bench/run.ts). Everything outside the Analysis markers is',
    '     rewritten on every run; write by hand only between the markers. -->',
    '',
    `Run on ${r.started.replace('T', ' ').replace(/\.\d+Z$/, ' UTC')}, ${r.mode} run` +
      (r.mode === 'quick' ? ' (`--quick`: short runs, smoke check only — not for comparison)' : '') +
      (r.subset.servers || r.subset.workloads
        ? `, subset: ${[
            r.subset.servers ? `servers ${r.subset.servers.join(', ')}` : '',
            r.subset.workloads ? `workloads ${r.subset.workloads.join(', ')}` : '',
          ]
            .filter(Boolean)
            .join('; ')}`
        : '') +
      `; took ${Math.round(r.durationS)} s.`,
    '',
  );
  if (r.targets.length)
    push(
      '## Targets',
      '',
      'The targets of the project’s issue, measured in this run (MISS is a finding to act on, not a failed run).',
      '',
      targetsTable(r.targets, true),
      '',
    );
  if (r.workloads.length)
    push(
      '## Results',
      '',
      'Higher is better everywhere. MB/s is 10^6 bytes per second. The fastest figure per row is in bold;',
      'the ratio columns divide each colo-blk variant by the best of the peers (nbdkit, qemu-nbd, nbd-server),',
      'named in parentheses. The colo-blk variants are not compared with each other there. A dash marks a',
      'workload that does not apply to a server (colo-blk-replicated runs the write workloads only).',
      '',
      markdownTable(r),
      '',
    );
  if (r.replicationOverhead.length) {
    push(
      '### Replication overhead',
      '',
      'A replicated pair ÷ colo-blk alone in this run (both in the default I/O mode): what mirroring every write to',
      `a live secondary, with a checkpoint every 100 ms, costs. Target ≥ ${REPLICATION_TARGET}×, with the pair`,
      'replicating throughout: a workload during which checkpoints failed, the link reconnected or the',
      'primary marked the secondary out of sync does not meet it, whatever its ratio. **Pinned** stands for',
      'the secondary on its own host: fio and the node under test on CPU 0 (`taskset -c 0`), the secondary on',
      'CPU 1 (the benchmark process, which only sends one `POST /checkpoint` per 100 ms, is not pinned);',
      'its baseline is colo-blk alone pinned the same way (colo-blk-pinned). **Unpinned**: every process',
      'wherever the scheduler puts it. CPU per GiB: CPU-seconds of each process from `/proc/PID/stat` over',
      'the whole workload ÷ the GiB written in that time (fio’s rate × the wall time); the figure that holds',
      'when the two sides run on separate hosts.',
      '',
      markdownGrid({
        columns: [
          'Workload',
          'Placement',
          'Unit',
          'Replicated',
          'Alone',
          'Ratio (pass by pass)',
          'CPU s/GiB: primary, secondary (alone)',
          'Verdict',
        ],
        align: ['l', 'l', 'l', 'r', 'r', 'r', 'r', 'l'],
        rows: r.replicationOverhead.map((row) => [
          row.title,
          placement(row),
          row.unit,
          row.replicated === null ? '—' : formatValue(row.replicated, row.unit),
          row.plain === null ? '—' : formatValue(row.plain, row.unit),
          row.ratio === null
            ? `— (${row.missing})`
            : formatRatio(row.ratio) + (row.passRatios ? ` (${passesText(row.passRatios)})` : ''),
          row.cpuPerGiB
            ? [row.cpuPerGiB.primary, row.cpuPerGiB.secondary]
                .map((x) => (x === null ? '?' : x.toFixed(2)))
                .join(', ') + ` (${row.cpuPerGiB.plain === null ? '?' : row.cpuPerGiB.plain.toFixed(2)})`
            : '—',
          row.ratio === null
            ? 'not measured'
            : overheadPass(row)
              ? '**PASS**'
              : row.problem
                ? `**MISS**: replication broke — ${row.problem}`
                : '**MISS**',
        ]),
      }),
      '',
    );
    const tallies = r.replicationOverhead.flatMap((row) => {
      const o = r.results[row.workload]?.[row.replicatedServer];
      const t = o?.ok ? (o.detail?.server as Record<string, unknown> | undefined) : undefined;
      return t && t.checkpoints !== undefined ? [{ row, t }] : [];
    });
    if (tallies.length)
      push(
        'Checkpoints run by the benchmark’s coordinator loop while each workload ran (from fio’s start to its end):',
        '',
        markdownGrid({
          columns: [
            'Workload',
            'Checkpoints',
            'Failed',
            'p50 (ms)',
            'p99 (ms)',
            'Max (ms)',
            'Data checkpointed',
            'CPU s: primary + secondary (colo-blk alone)',
          ],
          rows: tallies.map(({ row, t }) => [
            `${row.title}, ${placement(row)}`,
            String(t.checkpoints ?? '—'),
            String(t.checkpointFailures ?? '—') +
              (t.firstFailure ? ` (first: ${String(t.firstFailure)})` : ''),
            t.checkpointP50Ms === undefined ? '—' : String(t.checkpointP50Ms),
            t.checkpointP99Ms === undefined ? '—' : String(t.checkpointP99Ms),
            t.checkpointMaxMs === undefined ? '—' : String(t.checkpointMaxMs),
            typeof t.checkpointedBytes === 'number'
              ? `${Math.round(t.checkpointedBytes / 2 ** 20)} MiB`
              : '—',
            cpuCell(t, r.results[row.workload]?.[row.plainServer]),
          ]),
        }),
        '',
      );
  }
  for (const sc of r.scenarios) {
    push(`## ${sc.title}`, '', `Selected with \`--only ${sc.id}\`. ${sc.method}`, '');
    if (!sc.outcome.ok) {
      push(`**Failed:** ${mdEscape(sc.outcome.error)}`, '');
      continue;
    }
    for (const t of sc.outcome.tables) {
      if (t.caption) push(t.caption, '');
      push(markdownGrid(t.table), '');
    }
    if (sc.outcome.targets.length) push(targetsTable(sc.outcome.targets, false), '');
    if (sc.outcome.notes.length) push(...sc.outcome.notes.map((n) => `- ${n}`), '');
  }
  push(
    '## Machine',
    '',
    '| | |',
    '|---|---|',
    `| CPU | ${mdEscape(m.cpu)} |`,
    `| Cores available | ${m.cores} |`,
    `| Memory | ${m.memoryGiB} GiB |`,
    `| Kernel | ${mdEscape(m.kernel)} (${mdEscape(m.os)}) |`,
    `| Node | ${m.node} |`,
    `| Load average (1/5/15 min) at start | ${m.loadAvgStart.join(' / ')} |`,
    ...(m.loadAvgEnd ? [`| Load average at end | ${m.loadAvgEnd.join(' / ')} |`] : []),
    '',
    '| Program | Version |',
    '|---|---|',
    ...r.servers.map((s) => `| ${s.name} | ${mdEscape(s.version)} |`),
    ...Object.entries(r.tools).map(([k, v]) => `| ${k} | ${mdEscape(v)} |`),
    '',
    '## Setup',
    '',
    `Image: ${r.image.setup}`,
    '',
    'Servers are started one at a time, each on its own free port on 127.0.0.1, checked with',
    '`nbdinfo --size` (it must report the image size) before any workload runs, and stopped by PID',
    '(SIGTERM, then SIGKILL after 5 s) before the next one starts. Every workload that applies runs',
    'against every server, in the order of the table; writes go to the same image, which stays fully',
    'allocated. The scenarios (checkpoint latency, memory) run after the servers, each on a fresh pair of',
    'its own, and stop both nodes by PID as well.',
    '',
    '### Servers',
    '',
  );
  for (const s of r.servers) {
    push(
      `- **${s.name}** — ${s.summary}`,
      '',
      '  ```sh',
      ...s.command.split('\n').map((l) => `  ${l}`),
      '  ```',
      '',
    );
  }
  push('### Workloads', '', 'Shown with the URI of a server on port PORT.', '');
  for (const w of r.workloads)
    push(`- **${w.title}** (\`${w.id}\`)`, '', '  ```sh', `  ${w.command}`, '  ```', '');
  push('## Notes', '', ...r.notes.map((n) => `- ${n}`), '');
  push('## Analysis', '', ANALYSIS_START + (analysis ?? DEFAULT_ANALYSIS) + ANALYSIS_END, '');
  return lines.join('\n');
}
