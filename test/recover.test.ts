// `colo-blk recover` on stopped secondaries and primaries: committed epochs
// applied, torn tails cut, corruption refused, a lost index rebuilt, and a
// second run that finds nothing to do.
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { encodeFrame, encodeFrameBuffer } from '../src/checkpoint/format/frame.js';
import type { MutationRecord } from '../src/checkpoint/format/records.js';
import { SecondaryStore } from '../src/checkpoint/secondary/store.js';
import { CLI, prng, randomBytes, rmDir, run, tmpDir } from './helpers.js';

const root = tmpDir('colo-blk-recover-');
afterAll(() => rmDir(root));
let n = 0;
const SIZE = 8 * 1024 * 1024;
const sha = (p: string) => createHash('sha256').update(fs.readFileSync(p)).digest('hex');
const recover = (dir: string) => run(process.execPath, [CLI, 'recover', '--state', dir, '--json']);

/**
 * A secondary state directory with epoch 1 committed but (deliberately) not
 * applied, and epoch 2 durable. Returns the model of the checkpoint-1 image.
 */
async function secondaryState(): Promise<{ dir: string; image: string; model: Buffer }> {
  const dir = path.join(root, `s${n++}`);
  const image = dir + '.img';
  const dev = await FileDevice.open(image, { size: SIZE });
  const store = await SecondaryStore.open(dir, dev);
  fs.writeFileSync(path.join(dir, 'node.json'), JSON.stringify({ role: 'secondary', image, size: SIZE }));
  const rand = prng(n);
  const model = Buffer.alloc(SIZE);
  let s = 0;
  for (const e of [1, 2]) {
    let bytes = 0;
    for (let i = 0; i < 10; i++) {
      const rec: MutationRecord = { t: 'w', e, s: ++s, o: (rand() % 100) * 65536 };
      const data = randomBytes(65536, rand);
      store.receive(rec, encodeFrame(rec, data), data.length);
      if (e === 1) data.copy(model, rec.o);
      bytes += data.length;
    }
    await store.seal({ t: 'seal', e, n: 10, b: bytes });
  }
  // Close before the background apply runs: epoch 1 stays committed-not-applied.
  const closing = store.commit(1).then(() => store.close());
  await closing;
  await dev.close();
  return { dir, image, model };
}

