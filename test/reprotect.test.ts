// Re-protection after a failover, in both directions; a fresh secondary; a
// primary restarted after a crash; an interrupted resync; split brain. Real
// processes (the CLI), real sockets, SIGKILL.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { CLI, killAll, rmDir, run, runOk, tmpDir, waitFor as poll } from './helpers.js';
import {
  FaultProxy,
  hashExport,
  secondaryArgs,
  startNode,
  startPair,
  waitLinkUp,
  type NodeProc,
  type Pair,
} from './replication-helpers.js';

const dirs: string[] = [];
const procs: NodeProc[] = [];
let pair: Pair | null = null;
let proxy: FaultProxy | null = null;

function fresh(): string {
  const d = tmpDir('colo-blk-reprotect-');
  dirs.push(d);
  return d;
}

afterEach(async () => {
  await pair?.stop();
  pair = null;
  await proxy?.close();
  proxy = null;
  for (const p of procs.splice(0))
    if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill('SIGKILL');
  await killAll();
});
afterAll(() => dirs.forEach(rmDir));

interface PStatus {
  role: string;
  generation: number;
  generationId: string;
  peerState: string;
  refused: string | null;
  resync: { mode: string; state: string; sentBytes: number; equalBytes: number; hashBytes: number } | null;
  link: { state: string; lastError: string | null };
  unprotected: { exactBytes: number; hotBytes: number; unknownBytes: number } | null;
}

const status = (n: { control: { host: string; port: number } }) =>
  controlCall<PStatus>(n.control, 'GET', '/status');

/** helpers' waitFor with this file's patience (15 s, every 50 ms). */
const waitFor = <T>(what: () => Promise<T>, ok: (v: T) => boolean, label: string, ms = 15_000): Promise<T> =>
  poll(what, ok, label, ms, 50);

/** A secondary process on an existing state directory and image (a returning node or a new one). */
async function secondaryOn(
  dir: string,
  state: string,
  image: string,
  size: string,
  extra: string[] = [],
  env: NodeJS.ProcessEnv = {},
) {
  const s = await startNode(
    'secondary',
    secondaryArgs(path.join(dir, image), size, path.join(dir, state), extra),
    env,
  );
  procs.push(s);
  return s;
}

/** A primary process on a state directory and image of `dir`, replicating to `peerPort`. */
async function primaryOn(
  dir: string,
  state: string,
  image: string,
  size: string,
  peerPort: number,
  extra: string[] = [],
  env: NodeJS.ProcessEnv = {},
) {
  const p = await startNode(
    'primary',
    [
      '--listen',
      '127.0.0.1:0',
      '--export',
      `disk0=${path.join(dir, image)},size=${size}`,
      '--state',
      path.join(dir, state),
      '--peer',
      `127.0.0.1:${peerPort}`,
      '--control',
      '127.0.0.1:0',
      ...extra,
    ],
    env,
  );
  procs.push(p);
  return p;
}

async function reprotect(primaryControl: { port: number }, peerPort: number) {
  const r = await runOk(
    process.execPath,
    [
      CLI,
      'reprotect',
      '--control',
      `127.0.0.1:${primaryControl.port}`,
      '--peer',
      `127.0.0.1:${peerPort}`,
      '--json',
    ],
    { timeoutMs: 60_000 },
  );
  return JSON.parse(r.stdout) as {
    state: string;
    decision: { action: string; mode: string; reason: string };
    resync: { mode: string; sentBytes: number; equalBytes: number; hashBytes: number; hashAlg: string };
  };
}

const checkpointOn = (n: { control: { host: string; port: number } }) =>
  controlCall<{ epoch: number }>(n.control, 'POST', '/checkpoint', { timeoutMs: 20_000 });

