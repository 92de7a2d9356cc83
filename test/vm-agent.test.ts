/**
 * The QEMU agent's pieces that need no VM: the memory checkpoint's wire
 * format (every length and bound checked before anything is kept), the
 * standby's command line (what it needs, what it rewrites), a standby
 * agent receiving, committing and refusing checkpoints over its control API,
 * and the CLI's errors.
 */
import fs from 'node:fs';
import path from 'node:path';
import { pack } from 'msgpackr';
import { afterAll, describe, expect, it } from 'vitest';
import { ControlServer, controlCall, controlRaw } from '../src/checkpoint/control.js';
import { QemuAgent } from '../src/checkpoint/qemu/agent.js';
import { parseVmCommand, standbyArgv } from '../src/checkpoint/qemu/launch.js';
import { PAGE_BYTES } from '../src/checkpoint/qemu/ram.js';
import { decodeCheckpoint, encodeCheckpoint } from '../src/checkpoint/qemu/wire.js';
import { nodeStorage } from '../src/sys/storage.js';
import { CLI, prng, randomBytes, rmDir, run, tmpDir } from './helpers.js';

const quiet = { info: () => {}, warn: () => {}, debug: () => {} };
const dirs: string[] = [];
afterAll(() => dirs.forEach(rmDir));

const RAM = 64 * PAGE_BYTES;
const VM = [
  'qemu-system-x86_64',
  '-machine',
  'q35,memory-backend=mem',
  '-object',
  `memory-backend-file,id=mem,size=${RAM},mem-path=/dev/shm/x,share=on`,
  '-drive',
  'file=nbd://127.0.0.1:1/disk0',
];

function checkpoint(pages: number[], seed: number, device = Buffer.from('device-state')) {
  const data = randomBytes(pages.length * PAGE_BYTES, prng(seed));
  const ranges = pages.map((_, i) => data.subarray(i * PAGE_BYTES, (i + 1) * PAGE_BYTES));
  return {
    data,
    device,
    body: Buffer.concat(encodeCheckpoint(RAM, Uint32Array.from(pages), ranges, device)),
  };
}

describe('memory checkpoint wire format', () => {
  it('decodes what it encodes', () => {
    const c = checkpoint([0, 5, 6, 63], 1);
    const d = decodeCheckpoint(c.body);
    expect(d.ramBytes).toBe(RAM);
    expect([...d.pages]).toEqual([0, 5, 6, 63]);
    expect(d.data.equals(c.data)).toBe(true);
    expect(d.device.equals(c.device)).toBe(true);
  });

  it('refuses, with the reason, every damaged body', () => {
    const good = checkpoint([1, 2], 2).body;
    const header = (h: object) => {
      const b = pack(h);
      const len = Buffer.alloc(4);
      len.writeUInt32LE(b.length);
      return Buffer.concat([len, b]);
    };
    const cases: [Buffer, RegExp][] = [
      [Buffer.alloc(2), /2 bytes/],
      [Buffer.from([0xff, 0xff, 0xff, 0x7f, 1, 2]), /header of/],
      [
        Buffer.concat([Buffer.from([3, 0, 0, 0]), Buffer.from([0xc1, 0xc1, 0xc1])]),
        /not msgpack|no sizes|version/,
      ],
      [header({ v: 2, ramBytes: RAM, pages: 0, deviceBytes: 0 }), /version 2/],
      [header({ v: 1, ramBytes: 1000, pages: 0, deviceBytes: 0 }), /no sizes/],
      [good.subarray(0, good.length - 1), /need \d+ bytes, not/],
      [Buffer.concat([good, Buffer.alloc(1)]), /need \d+ bytes, not/],
    ];
    for (const [body, why] of cases) expect(() => decodeCheckpoint(body), String(why)).toThrow(why);
    const outside = checkpoint([64], 3).body;
    expect(() => decodeCheckpoint(outside)).toThrow(/page 64 is outside/);
    const unordered = checkpoint([5, 5], 4).body;
    expect(() => decodeCheckpoint(unordered)).toThrow(/not ascending/);
  });
});

describe("the standby's command line", () => {
  it('finds the RAM size and rewrites only mem-path, adding -incoming defer and our QMP socket', () => {
    const cmd = parseVmCommand(VM);
    expect(cmd.ramBytes).toBe(RAM);
    const argv = standbyArgv(cmd, '/standby/ram.img', '/standby/qmp.sock');
    expect(argv).toContain(`memory-backend-file,id=mem,size=${RAM},share=on,mem-path=/standby/ram.img`);
    expect(argv).toContain('file=nbd://127.0.0.1:1/disk0');
    expect(argv.slice(-4)).toEqual([
      '-incoming',
      'defer',
      '-qmp',
      'unix:/standby/qmp.sock,server=on,wait=off',
    ]);
  });

  it('says what is missing', () => {
    expect(() => parseVmCommand([])).toThrow(/no QEMU command line/);
    expect(() => parseVmCommand(['qemu-system-x86_64', '-m', '256M'])).toThrow(/0 memory-backend-file/);
    expect(() => parseVmCommand(VM.map((a) => a.replace(',share=on', '')))).toThrow(/share=on/);
    expect(() => parseVmCommand(VM.map((a) => a.replace(`size=${RAM},`, '')))).toThrow(/no size=/);
    expect(() => parseVmCommand(VM.map((a) => a.replace(`size=${RAM}`, 'size=lots')))).toThrow(/not a size/);
    expect(() => parseVmCommand([...VM, '-incoming', 'defer'])).toThrow(/must not have -incoming/);
  });
});

