/**
 * Turning results into text: the machine description, the tables printed to
 * stdout, and docs/BENCHMARKS.md (whose Analysis section is kept across runs).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import type { Outcome, Unit } from './types.js';

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
  notes: string[];
}

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
      if (!o) line += 'not run';
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
  return out.join('\n');
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
      if (!o) cells.push('not run');
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
    '## Results',
    '',
    'Higher is better everywhere. MB/s is 10^6 bytes per second. The fastest figure per row is in bold;',
    'the ratio columns divide each colo-blk variant by the best of the peers (nbdkit, qemu-nbd, nbd-server),',
    'named in parentheses. The two colo-blk variants are not compared with each other.',
    '',
    markdownTable(r),
    '',
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
    '(SIGTERM, then SIGKILL after 5 s) before the next one starts. Every workload runs against every',
    'server, in the order of the table; writes go to the same image, which stays fully allocated.',
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
