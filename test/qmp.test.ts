/**
 * The QMP client against a real QEMU running the small Linux guest (TCG, RAM
 * in a shared file): capability negotiation, commands and their errors,
 * events interleaved with replies, pause and resume, device state alone by
 * migration with x-ignore-shared (the RAM stays in the shared file), and a
 * clear error for every call when QEMU dies.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { QmpClient, QmpError } from '../src/checkpoint/qemu/qmp.js';
import { killAll, rmDir, tmpDir } from './helpers.js';
import { describeWith } from './tools.js';
import { bootGuest, type BootedGuest } from './vm-helpers.js';

let dir: string;

describeWith(['qemu-system-x86_64', 'busybox', 'cpio'], 'QMP against a real QEMU', () => {
  let guest: BootedGuest;
  let qmp: QmpClient;
  beforeAll(async () => {
    dir = tmpDir('colo-blk-qmp-');
    // Booted beside the other suites at nice 19: it may wait a while for CPU.
    guest = await bootGuest(dir, { bootTimeoutMs: 240_000 });
    qmp = await QmpClient.connect({ path: guest.qmpPath });
  }, 300_000);
  afterAll(async () => {
    qmp?.close();
    await guest?.kill();
    await killAll();
    rmDir(dir);
  });

  it('negotiates, answers commands, and reports refusals with their class', async () => {
    expect(qmp.version).toMatch(/^\d+\.\d+\.\d+$/);
    expect(await qmp.execute('query-status')).toMatchObject({ running: true, status: 'running' });
    const err = await qmp.execute('no-such-command').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).errorClass).toBe('CommandNotFound');
    const bad = await qmp
      .execute('migrate-set-capabilities', { capabilities: 'nope' })
      .catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(QmpError);
  });

  it('pauses and resumes, with the STOP and RESUME events between the replies', async () => {
    const stopped = qmp.waitEvent('STOP', 5_000);
    await qmp.execute('stop');
    await stopped;
    expect(await qmp.execute('query-status')).toMatchObject({ running: false, status: 'paused' });
    const resumed = qmp.waitEvent('RESUME', 5_000);
    await qmp.execute('cont');
    await resumed;
    expect(await qmp.execute('query-status')).toMatchObject({ running: true });
  });

  it('saves device state alone with x-ignore-shared: the shared RAM does not travel', async () => {
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [{ capability: 'x-ignore-shared', state: true }],
    });
    const file = path.join(dir, 'devstate');
    await qmp.execute('stop');
    const t0 = Date.now();
    await qmp.execute('migrate', { uri: `exec:cat > ${file}` });
    for (;;) {
      const m = await qmp.execute<{ status: string }>('query-migrate');
      if (m.status === 'completed') break;
      if (m.status === 'failed') throw new Error(`migration failed: ${JSON.stringify(m)}`);
      if (Date.now() - t0 > 30_000) throw new Error('migration did not complete in 30 s');
      await new Promise((r) => setTimeout(r, 5));
    }
    const ms = Date.now() - t0;
    const bytes = fs.statSync(file).size;
    // 256 MiB of RAM; device state is well under a megabyte.
    expect(bytes).toBeGreaterThan(1024);
    expect(bytes).toBeLessThan(4 * 1024 * 1024);
    console.log(
      `device state with x-ignore-shared: ${(bytes / 1024).toFixed(0)} KiB in ${ms} ms (256 MiB RAM left in the shared file)`,
    );
    await qmp.execute('cont');
    expect(await qmp.execute('query-status')).toMatchObject({ running: true });
  }, 60_000);

  it('fails every call with one clear error when QEMU dies, and says so once', async () => {
    let closes = 0;
    qmp.on('close', () => closes++);
    const pending = qmp.execute('query-status', undefined, 10_000).catch((e: Error) => e);
    guest.child.kill('SIGKILL');
    const late = await Promise.all([pending, qmp.waitEvent('SHUTDOWN', 10_000).catch((e: Error) => e)]);
    for (const r of late) if (r instanceof Error) expect(r.message).toMatch(/QEMU closed the connection|QMP/);
    await new Promise((r) => setTimeout(r, 100));
    const after = await qmp.execute('query-status').catch((e: Error) => e);
    expect(after).toBeInstanceOf(Error);
    expect((after as Error).message).toMatch(/QEMU closed the connection/);
    expect(closes).toBe(1);
    await expect(QmpClient.connect({ path: guest.qmpPath }, 2_000)).rejects.toThrow(/not listening|QMP/);
  }, 30_000);
});
