#!/usr/bin/env node
// Runs the vitest suite and ends with the plain line "N passed, M failed" that CI reads.
// Extra arguments are passed to vitest (e.g. a file filter).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';

const report = '.vitest-report.json';
const faultCounts = '.fault-counts';
const toolSkips = '.tool-skips';
fs.rmSync(report, { force: true });
fs.rmSync(faultCounts, { recursive: true, force: true });
fs.rmSync(toolSkips, { recursive: true, force: true });
const args = [
  'vitest',
  'run',
  '--reporter=default',
  '--reporter=json',
  `--outputFile.json=${report}`,
  ...process.argv.slice(2),
];
const r = spawnSync('npx', args, { stdio: 'inherit' });
let passed = 0;
let failed = 0;
let skipped = 0;
try {
  const json = JSON.parse(fs.readFileSync(report, 'utf8'));
  passed = json.numPassedTests ?? 0;
  // A file that failed to load, or whose setup (beforeAll) failed, has no failed test of its own
  // (none ran, or all were skipped): count it as one failure.
  const brokenFiles = (json.testResults ?? []).filter(
    (f) => f.status === 'failed' && (f.assertionResults ?? []).every((a) => a.status !== 'failed'),
  ).length;
  failed = (json.numFailedTests ?? 0) + brokenFiles;
  skipped = (json.numPendingTests ?? 0) + (json.numTodoTests ?? 0);
} catch {
  failed = Math.max(failed, 1);
  console.error('run-tests: vitest wrote no report; counting the run as failed');
}
// Fault-injection suites record how many faults they injected (test/fault-counts.ts).
try {
  for (const name of fs.readdirSync(faultCounts).sort()) {
    const c = JSON.parse(fs.readFileSync(`${faultCounts}/${name}`, 'utf8'));
    console.log(`fault injection: ${c.suite}: ${c.count} ${c.what}`);
  }
} catch {
  // no fault suite ran (e.g. a filtered run)
}
// Suites skipped because a tool is missing here (test/tools.ts): which ones, and how to get them.
try {
  const skips = new Map();
  for (const name of fs.readdirSync(toolSkips))
    for (const line of fs.readFileSync(`${toolSkips}/${name}`, 'utf8').split('\n'))
      if (line.trim()) {
        const s = JSON.parse(line);
        skips.set(s.name, s);
      }
  if (skips.size) {
    const tools = [...new Set([...skips.values()].flatMap((s) => s.missing))];
    console.log(`skipped ${skips.size} suites or tests: they need ${tools.join(', ')}, not found here`);
    for (const s of skips.values()) console.log(`  - ${s.name}: ${s.hint}`);
    // One command for every skip: the union of the packages their hints name.
    const pkgs = new Set();
    for (const s of skips.values())
      for (const p of (/apt-get install ([^()]+?)(?: and run|$)/.exec(s.hint)?.[1] ?? '').split(/\s+/))
        if (p) pkgs.add(p);
    const rootFor = [
      ...new Set(
        [...skips.values()].flatMap((s) => /run as root \(([^)]+)\)/.exec(s.hint)?.[1].split(', ') ?? []),
      ),
    ];
    const root = rootFor.length ? ` (and root, for ${rootFor.join(', ')})` : '';
    console.log(
      `  install them all with: sudo apt-get install ${[...pkgs].join(' ')}${root}; ` +
        '.ci/run does, and fails on a missing tool',
    );
  }
} catch {
  // nothing was skipped for a missing tool
}
console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}`);
process.exit(r.status === 0 && failed === 0 ? 0 : 1);