describe('colo-blk recover', () => {
  it('applies a committed epoch, and a second run finds nothing to do', async () => {
    const { dir, image, model } = await secondaryState();
    const first = await recover(dir);
    expect(first.code, first.stderr).toBe(0);
    const r1 = JSON.parse(first.stdout);
    expect(r1).toMatchObject({ ok: true, role: 'secondary', committedEpoch: 1, applied: [1] });
    expect(fs.readFileSync(image).equals(model)).toBe(true);
    expect(r1.pending).toEqual([{ epoch: 2, state: 'durable', writes: 10, bytes: 655360 }]);
    const hash = sha(image);
    const second = JSON.parse((await recover(dir)).stdout);
    expect(second.applied).toEqual([]);
    expect(second.actions).toEqual([]);
    expect(sha(image)).toBe(hash);
  });

  it("a promoted node's directory is recovered as its store: committed epochs applied, its own writes kept", async () => {
    const { dir, image, model } = await secondaryState();
    // Promoted (epoch 2, never committed, is dropped), then it writes as the primary it now is.
    let dev = await FileDevice.open(image);
    let store = await SecondaryStore.open(dir, dev);
    await store.promote('test');
    const own = randomBytes(65536, prng(99));
    await store.svmDevice.pwrite(own, 0, { fua: true });
    await store.close();
    await dev.close();
    fs.writeFileSync(path.join(dir, 'node.json'), JSON.stringify({ role: 'promoted', image, size: SIZE }));
    const first = await recover(dir);
    expect(first.code, first.stderr).toBe(0);
    const r1 = JSON.parse(first.stdout);
    // The old command took it for a primary's directory: role 'primary', its epoch files scanned as
    // a resend buffer, nothing of the store checked or applied.
    expect(r1).toMatchObject({ ok: true, role: 'promoted', committedEpoch: 1 });
    expect(r1.promoted).toMatchObject({ overlayWrites: 1, overlayBytes: 65536 });
    expect(r1.pending).toEqual([]);
    expect(r1.actions.join('\n')).not.toMatch(/resynchronise the secondary/);
    expect(fs.readFileSync(image).equals(model)).toBe(true);
    const text = await run(process.execPath, [CLI, 'recover', '--state', dir]);
    expect(text.stdout).toMatch(/promoted to primary \(generation \d+\).*stay in its overlay/);
    // Its own write is still what its disk reads.
    dev = await FileDevice.open(image);
    store = await SecondaryStore.open(dir, dev);
    const back = Buffer.alloc(65536);
    await store.svmDevice.pread(back, 0);
    expect(back.equals(own)).toBe(true);
    await store.close();
    await dev.close();
  });

  it('cuts a torn tail and reports its offset', async () => {
    const { dir } = await secondaryState();
    // Epoch 3 was being received: one whole frame, then half of the next.
    const file = path.join(dir, 'epochs', '3.journal');
    const whole = encodeFrameBuffer({ t: 'w', e: 3, s: 21, o: 0 }, Buffer.alloc(4096, 1));
    const torn = encodeFrameBuffer({ t: 'w', e: 3, s: 22, o: 4096 }, Buffer.alloc(4096, 2)).subarray(0, 1000);
    fs.writeFileSync(file, Buffer.concat([whole, torn]));
    const r = JSON.parse((await recover(dir)).stdout);
    expect(r.tornTails).toEqual([{ file, offset: whole.length, reason: 'incomplete frame' }]);
    expect(fs.statSync(file).size).toBe(whole.length);
  });

  it('past a seal, bytes are what the file held before (a recycled journal): cut, not a torn tail', async () => {
    const { dir } = await secondaryState();
    const file = path.join(dir, 'epochs', '2.journal');
    const size = fs.statSync(file).size;
    fs.appendFileSync(
      file,
      encodeFrameBuffer({ t: 'w', e: 2, s: 99, o: 0 }, Buffer.alloc(4096, 1)).subarray(0, 1000),
    );
    const r = JSON.parse((await recover(dir)).stdout);
    expect(r.tornTails).toEqual([]);
    expect(r.pending).toEqual([{ epoch: 2, state: 'durable', writes: 10, bytes: 655360 }]);
    expect(fs.statSync(file).size).toBe(size);
  });

  it('refuses corruption in the middle, names the file and offset, and applies nothing', async () => {
    const { dir, image } = await secondaryState();
    const file = path.join(dir, 'epochs', '1.journal');
    const buf = fs.readFileSync(file);
    const before = sha(image);
    buf[buf.length >> 1] ^= 0xff;
    fs.writeFileSync(file, buf);
    const r = await run(process.execPath, [CLI, 'recover', '--state', dir]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/1\.journal is corrupt at offset \d+/);
    expect(r.stderr).toMatch(/Resynchronise this node/);
    expect(sha(image)).toBe(before);
    const j = await recover(dir);
    expect(JSON.parse(j.stdout)).toMatchObject({ ok: false, error: { code: 'EIO' } });
  });

  it('rebuilds a lost metadata index from the journals', async () => {
    const { dir, image, model } = await secondaryState();
    fs.rmSync(path.join(dir, 'meta'), { recursive: true });
    const r = JSON.parse((await recover(dir)).stdout);
    expect(r.indexRebuilt).toBe(true);
    expect(r.committedEpoch).toBe(1);
    expect(fs.readFileSync(image).equals(model)).toBe(true);
  });

  it('refuses a state directory that a running node holds', async () => {
    const { dir, image } = await secondaryState();
    const dev = await FileDevice.open(image);
    const store = await SecondaryStore.open(dir, dev);
    const r = await run(process.execPath, [CLI, 'recover', '--state', dir]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/another colo-blk/);
    await store.close();
    await dev.close();
  });

  it('on a primary, cuts torn tails and lists unacknowledged epochs', async () => {
    const dir = path.join(root, 'primary');
    fs.mkdirSync(path.join(dir, 'epochs'), { recursive: true });
    fs.writeFileSync(
      path.join(dir, 'node.json'),
      JSON.stringify({ role: 'primary', image: '/x/pvm.img', size: SIZE }),
    );
    const file = path.join(dir, 'epochs', '7.journal');
    const good = encodeFrameBuffer({ t: 'w', e: 7, s: 1, o: 0 }, Buffer.alloc(512, 3));
    fs.writeFileSync(file, Buffer.concat([good, good.subarray(0, 20)]));
    const r = JSON.parse((await recover(dir)).stdout);
    expect(r.pending).toEqual([{ epoch: 7, state: 'open', writes: 1, bytes: 512 }]);
    expect(r.tornTails[0].offset).toBe(good.length);
    expect(r.actions.join('\n')).toMatch(/resynchronise the secondary/);
    expect(fs.statSync(file).size).toBe(good.length);
  });
});