describe('re-protection', () => {
  it('old secondary as primary, old primary back as secondary (rollback), then the other way round', async () => {
    const dir = fresh();
    pair = await startPair(dir, '32M');
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    await pvm.write(Buffer.alloc(1 << 20, 0x11), 0);
    await pair.checkpoint();
    // Uncommitted on the old primary: must be rolled back when it returns.
    await pvm.write(Buffer.alloc(256 * 1024, 0x22), 4 << 20);
    // The SVM's own writes since the checkpoint survive the failover (invariant 5).
    await svm.write(Buffer.alloc(128 * 1024, 0x33), 8 << 20);
    pair.primary.child.kill('SIGKILL');
    await pair.primary.exit;
    await controlCall(pair.secondary.control, 'POST', '/failover');
    // The SVM runs on as the PVM, on the same connection.
    await svm.write(Buffer.alloc(64 * 1024, 0x44), 12 << 20);

    // The old primary comes back as a secondary on its own state and image.
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img', '32M');
    const r = await reprotect(pair.secondary.control, Number(a.info.replicationPort));
    expect(r.state).toBe('protected');
    expect(r.decision).toMatchObject({ action: 'resync', mode: 'incremental' });
    // Sent: the promoted node's writes (SVM overlay + after) and the rolled-back region, no more.
    const changed = 128 * 1024 + 64 * 1024 + 256 * 1024;
    expect(r.resync.sentBytes).toBeGreaterThanOrEqual(changed);
    expect(r.resync.sentBytes).toBeLessThanOrEqual(changed * 1.05);
    // The SVM's connection survived the switch to a replicating primary; checkpoints run.
    await svm.write(Buffer.alloc(4096, 0x55), 16 << 20);
    await checkpointOn(pair.secondary);
    const [hb, ha] = await Promise.all([hashExport(pair.secondary.nbdPort), hashExport(a.nbdPort)]);
    expect(ha).toBe(hb);
    expect((await svm.read(4 << 20, 4096)).equals(Buffer.alloc(4096, 0x11 * 0))).toBe(true);
    expect((await svm.read(8 << 20, 4096)).equals(Buffer.alloc(4096, 0x33))).toBe(true);
    const sa = await status(a);
    expect(sa).toMatchObject({ role: 'secondary', generation: 2 });

    // The other direction: the new primary dies, the old one takes over again, and the
    // dead one rejoins as a secondary (--rejoin: it had served as a primary).
    await svm.write(Buffer.alloc(32 * 1024, 0x66), 20 << 20); // uncommitted on B: rolled back later
    await svm.close().catch(() => {});
    pair.secondary.child.kill('SIGKILL');
    await pair.secondary.exit;
    await controlCall(a.control, 'POST', '/failover');
    const c2 = await NbdClient.connect({ port: a.nbdPort, exportName: 'disk0' });
    await c2.write(Buffer.alloc(16 * 1024, 0x77), 24 << 20);
    const b = await secondaryOn(dir, 'svm-state', 'svm.img', '32M', ['--rejoin']);
    const r2 = await reprotect(a.control, Number(b.info.replicationPort));
    expect(r2.decision).toMatchObject({ action: 'resync', mode: 'incremental' });
    expect(r2.resync.sentBytes).toBeLessThanOrEqual((32 + 16 + 4) * 1024 * 1.05);
    await checkpointOn(a);
    expect(await hashExport(b.nbdPort)).toBe(await hashExport(a.nbdPort));
    expect((await c2.read(20 << 20, 4096)).equals(Buffer.alloc(4096))).toBe(true); // B's unfinished write is gone
    expect(await status(b)).toMatchObject({ role: 'secondary', generation: 3 });
    await c2.close();
    await pvm.close().catch(() => {});
  });

  it('a promoted node that wrote alone all over the disk sends exactly that and compares only what the old primary may hold', async () => {
    const dir = fresh();
    const MiB = 1 << 20;
    pair = await startPair(dir, '64M');
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(randomBytes(MiB), 0);
    await pair.checkpoint();
    await pvm.write(Buffer.alloc(64 * 1024, 0x22), 4 * MiB); // uncommitted: rolled back later
    pair.primary.child.kill('SIGKILL');
    await pair.primary.exit;
    await pvm.close().catch(() => {});
    await controlCall(pair.secondary.control, 'POST', '/failover');
    // Alone, 4 KiB into each of 40 extents: every one of them hot, every block written known exactly.
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    for (let k = 8; k < 48; k++) await svm.write(randomBytes(4096), k * MiB + 8192);
    // Its status says so: 40 extents hot, none of them to compare.
    const before = await status(pair.secondary);
    expect(before.unprotected).toMatchObject({ exactBytes: 40 * 4096, unknownBytes: 0 });
    expect(before.unprotected!.hotBytes).toBeGreaterThanOrEqual(40 * MiB);
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img', '64M');
    const r = await reprotect(pair.secondary.control, Number(a.info.replicationPort));
    expect(r.decision).toMatchObject({ action: 'resync', mode: 'incremental' });
    // Sent: the 40 blocks and the rolled-back 64 KiB.
    expect(r.resync.sentBytes).toBe(40 * 4096 + 64 * 1024);
    // Compared: the old primary's hot extents only (a few MiB: hundreds of bytes of hashes). Comparing
    // the promoted node's 40 hot extents as well would take 40 MiB of hashing, 10 KiB of hashes.
    expect(r.resync.hashBytes).toBeLessThan(4096);
    await checkpointOn(pair.secondary);
    expect(await hashExport(a.nbdPort)).toBe(await hashExport(pair.secondary.nbdPort));
    await svm.close();
  });

  it.each([
    ['blake3', {}],
    ['sha256', { COLO_BLK_NO_BLAKE3: '1' }],
  ])(
    'a fresh secondary: full sync compares hashes and sends only differing blocks (%s: the digest both have)',
    async (alg, env) => {
      const dir = fresh();
      pair = await startPair(dir, '32M');
      await waitLinkUp(pair.primary);
      const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
      await pvm.write(randomBytes(2 << 20), 0);
      // Random data where the new node will have other random data: compared block by block.
      const data = randomBytes(6 << 20);
      await pvm.write(data, 8 << 20);
      await pair.checkpoint();
      pair.primary.child.kill('SIGKILL');
      await pair.primary.exit;
      await pvm.close().catch(() => {});
      await controlCall(pair.secondary.control, 'POST', '/failover');
      // The new node's image: the same 6 MiB but for one byte in each of three 64 KiB blocks.
      const theirs = Buffer.from(data);
      for (const at of [5, (2 << 20) + 70_000, (5 << 20) + 1]) theirs[at] ^= 0xff;
      const img = Buffer.alloc(32 << 20);
      theirs.copy(img, 8 << 20);
      fs.writeFileSync(path.join(dir, 'new.img'), img);
      // An SHA-256-only node (a build without BLAKE3) pairs all the same: the primary hashes as it can.
      const c = await secondaryOn(dir, 'new-state', 'new.img', '32M', [], env);
      const r = await reprotect(pair.secondary.control, Number(c.info.replicationPort));
      expect(r.decision).toMatchObject({ action: 'resync', mode: 'full' });
      expect(r.resync.hashAlg).toBe(alg);
      // The 2 MiB the new node lacks, and the three differing 4 KiB blocks; the rest equal by hash.
      expect(r.resync.sentBytes).toBe((2 << 20) + 3 * 4096);
      expect(r.resync.equalBytes).toBe((32 << 20) - (2 << 20) - 3 * 4096);
      await checkpointOn(pair.secondary);
      expect(await hashExport(c.nbdPort)).toBe(await hashExport(pair.secondary.nbdPort));
    },
  );

  it('a fresh pair on sparse 64 GiB images: holes on both sides are equal without hashing', async () => {
    const dir = fresh();
    pair = await startPair(dir, '64G');
    await waitLinkUp(pair.primary, 30_000);
    const s = await status(pair.primary);
    expect(s.resync).toMatchObject({ mode: 'full', state: 'done', sentBytes: 0, equalBytes: 64 * 2 ** 30 });
    // One hash per gigabyte of hole each way (16 MiB of hashes if every 64 KiB block were hashed).
    expect(s.resync!.hashBytes).toBeLessThanOrEqual(64 * 16);
  });

  it('holes against data: stale data where the primary has a hole is replaced, zeroes written as data are equal', async () => {
    const dir = fresh();
    const MiB = 1 << 20;
    const size = 256 * MiB;
    const shared = randomBytes(MiB);
    const pvmData = randomBytes(3 * MiB);
    const make = (name: string, parts: [number, Buffer][]) => {
      const fd = fs.openSync(path.join(dir, name), 'w');
      fs.ftruncateSync(fd, size);
      for (const [off, b] of parts) fs.writeSync(fd, b, 0, b.length, off);
      fs.closeSync(fd);
    };
    make('pvm.img', [
      [16 * MiB, shared],
      [100 * MiB, pvmData],
      [60 * MiB, Buffer.alloc(8 * MiB)], // zeroes as data here, a hole there
    ]);
    make('svm.img', [
      [16 * MiB, shared],
      [200 * MiB, randomBytes(2 * MiB)], // stale: the primary has a hole here
      [150 * MiB, Buffer.alloc(8 * MiB)], // zeroes as data, a hole on the primary
      [101 * MiB, randomBytes(4096)], // inside the primary's data, different
    ]);
    pair = await startPair(dir, '256M');
    await waitLinkUp(pair.primary, 30_000);
    const s = await status(pair.primary);
    expect(s.resync).toMatchObject({ mode: 'full', state: 'done' });
    // Sent: the primary's 3 MiB the secondary lacks (its 4 KiB inside them included) and the
    // 2 MiB of stale data (as zeroes); nothing else.
    expect(s.resync!.sentBytes).toBe(5 * MiB);
    expect(s.resync!.equalBytes).toBe(size - 5 * MiB);
    await pair.checkpoint();
    expect(await hashExport(pair.secondary.nbdPort)).toBe(await hashExport(pair.primary.nbdPort));
  });

  it('a primary killed mid-epoch restarts, knows what it may have written, and resynchronises', async () => {
    const dir = fresh();
    pair = await startPair(dir, '32M');
    await waitLinkUp(pair.primary);
    let pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(Buffer.alloc(1 << 20, 1), 0);
    await pair.checkpoint();
    await pvm.write(Buffer.alloc(64 * 1024, 2), 3 << 20); // acknowledged, never committed
    pair.primary.child.kill('SIGKILL');
    await pair.primary.exit;
    await pvm.close().catch(() => {});
    const p = await primaryOn(dir, 'pvm-state', 'pvm.img', '32M', pair.replicationPort);
    pair.primary = p;
    await waitLinkUp(p, 15_000);
    const s = await status(p);
    expect(s.resync).toMatchObject({ mode: 'incremental', state: 'done' });
    expect(s.resync!.sentBytes).toBe(64 * 1024); // hot extents compared, only the lost write sent
    pvm = await NbdClient.connect({ port: p.nbdPort, exportName: 'disk0' });
    expect((await pvm.read(3 << 20, 4096)).equals(Buffer.alloc(4096, 2))).toBe(true);
    await checkpointOn(p);
    expect(await hashExport(pair.secondary.nbdPort)).toBe(await hashExport(p.nbdPort));
    await pvm.close();
  });

  it('an interrupted resync resumes; what was sent already costs only hashes', async () => {
    const dir = fresh();
    pair = await startPair(dir, '64M', {
      proxy: async (target) => {
        proxy = new FaultProxy(target);
        proxy.refuse = true;
        return proxy.listen();
      },
    });
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    const data = randomBytes(24 << 20);
    await pvm.write(data, 0);
    // Cut the first resync after ~8 MiB of its stream.
    proxy!.cutAfterBytes = 8 << 20;
    proxy!.refuse = false;
    await waitFor(
      () => status(pair!.primary),
      (s) => s.resync?.state === 'failed',
      'the first resync was not interrupted',
    );
    proxy!.cutAfterBytes = Infinity;
    proxy!.forwarded = 0;
    await waitLinkUp(pair.primary, 30_000);
    const s = await status(pair.primary);
    expect(s.resync).toMatchObject({ state: 'done', mode: 'full' });
    // Part of the data had been committed before the cut: the second pass found it equal.
    expect(s.resync!.sentBytes).toBeLessThan(24 << 20);
    expect(s.resync!.equalBytes).toBeGreaterThan(40 << 20);
    await pair.checkpoint();
    expect(await hashExport(pair.secondary.nbdPort)).toBe(await hashExport(pair.primary.nbdPort));
    await pvm.close();
  });

  it('a new secondary that never met a primary: status says so, failover is refused, it can start as the primary', async () => {
    const dir = fresh();
    fs.writeFileSync(path.join(dir, 'svm.img'), Buffer.alloc(1 << 20, 0x5c));
    const s = await secondaryOn(dir, 'svm-state', 'svm.img', '1M');
    const st = await controlCall<{ consistent: boolean; fresh: boolean }>(s.control, 'GET', '/status');
    expect(st).toMatchObject({ consistent: false, fresh: true });
    const text = await run(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${s.control.port}`]);
    expect(text.stdout).toMatch(/NEW +never synchronised with a primary/);
    const f = await run(process.execPath, [CLI, 'failover', '--control', `127.0.0.1:${s.control.port}`]);
    expect(f.code).toBe(1);
    expect(f.stderr).toMatch(/never been synchronised with a primary.*colo-blk primary/s);
    // Its disk is the one to serve: it starts as the primary on the same state directory.
    s.child.kill('SIGKILL');
    await s.exit;
    const p = await primaryOn(dir, 'svm-state', 'svm.img', '1M', 1);
    const c = await NbdClient.connect({ port: p.nbdPort, exportName: 'disk0' });
    expect((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x5c))).toBe(true);
    await c.close();
  });

  it('failover --force serves a secondary that holds no checkpoint as it is', async () => {
    const dir = fresh();
    fs.writeFileSync(path.join(dir, 'svm.img'), Buffer.alloc(1 << 20, 0x5d));
    const s = await secondaryOn(dir, 'svm-state', 'svm.img', '1M');
    const control = `127.0.0.1:${s.control.port}`;
    expect((await run(process.execPath, [CLI, 'failover', '--control', control])).code).toBe(1);
    const f = await run(process.execPath, [CLI, 'failover', '--control', control, '--force', '--json']);
    expect(f.code, f.stderr).toBe(0);
    expect(JSON.parse(f.stdout)).toMatchObject({ role: 'primary', reason: expect.stringMatching(/--force/) });
    const st = await controlCall<{ role: string; history: { forced?: boolean }[] }>(
      s.control,
      'GET',
      '/status',
    );
    expect(st.role).toBe('primary');
    const c = await NbdClient.connect({ port: s.nbdPort, exportName: 'disk0' });
    expect((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x5d))).toBe(true);
    await c.write(Buffer.alloc(4096, 0x5e), 0);
    await c.close();
  });

  it('split brain: both sides wrote after diverging; both refuse, nothing is merged', async () => {
    const dir = fresh();
    pair = await startPair(dir, '16M', {
      primaryArgs: ['--lone-after', '300'],
      proxy: async (target) => {
        proxy = new FaultProxy(target);
        return proxy.listen();
      },
    });
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(Buffer.alloc(4096, 1), 0);
    await pair.checkpoint();
    // Partition: the primary goes on alone, and the secondary is made to take over.
    proxy!.refuse = true;
    proxy!.cutAll();
    await waitFor(
      () => status(pair!.primary),
      (s) => s.peerState === 'lone',
      'the primary never went on alone',
    );
    await controlCall(pair.secondary.control, 'POST', '/failover');
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    await pvm.write(Buffer.alloc(4096, 0xa), 1 << 20);
    await svm.write(Buffer.alloc(4096, 0xb), 1 << 20);
    // The lone primary says how much its secondary lacks (recorded before each write was acknowledged).
    const lone = await status(pair.primary);
    expect(lone.unprotected!.exactBytes).toBeGreaterThanOrEqual(4096);
    expect(lone.unprotected!.hotBytes).toBeGreaterThanOrEqual(1 << 20);
    const loneText = (
      await runOk(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${pair.primary.control.port}`])
    ).stdout;
    expect(loneText).toMatch(/ALONE/);
    expect(loneText).toMatch(/out of sync +\d/);
    expect(loneText).toMatch(/of them to compare by hash at a resync/);
    const [pa, sb] = [await hashExport(pair.primary.nbdPort), await hashExport(pair.secondary.nbdPort)];
    // The partition heals: the old primary reconnects to the promoted node.
    proxy!.refuse = false;
    const p = await waitFor(
      () => status(pair!.primary),
      (s) => s.peerState === 'refused',
      'no refusal',
    );
    expect(p.refused).toMatch(/split brain/);
    expect(p.refused).toMatch(/generation 2 \([0-9a-f]+\).*generation 2 \([0-9a-f]+\)/);
    expect(p.refused).toMatch(/--discard-my-data/);
    const s = await controlCall<{ refusal: { code: string; message: string } | null }>(
      pair.secondary.control,
      'GET',
      '/status',
    );
    expect(s.refusal).toMatchObject({ code: 'ESPLIT' });
    // Nothing was touched on either side; checkpoints say why they cannot run.
    expect(await hashExport(pair.primary.nbdPort)).toBe(pa);
    expect(await hashExport(pair.secondary.nbdPort)).toBe(sb);
    const ck = await run(process.execPath, [
      CLI,
      'checkpoint',
      '--control',
      `127.0.0.1:${pair.primary.control.port}`,
    ]);
    expect(ck.code).toBe(1);
    expect(ck.stderr).toMatch(/refused|split brain/);
    // The operator picks the promoted node; the old primary discards its data and rejoins.
    pair.primary.child.kill('SIGKILL');
    await pair.primary.exit;
    await pvm.close().catch(() => {});
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img', '16M', ['--discard-my-data']);
    const r = await reprotect(pair.secondary.control, Number(a.info.replicationPort));
    expect(r.decision).toMatchObject({ action: 'resync', mode: 'full' });
    await checkpointOn(pair.secondary);
    expect(await hashExport(a.nbdPort)).toBe(await hashExport(pair.secondary.nbdPort));
    expect((await svm.read(1 << 20, 4096)).equals(Buffer.alloc(4096, 0xb))).toBe(true);
    await svm.close();
  });
});

