// Promote → crash → re-protect (issue: a silent divergence). A promoted node
// is killed before its first fold and restarted on the same state directory,
// as a secondary that re-protects or as a plain primary; the old primary
// returns as its secondary. After the resync and a checkpoint both exports
// must be equal by hash, and the SVM's post-failover writes must be on both.
// Real processes (the CLI), real sockets, SIGKILL.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { CLI, killAll, rmDir, run, tmpDir } from './helpers.js';
import {
  hashExport,
  startNode,
  startPair,
  waitLinkUp,
  type NodeProc,
  type Pair,
} from './replication-helpers.js';

const dirs: string[] = [];
const procs: NodeProc[] = [];
let pair: Pair | null = null;

afterEach(async () => {
  await pair?.stop();
  pair = null;
  for (const p of procs.splice(0))
    if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
  await killAll();
});
afterAll(() => dirs.forEach(rmDir));

const SIZE = '128M';
const MiB = 1 << 20;

/** The writes of the report: regions nobody wrote before. */
const svmWrites = [
  { offset: 40 * MiB, length: MiB, fill: 0x41 },
  { offset: 90 * MiB, length: 512 * 1024, fill: 0x42 },
  { offset: 1 * MiB, length: 4096, fill: 0x43 },
];

function nodeArgs(dir: string, state: string, image: string): string[] {
  return [
    '--listen',
    '127.0.0.1:0',
    '--export',
    `disk0=${path.join(dir, image)},size=${SIZE}`,
    '--state',
    path.join(dir, state),
    '--control',
    '127.0.0.1:0',
  ];
}

async function secondaryOn(
  dir: string,
  state: string,
  image: string,
  extra: string[] = [],
  env: NodeJS.ProcessEnv = {},
) {
  const s = await startNode(
    'secondary',
    [...nodeArgs(dir, state, image), '--replication-listen', '127.0.0.1:0', '--failover', 'manual', ...extra],
    env,
  );
  procs.push(s);
  return s;
}

async function primaryOn(
  dir: string,
  state: string,
  image: string,
  peerPort: number,
  env: NodeJS.ProcessEnv = {},
) {
  const p = await startNode(
    'primary',
    [...nodeArgs(dir, state, image), '--peer', `127.0.0.1:${peerPort}`],
    env,
  );
  procs.push(p);
  return p;
}

/** Steps 1-3 of the report, then SIGKILL of the promoted node. Returns the pair's directory. */
async function promoteWriteKill(opts: { fold?: boolean } = {}): Promise<string> {
  const dir = tmpDir('colo-blk-promoted-restart-');
  dirs.push(dir);
  pair = await startPair(dir, SIZE, opts.fold ? { secondaryArgs: ['--fold-size', '256K'] } : {});
  await waitLinkUp(pair.primary);
  const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
  await pvm.write(Buffer.alloc(MiB, 0x11), 8 * MiB);
  await pair.checkpoint();
  pair.primary.child.kill('SIGKILL');
  await pair.primary.exit;
  await pvm.close().catch(() => {});
  await controlCall(pair.secondary.control, 'POST', '/failover');
  const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
  for (const w of svmWrites) await svm.write(Buffer.alloc(w.length, w.fill), w.offset);
  await svm.flush();
  await svm.close();
  pair.secondary.child.kill('SIGKILL');
  await pair.secondary.exit;
  return dir;
}

async function expectWritesOn(port: number): Promise<void> {
  const c = await NbdClient.connect({ port, exportName: 'disk0' });
  try {
    for (const w of svmWrites)
      expect((await c.read(w.offset, w.length)).equals(Buffer.alloc(w.length, w.fill))).toBe(true);
    expect((await c.read(8 * MiB, MiB)).equals(Buffer.alloc(MiB, 0x11))).toBe(true);
  } finally {
    await c.close();
  }
}

