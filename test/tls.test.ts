/**
 * NBD over TLS (STARTTLS), X.509 and PSK, against real TLS clients — qemu-img
 * and qemu-io (GnuTLS, tls-creds-x509 / tls-creds-psk), nbdinfo and nbdcopy
 * (libnbd, nbds:// URIs) — and our own client; plus the refusals: a client
 * that trusts another CA, a wrong PSK, a plain client against `require`,
 * options in the clear before STARTTLS, and data injected after it. The
 * state negotiated in the clear is forgotten at STARTTLS (CVE-2021-3716).
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdClient, NbdOptionError } from '../src/net/client.js';
import { encodeInfoRequest, encodeOption } from '../src/net/codec.js';
import { Info, Opt, Rep, TxFlag } from '../src/net/protocol.js';
import { loadPskFile, loadX509Dir, type TlsCredentials } from '../src/net/tls/credentials.js';
import {
  CLI,
  killAll,
  prng,
  randomBytes,
  rmDir,
  run,
  runOk,
  startCliServer,
  startServer,
  tmpDir,
  type RunningServer,
} from './helpers.js';
import { sha256, sha256File } from './interop-helpers.js';
import { closeAllRaw, RawConn } from './raw-nbd.js';
import { makePki, makePsk, type TestPki } from './tls-helpers.js';
import { describeWith, unmet } from './tools.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

let dir: string;
let pki: TestPki;
let psk: { file: string; dir: string };
let wrongPsk: { file: string; dir: string };

beforeAll(() => {
  dir = tmpDir('colo-blk-tls-');
  if (unmet(['openssl']).length === 0) pki = makePki(path.join(dir, 'pki'));
  psk = makePsk(path.join(dir, 'psk'), 'alice');
  wrongPsk = makePsk(path.join(dir, 'psk-wrong'), 'alice');
});

afterAll(() => rmDir(dir));
afterEach(() => closeAllRaw());

async function tlsServer(
  creds: () => TlsCredentials,
  mode: 'on' | 'require',
  verifyPeer = false,
): Promise<{ srv: RunningServer; dev: MemoryDevice }> {
  const dev = new MemoryDevice(SIZE);
  const srv = await startServer([{ name: 'disk0', device: dev }], {
    tls: { mode, creds: creds(), verifyPeer },
    handshakeTimeoutMs: 5_000,
  });
  return { srv, dev };
}

const nbds = (port: number, query: string, user = '') =>
  `nbds://${user ? `${user}@` : ''}127.0.0.1:${port}/disk0?${query}`;

const qemuX509 = (certDir: string) => `tls-creds-x509,id=tls0,dir=${certDir},endpoint=client`;
const qemuPsk = (pskDir: string, user: string) =>
  `tls-creds-psk,id=tls0,dir=${pskDir},endpoint=client,username=${user}`;
const qemuOpts = (port: number) => `driver=nbd,host=127.0.0.1,port=${port},export=disk0,tls-creds=tls0`;

/** qemu-io over TLS: write a pattern, read it back verified; returns the combined output. */
async function qemuIoTls(object: string, port: number, cmds: string[]) {
  const args = ['--object', object, '--image-opts', qemuOpts(port)];
  for (const c of cmds) args.push('-c', c);
  return run('qemu-io', args, { timeoutMs: 30_000 });
}

function failedQemuIo(r: { code: number | null; stdout: string; stderr: string }): boolean {
  return r.code !== 0 || /failed|error/i.test(r.stdout + r.stderr);
}