describe('crashes during a resync', () => {
  /** A primary with data and a new secondary: a full resync with a partial commit every 1 MiB. */
  async function pairWithData(
    dir: string,
    secondaryEnv: NodeJS.ProcessEnv,
    primaryEnv: NodeJS.ProcessEnv = {},
  ) {
    const env = { COLO_BLK_RESYNC_COMMIT_BYTES: String(1 << 20) };
    // Nobody at the peer address yet; a budget the data goes past, so the log cannot carry it
    // and the resync must send it.
    const p = await primaryOn(dir, 'pvm-state', 'pvm.img', '16M', 1, ['--budget', '1M'], {
      ...env,
      ...primaryEnv,
    });
    const c = await NbdClient.connect({ port: p.nbdPort, exportName: 'disk0' });
    await c.write(randomBytes(8 << 20), 0);
    await c.write(randomBytes(1 << 20), 12 << 20);
    await c.close();
    const s = await secondaryOn(dir, 'svm-state', 'svm.img', '16M', [], { ...env, ...secondaryEnv });
    return { p, s };
  }

  for (const point of [
    'secondary-after-rebase',
    'secondary-after-partial-sync-commit',
    'secondary-mid-apply',
  ]) {
    it(`the secondary killed at ${point} is never promotable half-synced, and the resync completes`, async () => {
      const dir = fresh();
      const skip = point === 'secondary-after-rebase' ? '0' : '1'; // one rebase per resync
      const { p, s } = await pairWithData(dir, { COLO_BLK_CRASH_AT: point, COLO_BLK_CRASH_SKIP: skip });
      await controlCall(p.control, 'POST', '/reprotect', { peer: `127.0.0.1:${s.info.replicationPort}` });
      expect((await s.exit).signal).toBe('SIGKILL');
      // Restarted: if a partial commit made it, the node refuses to be promoted.
      const again = await secondaryOn(dir, 'svm-state', 'svm.img', '16M', [], {
        COLO_BLK_RESYNC_COMMIT_BYTES: String(1 << 20),
      });
      const st = await controlCall<{ syncing: unknown }>(again.control, 'GET', '/status');
      if (point === 'secondary-after-partial-sync-commit') expect(st.syncing).toBeTruthy();
      if (st.syncing) {
        const f = await run(process.execPath, [
          CLI,
          'failover',
          '--control',
          `127.0.0.1:${again.control.port}`,
        ]);
        expect(f.code).toBe(1);
        expect(f.stderr).toMatch(/part-way through a resync/);
      }
      await controlCall(p.control, 'POST', '/reprotect', { peer: `127.0.0.1:${again.info.replicationPort}` });
      await waitLinkUp(p, 30_000);
      await checkpointOn(p);
      expect(await hashExport(again.nbdPort)).toBe(await hashExport(p.nbdPort));
    });
  }

  it('the primary killed mid-resync restarts and completes it', async () => {
    const dir = fresh();
    const { p, s } = await pairWithData(
      dir,
      {},
      { COLO_BLK_CRASH_AT: 'primary-mid-resync', COLO_BLK_CRASH_SKIP: '3' },
    );
    await controlCall(p.control, 'POST', '/reprotect', { peer: `127.0.0.1:${s.info.replicationPort}` });
    expect((await p.exit).signal).toBe('SIGKILL');
    const p2 = await primaryOn(dir, 'pvm-state', 'pvm.img', '16M', Number(s.info.replicationPort));
    await waitLinkUp(p2, 30_000);
    await checkpointOn(p2);
    expect(await hashExport(s.nbdPort)).toBe(await hashExport(p2.nbdPort));
  });
});

