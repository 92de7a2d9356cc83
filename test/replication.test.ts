// Replication end to end with real processes, real sockets and real LevelDB:
// invariant 1 (epoch equality), SVM isolation, crashes of the secondary at
// named points, a cut link, real clients while checkpoints run.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { Cmd, COMMANDS } from '../src/net/protocol.js';
import { CLI, killAll, prng, randomBytes, rmDir, run, runOk, tmpDir, waitFor } from './helpers.js';
import {
  FaultProxy,
  hashExport,
  pairHashes,
  startPair,
  waitLinkUp,
  type Pair,
} from './replication-helpers.js';
import { itWith } from './tools.js';

const root = tmpDir('colo-blk-repl-');
let n = 0;
const fresh = () => {
  const d = path.join(root, `t${n++}`);
  fs.mkdirSync(d);
  return d;
};
let pair: Pair | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
  await killAll();
});
afterAll(() => rmDir(root));

const SIZE = 16 * 1024 * 1024;

/** A random guest-like workload over every mutating command; returns the number of ops. */
async function workload(c: NbdClient, seed: number, ops: number): Promise<void> {
  const rand = prng(seed);
  const pending: Promise<unknown>[] = [];
  for (let i = 0; i < ops; i++) {
    // Non-overlapping batches would hide ordering bugs: let them overlap freely.
    const off = rand() % (SIZE - 300_000);
    const len = 1 + (rand() % 262_144);
    const op = rand() % 12;
    if (op < 5) pending.push(c.write(randomBytes(len, rand), off));
    else if (op === 5) pending.push(c.write(randomBytes(len, rand), off, { fua: true }));
    else if (op === 6) pending.push(c.zero(off, len, { noHole: true }));
    else if (op === 7) pending.push(c.zero(off, len));
    else if (op === 8) pending.push(c.trim(off, len));
    else if (op === 9) pending.push(c.flush());
    else pending.push(c.read(off, len));
    if (pending.length >= 8) await Promise.all(pending.splice(0));
  }
  await Promise.all(pending);
}

