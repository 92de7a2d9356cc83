// Generation histories and the decision at each hello (failover/history.ts):
// every branch, and the file's durability rules.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { decide, History, type Generation } from '../src/failover/history.js';
import { rmDir, tmpDir } from './helpers.js';
import { nodeStorage } from '../src/sys/storage.js';

const root = tmpDir();
afterAll(() => rmDir(root));

const gen = (n: number, id: string, extra: Partial<Generation> = {}): Generation => ({
  n,
  id,
  by: 'node',
  base: 0,
  at: 0,
  reason: 'test',
  ...extra,
});

describe('generation history', () => {
  const g1 = gen(1, 'a1');
  const g2 = gen(2, 'b2');
  const g2p = gen(2, 'b2', { protected: true });
  const g3 = gen(3, 'c3');
  const g2x = gen(2, 'x2');

  it('same generation: nothing to do, unless the primary cannot resend its log', () => {
    expect(decide([g1], [g1]).action).toBe('none');
    expect(decide([g1], [g1], { primaryNeedsResync: true })).toMatchObject({
      action: 'resync',
      mode: 'incremental',
    });
  });

  it('a new secondary, or one that belongs to no common history, is fully resynchronised', () => {
    expect(decide([g1], [])).toMatchObject({ action: 'resync', mode: 'full' });
  });

  it('a secondary one generation behind a forced one (failover --force): full, not incremental', () => {
    const forced = gen(2, 'f2', { forced: true });
    expect(decide([g1, forced], [g1])).toMatchObject({ action: 'resync', mode: 'full' });
    expect(decide([g1, forced], [g1]).reason).toMatch(/forced/);
    expect(decide([g1, forced, g3], [g1])).toMatchObject({ action: 'resync', mode: 'full' });
  });

  it('a secondary one generation behind an unprotected primary: incremental (with rollback)', () => {
    expect(decide([g1, g2], [g1])).toMatchObject({ action: 'resync', mode: 'incremental', common: g1 });
  });

  it('further behind, or behind a generation that protected someone else: full', () => {
    expect(decide([g1, g2p], [g1])).toMatchObject({ action: 'resync', mode: 'full' });
    expect(decide([g1, g2, g3], [g1])).toMatchObject({ action: 'resync', mode: 'full' });
  });

  it('a primary older than its secondary is stale and refused', () => {
    expect(decide([g1], [g1, g2])).toMatchObject({ action: 'refuse', kind: 'stale-primary' });
  });

  it('both sides wrote after diverging: split brain, naming both generations and the way out', () => {
    const d = decide([g1, g2x], [g1, g2]);
    expect(d).toMatchObject({ action: 'refuse', kind: 'split-brain' });
    expect(d.reason).toMatch(/generation 1 \(a1\)/);
    expect(d.reason).toMatch(/generation 2 \(x2\)/);
    expect(d.reason).toMatch(/generation 2 \(b2\)/);
    expect(d.reason).toMatch(/--discard-my-data/);
    // Two unrelated disks are a split brain too, never a merge.
    expect(decide([g2x], [g1])).toMatchObject({ action: 'refuse', kind: 'split-brain' });
  });

  it('a half-finished resync is resumed towards the same primary, or redone in full', () => {
    expect(decide([g1, g2], [g1], { syncing: { target: 'b2', mode: 'incremental' } })).toMatchObject({
      action: 'resync',
      mode: 'incremental',
    });
    expect(decide([g1, g3], [g1], { syncing: { target: 'b2', mode: 'incremental' } })).toMatchObject({
      action: 'resync',
      mode: 'full',
    });
  });

  it('is kept in history.json: minted generations survive a reload; a damaged file is refused', () => {
    const dir = path.join(root, 'h');
    fs.mkdirSync(dir);
    const h = History.load(nodeStorage, path.join(dir, 'history.json'));
    expect(h.empty).toBe(true);
    const a = h.mint('new disk', 0);
    const b = h.mint('promoted', 7);
    expect([a.n, b.n]).toEqual([1, 2]);
    expect(a.id).not.toBe(b.id);
    h.markProtected();
    const again = History.load(nodeStorage, path.join(dir, 'history.json'));
    expect(again.node).toBe(h.node);
    expect(again.generations.map((g) => g.id)).toEqual([a.id, b.id]);
    expect(again.last).toMatchObject({ base: 7, protected: true });
    expect(fs.existsSync(path.join(dir, 'history.json.tmp'))).toBe(false);
    fs.writeFileSync(path.join(dir, 'history.json'), '{"version":1,"node":');
    expect(() => History.load(nodeStorage, path.join(dir, 'history.json'))).toThrow(
      /not valid JSON.*Restore it/,
    );
  });
});
