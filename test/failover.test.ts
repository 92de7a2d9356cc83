// Failover with real processes: the secondary takes over when the primary
// dies (or on request), keeps the SVM's writes and drops uncommitted PVM
// writes (invariant 5), fences the old primary (invariant 9), and as a
// promoted node folds its overlay into its image and survives restarts.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { CLI, killAll, prng, randomBytes, rmDir, runOk, tmpDir } from './helpers.js';
import { startPair, waitLinkUp, type Pair } from './replication-helpers.js';

const root = tmpDir('colo-blk-failover-');
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

type SStatus = {
  role: string;
  generation: number;
  promoted: { reason: string; generation: number } | null;
};

async function waitFor<T>(
  what: () => Promise<T>,
  ok: (v: T) => boolean,
  label: string,
  ms = 15_000,
): Promise<T> {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await what().catch(() => null as T);
    if (v !== null && ok(v)) return v;
    if (Date.now() > deadline) throw new Error(`${label}: ${JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const A = Buffer.alloc(65536, 0xa1); // PVM, committed
const B = Buffer.alloc(65536, 0xb2); // PVM, never committed
const S = Buffer.alloc(65536, 0x5c); // SVM's own write
const T = Buffer.alloc(65536, 0x7e); // written after the takeover

describe('failover', () => {
  it('takes over by itself when the primary dies: SVM writes kept, uncommitted PVM writes gone', async () => {
    pair = await startPair(fresh(), '32M', { failover: 'auto', secondaryArgs: ['--failover-grace', '200'] });
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    await pvm.write(A, 0);
    await pair.checkpoint();
    await pvm.write(B, 1 << 20); // epoch 2: mirrored, never committed
    await svm.write(S, 2 << 20); // the SVM's own write since the checkpoint
    pvm.destroy();
    pair.primary.child.kill('SIGKILL');
    const s = await waitFor(
      () => controlCall<SStatus>(pair!.secondary.control, 'GET', '/status'),
      (v) => v.role === 'primary',
      'the secondary never took over',
    );
    expect(s.generation).toBe(2);
    expect(s.promoted!.reason).toMatch(/automatic failover: primary lost/);
    // The SVM's connection kept working across the takeover.
    expect((await svm.read(0, A.length)).equals(A)).toBe(true);
    expect((await svm.read(1 << 20, B.length)).equals(Buffer.alloc(B.length))).toBe(true);
    expect((await svm.read(2 << 20, S.length)).equals(S)).toBe(true);
    await svm.write(T, 3 << 20, { fua: true });
    await svm.close();
    // A restart keeps the role, the generation and the data.
    pair.secondary.child.kill('SIGKILL');
    await pair.secondary.exit;
    await pair.startSecondary();
    const again = await controlCall<SStatus>(pair.secondary.control, 'GET', '/status');
    expect(again).toMatchObject({ role: 'primary', generation: 2 });
    const c = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    expect((await c.read(0, A.length)).equals(A)).toBe(true);
    expect((await c.read(1 << 20, B.length)).equals(Buffer.alloc(B.length))).toBe(true);
    expect((await c.read(2 << 20, S.length)).equals(S)).toBe(true);
    expect((await c.read(3 << 20, T.length)).equals(T)).toBe(true);
    await c.close();
  });

  it('colo-blk failover promotes on request and fences the old primary, which then refuses writes', async () => {
    pair = await startPair(fresh(), '32M');
    await waitLinkUp(pair.primary);
    const pvm = await NbdClient.connect({ port: pair.primary.nbdPort, exportName: 'disk0' });
    await pvm.write(A, 0);
    const ck = await pair.checkpoint();
    await pvm.write(B, 1 << 20);
    const r = JSON.parse(
      (
        await runOk(process.execPath, [
          CLI,
          'failover',
          '--control',
          `127.0.0.1:${pair.secondary.control.port}`,
          '--json',
        ])
      ).stdout,
    );
    expect(r).toMatchObject({ role: 'primary', generation: 2, committed: ck.epoch });
    expect(r.droppedEpochs).toEqual([ck.epoch + 1]);
    // The old primary reconnects, is refused as stale, and fences itself.
    const p = await waitFor(
      () => controlCall<{ deposed: string | null }>(pair!.primary.control, 'GET', '/status'),
      (v) => v.deposed !== null,
      'the old primary was never fenced',
    );
    expect(p.deposed).toMatch(/older than the secondary's generation 2 .*promoted/);
    await expect(pvm.write(A, 4 << 20)).rejects.toMatchObject({ code: 'EPERM' });
    expect((await pvm.read(0, A.length)).equals(A)).toBe(true); // reads still work
    const text = (
      await runOk(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${pair.primary.control.port}`])
    ).stdout;
    expect(text).toMatch(/DEPOSED/);
    const stext = (
      await runOk(process.execPath, [CLI, 'status', '--control', `127.0.0.1:${pair.secondary.control.port}`])
    ).stdout;
    expect(stext).toMatch(/role +primary \(generation 2, [0-9a-f]+\)/);
    expect(stext).toMatch(/PROMOTED/);
    await pvm.close();
  });

  it('a promoted node folds its overlay into its image and keeps everything across a crash', async () => {
    const dir = fresh();
    pair = await startPair(dir, '160M');
    await waitLinkUp(pair.primary);
    await controlCall(pair.secondary.control, 'POST', '/failover');
    const svm = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    // More than the fold threshold (64 MiB): at least one fold, applied to the image.
    const rand = prng(4);
    const first = randomBytes(1 << 20, rand);
    await svm.write(first, 0);
    for (let i = 1; i < 80; i++) await svm.write(randomBytes(1 << 20, rand), i * (1 << 20));
    await controlCall(pair.secondary.control, 'POST', '/drain-apply');
    const img = fs.readFileSync(path.join(dir, 'svm.img'));
    expect(img.subarray(0, first.length).equals(first), 'the folded overlay reached the image').toBe(true);
    await svm.write(Buffer.alloc(4096, 0x42), 150 << 20, { fua: true });
    await svm.close();
    pair.secondary.child.kill('SIGKILL');
    await pair.secondary.exit;
    await pair.startSecondary();
    const c = await NbdClient.connect({ port: pair.secondary.nbdPort, exportName: 'disk0' });
    expect((await c.read(0, first.length)).equals(first)).toBe(true);
    expect((await c.read(150 << 20, 4096)).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    await c.close();
  });
});