describe('replication', () => {
  it('the command table that drives validation covers every NBD command (the list is closed)', () => {
    for (const [name, value] of Object.entries(Cmd)) {
      if (name === 'RESIZE') continue; // not offered: answered with EINVAL
      expect(COMMANDS[value], `NBD command ${name} is not in the command table`).toBeDefined();
    }
    const mutating = Object.entries(COMMANDS)
      .filter(([, c]) => c.mutates)
      .map(([k]) => Number(k));
    expect(mutating.sort()).toEqual([Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES].sort());
  });

  it('after every commit the SVM disk equals the PVM disk at the cut (invariant 1)', async () => {
    pair = await startPair(fresh());
    const first = (await waitLinkUp(pair.primary)).epoch;
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    for (let round = 0; round < 8; round++) {
      // The PVM and the SVM diverge during the epoch...
      await Promise.all([workload(pvm, 100 + round, 120), workload(svm, 900 + round, 40)]);
      const r = await pair.checkpoint();
      expect(r.epoch).toBe(first + round);
      // ...and are byte-for-byte equal after the commit (no PVM write after the seal).
      const [a, b] = await pairHashes(pair);
      expect(b, `round ${round}: SVM differs from PVM after commit of epoch ${r.epoch}`).toBe(a);
    }
    // The later rounds ran over recycled journals (applied epochs' files, written over), as a pair
    // that runs for long does.
    const s = await controlCall<{ spareJournals: { reused: number } }>(
      pair.secondary.control,
      'GET',
      '/status',
    );
    expect(s.spareJournals.reused).toBeGreaterThan(0);
    await pvm.close();
    await svm.close();
  });

  it('keeps PVM writes invisible to the SVM until commit, and drops the SVM writes at commit', async () => {
    pair = await startPair(fresh());
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    await pvm.write(Buffer.alloc(65536, 0xaa), 0);
    await svm.write(Buffer.alloc(4096, 0x55), 1_000_000);
    // Sealed and durable, not yet committed: still invisible.
    const seal = await controlCall<{ epoch: number }>(pair.primary.control, 'POST', '/seal');
    await controlCall(pair.primary.control, 'POST', '/durable', { epoch: seal.epoch });
    expect((await svm.read(0, 65536)).equals(Buffer.alloc(65536))).toBe(true);
    expect((await svm.read(1_000_000, 4096)).equals(Buffer.alloc(4096, 0x55))).toBe(true);
    // A PVM write after the seal belongs to the next epoch.
    await pvm.write(Buffer.alloc(4096, 0xbb), 2_000_000);
    await controlCall(pair.primary.control, 'POST', '/commit', { epoch: seal.epoch });
    expect((await svm.read(0, 65536)).equals(Buffer.alloc(65536, 0xaa))).toBe(true);
    expect((await svm.read(1_000_000, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    expect((await svm.read(2_000_000, 4096)).equals(Buffer.alloc(4096))).toBe(true);
    await pair.checkpoint();
    expect((await svm.read(2_000_000, 4096)).equals(Buffer.alloc(4096, 0xbb))).toBe(true);
    await pvm.close();
    await svm.close();
  });

  for (const point of [
    'secondary-after-commit-record',
    'secondary-mid-apply',
    'secondary-before-applied-record',
  ]) {
    it(`recovers when the secondary is killed at ${point}`, async () => {
      // The pair's first resync ends with a commit (and an apply) of its own: let it pass.
      pair = await startPair(fresh(), '16M', {
        secondaryEnv: {
          COLO_BLK_CRASH_AT: point,
          COLO_BLK_CRASH_SKIP: point === 'secondary-mid-apply' ? '0' : '1',
        },
      });
      await waitLinkUp(pair.primary);
      const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
      await workload(pvm, 7, 150);
      // The commit (or the apply right after it) kills the secondary.
      await pair.checkpoint().catch(() => {});
      const died = await pair.secondary.exit;
      expect(died.signal).toBe('SIGKILL');
      await pair.startSecondary();
      await waitLinkUp(pair.primary);
      await workload(pvm, 8, 50);
      await pair.checkpoint();
      const [a, b] = await pairHashes(pair);
      expect(b).toBe(a);
      await pvm.close();
    });
  }

  it('survives a secondary killed between durable and commit', async () => {
    pair = await startPair(fresh());
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await workload(pvm, 11, 100);
    const seal = await controlCall<{ epoch: number }>(pair.primary.control, 'POST', '/seal');
    await controlCall(pair.primary.control, 'POST', '/durable', { epoch: seal.epoch });
    pair.secondary.child.kill('SIGKILL');
    await pair.secondary.exit;
    await pair.startSecondary();
    await waitLinkUp(pair.primary);
    await controlCall(pair.primary.control, 'POST', '/commit', { epoch: seal.epoch });
    const [a, b] = await pairHashes(pair);
    expect(b).toBe(a);
    await pvm.close();
  });

  it('a link cut mid-frame fails the checkpoint with a clear error and loses nothing', async () => {
    const dir = fresh();
    let proxy!: FaultProxy;
    pair = await startPair(dir, '16M', {
      proxy: async (target) => {
        proxy = new FaultProxy(target);
        return proxy.listen();
      },
    });
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await workload(pvm, 21, 60);
    await pair.checkpoint();
    // Cut the stream in the middle of a frame and keep the link down.
    proxy.cutAfterBytes = proxy.forwarded + 70_000;
    proxy.refuse = true;
    await pvm.write(randomBytes(1024 * 1024, prng(5)), 4096);
    await new Promise((r) => setTimeout(r, 200));
    const failed = await controlCall(pair.primary.control, 'POST', '/checkpoint', { timeoutMs: 2000 }).then(
      () => null,
      (err: Error & { code?: string }) => err,
    );
    expect(failed, 'a checkpoint must not succeed while the link is cut').not.toBeNull();
    expect(failed!.message).toMatch(/not connected|link lost|timed out/);
    const status = await controlCall<{ pending: { epoch: number }[] }>(
      pair.primary.control,
      'GET',
      '/status',
    );
    expect(status.pending.length).toBeGreaterThan(0); // the epoch is kept for resending
    // Heal the link: the primary reconnects and resends; the next checkpoint covers everything.
    proxy.cutAfterBytes = Infinity;
    proxy.refuse = false;
    await waitLinkUp(pair.primary, 15_000);
    await workload(pvm, 22, 40);
    await pair.checkpoint();
    const [a, b] = await pairHashes(pair);
    expect(b).toBe(a);
    await pvm.close();
    await proxy.close();
  });

  it('a commit sent while a backlog streams never lands in the middle of a frame', async () => {
    let proxy!: FaultProxy;
    pair = await startPair(fresh(), '64M', {
      proxy: async (target) => {
        proxy = new FaultProxy(target);
        return proxy.listen();
      },
    });
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(randomBytes(1024 * 1024, prng(3)), 0);
    await pair.checkpoint();
    // Link down: epoch 2 (small, sealed) and epoch 3 (a large backlog) pile up in the log.
    proxy.refuse = true;
    proxy.cutAll();
    for (let i = 0; i < 4; i++) await pvm.write(randomBytes(1024 * 1024, prng(10 + i)), i * 1024 * 1024);
    const seal = await controlCall<{ epoch: number }>(pair.primary.control, 'POST', '/seal');
    const rand = prng(99);
    for (let i = 0; i < 40; i++)
      await pvm.write(randomBytes(1024 * 1024 + 3, rand), 8 * 1024 * 1024 + i * 1_100_000);
    type S = { link: { reconnects: number } };
    const before = await controlCall<S>(pair.primary.control, 'GET', '/status');
    // Link back: while epoch 3 streams from the journal, epoch 2 is made durable and committed.
    proxy.refuse = false;
    await waitLinkUp(pair.primary, 15_000);
    await controlCall(pair.primary.control, 'POST', '/durable', { epoch: seal.epoch, timeoutMs: 15_000 });
    await controlCall(pair.primary.control, 'POST', '/commit', { epoch: seal.epoch });
    await pair.checkpoint();
    const after = await controlCall<S>(pair.primary.control, 'GET', '/status');
    expect(after.link.reconnects - before.link.reconnects, 'the link had to reconnect').toBeLessThanOrEqual(
      1,
    );
    expect(pair.secondary.stderr()).not.toMatch(/bad frame|checksum/);
    const [a, b] = await pairHashes(pair);
    expect(b).toBe(a);
    await pvm.close();
    await proxy.close();
  });

  it('past the log budget the peer is marked out of sync, said in status; checkpoints fail until the automatic resync', async () => {
    let proxy!: FaultProxy;
    pair = await startPair(fresh(), '16M', {
      primaryArgs: ['--budget', '1M'],
      proxy: async (target) => {
        proxy = new FaultProxy(target);
        proxy.refuse = true; // the secondary is unreachable from the start
        return proxy.listen();
      },
    });
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(randomBytes(512 * 1024, prng(1)), 0);
    let s = await controlCall<{ outOfSync: { reason: string } | null }>(
      pair.primary.control,
      'GET',
      '/status',
    );
    expect(s.outOfSync).toBeNull();
    await pvm.write(randomBytes(1024 * 1024, prng(2)), 1024 * 1024); // past 1 MiB held
    s = await controlCall<{ outOfSync: { reason: string } | null }>(pair.primary.control, 'GET', '/status');
    expect(s.outOfSync?.reason).toMatch(/more than the budget/);
    const text = (
      await runOk(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${pair.primary.control.port}`])
    ).stdout;
    expect(text).toMatch(/OUT OF SYNC/);
    const metrics = await controlCall<string>(pair.primary.control, 'GET', '/metrics');
    expect(metrics).toMatch(/^colo_out_of_sync 1$/m);
    // Checkpoints fail until the secondary is resynchronised...
    const r = await run(process.execPath, [
      CLI,
      'checkpoint',
      '--control',
      `127.0.0.1:${pair.primary.control.port}`,
    ]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/out of sync.*resync is required|not connected/);
    // ...which starts by itself once the link is back (a full comparison: the secondary never had
    // a history), and sends only the blocks that differ.
    proxy.refuse = false;
    const up = await waitLinkUp(pair.primary, 15_000);
    const st = await controlCall<{
      outOfSync: unknown;
      resync: { mode: string; sentBytes: number; state: string };
    }>(pair.primary.control, 'GET', '/status');
    expect(st.outOfSync).toBeNull();
    expect(st.resync).toMatchObject({ mode: 'full', state: 'done' });
    expect(st.resync.sentBytes).toBeGreaterThanOrEqual(1536 * 1024);
    expect(st.resync.sentBytes).toBeLessThanOrEqual(1.05 * 1536 * 1024);
    expect(up.peerState).toBe('protected');
    await pair.checkpoint();
    expect(await hashExport(pair.secondary.nbdPort)).toBe(await hashExport(pair.primary.nbdPort));
    // The PVM keeps being served all along.
    expect((await pvm.read(1024 * 1024, 16)).equals(randomBytes(1024 * 1024, prng(2)).subarray(0, 16))).toBe(
      true,
    );
    await pvm.close();
    await proxy.close();
  });

  it('detects a frozen secondary and a frozen primary by heartbeat, and recovers when they thaw', async () => {
    pair = await startPair(fresh());
    await waitLinkUp(pair.primary);
    type PStatus = { link: { state: string; lastError: string | null } };
    type SStatus = { link: { state: string; primaryLost: { reason: string } | null } };
    // A frozen secondary keeps its TCP connection open: only the heartbeat can tell.
    pair.secondary.child.kill('SIGSTOP');
    const p = await waitFor(
      () => controlCall<PStatus>(pair!.primary.control, 'GET', '/status'),
      (s) => s.link.state !== 'connected',
      'the primary never noticed the frozen secondary',
    );
    expect(p.link.lastError).toMatch(/heartbeat timeout: nothing from the secondary for \d+ ms/);
    pair.secondary.child.kill('SIGCONT');
    await waitLinkUp(pair.primary, 15_000);
    await pair.checkpoint();
    // Now the other way round.
    pair.primary.child.kill('SIGSTOP');
    const s = await waitFor(
      () => controlCall<SStatus>(pair!.secondary.control, 'GET', '/status'),
      (v) => v.link.primaryLost !== null,
      'the secondary never noticed the frozen primary',
    );
    expect(s.link.primaryLost!.reason).toMatch(/heartbeat timeout: nothing from the primary/);
    const text = (
      await runOk(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${pair.secondary.control.port}`])
    ).stdout;
    expect(text).toMatch(/PRIMARY LOST/);
    const thawedAt = Date.now();
    pair.primary.child.kill('SIGCONT');
    // The thawed primary first learns that its old connection is gone, then reconnects.
    await waitFor(
      () =>
        controlCall<{ peerState: string; link: { state: string; since: number | null } }>(
          pair!.primary.control,
          'GET',
          '/status',
        ),
      (v) => v.peerState === 'protected' && v.link.state === 'connected' && (v.link.since ?? 0) >= thawedAt,
      'the primary never reconnected after thawing',
    );
    await pair.checkpoint();
  });

  it('flow control holds PVM writes while a connected secondary lags, and releases them when it is lost', async () => {
    // A generous heartbeat timeout: the backlog must pass the high-water mark before the loss is declared.
    pair = await startPair(fresh(), '160M', {
      primaryArgs: ['--budget', '4G', '--heartbeat-timeout', '3000'],
    });
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    // A frozen secondary reads nothing: the backlog passes the high-water mark and
    // writes wait, until the heartbeat declares the secondary lost.
    pair.secondary.child.kill('SIGSTOP');
    const chunk = randomBytes(4 * 1024 * 1024, prng(8));
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 32; i++) writes.push(pvm.write(chunk, i * chunk.length));
    await Promise.all(writes); // all complete: a lost secondary never stalls the PVM
    const s = await controlCall<{ link: { state: string; throttled: number; lastError: string } }>(
      pair.primary.control,
      'GET',
      '/status',
    );
    expect(s.link.throttled).toBeGreaterThan(0);
    expect(s.link.state).not.toBe('connected');
    expect(s.link.lastError).toMatch(/heartbeat timeout/);
    pair.secondary.child.kill('SIGCONT');
    await waitLinkUp(pair.primary, 15_000);
    await pair.checkpoint();
    const [a, b] = await pairHashes(pair);
    expect(b).toBe(a);
    await pvm.close();
  });

  it.each([
    ['the default window', [], 2 * 1024 * 1024],
    ['--window 512K', ['--window', '512K'], 512 * 1024],
  ] as const)(
    'keeps at most a window of log on the wire (%s); the rest waits unsent and holds the PVM at the high-water mark',
    async (_name, windowArgs, window) => {
      // Socket buffers on loopback hold several MiB: without the window they would fill with
      // log that a seal's durable answer and a commit then wait behind.
      pair = await startPair(fresh(), '64M', {
        primaryArgs: ['--budget', '4G', '--heartbeat-timeout', '20000', ...windowArgs],
      });
      await waitLinkUp(pair.primary);
      const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
      type Lag = { link: { throttled: number }; lag: { unsentBytes: number; inFlightBytes: number } };
      const status = () => controlCall<Lag>(pair!.primary.control, 'GET', '/status');
      pair.secondary.child.kill('SIGSTOP');
      const chunk = randomBytes(256 * 1024, prng(9));
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 64; i++) writes.push(pvm.write(chunk, i * chunk.length));
      await waitFor(status, (v) => v.link.throttled > 0, 'writes were never held');
      await new Promise((r) => setTimeout(r, 300)); // let whatever was let through reach the log
      const s = await status();
      const high = 1024 * 1024; // the default replicationHighWaterBytes
      const frame = chunk.length + 4096; // one write's frame may pass a mark that is not yet reached
      expect(s.lag.inFlightBytes).toBeGreaterThanOrEqual(window / 2);
      expect(s.lag.inFlightBytes).toBeLessThanOrEqual(window + frame);
      // All 64 writes arrive at once: the ones let through count before they are logged.
      expect(s.lag.unsentBytes).toBeGreaterThan(0);
      expect(s.lag.unsentBytes).toBeLessThanOrEqual(high + frame);
      pair.secondary.child.kill('SIGCONT');
      await Promise.all(writes);
      const after = await waitFor(status, (v) => v.lag.unsentBytes === 0, 'the log was never sent');
      expect(after.lag.inFlightBytes).toBeLessThanOrEqual(window + frame); // the last 'got' may still be on its way
      await pair.checkpoint();
      const [a, b] = await pairHashes(pair);
      expect(b).toBe(a);
      await pvm.close();
    },
  );

  it('sends nothing of the next epoch while a checkpoint waits for its commit, so the commit does not queue behind it', async () => {
    pair = await startPair(fresh(), '64M', { primaryArgs: ['--heartbeat-timeout', '20000'] });
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    type Lag = { epoch: number; lag: { unsentBytes: number; inFlightBytes: number } };
    const status = () => controlCall<Lag>(pair!.primary.control, 'GET', '/status');
    const chunk = randomBytes(256 * 1024, prng(11));
    await pvm.write(chunk, 0); // epoch N
    await waitFor(status, (v) => v.lag.unsentBytes === 0, 'epoch N was never sent');
    pair.secondary.child.kill('SIGSTOP'); // N can be sealed, not made durable
    const epoch = (await status()).epoch;
    const checkpoint = controlCall(pair.primary.control, 'POST', '/checkpoint', { timeoutMs: 30_000 });
    await waitFor(status, (v) => v.epoch === epoch + 1, 'epoch N was never sealed');
    await pvm.write(chunk, 1 << 20); // epoch N+1, while N's checkpoint waits: held back
    await new Promise((r) => setTimeout(r, 300));
    const held = await status();
    expect(held.lag.unsentBytes).toBeGreaterThanOrEqual(chunk.length);
    pair.secondary.child.kill('SIGCONT');
    await checkpoint; // durable, then the commit request goes first, then N+1
    await waitFor(status, (v) => v.lag.unsentBytes === 0, 'epoch N+1 was never sent after the commit');
    await pair.checkpoint();
    const [a, b] = await pairHashes(pair);
    expect(b).toBe(a);
    await pvm.close();
  });

  it('refuses to pair images of different sizes, saying so', async () => {
    pair = await startPair(fresh(), '16M', { secondarySize: '8M' });
    await new Promise((r) => setTimeout(r, 500));
    const s = await controlCall<{ link: { state: string; lastError: string } }>(
      pair.primary.control,
      'GET',
      '/status',
    );
    expect(s.link.state).not.toBe('connected');
    expect(s.link.lastError).toMatch(/same size/);
    const r = await run(process.execPath, [
      CLI,
      'checkpoint',
      '--control',
      `127.0.0.1:${pair.primary.control.port}`,
    ]);
    expect(r.code).toBe(3);
    expect(r.stderr).toMatch(/same size/);
  });

  itWith(['qemu-io', 'fio'], 'qemu-io and fio on the PVM while checkpoints run in a loop', async () => {
    pair = await startPair(fresh(), '32M');
    await waitLinkUp(pair.primary);
    const uri = `nbd://127.0.0.1:${pair.primary.nbdPort}/disk0`;
    let stop = false;
    let checkpoints = 0;
    const loop = (async () => {
      while (!stop) {
        await pair!.checkpoint();
        checkpoints++;
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    await runOk('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x3c 0 4M',
      '-c',
      'aio_write -P 0x4d 8M 1M',
      '-c',
      'aio_flush',
      '-c',
      'write -z 4M 1M',
      uri,
    ]);
    const fio = await run('fio', [
      '--name=ckpt',
      '--ioengine=nbd',
      `--uri=${uri}`,
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=16M',
      '--offset=16M',
      '--verify=crc32c',
      '--do_verify=1',
      '--runtime=3',
      '--time_based=0',
      '--verify_state_save=0',
    ]);
    expect(fio.code, fio.stderr).toBe(0);
    expect(fio.stdout).toMatch(/err= 0/);
    stop = true;
    await loop;
    expect(checkpoints).toBeGreaterThan(3);
    await pair.checkpoint();
    const [a, b] = await pairHashes(pair);
    expect(b).toBe(a);
    await runOk('qemu-io', [
      '-f',
      'raw',
      '-r',
      '-c',
      'read -P 0x3c 0 4M',
      '-c',
      'read -P 0 4M 1M',
      '-c',
      'read -P 0x4d 8M 1M',
      `nbd://127.0.0.1:${pair.secondary.nbdPort}/disk0`,
    ]);
  });

  it('status, checkpoint --json and inspect (running and stopped) report the pending write sets', async () => {
    const dir = fresh();
    pair = await startPair(dir);
    const { epoch } = await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(Buffer.alloc(8192, 1), 0);
    await pvm.zero(65536, 4096);
    const ctl = `127.0.0.1:${pair.primary.control.port}`;
    const status = JSON.parse(
      (await runOk(process.execPath, [CLI, 'status', '--control', ctl, '--json'])).stdout,
    );
    expect(status).toMatchObject({ role: 'primary', epoch, link: { state: 'connected' } });
    expect(status.pending[0]).toMatchObject({ epoch, state: 'open', writes: 2, bytes: 8192 });
    const insp = JSON.parse(
      (await runOk(process.execPath, [CLI, 'inspect', '--control', ctl, '--json'])).stdout,
    );
    expect(insp.epochs[0].logged.map((l: { op: string }) => l.op)).toEqual(['write', 'zero']);
    const ck = JSON.parse(
      (await runOk(process.execPath, [CLI, 'checkpoint', '--control', ctl, '--json'])).stdout,
    );
    expect(ck).toMatchObject({ epoch, writes: 2, bytes: 8192 });
    for (const k of ['sealMs', 'durableMs', 'commitMs', 'totalMs']) expect(ck[k]).toBeGreaterThan(0);
    const text = (
      await runOk(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${pair.secondary.control.port}`])
    ).stdout;
    expect(text).toMatch(/role +secondary/);
    expect(text).toMatch(new RegExp(`committed ${epoch}`));
    // A pending epoch on a stopped primary, read from its state directory.
    await pvm.write(Buffer.alloc(512, 2), 1_000_000);
    await pvm.close();
    await pair.stop();
    const offline = JSON.parse(
      (await runOk(process.execPath, [CLI, 'inspect', '--state', path.join(dir, 'pvm-state'), '--json']))
        .stdout,
    );
    expect(offline.role).toBe('primary');
    expect(offline.epochs.some((e: { records: number }) => e.records === 1)).toBe(true);
    const bad = await run(process.execPath, [CLI, 'inspect', '--state', dir]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/not a colo-blk state directory/);
    pair = null;
  });
});
