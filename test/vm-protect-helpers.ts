/**
 * A protected QEMU VM for the tests (tools/vm/stack.ts), watched from
 * outside: the PVM's console ("synced N" lines) and a client asking the
 * guest's web service through the comparer all along (its answers are
 * released output: what the VM acknowledged).
 */
import { askAllAlong } from '../tools/vm/check.js';
import { startVmStack, type VmStack } from '../tools/vm/stack.js';
import { track } from './helpers.js';

export { checkDisk, getSynced } from '../tools/vm/check.js';

export interface ProtectedVm extends VmStack {
  /** Highest "synced N" the PVM's console showed, with when this process saw it. */
  synced: { n: number; at: number }[];
  /** Every answer a client had from GET /cgi-bin/synced (released output: acknowledged), with when. */
  acked: { n: number; at: number }[];
  stopWatch: () => void;
}

/** The numbers of "colo-guest: synced N" lines in a console's text. */
export function syncedNumbers(text: string): number[] {
  return [...text.matchAll(/colo-guest: synced (\d+)/g)].map((m) => Number(m[1]));
}

/** The stack of tools/vm/stack.ts with the web workload, watched: the console's synced files, a client's answers. */
export async function startProtectedVm(dir: string, coloArgs: string[] = []): Promise<ProtectedVm> {
  const stack = await startVmStack({ dir, workload: 'web', coloArgs, track: (c) => void track(c) });
  const synced: { n: number; at: number }[] = [];
  const watch = setInterval(() => {
    const ns = syncedNumbers(stack.guest.serial());
    const n = ns.length ? ns[ns.length - 1] : 0;
    if (n > (synced.at(-1)?.n ?? 0)) synced.push({ n, at: Date.now() });
  }, 10);
  // A client asking the service, one request at a time, all along.
  const client = askAllAlong(stack.port);
  return Object.assign(stack, {
    synced,
    acked: client.answers,
    stopWatch: () => {
      clearInterval(watch);
      void client.stop();
    },
  });
}

/**
 * The highest file number the secondary must hold: the last "synced N" this
 * process saw before the start of the last checkpoint whose commit it heard
 * of (the VM's memory and disk at that pause are what the secondary holds).
 */
export function committedSynced(p: ProtectedVm, before: number): number {
  const cps = p.events
    .filter((e) => e.event === 'checkpoint' && (e.at as number) <= before)
    .map((e) => (e.at as number) - (e.totalMs as number));
  const start = cps.length ? Math.max(...cps) : 0;
  return Math.max(0, ...p.synced.filter((s) => s.at < start).map((s) => s.n));
}

export async function waitFor<T>(
  what: string,
  f: () => Promise<T | null> | T | null,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await f();
    if (v !== null && v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Wait for the standby's VM after the primary side died; on a timeout the
 * error says where the failover stood (colo's status and the last lines of
 * colo, the standby and the secondary), so that a rare stall can be read.
 */
export async function standbyStarted(p: ProtectedVm, timeoutMs = 30_000): Promise<number> {
  try {
    return await waitFor('the VM started on the standby', () => p.standbyQemuPid(), timeoutMs);
  } catch (err) {
    const tail = (s: string) => s.split('\n').slice(-15).join('\n');
    const status = await p.status().then(
      (s) => JSON.stringify({ state: s.state, lastError: s.lastError, failovers: s.failovers }),
      (e: Error) => `(no status: ${e.message})`,
    );
    throw new Error(
      `${(err as Error).message}\ncolo status: ${status}\n` +
        `--- colo ---\n${tail(p.colo.stderr())}\n--- vm-standby ---\n${tail(p.standby.stderr())}\n` +
        `--- secondary ---\n${tail(p.secondary.stderr())}`,
      { cause: err },
    );
  }
}
