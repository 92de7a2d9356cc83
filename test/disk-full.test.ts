// Disk full on the secondary's buffer (a small tmpfs): the checkpoint fails
// cleanly, saying why; nothing acknowledged is lost; the secondary stays up at
// the previous checkpoint; and service recovers once space is freed.
//
// Every pair starts with a resynchronisation that ends with a checkpoint of its
// own: epoch numbers are taken from the primary once the pair is protected
// (waitLinkUp), never hard-coded.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { NbdClient } from '../src/net/client.js';
import { recordFaults } from './fault-counts.js';
import { killAll, prng, randomBytes, rmDir, runOk, tmpDir } from './helpers.js';
import {
  expectEqualImages,
  ModelDisk,
  modelWorkload,
  primaryStatus,
  secondaryStatus,
  stopNode,
  tryCheckpoint,
} from './net-faults-helpers.js';
import { hashExport, startNode, waitLinkUp, type NodeProc } from './replication-helpers.js';
import { describeWith } from './tools.js';

/** Made when the suite runs (a skipped suite runs no hook, so it would never be removed). */
let root = '';
let n = 0;
const SIZE = 32 * 1024 * 1024;
const MiB = 1024 * 1024;
let episodes = 0;
let clients: NbdClient[] = [];
const mounts: string[] = [];

async function unmount(mp: string): Promise<void> {
  for (let i = 0; i < 20; i++) {
    try {
      execFileSync('umount', [mp], { stdio: 'pipe' });
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 100)); // a process may still be closing its files
    }
  }
  execFileSync('umount', ['-l', mp], { stdio: 'pipe' });
}

afterEach(async () => {
  for (const c of clients) c.destroy();
  clients = [];
  if (nodes) for (const p of [nodes.primary, nodes.secondary]) if (p) await stopNode(p);
  nodes = null;
  await killAll();
  for (const mp of mounts.splice(0)) await unmount(mp).catch(() => {});
});
afterAll(async () => {
  await killAll();
  for (const mp of mounts.splice(0)) await unmount(mp).catch(() => {});
  if (root) rmDir(root);
  recordFaults('disk full', episodes, 'disk-full episodes');
});

interface Nodes {
  primary: NodeProc;
  secondary: NodeProc;
}
let nodes: Nodes | null = null;

/**
 * A pair whose secondary keeps its state directory (and, with `imageOnTmpfs`,
 * its image too) on a fresh tmpfs of `sizeMiB`.
 */