describeWith(['openssl', 'qemu-io', 'qemu-img', 'nbdinfo', 'nbdcopy'], 'NBD over TLS with X.509', () => {
  let srv: RunningServer;
  let dev: MemoryDevice;
  beforeAll(
    async () => ({ srv, dev } = await tlsServer(() => loadX509Dir(pki.server, ['server']), 'require')),
  );
  afterAll(() => srv.close());

  it('qemu-io writes and reads back through tls-creds-x509', async () => {
    const r = await qemuIoTls(qemuX509(pki.caOnly), srv.port, [
      'write -P 0xa7 1M 256k',
      'read -P 0xa7 1M 256k',
      'read -P 0 0 64k',
    ]);
    expect(failedQemuIo(r), r.stdout + r.stderr).toBe(false);
    const back = Buffer.alloc(256 * 1024);
    await dev.pread(back, MiB);
    expect(back.every((b) => b === 0xa7)).toBe(true);
  });

  it('qemu-img reads the image over TLS (info and convert)', async () => {
    const info = await runOk(
      'qemu-img',
      ['info', '--output=json', '--object', qemuX509(pki.caOnly), '--image-opts', qemuOpts(srv.port)],
      { timeoutMs: 30_000 },
    );
    expect(JSON.parse(info.stdout)['virtual-size']).toBe(SIZE);
    const out = path.join(dir, 'x509-out.img');
    await runOk(
      'qemu-img',
      ['convert', '--object', qemuX509(pki.caOnly), '--image-opts', qemuOpts(srv.port), '-O', 'raw', out],
      { timeoutMs: 30_000 },
    );
    const whole = Buffer.alloc(SIZE);
    await dev.pread(whole, 0);
    expect(sha256File(out)).toBe(sha256(whole));
  });

  it('nbdinfo and nbdcopy speak nbds:// with the CA', async () => {
    const info = await runOk('nbdinfo', ['--json', nbds(srv.port, `tls-certificates=${pki.caOnly}`)], {
      timeoutMs: 20_000,
    });
    const exp = (JSON.parse(info.stdout) as { exports: { 'export-size': number }[] }).exports[0];
    expect(exp['export-size']).toBe(SIZE);
    // Copy a file in, then the export out, and compare.
    const src = path.join(dir, 'copy-in.img');
    fs.writeFileSync(src, randomBytes(SIZE, prng(11)));
    await runOk('nbdcopy', [src, nbds(srv.port, `tls-certificates=${pki.caOnly}`)], { timeoutMs: 30_000 });
    const out = path.join(dir, 'copy-out.img');
    await runOk('nbdcopy', [nbds(srv.port, `tls-certificates=${pki.caOnly}`), out], { timeoutMs: 30_000 });
    expect(sha256File(out)).toBe(sha256File(src));
  });

  it('our own client speaks TLS', async () => {
    const c = await NbdClient.connect({
      port: srv.port,
      exportName: 'disk0',
      tls: loadX509Dir(pki.caOnly, []),
    });
    try {
      const data = randomBytes(64 * 1024, prng(5));
      await c.write(data, 2 * MiB);
      expect(sha256(await c.read(2 * MiB, data.length))).toBe(sha256(data));
      expect(c.mode).toBe('extended');
    } finally {
      await c.close();
    }
  });

  it('refuses a client that trusts another CA (qemu-io, nbdinfo, our client)', async () => {
    const q = await qemuIoTls(qemuX509(pki.rogueCaOnly), srv.port, ['read 0 4k']);
    expect(failedQemuIo(q)).toBe(true);
    expect(q.stdout + q.stderr).toMatch(/certificate|TLS|verif/i);
    const i = await run('nbdinfo', [nbds(srv.port, `tls-certificates=${pki.rogueCaOnly}`)], {
      timeoutMs: 20_000,
    });
    expect(i.code).not.toBe(0);
    await expect(
      NbdClient.connect({ port: srv.port, exportName: 'disk0', tls: loadX509Dir(pki.rogueCaOnly, []) }),
    ).rejects.toThrow(/TLS|certificate/i);
  });

  it('refuses plain clients: qemu-io, nbdinfo and ours are told TLS is required', async () => {
    const q = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', `nbd://127.0.0.1:${srv.port}/disk0`], {
      timeoutMs: 20_000,
    });
    expect(failedQemuIo(q)).toBe(true);
    const i = await run('nbdinfo', [`nbd://127.0.0.1:${srv.port}/disk0`], { timeoutMs: 20_000 });
    expect(i.code).not.toBe(0);
    expect(i.stderr).toMatch(/opt_go|TLS/);
    const err = await NbdClient.connect({ port: srv.port, exportName: 'disk0' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdOptionError);
    expect((err as NbdOptionError).reply).toBe(Rep.ERR_TLS_REQD);
  });

  it('answers every option sent in the clear with ERR_TLS_REQD, and drops EXPORT_NAME', async () => {
    const raw = await RawConn.connect(srv.port);
    await raw.greeting();
    raw.flags();
    for (const opt of [Opt.LIST, Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS]) {
      raw.option(opt);
      const r = await raw.optionReply();
      expect(r.type).toBe(Rep.ERR_TLS_REQD);
    }
    raw.option(Opt.INFO, encodeInfoRequest('disk0', []));
    expect((await raw.optionReply()).type).toBe(Rep.ERR_TLS_REQD);
    raw.option(Opt.GO, encodeInfoRequest('disk0', []));
    expect((await raw.optionReply()).type).toBe(Rep.ERR_TLS_REQD);
    raw.option(Opt.EXPORT_NAME, Buffer.from('disk0'));
    expect(await raw.waitClosed()).toBe(true);
  });

  it('drops a client that sends bytes in the clear right after STARTTLS (injection)', async () => {
    const raw = await RawConn.connect(srv.port);
    await raw.greeting();
    raw.flags();
    raw.send(
      Buffer.concat([encodeOption(Opt.STARTTLS), encodeOption(Opt.GO, encodeInfoRequest('disk0', []))]),
    );
    expect(await raw.waitClosed()).toBe(true);
  });
});

