/**
 * A protected QEMU VM as real processes, as a user runs it: a disk pair (an
 * ext4 image on the primary, synced to the secondary), the VM booted with
 * its RAM in a shared file and its disk on the primary's export, `colo-blk
 * vm` beside it, `colo-blk vm-standby` with the same command line (its disk
 * the secondary's export), and `colo-blk colo --mode remus` driving them.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { freePort } from './helpers.js';
import { startNode, startPair, waitLinkUp, type NodeProc, type Pair } from './replication-helpers.js';
import { bootGuest, guestQemuArgs, type BootedGuest } from './vm-helpers.js';

export interface ProtectedVm {
  pair: Pair;
  guest: BootedGuest;
  vm: NodeProc;
  standby: NodeProc;
  colo: NodeProc;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  status: () => Promise<any>;
  /** Highest "synced N" the PVM's console showed, with when this process saw it. */
  synced: { n: number; at: number }[];
  /** Where clients reach the guest's web service (through the comparer). */
  port: number;
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

export const DISK_SIZE = '64M';

/** The numbers of "colo-guest: synced N" lines in a console's text. */
export function syncedNumbers(text: string): number[] {
  return [...text.matchAll(/colo-guest: synced (\d+)/g)].map((m) => Number(m[1]));
}

export async function startProtectedVm(dir: string, coloArgs: string[] = []): Promise<ProtectedVm> {
  const img = path.join(dir, 'pvm.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 64 * 1024 * 1024);
  execFileSync('mkfs.ext4', ['-q', '-F', img], { stdio: 'ignore' });
  const pair = await startPair(dir, DISK_SIZE);
  await waitLinkUp(pair.primary, 60_000);
  const [pvmHttp, svmHttp] = [await freePort(), await freePort()];
  const guest = await bootGuest(dir, {
    workload: 'web',
    disk: `nbd://127.0.0.1:${pair.primary.nbdPort}/disk0`,
    httpPort: pvmHttp,
  });
  const vm = await startNode('vm', [
    '--qmp',
    guest.qmpPath,
    '--ram',
    guest.ramPath,
    '--control',
    '127.0.0.1:0',
  ]);
  const standbyDir = path.join(dir, 'standby');
  const standby = await startNode('vm-standby', [
    '--dir',
    standbyDir,
    '--control',
    '127.0.0.1:0',
    '--',
    'nice',
    '-n',
    '19',
    'qemu-system-x86_64',
    ...guestQemuArgs({
      workload: 'web',
      disk: `nbd://127.0.0.1:${pair.secondary.nbdPort}/disk0`,
      ramPath: '/dev/null/replaced-by-colo-blk',
      httpPort: svmHttp,
    }),
  ]);
  const colo = await startNode('colo', [
    '--listen',
    '127.0.0.1:0',
    '--control',
    '127.0.0.1:0',
    '--mode',
    'remus',
    '--pvm',
    `127.0.0.1:${pvmHttp}`,
    '--pvm-control',
    `127.0.0.1:${vm.control.port}`,
    '--svm',
    `127.0.0.1:${svmHttp}`,
    '--svm-control',
    `127.0.0.1:${standby.control.port}`,
    '--primary-control',
    `127.0.0.1:${pair.primary.control.port}`,
    '--secondary-control',
    `127.0.0.1:${pair.secondary.control.port}`,
    ...coloArgs,
  ]);
  const synced: { n: number; at: number }[] = [];
  const watch = setInterval(() => {
    const ns = syncedNumbers(guest.serial());
    const n = ns.length ? ns[ns.length - 1] : 0;
    if (n > (synced.at(-1)?.n ?? 0)) synced.push({ n, at: Date.now() });
  }, 10);
  // A client asking the service, one request at a time, all along.
  const port = Number(colo.info.port);
  const acked: { n: number; at: number }[] = [];
  let polling = true;
  void (async () => {
    while (polling) {
      const n = await getSynced(port);
      if (n !== null) acked.push({ n, at: Date.now() });
      else await new Promise((r) => setTimeout(r, 20));
    }
  })();
  return {
    pair,
    guest,
    vm,
    standby,
    colo,
    status: () => controlCall(colo.control, 'GET', '/status'),
    synced,
    port,
    acked,
    stopWatch: () => {
      clearInterval(watch);
      polling = false;
    },
  };
}

/**
 * The highest file number the secondary must hold: the last "synced N" this
 * process saw before the start of the last checkpoint whose commit it heard
 * of (the VM's memory and disk at that pause are what the secondary holds).
 */
export function committedSynced(p: ProtectedVm, before: number): number {
  const cps = p.colo
    .events()
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
