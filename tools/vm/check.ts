/**
 * Checking a protected VM from outside, for the tests and the VM demo: what
 * the guest's web service answers (GET /cgi-bin/synced: the last file it
 * synced), and its disk after the fact (copied over NBD, ext4 journal
 * replayed as a mount would, fsck, every file the fsync loop wrote).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import { NbdClient } from '../../src/net/client.js';

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

/**
 * A client asking all along, one request at a time (every answer is released
 * output: what the VM acknowledged), until `stop`.
 */
export function askAllAlong(port: number): {
  answers: { n: number; at: number }[];
  stop: () => Promise<void>;
} {
  const answers: { n: number; at: number }[] = [];
  let asking = true;
  const loop = (async () => {
    while (asking) {
      const n = await getSynced(port, 1000);
      if (n !== null) answers.push({ n, at: Date.now() });
      else await new Promise((r) => setTimeout(r, 10));
    }
  })();
  return {
    answers,
    stop: async () => {
      asking = false;
      await loop;
    },
  };
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
  e2(['-E', 'journal_only', '-y', into]);
  const fsck = e2(['-f', '-n', into]);
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