describeWith(['openssl'], 'NBD TLS: what negotiation survives STARTTLS', () => {
  it('forgets structured replies negotiated in the clear (mode on)', async () => {
    const { srv } = await tlsServer(() => loadX509Dir(pki.server, ['server']), 'on');
    try {
      const raw = await RawConn.connect(srv.port);
      await raw.greeting();
      raw.flags();
      raw.option(Opt.STRUCTURED_REPLY);
      expect((await raw.optionReply()).type).toBe(Rep.ACK);
      // Plaintext INFO shows it took effect: SEND_DF is offered with structured replies.
      raw.option(Opt.INFO, encodeInfoRequest('disk0', []));
      const before = await raw.optionReply();
      expect(before.data.readUInt16BE(0)).toBe(Info.EXPORT);
      expect(before.data.readUInt16BE(10) & TxFlag.SEND_DF).toBe(TxFlag.SEND_DF);
      while ((await raw.optionReply()).type !== Rep.ACK);
      raw.option(Opt.STARTTLS);
      expect((await raw.optionReply()).type).toBe(Rep.ACK);
      await raw.upgrade({ ca: fs.readFileSync(path.join(pki.caOnly, 'ca-cert.pem')), host: '127.0.0.1' });
      raw.option(Opt.INFO, encodeInfoRequest('disk0', []));
      const after = await raw.optionReply();
      expect(after.type).toBe(Rep.INFO);
      expect(after.data.readUInt16BE(10) & TxFlag.SEND_DF).toBe(0);
      while ((await raw.optionReply()).type !== Rep.ACK);
      // And a second STARTTLS inside TLS is refused.
      raw.option(Opt.STARTTLS);
      expect((await raw.optionReply()).type).toBe(Rep.ERR_INVALID);
    } finally {
      await srv.close();
    }
  });

  it('serves plaintext clients too in mode on', async () => {
    const { srv } = await tlsServer(() => loadX509Dir(pki.server, ['server']), 'on');
    try {
      const c = await NbdClient.connect({ port: srv.port, exportName: 'disk0' });
      expect(c.size).toBe(SIZE);
      await c.close();
      const t = await NbdClient.connect({
        port: srv.port,
        exportName: 'disk0',
        tls: loadX509Dir(pki.caOnly, []),
      });
      expect(t.size).toBe(SIZE);
      await t.close();
    } finally {
      await srv.close();
    }
  });

  it('with --tls-verify-peer, demands a client certificate from the CA', async () => {
    const { srv } = await tlsServer(() => loadX509Dir(pki.server, ['server']), 'require', true);
    try {
      const ok = await NbdClient.connect({
        port: srv.port,
        exportName: 'disk0',
        tls: loadX509Dir(pki.client, ['client']),
      });
      expect(ok.size).toBe(SIZE);
      await ok.close();
      // No certificate, then a certificate from another CA (which trusts ours, so only the client side is wrong).
      await expect(
        NbdClient.connect({
          port: srv.port,
          exportName: 'disk0',
          tls: loadX509Dir(pki.caOnly, []),
          timeoutMs: 5_000,
        }),
      ).rejects.toThrow();
      const rogueWithOurCa = path.join(dir, 'rogue-client');
      fs.mkdirSync(rogueWithOurCa, { recursive: true });
      fs.copyFileSync(path.join(pki.caOnly, 'ca-cert.pem'), path.join(rogueWithOurCa, 'ca-cert.pem'));
      for (const f of ['client-cert.pem', 'client-key.pem'])
        fs.copyFileSync(path.join(pki.rogue, f), path.join(rogueWithOurCa, f));
      fs.chmodSync(path.join(rogueWithOurCa, 'client-key.pem'), 0o600);
      await expect(
        NbdClient.connect({
          port: srv.port,
          exportName: 'disk0',
          tls: loadX509Dir(rogueWithOurCa, ['client']),
          timeoutMs: 5_000,
        }),
      ).rejects.toThrow();
    } finally {
      await srv.close();
    }
  });
});

