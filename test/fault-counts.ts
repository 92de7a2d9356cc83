/**
 * Fault-injection suites report how many faults they injected (crash points,
 * power cuts, partitions...). Each call adds to a per-suite counter file that
 * tools/run-tests.mjs prints before its final "N passed, M failed" line, so a
 * CI log shows how much fault injection actually ran.
 */
import fs from 'node:fs';
import path from 'node:path';

export const FAULT_COUNTS_DIR = path.resolve('.fault-counts');

export function recordFaults(suite: string, count: number, what: string): void {
  fs.mkdirSync(FAULT_COUNTS_DIR, { recursive: true });
  const file = path.join(FAULT_COUNTS_DIR, `${suite.replace(/[^a-z0-9-]/gi, '_')}.json`);
  let prev = { suite, count: 0, what };
  try {
    prev = JSON.parse(fs.readFileSync(file, 'utf8')) as typeof prev;
  } catch {
    // first record of this suite
  }
  fs.writeFileSync(file, JSON.stringify({ suite, what, count: prev.count + count }));
}