describe('restarts after re-protection', () => {
  it('a promoted node that re-protected a secondary restarts as a plain primary and carries on', async () => {
    const dir = fresh();
    pair = await startPair(dir, '16M');
    await waitLinkUp(pair.primary);
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    pair.primary.child.kill('SIGKILL');
    await pair.primary.exit;
    await controlCall(pair.secondary.control, 'POST', '/failover');
    await svm.write(Buffer.alloc(64 * 1024, 9), 0);
    const a = await secondaryOn(dir, 'pvm-state', 'pvm.img', '16M');
    await reprotect(pair.secondary.control, Number(a.info.replicationPort));
    await svm.write(Buffer.alloc(64 * 1024, 10), 1 << 20); // logged, never committed
    await svm.close();
    pair.secondary.child.kill('SIGKILL');
    await pair.secondary.exit;
    // The same state directory, now as `colo-blk primary`: the promoted store is folded into the image.
    const b = await primaryOn(dir, 'svm-state', 'svm.img', '16M', Number(a.info.replicationPort));
    const st = await waitLinkUp(b, 20_000);
    expect(st).toMatchObject({ peerState: 'protected' });
    const c = await NbdClient.connect({ port: b.nbdPort, exportName: 'disk0' });
    expect((await c.read(0, 4096)).equals(Buffer.alloc(4096, 9))).toBe(true);
    expect((await c.read(1 << 20, 4096)).equals(Buffer.alloc(4096, 10))).toBe(true);
    await c.close();
    await checkpointOn(b);
    expect(await hashExport(a.nbdPort)).toBe(await hashExport(b.nbdPort));
    expect((await status(b)).generation).toBe(2);
  });
});