describeWith(['qemu-io', 'nbdinfo', 'nbdcopy'], 'NBD over TLS with a PSK', () => {
  let srv: RunningServer;
  let dev: MemoryDevice;
  beforeAll(async () => ({ srv, dev } = await tlsServer(() => loadPskFile(psk.file), 'require')));
  afterAll(() => srv.close());

  it('qemu-io writes and reads back through tls-creds-psk', async () => {
    const r = await qemuIoTls(qemuPsk(psk.dir, 'alice'), srv.port, [
      'write -P 0x3c 0 128k',
      'read -P 0x3c 0 128k',
    ]);
    expect(failedQemuIo(r), r.stdout + r.stderr).toBe(false);
    const back = Buffer.alloc(128 * 1024);
    await dev.pread(back, 0);
    expect(back.every((b) => b === 0x3c)).toBe(true);
  });

  it('nbdinfo and nbdcopy speak nbds:// with the PSK file', async () => {
    const uri = nbds(srv.port, `tls-psk-file=${psk.file}`, 'alice');
    const info = await runOk('nbdinfo', ['--json', uri], { timeoutMs: 20_000 });
    expect(
      (JSON.parse(info.stdout) as { exports: { 'export-size': number }[] }).exports[0]['export-size'],
    ).toBe(SIZE);
    const out = path.join(dir, 'psk-out.img');
    await runOk('nbdcopy', [uri, out], { timeoutMs: 30_000 });
    const whole = Buffer.alloc(SIZE);
    await dev.pread(whole, 0);
    expect(sha256File(out)).toBe(sha256(whole));
  });

  it('our own client speaks TLS-PSK', async () => {
    const c = await NbdClient.connect({ port: srv.port, exportName: 'disk0', tls: loadPskFile(psk.file) });
    expect(c.size).toBe(SIZE);
    await c.close();
  });

  it('refuses a wrong key and an unknown identity', async () => {
    const q = await qemuIoTls(qemuPsk(wrongPsk.dir, 'alice'), srv.port, ['read 0 4k']);
    expect(failedQemuIo(q)).toBe(true);
    const i = await run('nbdinfo', [nbds(srv.port, `tls-psk-file=${wrongPsk.file}`, 'alice')], {
      timeoutMs: 20_000,
    });
    expect(i.code).not.toBe(0);
    await expect(
      NbdClient.connect({
        port: srv.port,
        exportName: 'disk0',
        tls: loadPskFile(wrongPsk.file),
        timeoutMs: 5_000,
      }),
    ).rejects.toThrow();
    const stranger = makePsk(path.join(dir, 'psk-stranger'), 'mallory');
    await expect(
      NbdClient.connect({
        port: srv.port,
        exportName: 'disk0',
        tls: loadPskFile(stranger.file),
        timeoutMs: 5_000,
      }),
    ).rejects.toThrow();
  });
});

