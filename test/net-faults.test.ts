// Network faults: a fault proxy between primary and secondary (delay, cut at
// byte n, blackhole, drop one frame type), and partitions with network
// namespaces and a veth link set down. Whatever the fault, a checkpoint either
// fails with a clear error or succeeds with both images equal; nothing the PVM
// acknowledged is lost; once the network heals, a checkpoint succeeds.
//
// Every pair starts with a resynchronisation that ends with an internal
// checkpoint of its own, so no epoch number is hard-coded here: the first
// user checkpoint seals the epoch the primary has open once the pair is
// protected (waitLinkUp's status), and later ones are counted from it.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { recordFaults } from './fault-counts.js';
import { killAll, prng, randomBytes, rmDir, runOk, tmpDir } from './helpers.js';
import {
  bridgeFromNs,
  createNetnsPair,
  expectEqualImages,
  ModelDisk,
  modelWorkload,
  NetFaultProxy,
  primaryStatus,
  secondaryStatus,
  startNodeInNs,
  stopNode,
  tryCheckpoint,
  waitFor,
  type Direction,
  type NetnsPair,
} from './net-faults-helpers.js';
import { hashExport, startPair, waitLinkUp, type NodeProc, type Pair } from './replication-helpers.js';
import { describeWith } from './tools.js';

const root = tmpDir('colo-blk-netfaults-');
let n = 0;
const fresh = () => {
  const d = path.join(root, `t${n++}`);
  fs.mkdirSync(d);
  return d;
};
const SIZE = 16 * 1024 * 1024;
let faults = 0;
let pair: Pair | null = null;
let proxy: NetFaultProxy | null = null;
let clients: NbdClient[] = [];
const cleanups: (() => Promise<void>)[] = [];

afterEach(async () => {
  for (const c of clients) c.destroy();
  clients = [];
  await pair?.stop();
  pair = null;
  await proxy?.close();
  proxy = null;
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await killAll();
});
afterAll(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
  await killAll();
  rmDir(root);
  recordFaults(
    'network faults',
    faults,
    'faults injected (delay, cut, blackhole, dropped frames, veth partitions)',
  );
});

/** A pair whose replication link runs through a NetFaultProxy. */
async function proxiedPair(opts: Parameters<typeof startPair>[2] = {}, delayMs = 0) {
  const dir = fresh();
  pair = await startPair(dir, '16M', {
    ...opts,
    proxy: async (target) => {
      proxy = new NetFaultProxy(target);
      proxy.delayMs = delayMs;
      return proxy.listen();
    },
  });
  // Synchronised (the initial resync and its checkpoint are done): `epoch` is the open epoch,
  // the one the first checkpoint of the test seals.
  const { epoch } = await waitLinkUp(pair.primary);
  const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
  clients.push(pvm);
  const files = { pvm: path.join(dir, 'pvm.img'), svm: path.join(dir, 'svm.img') };
  return { pair, proxy: proxy!, pvm, model: new ModelDisk(SIZE), files, epoch };
}

/** A checkpoint that must succeed; its result (epoch, timings). */
async function checkpointOk(primary: NodeProc, timeoutMs = 10_000): Promise<Record<string, number>> {
  const r = await tryCheckpoint(primary, timeoutMs);
  if (!r.ok) throw new Error(`checkpoint failed: ${r.error.message}`);
  return r.result;
}

/** The last lines of both nodes' logs, for a failure message. */
const logs = (p: NodeProc, s: NodeProc) =>
  `\n--- primary log:\n${p.stderr().slice(-4000)}\n--- secondary log:\n${s.stderr().slice(-4000)}`;

const CLEAR_LINK_ERROR =
  /not connected|replication link lost|timed out after \d+ ms waiting for the secondary/;

