// The colo-blk command line as a real process: help, usage errors with exit
// code 2, operational errors with exit code 1, and a clean shutdown.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../src/net/client.js';
import { CLI, killAll, rmDir, ROOT, run, startCliServer, tmpDir } from './helpers.js';

const dir = tmpDir();
afterAll(async () => {
  await killAll();
  rmDir(dir);
});

const cli = (args: string[]) => run(process.execPath, [CLI, ...args], { timeoutMs: 20_000 });

describe('colo-blk CLI', () => {
  it('prints help with the serve command and examples', async () => {
    const top = await cli(['--help']);
    expect(top.code).toBe(0);
    expect(top.stdout).toMatch(/serve \[options\]/);
    const serve = await cli(['serve', '--help']);
    expect(serve.code).toBe(0);
    expect(serve.stdout).toMatch(/--export <spec>/);
    expect(serve.stdout).toMatch(/Examples:/);
  });

  it('prints its version', async () => {
    const r = await cli(['--version']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
  });

  it('exits 2 with a clear message on usage errors', async () => {
    for (const [args, msg] of [
      [['serve'], /required option '--export/],
      [['serve', '--export', 'nonsense'], /expected NAME=PATH/],
      [['serve', '--export', 'd=x.img,size=lots'], /cannot parse size 'lots'/],
      [['serve', '--export', 'd=x.img,colour=blue'], /unknown export option 'colour'/],
      [['serve', '--export', 'd=:memory:'], /needs a size/],
      [['serve', '--listen', 'nowhere', '--export', 'd=:memory:,size=1M'], /expected HOST:PORT/],
      [['serve', '--io', 'warp', '--export', 'd=:memory:,size=1M'], /Allowed choices are sync, async/],
      [['frobnicate'], /unknown command 'frobnicate'/],
      [
        ['primary', '--export', 'd=x.img', '--state', 's', '--peer', '127.0.0.1:1', '--window', '4K'],
        /--window 4K is too small/,
      ],
      [
        ['primary', '--export', 'd=x.img', '--state', 's', '--peer', '127.0.0.1:1', '--window', 'wide'],
        /cannot parse size 'wide'/,
      ],
      [['secondary', '--export', 'd=x.img', '--state', 's', '--window', '1K'], /--window 1K is too small/],
      // The disk nodes take waits of up to a day: a longer phase timeout would fail every checkpoint.
      [
        [
          'colo',
          ...['--pvm', '127.0.0.1:1', '--pvm-control', '127.0.0.1:1', '--svm', '127.0.0.1:1'],
          ...['--svm-control', '127.0.0.1:1', '--primary-control', '127.0.0.1:1'],
          ...['--secondary-control', '127.0.0.1:1', '--timeout', '99999999999'],
        ],
        /--timeout must be a number of milliseconds \(at least 100, at most 86400000\)/,
      ],
    ] as const) {
      const r = await cli([...args]);
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(2);
      expect(r.stderr).toMatch(msg);
    }
  });

  it("the developers' tools (fuzz runner, connection flood, guest builder) answer --help and refuse an unknown option with exit 2", async () => {
    for (const tool of [
      path.join('tools', 'fuzz', 'run.mjs'),
      path.join('tools', 'loris.mjs'),
      path.join('tools', 'vm', 'build-guest.mjs'),
    ]) {
      const script = path.join(ROOT, tool);
      const help = await run(process.execPath, [script, '--help'], { timeoutMs: 20_000 });
      expect(help.code, `${tool} --help: ${help.stderr}`).toBe(0);
      expect(help.stdout).toMatch(/^usage: /);
      const bad = await run(process.execPath, [script, '--frobnicate'], { timeoutMs: 20_000 });
      expect(bad.code, tool).toBe(2);
      expect(bad.stderr).toMatch(/Unknown option '--frobnicate'/);
      expect(bad.stderr).toMatch(/usage: /);
      expect(bad.stderr, 'no stack trace').not.toMatch(/\n\s+at /);
    }
  });

  it('exits 1 when an image cannot be opened, saying what to do', async () => {
    const r = await cli(['serve', '--export', `d=${path.join(dir, 'missing.img')}`]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/does not exist; give a size/);
  });

  it('refuses a port that is in use with a clear message', async () => {
    const blocker = net.createServer();
    await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', () => r()));
    const port = (blocker.address() as net.AddressInfo).port;
    const r = await cli(['serve', '--listen', `127.0.0.1:${port}`, '--export', 'd=:memory:,size=1M']);
    blocker.close();
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already in use/);
  });

  it('creates the image, serves several exports, and stops cleanly on SIGINT', async () => {
    const img = path.join(dir, 'created.img');
    const srv = await startCliServer([
      '--export',
      `disk0=${img},size=8M`,
      '--export',
      'scratch=:memory:,size=4M,desc=scratch space',
    ]);
    expect(fs.statSync(img).size).toBe(8 * 1024 * 1024);
    const list = await NbdClient.list({ port: srv.port });
    expect(list).toEqual([
      { name: 'disk0', description: img },
      { name: 'scratch', description: 'scratch space' },
    ]);
    const c = await NbdClient.connect({ port: srv.port, exportName: 'disk0' });
    await c.write(Buffer.from('persisted'), 4096);
    await c.close();
    const exit = await srv.stop('SIGINT');
    expect(exit.code).toBe(0);
    const buf = Buffer.alloc(9);
    const fd = fs.openSync(img, 'r');
    fs.readSync(fd, buf, 0, 9, 4096);
    fs.closeSync(fd);
    expect(buf.toString()).toBe('persisted');
  });

  it('serves a read-only export that refuses writes with EPERM', async () => {
    const img = path.join(dir, 'ro.img');
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024, 0x61));
    const srv = await startCliServer(['--export', `disk0=${img},ro`]);
    const c = await NbdClient.connect({ port: srv.port, exportName: 'disk0' });
    expect(c.readOnly).toBe(true);
    await expect(c.write(Buffer.alloc(10), 0)).rejects.toMatchObject({ code: 'EPERM' });
    expect((await c.read(0, 3)).toString()).toBe('aaa');
    await c.close();
    expect((await srv.stop()).code).toBe(0);
  });
});