describe('TLS credentials and flags', () => {
  it('refuses a PSK file others can read, a short key and a malformed line, saying how to fix it', () => {
    const f = path.join(dir, 'loose.psk');
    fs.writeFileSync(f, `alice:${'ab'.repeat(32)}\n`, { mode: 0o644 });
    fs.chmodSync(f, 0o644);
    expect(() => loadPskFile(f)).toThrow(/chmod 600/);
    fs.chmodSync(f, 0o600);
    expect(loadPskFile(f).identity).toBe('alice');
    fs.writeFileSync(f, 'alice:abcd\n');
    expect(() => loadPskFile(f)).toThrow(/at least 16/);
    fs.writeFileSync(f, 'alice abcd\n');
    expect(() => loadPskFile(f)).toThrow(/identity:hexkey/);
    expect(() => loadPskFile(path.join(dir, 'nope.psk'))).toThrow(/colo-blk tls-psk/);
  });

  it('refuses a certificate directory without the pair this side needs', () => {
    const d = path.join(dir, 'empty-certs');
    fs.mkdirSync(d, { recursive: true });
    expect(() => loadX509Dir(d, ['server'])).toThrow(/ca-cert.pem/);
    fs.writeFileSync(path.join(d, 'ca-cert.pem'), 'x');
    expect(() => loadX509Dir(d, ['server'])).toThrow(/no server-cert.pem and server-key.pem/);
    expect(() => loadX509Dir(path.join(dir, 'missing'), [])).toThrow(/does not exist/);
  });
});

describeWith(['nbdinfo'], 'TLS from the command line', () => {
  afterEach(() => killAll());

  it('tls-psk makes a private key file once; serve --tls-psk serves nbds:// to nbdinfo and refuses nbd://', async () => {
    const file = path.join(dir, 'cli.psk');
    const made = await runOk(process.execPath, [CLI, 'tls-psk', file, '--identity', 'ops', '--json']);
    expect(JSON.parse(made.stdout)).toEqual({ file, identity: 'ops' });
    expect(fs.statSync(file).mode & 0o777).toBe(0o600);
    expect(loadPskFile(file).keys.get('ops')!.length).toBe(32);
    const again = await run(process.execPath, [CLI, 'tls-psk', file]);
    expect(again.code).toBe(2);
    expect(again.stderr).toMatch(/already exists/);

    const srv = await startCliServer(['--export', 'disk0=:memory:,size=4M', '--tls-psk', file]);
    const ok = await runOk('nbdinfo', ['--size', nbds(srv.port, `tls-psk-file=${file}`, 'ops')], {
      timeoutMs: 20_000,
    });
    expect(ok.stdout.trim()).toBe(String(4 * MiB));
    const plain = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${srv.port}/disk0`], {
      timeoutMs: 20_000,
    });
    expect(plain.code).not.toBe(0);
    await srv.stop();
  }, 30_000);

  it('says what is wrong with TLS flags, exit 2', async () => {
    const cases: [string[], RegExp][] = [
      [['--tls', 'require'], /needs credentials/],
      [['--tls', 'off', '--tls-psk', psk.file], /--tls off with --tls-psk/],
      [['--tls-psk', psk.file, '--tls-verify-peer'], /--tls-verify-peer is for --tls-certs/],
      [['--tls-certs', path.join(dir, 'nowhere')], /does not exist/],
      [['--tls', 'sometimes'], /Allowed choices are off, on, require/],
    ];
    for (const [args, message] of cases) {
      const r = await run(process.execPath, [CLI, 'serve', '--export', 'disk0=:memory:,size=1M', ...args], {
        timeoutMs: 10_000,
      });
      expect(r.code, args.join(' ')).toBe(2);
      expect(r.stderr).toMatch(message);
    }
  }, 30_000);
});