async function pairOnSmallTmpfs(sizeMiB: number, imageOnTmpfs = false) {
  const dir = path.join(root, `t${n++}`);
  const mp = path.join(dir, imageOnTmpfs ? 'svm-disk' : 'svm-state');
  fs.mkdirSync(mp, { recursive: true });
  await runOk('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0755`, 'tmpfs', mp]);
  mounts.push(mp);
  const state = imageOnTmpfs ? path.join(mp, 'state') : mp;
  const files = { pvm: path.join(dir, 'pvm.img'), svm: path.join(imageOnTmpfs ? mp : dir, 'svm.img') };
  const secondary = await startNode('secondary', [
    ...['--listen', '127.0.0.1:0', '--export', `disk0=${files.svm},size=32M`, '--state', state],
    ...['--replication-listen', '127.0.0.1:0', '--control', '127.0.0.1:0', '--failover', 'manual'],
  ]);
  nodes = { primary: null as unknown as NodeProc, secondary };
  nodes.primary = await startNode('primary', [
    ...['--listen', '127.0.0.1:0', '--export', `disk0=${files.pvm},size=32M`],
    ...['--state', path.join(dir, 'pvm-state'), '--control', '127.0.0.1:0'],
    ...['--peer', `127.0.0.1:${secondary.info.replicationPort}`],
  ]);
  // `epoch`: the open epoch once the initial resync is done, sealed by the test's first checkpoint.
  const { epoch } = await waitLinkUp(nodes.primary);
  const pvm = await NbdClient.connect({ port: nodes.primary.nbdPort, exportName: 'disk0' });
  clients.push(pvm);
  return { ...nodes, pvm, state, files, model: new ModelDisk(SIZE), epoch };
}

const freeBytes = (dir: string) => {
  const s = fs.statfsSync(dir);
  return s.bavail * s.bsize;
};

/** Write `bytes` of fresh data in 1 MiB requests (recorded in the model once acknowledged). */
async function bulk(
  pvm: NbdClient,
  model: ModelDisk,
  seed: number,
  bytes: number,
  at: number,
): Promise<void> {
  const rand = prng(seed);
  for (let off = 0; off < bytes; off += MiB) {
    const len = Math.min(MiB, bytes - off);
    const data = randomBytes(len, rand);
    const pos = (at + off) % (SIZE - len);
    await pvm.write(data, pos);
    data.copy(model.data, pos);
  }
}

/** The test's first checkpoint, which must succeed; its epoch. */
async function firstCheckpoint(primary: NodeProc): Promise<number> {
  const r = await tryCheckpoint(primary, 10_000);
  if (!r.ok) throw new Error(`the first checkpoint failed: ${r.error.message}`);
  return r.result.epoch;
}

/** Retry checkpoints for up to `ms` (the link may be reconnecting); the last outcome. */
async function checkpointWithin(primary: NodeProc, ms: number) {
  const deadline = Date.now() + ms;
  const errors: string[] = [];
  for (;;) {
    const r = await tryCheckpoint(primary, 5000);
    if (r.ok || Date.now() > deadline) return { r, errors };
    errors.push(r.error.message);
    await new Promise((res) => setTimeout(res, 300));
  }
}

describeWith(['tmpfs'], 'disk full on the secondary', () => {
  beforeAll(() => {
    root = tmpDir('colo-blk-diskfull-');
  });
  it('an epoch larger than the free space: the checkpoint fails with ENOSPC; recovery after a remount', async () => {
    const { primary, secondary, pvm, state, files, model, epoch } = await pairOnSmallTmpfs(12);
    await modelWorkload(pvm, model, 1, 32, { maxLen: 64 * 1024 });
    expect(await firstCheckpoint(primary)).toBe(epoch);
    const hash1 = await expectEqualImages(primary, secondary, model, files);

    // More than the whole buffer holds, in one epoch.
    const epochBytes = freeBytes(state) + 6 * MiB;
    await bulk(pvm, model, 2, epochBytes, 0);
    episodes++;
    const failed = await tryCheckpoint(primary, 5000);
    expect(failed.ok, 'a checkpoint succeeded although the secondary could not store the epoch').toBe(false);
    if (!failed.ok)
      expect.soft(failed.error.message, 'the error must say the disk is full').toMatch(/ENOSPC|no space/i);
    // The secondary says so in its log, is still running, answers, and holds the first checkpoint exactly.
    expect(secondary.stderr()).toMatch(/ENOSPC|no space/i);
    // ...and the primary read its reason before the link closed (a reset after the error frame lost it).
    expect(primary.stderr(), "the primary never read the secondary's error frame").toMatch(
      /secondary: ENOSPC/,
    );
    expect(secondary.child.exitCode).toBeNull();
    const s = await secondaryStatus(secondary);
    expect(s.committedEpoch, 'the secondary must still be at the last good checkpoint').toBe(epoch);
    expect(await hashExport(secondary.nbdPort), `the SVM image is not checkpoint ${epoch} any more`).toBe(
      hash1,
    );
    // The PVM keeps being served and lost nothing it acknowledged.
    await bulk(pvm, model, 3, 2 * MiB, 20 * MiB);
    expect(await hashExport(primary.nbdPort), 'the PVM lost an acknowledged write').toBe(await model.hash());
    const p = await primaryStatus(primary);
    expect(
      p.pending.map((e) => e.epoch),
      'the failed epoch must be kept for resending',
    ).toContain(epoch + 1);

    // Free space: the next checkpoint (after the resend) succeeds and both images are equal.
    await runOk('mount', ['-o', 'remount,size=96m', state]);
    const { r, errors } = await checkpointWithin(primary, 10_000);
    expect(
      r.ok,
      `no checkpoint succeeded after space was freed:\n${errors.slice(-3).join('\n')}\n${r.ok ? '' : r.error.message}`,
    ).toBe(true);
    await expectEqualImages(primary, secondary, model, files);
    expect(secondary.child.exitCode).toBeNull();
  });

  // The image shares the small file system with the buffer here (as on a host with one data disk).
  it('a ballast file fills the disk: checkpoints fail while it is there, and succeed once it is deleted', async () => {
    const { primary, secondary, pvm, state, files, model, epoch } = await pairOnSmallTmpfs(24, true);
    await modelWorkload(pvm, model, 11, 32, { maxLen: 64 * 1024 });
    expect(await firstCheckpoint(primary)).toBe(epoch);
    const hash1 = await expectEqualImages(primary, secondary, model, files);
    // Leave 2 MiB free, then write an epoch of 6 MiB.
    const ballast = path.join(state, 'ballast');
    fs.writeFileSync(ballast, Buffer.alloc(freeBytes(state) - 2 * MiB, 1));
    await bulk(pvm, model, 12, 6 * MiB, 4 * MiB);
    episodes++;
    for (let i = 0; i < 2; i++) {
      const failed = await tryCheckpoint(primary, 3000);
      expect(failed.ok, 'a checkpoint succeeded although the secondary could not store the epoch').toBe(
        false,
      );
      if (!failed.ok)
        expect.soft(failed.error.message, 'the error must say the disk is full').toMatch(/ENOSPC|no space/i);
      await bulk(pvm, model, 13 + i, MiB, 12 * MiB);
    }
    expect(secondary.child.exitCode).toBeNull();
    expect((await secondaryStatus(secondary)).committedEpoch).toBe(epoch);
    expect(await hashExport(secondary.nbdPort)).toBe(hash1);
    expect(await hashExport(primary.nbdPort), 'the PVM lost an acknowledged write').toBe(await model.hash());
    expect((await primaryStatus(primary)).pending.map((e) => e.epoch)).toContain(epoch + 1);
    fs.rmSync(ballast);
    const { r, errors } = await checkpointWithin(primary, 10_000);
    expect(
      r.ok,
      `no checkpoint succeeded after the ballast was deleted:\n${errors.slice(-3).join('\n')}\n${r.ok ? '' : r.error.message}`,
    ).toBe(true);
    await expectEqualImages(primary, secondary, model, files);
  });
});