describe('a standby agent', () => {
  it('holds each checkpoint until it is loaded, commits it to its image, and refuses what is not its VM', async () => {
    const dir = tmpDir('colo-blk-vmagent-');
    dirs.push(dir);
    const agent = await QemuAgent.standbyFor(nodeStorage, dir, parseVmCommand(VM), quiet);
    const control = new ControlServer(agent.routes());
    const a = await control.listen(0, '127.0.0.1');
    const at = { host: '127.0.0.1', port: a.port };
    try {
      const status = await controlCall<Record<string, unknown>>(at, 'GET', '/status');
      expect(status).toMatchObject({
        agent: 'standby',
        standby: true,
        identity: `qemu ram=${RAM}`,
        committedEpoch: 0,
      });
      // Pause and checkpointed are nothing to a standby; send is not its to do.
      expect(await controlCall(at, 'POST', '/mem/pause', {})).toEqual({ conns: null });
      await expect(controlCall(at, 'POST', '/mem/send', { to: '127.0.0.1:1', full: true })).rejects.toThrow(
        /this is a standby/,
      );
      // A checkpoint received, then discarded: the image stays zero.
      const c1 = checkpoint([3, 4], 5);
      expect(JSON.parse((await controlRaw(at, '/mem/receive', c1.body)).toString())).toEqual({
        epoch: 1,
        pages: 2,
      });
      await controlCall(at, 'POST', '/mem/discard', {});
      await expect(controlCall(at, 'POST', '/mem/load', {})).rejects.toThrow(/was not received/);
      // Received and loaded: in the image, durable.
      await controlRaw(at, '/mem/receive', c1.body);
      expect(await controlCall(at, 'POST', '/mem/load', { checkpoint: 'c1' })).toEqual({ epoch: 1 });
      // The same load again (a coordinator whose answer was lost): answered, nothing more committed;
      // another checkpoint's load with nothing received is still refused.
      expect(await controlCall(at, 'POST', '/mem/load', { checkpoint: 'c1' })).toEqual({
        epoch: 1,
        again: true,
      });
      await expect(controlCall(at, 'POST', '/mem/load', { checkpoint: 'c2' })).rejects.toThrow(
        /was not received/,
      );
      const img = fs.readFileSync(path.join(dir, 'ram.img'));
      expect(img.subarray(3 * PAGE_BYTES, 5 * PAGE_BYTES).equals(c1.data)).toBe(true);
      expect(img.subarray(0, 3 * PAGE_BYTES).every((b) => b === 0)).toBe(true);
      // Its hash is that of the committed image.
      const { hash } = await controlCall<{ hash: string }>(at, 'GET', '/hash');
      expect(hash).toMatch(/^[0-9a-f]{64}$/);
      // Another VM's RAM, or a damaged body: refused, nothing changes.
      const other = Buffer.concat(
        encodeCheckpoint(RAM * 2, Uint32Array.from([0]), [Buffer.alloc(PAGE_BYTES, 1)], Buffer.alloc(0)),
      );
      await expect(controlRaw(at, '/mem/receive', other)).rejects.toThrow(/not the same VM/);
      await expect(controlRaw(at, '/mem/receive', Buffer.from('garbage!'))).rejects.toThrow(
        /not a memory checkpoint/,
      );
      expect((await controlCall<{ committedEpoch: number }>(at, 'GET', '/status')).committedEpoch).toBe(1);
    } finally {
      await control.close();
      agent.close();
    }
    // Reopened (a restart): the committed checkpoint is there.
    const again = await QemuAgent.standbyFor(nodeStorage, dir, parseVmCommand(VM), quiet);
    expect(again.status().committedEpoch).toBe(1);
    again.close();
  });

  it('refuses a directory whose image became a running VM at a failover', async () => {
    const dir = tmpDir('colo-blk-vmagent-');
    dirs.push(dir);
    fs.writeFileSync(path.join(dir, 'ACTIVE'), 'checkpoint 9, then\n');
    await expect(QemuAgent.standbyFor(nodeStorage, dir, parseVmCommand(VM), quiet)).rejects.toThrow(
      /runs since a failover.*own empty directory/,
    );
  });
});

describe('the CLI', () => {
  it('vm and vm-standby say what is wrong, with usage and connection exit codes', async () => {
    const noQmp = await run(process.execPath, [
      CLI,
      'vm',
      '--qmp',
      '/nonexistent/qmp.sock',
      '--ram',
      '/dev/null',
    ]);
    expect(noQmp.code).toBe(3);
    expect(noQmp.stderr).toMatch(/QEMU is not listening there \(is it running with -qmp\?\)/);
    const noArgs = await run(process.execPath, [CLI, 'vm-standby', '--dir', '/tmp/x']);
    expect(noArgs.code).toBe(2);
    const noMem = await run(process.execPath, [
      CLI,
      'vm-standby',
      '--dir',
      '/tmp/x',
      '--',
      'qemu-system-x86_64',
      '-m',
      '1G',
    ]);
    expect(noMem.code).toBe(2);
    expect(noMem.stderr).toMatch(/memory-backend-file objects; it needs exactly one/);
  });
});
