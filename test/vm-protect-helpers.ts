/**
 * A protected QEMU VM for the tests (tools/vm/stack.ts), watched from
 * outside: the PVM's console ("synced N" lines) and a client asking the
 * guest's web service through the comparer all along (its answers are
 * released output: what the VM acknowledged).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import { NbdClient } from '../src/net/client.js';
import { startVmStack, type VmStack } from '../tools/vm/stack.js';
import { track } from './helpers.js';

export interface ProtectedVm extends VmStack {
  /** Highest "synced N" the PVM's console showed, with when this process saw it. */
  synced: { n: number; at: number }[];
  /** Every answer a client had from GET /cgi-bin/synced (released output: acknowledged), with when. */
  acked: { n: number; at: number }[];
  stopWatch: () => void;
}

/** GET the guest's last synced file number through the comparer (null: no answer). */
export function getSynced(port: number, timeoutMs = 2000): Promise<number | null> {
  return new Promise((resolve) => {
    const req = http.get(
      { host: '127.0.0.1', port, path: '/cgi-bin/synced', agent: false, timeout: timeoutMs },
      (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => resolve(res.statusCode === 200 && /^\d+\s*$/.test(body) ? Number(body) : null));
        res.on('error', () => resolve(null));
      },
    );
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
  });
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
  const acked: { n: number; at: number }[] = [];
  let polling = true;
  void (async () => {
    while (polling) {
      const n = await getSynced(stack.port);
      if (n !== null) acked.push({ n, at: Date.now() });
      else await new Promise((r) => setTimeout(r, 20));
    }
  })();
  return Object.assign(stack, {
    synced,
    acked,
    stopWatch: () => {
      clearInterval(watch);
      polling = false;
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
 * Copy an export to a file, replay its ext4 journal (as a mount would), and
 * check it: fsck's verdict, and every file f1..fN the fsync loop wrote.
 */
export async function checkDisk(
  nbdPort: number,
  into: string,
): Promise<{ fsckCode: number; fsck: string; files: number[]; bad: string[] }> {
  const c = await NbdClient.connect({ port: nbdPort, exportName: 'disk0' });
  const fd = fs.openSync(into, 'w');
  try {
    const step = 4 * 1024 * 1024;
    for (let off = 0; off < c.size; off += step) {
      const b = await c.read(off, Math.min(step, c.size - off));
      fs.writeSync(fd, b, 0, b.length, off);
    }
  } finally {
    fs.closeSync(fd);
    await c.close();
  }
  const e2 = (args: string[]) => {
    try {
      return { code: 0, out: execFileSync('e2fsck', args, { encoding: 'utf8', stdio: 'pipe' }) };
    } catch (err) {
      const e = err as { status: number; stdout: string; stderr: string };
      return { code: e.status, out: `${e.stdout}${e.stderr}` };
    }
  };
  const replay = e2(['-E', 'journal_only', '-y', into]);
  const fsck = e2(['-f', '-n', into]);
  if (process.env.COLO_BLK_DEBUG_DISK) console.log(replay, fsck);
  const listing = execFileSync('debugfs', ['-R', 'ls -p /', into], { encoding: 'utf8', stdio: 'pipe' });
  const files = [...listing.matchAll(/\/f(\d+)\//g)].map((m) => Number(m[1])).sort((a, b) => a - b);
  const bad: string[] = [];
  for (const n of files) {
    const text = execFileSync('debugfs', ['-R', `cat /f${n}`, into], { stdio: 'pipe' });
    if (
      text.length !== 4096 + `file ${n}\n`.length ||
      !text.subarray(4096).equals(Buffer.from(`file ${n}\n`))
    )
      bad.push(`f${n}: ${text.length} bytes, ending ${JSON.stringify(text.subarray(4096).toString())}`);
  }
  return { fsckCode: fsck.code, fsck: fsck.out, files, bad };
}