describe('network faults', () => {
  it('delay: 40 ms each way on every chunk, order kept: checkpoints succeed and the images are equal', async () => {
    const { pair, proxy, pvm, model, files, epoch } = await proxiedPair({}, 40);
    // The initial resync's own checkpoint went through the proxy too: count from here.
    const seals0 = proxy.frameCounts['up:seal'] ?? 0;
    const committed0 = proxy.frameCounts['down:committed'] ?? 0;
    expect(seals0, 'the initial resync ends with a checkpoint of its own').toBeGreaterThanOrEqual(1);
    for (let round = 0; round < 3; round++) {
      await modelWorkload(pvm, model, 10 + round, 24);
      const r = await tryCheckpoint(pair.primary, 10_000);
      expect(r.ok, r.ok ? '' : r.error.message + logs(pair.primary, pair.secondary)).toBe(true);
      if (r.ok) {
        expect(r.result.epoch).toBe(epoch + round);
        // The seal goes up and 'durable' comes back through the delay: at least two delays.
        expect(r.result.durableMs).toBeGreaterThanOrEqual(2 * 40 - 5);
      }
      await expectEqualImages(pair.primary, pair.secondary, model, files);
      faults++;
    }
    const s = await primaryStatus(pair.primary);
    expect(s.link.state).toBe('connected');
    expect(s.peerState, 'a slow link is no reason to resynchronise').toBe('protected');
    expect(
      s.link.reconnects,
      `a delay under the heartbeat timeout is not a lost peer${logs(pair.primary, pair.secondary)}`,
    ).toBe(0);
    expect(proxy.frameCounts['up:seal'] - seals0).toBe(3);
    expect(proxy.frameCounts['down:committed'] - committed0).toBe(3);
  });

  it('a checkpoint sends nothing of the next epoch until its commit is answered, so no commit waits behind data', async () => {
    const { pair, proxy, pvm, model, files, epoch } = await proxiedPair();
    // The secondary's answer to this checkpoint's commit is held 400 ms on its way back.
    proxy.frameDelay = (dir, meta) =>
      dir === 'down' && meta.t === 'committed' && meta.e === epoch ? 400 : 0;
    const write = async (offset: number, seed: number) => {
      const b = randomBytes(256 * 1024, prng(seed));
      await pvm.write(b, offset);
      b.copy(model.data, offset);
    };
    await write(0, 1); // epoch N
    const from = proxy.seen.length;
    const upSince = () => Promise.resolve(proxy.seen.slice(from).filter((f) => f.dir === 'up'));
    const checkpoint = checkpointOk(pair.primary);
    checkpoint.catch(() => {}); // awaited below; a failed expectation before that must not leave it unhandled
    await waitFor(upSince, (up) => up.some((f) => f.t === 'commit' && f.e === epoch), 'no commit request');
    await write(1 << 20, 2); // epoch N+1, while the commit's answer is on its way
    await new Promise((r) => setTimeout(r, 200));
    const early = (await upSince()).filter((f) => f.t === 'w' && f.e === epoch + 1);
    expect(early, 'frames of epoch N+1 went out before the commit of N was answered').toEqual([]);
    const r = await checkpoint;
    expect(r.epoch).toBe(epoch);
    expect(r.commitMs).toBeGreaterThanOrEqual(400 - 5);
    await waitFor(upSince, (up) => up.some((f) => f.t === 'w' && f.e === epoch + 1), 'N+1 was never sent');
    expect((await checkpointOk(pair.primary)).epoch).toBe(epoch + 1);
    await expectEqualImages(pair.primary, pair.secondary, model, files);
    faults++;
  });

  it('cut at byte n, mid-frame: the checkpoint fails clearly, nothing is lost, the link comes back', async () => {
    const { pair, proxy, pvm, model, files } = await proxiedPair();
    await modelWorkload(pvm, model, 20, 40);
    expect((await tryCheckpoint(pair.primary, 10_000)).ok).toBe(true);
    // Cut 300 000 bytes into the next stream, inside a 1 MiB write frame, and keep it down.
    proxy.cutAfterBytes = proxy.forwarded + 300_000;
    proxy.refuse = true;
    await modelWorkload(pvm, model, 21, 8, { lanes: 4, maxLen: 1024 * 1024 });
    await waitFor(
      () => primaryStatus(pair.primary),
      (s) => s.link.state !== 'connected',
      'the primary never noticed the cut',
    );
    faults++;
    const failed = await tryCheckpoint(pair.primary, 2000);
    expect(failed.ok, 'a checkpoint must not succeed while the link is cut').toBe(false);
    if (!failed.ok) expect(failed.error.message).toMatch(CLEAR_LINK_ERROR);
    expect(await hashExport(pair.primary.nbdPort), 'the PVM lost an acknowledged write').toBe(
      await model.hash(),
    );
    proxy.cutAfterBytes = Infinity;
    proxy.refuse = false;
    await waitLinkUp(pair.primary, 15_000);
    await modelWorkload(pvm, model, 22, 24);
    const ok = await tryCheckpoint(pair.primary, 10_000);
    expect(ok.ok, ok.ok ? '' : ok.error.message).toBe(true);
    await expectEqualImages(pair.primary, pair.secondary, model, files);
    expect(proxy.cuts).toBe(1);
    expect(pair.secondary.stderr()).not.toMatch(/corrupt|checksum/);
  });

  it('blackhole: both sides find out by heartbeat within ~1 s, checkpoints fail clearly, then it recovers', async () => {
    const { pair, proxy, pvm, model, files, epoch } = await proxiedPair();
    await modelWorkload(pvm, model, 30, 40);
    expect((await checkpointOk(pair.primary)).epoch).toBe(epoch);
    const before = await primaryStatus(pair.primary);
    await modelWorkload(pvm, model, 31, 16);
    // From now on no byte gets through and no connection is closed.
    const t0 = Date.now();
    proxy.blackhole = true;
    faults++;
    // A checkpoint already under way fails as soon as the heartbeat gives up, not at its timeout.
    const inflight = await tryCheckpoint(pair.primary, 10_000);
    const inflightMs = Date.now() - t0;
    expect(inflight.ok, 'a checkpoint must not succeed through a blackhole').toBe(false);
    if (!inflight.ok) expect(inflight.error.message).toMatch(/replication link lost: heartbeat timeout/);
    expect(inflightMs).toBeLessThan(1500);
    const down = await waitFor(
      () => primaryStatus(pair.primary),
      (s) => s.link.state !== 'connected',
      'the primary never noticed the blackhole',
    );
    expect(down.link.since! - t0, 'link-down detection time').toBeLessThanOrEqual(1200);
    expect(pair.primary.stderr()).toMatch(
      /link down: heartbeat timeout: nothing from the secondary for \d+ ms/,
    );
    // The secondary's connection is never closed by the proxy: only its own heartbeat can tell.
    const lost = await waitFor(
      () => secondaryStatus(pair.secondary),
      (s) => s.link.primaryLost !== null,
      'the secondary never noticed the blackhole',
      3000,
    );
    expect(lost.link.primaryLost!.reason).toMatch(/heartbeat timeout: nothing from the primary/);
    expect(lost.link.primaryLost!.at - t0).toBeLessThanOrEqual(1200);
    // The PVM is served all along; later checkpoints fail at once, saying why.
    await modelWorkload(pvm, model, 32, 24);
    const again = await tryCheckpoint(pair.primary, 10_000);
    expect(again.ok).toBe(false);
    if (!again.ok) expect(again.error.message).toMatch(/not connected/);
    expect(await hashExport(pair.primary.nbdPort), 'the PVM lost an acknowledged write').toBe(
      await model.hash(),
    );
    const s = await secondaryStatus(pair.secondary);
    expect(s.committedEpoch, 'the secondary must still be at the last good checkpoint').toBe(epoch);
    // Lift it: the primary reconnects, resends the backlog, and the next checkpoint covers everything.
    proxy.blackhole = false;
    await waitLinkUp(pair.primary, 15_000);
    const after = await primaryStatus(pair.primary);
    expect(after.link.reconnects).toBeGreaterThan(before.link.reconnects);
    await modelWorkload(pvm, model, 33, 16);
    const ok = await tryCheckpoint(pair.primary, 10_000);
    expect(ok.ok, ok.ok ? '' : ok.error.message).toBe(true);
    await expectEqualImages(pair.primary, pair.secondary, model, files);
    expect(proxy.blackholedBytes).toBeGreaterThan(0);
  });

  // One frame of one type lost on a live connection (a broken middlebox, a bug):
  // the checkpoint it belongs to must fail, never succeed silently, and the pair
  // must get back to equal images without a restart. The frame dropped is the one
  // of the second checkpoint of the test (`e` below: the first one's epoch + 1).
  const drops: { type: string; dir: Direction; error: (e: number) => RegExp }[] = [
    {
      type: 'seal',
      dir: 'up',
      error: (e) =>
        new RegExp(`timed out after \\d+ ms waiting for the secondary to make durable epoch ${e}(?!\\d)`),
    },
    {
      type: 'durable',
      dir: 'down',
      error: (e) =>
        new RegExp(`timed out after \\d+ ms waiting for the secondary to make durable epoch ${e}(?!\\d)`),
    },
    {
      type: 'commit',
      dir: 'up',
      error: (e) =>
        new RegExp(`timed out after \\d+ ms waiting for the secondary to commit epoch ${e}(?!\\d)`),
    },
    {
      type: 'committed',
      dir: 'down',
      error: (e) =>
        new RegExp(`timed out after \\d+ ms waiting for the secondary to commit epoch ${e}(?!\\d)`),
    },
    // The last write of the epoch: nothing after it in the epoch can reveal the gap but the seal.
    {
      type: 'w',
      dir: 'up',
      error: (e) => new RegExp(`epoch ${e}(?!\\d)|replication link lost|not connected`),
    },
  ];
  for (const d of drops) {
    it(`a dropped '${d.type}' frame (${d.dir === 'up' ? 'primary → secondary' : 'secondary → primary'}) fails that checkpoint, and a later one succeeds`, async () => {
      const { pair, proxy, pvm, model, files, epoch } = await proxiedPair();
      await modelWorkload(pvm, model, 40, 16);
      expect((await checkpointOk(pair.primary)).epoch).toBe(epoch);
      const hash1 = await expectEqualImages(pair.primary, pair.secondary, model);
      const e = epoch + 1;
      await modelWorkload(pvm, model, 41, 16, { end: SIZE / 2 });
      // Epoch e's frame of that type; for 'w', the write below (the last one of the epoch).
      proxy.dropNext(d.dir, d.type, { epoch: e, match: (m) => d.type !== 'w' || m.o === SIZE - 65536 });
      if (d.type === 'w') {
        const last = Buffer.alloc(65536, 0x77);
        await pvm.write(last, SIZE - 65536);
        last.copy(model.data, SIZE - 65536);
      }
      const hash2 = await model.hash();
      const r = await tryCheckpoint(pair.primary, 1000);
      expect(proxy.dropped.map((x) => [x.meta.t, x.meta.e])).toEqual([[d.type, e]]);
      faults++;
      expect(r.ok, `the checkpoint of epoch ${e} succeeded although its '${d.type}' frame was lost`).toBe(
        false,
      );
      if (!r.ok) expect(r.error.message).toMatch(d.error(e));
      // Nothing acknowledged is lost, and the secondary holds exactly the first or the second
      // checkpoint, never a mix.
      expect(await hashExport(pair.primary.nbdPort), 'the PVM lost an acknowledged write').toBe(hash2);
      const svm = await hashExport(pair.secondary.nbdPort);
      expect([hash1, hash2], `the SVM image is neither checkpoint ${epoch} nor ${e}`).toContain(svm);
      // Recovery: retry (the frame is not dropped again); if that still fails, cut the
      // link and let it come back (the primary resends from its journals).
      const errors: string[] = [];
      let done = false;
      for (let attempt = 0; attempt < 3 && !done; attempt++) {
        await modelWorkload(pvm, model, 50 + attempt, 8);
        const again = await tryCheckpoint(pair.primary, 3000);
        if (again.ok) {
          await expectEqualImages(pair.primary, pair.secondary, model, files);
          done = true;
          break;
        }
        errors.push(again.error.message);
        expect(again.error.message).toMatch(/epoch \d+|not connected|replication link lost/);
        proxy.cutAll();
        await waitLinkUp(pair.primary, 15_000);
      }
      expect(
        done,
        `no checkpoint succeeded after the lost '${d.type}' frame:\n${errors.join('\n')}${logs(pair.primary, pair.secondary)}`,
      ).toBe(true);
    });
  }

  it('a blip shorter than --failover-grace: the primary is back in time and the secondary does not take over', async () => {
    const { pair, proxy, pvm, model, files } = await proxiedPair({
      failover: 'auto',
      secondaryArgs: ['--failover-grace', '2000'],
    });
    await modelWorkload(pvm, model, 60, 24);
    expect((await tryCheckpoint(pair.primary, 10_000)).ok).toBe(true);
    proxy.blackhole = true;
    faults++;
    const lost = await waitFor(
      () => secondaryStatus(pair.secondary),
      (s) => s.link.primaryLost !== null,
      'the secondary never noticed the blackhole',
      3000,
    );
    expect(lost.failoverPending).toBe(true);
    const lostAt = Date.now();
    await waitFor(
      () => primaryStatus(pair.primary),
      (s) => s.link.state !== 'connected',
      'the primary never noticed the blackhole',
      3000,
    );
    proxy.blackhole = false;
    await waitLinkUp(pair.primary, 10_000);
    const back = Date.now() - lostAt;
    expect(back, 'the primary was not back within the grace period').toBeLessThan(1500);
    // Past the end of the grace period: the primary came back, so nothing may have been promoted.
    await new Promise((r) => setTimeout(r, lostAt + 2500 - Date.now()));
    const s = await secondaryStatus(pair.secondary);
    expect(s.role, 'the secondary took over although the primary was back within the grace period').toBe(
      'secondary',
    );
    expect(s.failoverPending).toBe(false);
    expect((await primaryStatus(pair.primary)).deposed).toBeNull();
    await modelWorkload(pvm, model, 61, 24);
    const ok = await tryCheckpoint(pair.primary, 10_000);
    expect(ok.ok, ok.ok ? '' : ok.error.message).toBe(true);
    await expectEqualImages(pair.primary, pair.secondary, model, files);
  });

  describeWith(['netns', 'qemu-io'], 'partition with network namespaces', () => {
    let nsPair: NetnsPair | null = null;
    afterAll(async () => {
      await killAll();
      await nsPair?.destroy();
    });

    it('veth down mid-workload: the primary notices within 1 s, keeps serving, and recovers when it is up', async () => {
      const dir = fresh();
      nsPair = await createNetnsPair('p');
      cleanups.push(async () => nsPair?.destroy());
      const ns = nsPair;
      // The secondary in ns b: replication on the veth address, NBD and control on b's own loopback.
      const sec = await startNodeInNs(ns.b, 'secondary', [
        '--listen',
        '127.0.0.1:0',
        '--export',
        `disk0=${path.join(dir, 'svm.img')},size=16M`,
        '--state',
        path.join(dir, 'svm-state'),
        '--replication-listen',
        `${ns.addrB}:0`,
        '--control',
        '127.0.0.1:0',
        '--failover',
        'manual',
      ]);
      cleanups.push(() => stopNode(sec));
      const bridgeB = await bridgeFromNs(ns.b, dir, [Number(sec.info.controlPort), Number(sec.info.port)]);
      cleanups.push(bridgeB.close);
      const pri = await startNodeInNs(ns.a, 'primary', [
        '--listen',
        '127.0.0.1:0',
        '--export',
        `disk0=${path.join(dir, 'pvm.img')},size=16M`,
        '--state',
        path.join(dir, 'pvm-state'),
        '--peer',
        `${ns.addrB}:${sec.info.replicationPort}`,
        '--control',
        '127.0.0.1:0',
      ]);
      cleanups.push(() => stopNode(pri));
      const bridgeA = await bridgeFromNs(ns.a, dir, [Number(pri.info.controlPort), Number(pri.info.port)]);
      cleanups.push(bridgeA.close);
      const primary: NodeProc = {
        ...pri,
        control: { host: '127.0.0.1', port: bridgeA.ports[0] },
        nbdPort: bridgeA.ports[1],
      };
      const secondary: NodeProc = {
        ...sec,
        control: { host: '127.0.0.1', port: bridgeB.ports[0] },
        nbdPort: bridgeB.ports[1],
      };
      const files = { pvm: path.join(dir, 'pvm.img'), svm: path.join(dir, 'svm.img') };
      const { epoch } = await waitLinkUp(primary);
      // The link really crosses the veth.
      expect((await primaryStatus(primary)).link.peer).toBe(`${ns.addrB}:${sec.info.replicationPort}`);
      expect((await secondaryStatus(secondary)).link.peer).toMatch(
        new RegExp(`^${ns.addrA.replace(/\./g, '\\.')}:`),
      );

      const pvm = await NbdClient.connect({ port: primary.nbdPort, exportName: 'disk0' });
      clients.push(pvm);
      const model = new ModelDisk(SIZE);
      const work = { start: 0, end: SIZE - 1024 * 1024 };
      await modelWorkload(pvm, model, 70, 40, work);
      expect((await checkpointOk(primary)).epoch).toBe(epoch);
      await expectEqualImages(primary, secondary, model, files);

      // A workload runs in the background across the partition (stopped and awaited on
      // every path, so a failure cannot leave it running into the next test).
      let stop = false;
      let acked = 0;
      const background = (async () => {
        for (let seed = 100; !stop; seed++) acked += await modelWorkload(pvm, model, seed, 8, work);
      })();
      background.catch(() => {});
      cleanups.push(async () => {
        stop = true;
        await background.catch(() => {});
      });
      await new Promise((r) => setTimeout(r, 300));
      const t0 = Date.now();
      await ns.setLink(false);
      faults++;
      const down = await waitFor(
        () => primaryStatus(primary),
        (s) => s.link.state !== 'connected',
        'the primary never noticed the partition',
      );
      expect(down.link.since! - t0, 'link-down detection time').toBeLessThanOrEqual(1200);
      expect(pri.stderr()).toMatch(/link down: heartbeat timeout: nothing from the secondary for \d+ ms/);
      // The PVM keeps being served: the background writes go on, and so does an external client.
      const ackedAtDown = acked;
      await runOk('ip', [
        'netns',
        'exec',
        ns.a,
        'qemu-io',
        '-f',
        'raw',
        '-c',
        `write -P 0x5e ${SIZE - 1024 * 1024} 1M`,
        `nbd://127.0.0.1:${pri.info.port}/disk0`,
      ]);
      model.data.fill(0x5e, SIZE - 1024 * 1024);
      await new Promise((r) => setTimeout(r, 300));
      expect(acked, 'no PVM write was acknowledged during the partition').toBeGreaterThan(ackedAtDown);
      const failed = await tryCheckpoint(primary, 2000);
      expect(failed.ok, 'a checkpoint must not succeed across a partition').toBe(false);
      if (!failed.ok) expect(failed.error.message).toMatch(/not connected|replication link lost/);
      const lost = await waitFor(
        () => secondaryStatus(secondary),
        (s) => s.link.primaryLost !== null,
        'the secondary never noticed the partition',
        3000,
      );
      expect(lost.link.primaryLost!.reason).toMatch(/heartbeat timeout: nothing from the primary/);
      expect(lost.committedEpoch, 'the secondary must still be at the last good checkpoint').toBe(epoch);
      expect(lost.role).toBe('secondary');

      // Heal: the link comes back, the backlog is resent, a checkpoint makes both equal.
      await ns.setLink(true);
      await waitLinkUp(primary, 15_000);
      stop = true;
      await background;
      const ok = await tryCheckpoint(primary, 10_000);
      expect(ok.ok, ok.ok ? '' : ok.error.message).toBe(true);
      await expectEqualImages(primary, secondary, model, files);
      const svm = await NbdClient.connect({ port: secondary.nbdPort, exportName: 'disk0' });
      clients.push(svm);
      expect((await svm.read(SIZE - 1024 * 1024, 1024 * 1024)).equals(Buffer.alloc(1024 * 1024, 0x5e))).toBe(
        true,
      );
      await svm.close();
      await pvm.close();
      clients = [];
      // Cleanly stopped: both processes exit 0.
      await stopNode(pri);
      await stopNode(sec);
      for (const [name, n] of [
        ['primary', pri],
        ['secondary', sec],
      ] as const) {
        const how = await n.exit;
        expect(
          how.code,
          `the ${name} did not exit 0 (${JSON.stringify(how)}):\n${n.stderr().slice(-3000)}`,
        ).toBe(0);
      }
      const answers = await controlCall(secondary.control, 'GET', '/status').then(
        () => true,
        () => false,
      );
      expect(answers, 'the secondary still answers after it was stopped').toBe(false);
    });
  });
});
