// The README's main job: `npm run demo` on a fresh machine (the COLO loop end
// to end: load through the comparer, checkpoints on divergence, the primary
// side killed, re-protection), and the disk pair's own demo.
import { describe, expect, it } from 'vitest';
import { ROOT, runOk } from './helpers.js';
import { describeWith } from './tools.js';

describe('demo', () => {
  it('the COLO loop: load, checkpoints verified, the primary side killed, re-protected, nothing lost', async () => {
    const r = await runOk(process.execPath, ['dist/tools/demo.js', '--seconds', '1', '--json'], {
      timeoutMs: 120_000,
      cwd: ROOT,
    });
    const s = JSON.parse(r.stdout);
    expect(s.errors).toEqual([]);
    expect(s.ok).toBe(true);
    expect(s.connectionsReset).toBe(0);
    expect(s.verified).toBe(s.checkpoints);
    expect(s.checkpointsByReason.pair).toBe(2);
    expect(s.failover.survived).toBe(s.connections);
    expect(s.readable).toBe(s.acknowledgedPuts);
    expect(s.acknowledgedPuts).toBeGreaterThan(0);
    expect(s.checkpointsAfterFailover).toBeGreaterThan(0);
    expect(s.finalCheckpoint).toMatchObject({ stateEqual: true, diskEqual: true });
  }, 120_000); // as long as the run it waits for: on a loaded machine the demo takes several times its 10-20 s

  it('the disk pair: survives the primary being killed, re-protects, and verifies every checkpoint', async () => {
    const r = await runOk(
      process.execPath,
      ['dist/tools/demo-disk.js', '--seconds', '3', '--size', '16M', '--json'],
      { timeoutMs: 90_000, cwd: ROOT },
    );
    const s = JSON.parse(r.stdout);
    expect(s.ok).toBe(true);
    expect(s.verified).toBe(s.checkpoints);
    expect(s.checkpointsAfterFailover).toBeGreaterThan(0);
    expect(s.failover.generation).toBe(2);
    expect(s.reprotect.mode).toBe('full');
    expect(s.exitCodes).toEqual([0, 0]);
  });
});

describeWith(['qemu-system-x86_64', 'busybox', 'cpio', 'mkfs.ext4', 'e2fsck', 'debugfs'], 'demo:vm', () => {
  it('a real QEMU VM: protected, the primary side killed, the guest carries on, nothing a client was told is lost', async () => {
    const r = await runOk(process.execPath, ['dist/tools/demo-vm.js', '--seconds', '2', '--json'], {
      timeoutMs: 180_000,
      cwd: ROOT,
    });
    const s = JSON.parse(r.stdout);
    expect(s.ok).toBe(true);
    expect(s.checkpoints).toBeGreaterThan(0);
    expect(s.fsckClean).toBe(true);
    expect(s.damaged).toEqual([]);
    expect(s.answeredAfter).toBeGreaterThanOrEqual(s.told);
    expect(s.files).toBeGreaterThanOrEqual(s.lastAnswer);
  }, 180_000);
});
