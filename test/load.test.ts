/**
 * Connection floods from a separate process (tools/loris.mjs): 10,000
 * slowloris connections from 127.0.0.2 against a `colo-blk serve` process,
 * while real clients from 127.0.0.1 (our client, qemu-img, nbdinfo) are
 * served well within the handshake deadline. First with the per-address cap
 * lifted, so the server is full and its eviction of the oldest unfinished
 * handshake is what lets clients in; then with the default cap, which turns
 * the flood away at the door. Each prints its figures (RSS, counts, time to
 * serve) for the record.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, expect, it } from 'vitest';
import { NbdClient } from '../src/net/client.js';
import { killAll, prng, randomBytes, ROOT, runOk, startCliServer, track } from './helpers.js';
import { describeWith } from './tools.js';

/** 10,000, or what this machine's open-file limit allows each process (the test says which). */
const FLOOD = Math.min(10_000, openFileLimit() - 2_000);

function openFileLimit(): number {
  const m = /Max open files\s+(\d+|unlimited)\s+(\d+|unlimited)/.exec(
    fs.readFileSync('/proc/self/limits', 'utf8'),
  );
  // Node raises its soft limit to the hard one at start; children inherit the hard one.
  return !m || m[2] === 'unlimited' ? 1 << 20 : Number(m[2]);
}
/** The real clients must be served within the server's default handshake deadline. */
const DEADLINE_MS = 10_000;
/**
 * The servers under test give the flood a longer deadline than that, so that
 * all of it is still in place when the real clients come (binding 10,000
 * sockets to one source address takes the flood several seconds); its
 * slowloris drip (a byte every 2 s) never finishes a handshake in that time.
 */
const FLOOD_DEADLINE = ['--handshake-timeout', '60000'];

afterEach(() => killAll());

interface LorisReport {
  event: string;
  opened: number;
  greeted: number;
  refused: number;
  dropped: number;
  failed: number;
  open: number;
}

/** Start the flood; resolves with its process and the 'ready' report. */
async function flood(port: number): Promise<{ stop: () => Promise<LorisReport>; ready: LorisReport }> {
  const child = track(
    spawn(
      process.execPath,
      [
        path.join(ROOT, 'tools', 'loris.mjs'),
        '--port',
        String(port),
        '--count',
        String(FLOOD),
        '--from',
        '127.0.0.2',
        '--mode',
        'slow',
        '--drip-ms',
        '2000',
        '--json',
      ],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    ),
  );
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  const lines = () =>
    out
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as LorisReport);
  const deadline = Date.now() + 60_000;
  while (!lines().some((l) => l.event === 'ready')) {
    if (child.exitCode !== null) throw new Error(`loris exited ${child.exitCode}: ${out}`);
    if (Date.now() > deadline) throw new Error(`the flood did not get ready: ${out.slice(-500)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    ready: lines().find((l) => l.event === 'ready')!,
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
      return lines().at(-1)!;
    },
  };
}

function rssMiB(pid: number): { rss: number; peak: number } {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (k: string) => Number(new RegExp(`${k}:\\s+(\\d+)`).exec(status)![1]);
  return { rss: Math.round(kb('VmRSS') / 1024), peak: Math.round(kb('VmHWM') / 1024) };
}

/** Real clients from 127.0.0.1: our client writes and reads back, qemu-img and nbdinfo read the size. */
async function serveRealClients(port: number): Promise<number> {
  const t0 = Date.now();
  const c = await NbdClient.connect({ port, exportName: 'disk0', timeoutMs: DEADLINE_MS });
  const data = randomBytes(64 * 1024, prng(9));
  await c.write(data, 4096);
  expect((await c.read(4096, data.length)).equals(data)).toBe(true);
  await c.close();
  const info = await runOk('qemu-img', ['info', `nbd://127.0.0.1:${port}/disk0`], { timeoutMs: DEADLINE_MS });
  expect(info.stdout).toMatch(/virtual size: 64 MiB/);
  const size = await runOk('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/disk0`], {
    timeoutMs: DEADLINE_MS,
  });
  expect(size.stdout.trim()).toBe(String(64 * 1024 * 1024));
  return Date.now() - t0;
}

describeWith(
  ['qemu-img', 'nbdinfo'],
  `a flood of ${FLOOD} slowloris connections from another process`,
  () => {
    it('a full server evicts the oldest unfinished handshake: real clients are served at once', async () => {
      const srv = await startCliServer([
        '--export',
        'disk0=:memory:,size=64M',
        '--max-connections-per-address',
        String(2 * FLOOD),
        ...FLOOD_DEADLINE,
        '-q',
      ]);
      const f = await flood(srv.port);
      // Every flood connection got in at first (the server admits new ones by dropping the oldest).
      expect(f.ready.opened).toBe(FLOOD);
      expect(f.ready.greeted).toBe(FLOOD);
      expect(f.ready.open).toBe(Math.min(FLOOD, 4096));
      const ms = await serveRealClients(srv.port);
      expect(ms).toBeLessThan(DEADLINE_MS);
      const mem = rssMiB(srv.child.pid!);
      const end = await f.stop();
      expect(srv.child.exitCode, 'the server is alive').toBeNull();
      console.log(
        `flood without a per-address cap: ${end.opened} opened, ${end.open} held at the end, ${end.dropped} evicted; ` +
          `real clients served in ${ms} ms; server RSS ${mem.rss} MiB (peak ${mem.peak})`,
      );
      await srv.stop();
    }, 120_000);

    it('the per-address cap (default 256) turns the flood away at the door; real clients are served', async () => {
      const srv = await startCliServer(['--export', 'disk0=:memory:,size=64M', ...FLOOD_DEADLINE, '-q']);
      const t0 = performance.now();
      const f = await flood(srv.port);
      expect(f.ready.greeted).toBe(256);
      expect(f.ready.open).toBe(256);
      expect(f.ready.refused).toBe(FLOOD - 256);
      const ms = await serveRealClients(srv.port);
      expect(ms).toBeLessThan(DEADLINE_MS);
      const mem = rssMiB(srv.child.pid!);
      const end = await f.stop();
      expect(srv.child.exitCode).toBeNull();
      // The log says so, without a line per refusal: the first of each second, then
      // that second's count (a loaded machine takes longer over the flood, so more seconds).
      const seconds = Math.ceil((performance.now() - t0) / 1000);
      const refusals = srv
        .stderr()
        .split('\n')
        .filter((l) => /refused a connection/.test(l));
      expect(refusals.length).toBeGreaterThan(0);
      expect(refusals.length).toBeLessThanOrEqual(2 * seconds + 2);
      expect(refusals.length).toBeLessThan(end.refused / 20);
      console.log(
        `flood with the per-address cap: ${end.refused} refused, ${end.greeted} admitted; ` +
          `real clients served in ${ms} ms; server RSS ${mem.rss} MiB (peak ${mem.peak})`,
      );
      await srv.stop();
    }, 120_000);
  },
);