describe('promote, crash, re-protect', () => {
  for (const fold of [false, true])
    it(`restarted as a secondary that re-protects the old primary${fold ? ' (crash after a fold)' : ''}`, async () => {
      const dir = await promoteWriteKill({ fold });
      const b = await secondaryOn(dir, 'svm-state', 'svm.img');
      const st = await controlCall<{ role: string }>(b.control, 'GET', '/status');
      expect(st.role).toBe('primary'); // still the promoted node
      const a = await secondaryOn(dir, 'pvm-state', 'pvm.img');
      await controlCall(b.control, 'POST', '/reprotect', { peer: `127.0.0.1:${a.info.replicationPort}` });
      await waitLinkUp(b, 30_000);
      await controlCall(b.control, 'POST', '/checkpoint', { timeoutMs: 20_000 });
      await expectWritesOn(b.nbdPort);
      await expectWritesOn(a.nbdPort);
      expect(await hashExport(a.nbdPort)).toBe(await hashExport(b.nbdPort));
    });

  for (const fold of [false, true])
    it(`restarted as a plain primary, the old primary its secondary${fold ? ' (crash after a fold)' : ''}`, async () => {
      const dir = await promoteWriteKill({ fold });
      const a = await secondaryOn(dir, 'pvm-state', 'pvm.img');
      const b = await primaryOn(dir, 'svm-state', 'svm.img', Number(a.info.replicationPort));
      await waitLinkUp(b, 30_000);
      await controlCall(b.control, 'POST', '/checkpoint', { timeoutMs: 20_000 });
      await expectWritesOn(b.nbdPort);
      await expectWritesOn(a.nbdPort);
      expect(await hashExport(a.nbdPort)).toBe(await hashExport(b.nbdPort));
    });

  // A partial commit every 256 KiB, so a crash mid-resync leaves the returning node part-synced.
  const small = { COLO_BLK_RESYNC_COMMIT_BYTES: String(256 * 1024) };

  it('the restarted node is killed mid-resync, restarts again and converges', async () => {
    const dir = await promoteWriteKill();
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img', [], small);
    const port = Number(a.info.replicationPort);
    const b = await primaryOn(dir, 'svm-state', 'svm.img', port, {
      ...small,
      COLO_BLK_CRASH_AT: 'primary-mid-resync',
      COLO_BLK_CRASH_SKIP: '1',
    });
    expect((await b.exit).signal).toBe('SIGKILL');
    const b2 = await primaryOn(dir, 'svm-state', 'svm.img', port, small);
    await waitLinkUp(b2, 30_000);
    await controlCall(b2.control, 'POST', '/checkpoint', { timeoutMs: 20_000 });
    await expectWritesOn(a.nbdPort);
    expect(await hashExport(a.nbdPort)).toBe(await hashExport(b2.nbdPort));
  });

  it('the returning node is killed after a partial resync commit, restarts and converges', async () => {
    const dir = await promoteWriteKill();
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img', [], {
      ...small,
      COLO_BLK_CRASH_AT: 'secondary-after-partial-sync-commit',
    });
    const b = await secondaryOn(dir, 'svm-state', 'svm.img', [], small);
    await controlCall(b.control, 'POST', '/reprotect', { peer: `127.0.0.1:${a.info.replicationPort}` });
    expect((await a.exit).signal).toBe('SIGKILL');
    const a2 = await secondaryOn(dir, 'pvm-state', 'pvm.img', [], small);
    await controlCall(b.control, 'POST', '/reprotect', { peer: `127.0.0.1:${a2.info.replicationPort}` });
    await waitLinkUp(b, 30_000);
    await controlCall(b.control, 'POST', '/checkpoint', { timeoutMs: 20_000 });
    await expectWritesOn(a2.nbdPort);
    expect(await hashExport(a2.nbdPort)).toBe(await hashExport(b.nbdPort));
  });

  it('restarted as a primary, killed after the fold but before the cleanup, restarts as a primary again', async () => {
    const dir = await promoteWriteKill({ fold: true });
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img');
    const port = Number(a.info.replicationPort);
    // It dies while opening its state directory (before it listens).
    const killed = await run(
      process.execPath,
      [CLI, 'primary', ...nodeArgs(dir, 'svm-state', 'svm.img'), '--peer', `127.0.0.1:${port}`],
      { env: { ...process.env, COLO_BLK_CRASH_AT: 'promoted-finish-before-cleanup' }, timeoutMs: 20_000 },
    );
    expect(killed.signal).toBe('SIGKILL');
    expect(fs.existsSync(path.join(dir, 'svm-state', 'commits.journal'))).toBe(true);
    const b2 = await primaryOn(dir, 'svm-state', 'svm.img', port);
    await waitLinkUp(b2, 30_000);
    await controlCall(b2.control, 'POST', '/checkpoint', { timeoutMs: 20_000 });
    await expectWritesOn(b2.nbdPort);
    await expectWritesOn(a.nbdPort);
    expect(await hashExport(a.nbdPort)).toBe(await hashExport(b2.nbdPort));
  });

  it('a misspelt crash point is refused at start, not silently never fired', async () => {
    const dir = tmpDir('colo-blk-promoted-restart-');
    dirs.push(dir);
    const r = await startNode(
      'secondary',
      [...nodeArgs(dir, 's', 'i.img'), '--replication-listen', '127.0.0.1:0'],
      {
        COLO_BLK_CRASH_AT: 'secondary-after-comit-record',
      },
    ).catch((err: Error) => err);
    expect(r).toBeInstanceOf(Error);
    expect((r as Error).message).toMatch(/is not a crash point; known: .*secondary-after-commit-record/);
  });
});
