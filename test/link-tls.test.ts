/**
 * The replication link over mutually authenticated TLS (X.509 client and
 * server certificates from one CA, or a PSK), with real processes: the pair
 * links up and checkpoints with the PVM's bytes encrypted on the wire, and a
 * peer without the credentials — plain TCP sending a well-formed hello, a
 * certificate from another CA, a wrong PSK, a primary with no TLS — is
 * refused before a frame is read, without disturbing the live link.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { setControlAuth, TOKEN_ENV } from '../src/checkpoint/control-auth.js';
import { HttpConn } from '../tools/loop/http-conn.js';
import { startColoStack, type ColoStack } from './colo-helpers.js';
import { encodeFrameBuffer } from '../src/checkpoint/format/frame.js';
import { NbdClient } from '../src/net/client.js';
import { killAll, rmDir, tmpDir } from './helpers.js';
import { closeAllRaw, RawConn } from './raw-nbd.js';
import { startPair, waitLinkUp, type Pair } from './replication-helpers.js';
import { makePki, makePsk, type TestPki } from './tls-helpers.js';
import { describeWith } from './tools.js';

const MARK = Buffer.from('COLO-BLK-CLEARTEXT-MARKER-0123456789');

let root: string;
let pki: TestPki;
let pair: Pair | null = null;
let stack: ColoStack | null = null;
const proxies: Sniffer[] = [];

/** A TCP relay that keeps every byte the primary sends, to look for plaintext. */
class Sniffer {
  readonly seen: Buffer[] = [];
  private server: net.Server;
  private sockets = new Set<net.Socket>();
  port = 0;
  target = 0;
  constructor() {
    this.server = net.createServer((c) => {
      const up = net.connect({ host: '127.0.0.1', port: this.target });
      for (const s of [c, up]) {
        this.sockets.add(s);
        s.on('error', () => {});
        s.on('close', () => {
          c.destroy();
          up.destroy();
        });
      }
      c.on('data', (d: Buffer) => {
        this.seen.push(Buffer.from(d));
        up.write(d);
      });
      up.on('data', (d: Buffer) => c.write(d));
    });
  }
  async listen(target: number): Promise<number> {
    this.target = target;
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this.port;
  }
  sawMarker(): boolean {
    return Buffer.concat(this.seen).includes(MARK);
  }
  close(): void {
    for (const s of this.sockets) s.destroy();
    this.server.close();
  }
}

beforeAll(() => {
  root = tmpDir('colo-blk-link-tls-');
  pki = makePki(path.join(root, 'pki'));
});
afterEach(async () => {
  await pair?.stop();
  pair = null;
  await stack?.stop();
  stack = null;
  setControlAuth({ token: null });
  delete process.env[TOKEN_ENV];
  proxies.splice(0).forEach((p) => p.close());
  closeAllRaw();
  await killAll();
});
afterAll(() => rmDir(root));

let n = 0;
const fresh = () => {
  const d = path.join(root, `pair-${n++}`);
  fs.mkdirSync(d, { recursive: true });
  return d;
};

/** Write the marker over and over through the PVM's export, then checkpoint. */
async function writeMarkedAndCheckpoint(p: Pair): Promise<void> {
  const c = await NbdClient.connect({ port: p.primary.nbdPort, exportName: 'disk0' });
  const data = Buffer.alloc(256 * 1024);
  for (let off = 0; off + MARK.length <= data.length; off += MARK.length) MARK.copy(data, off);
  await c.write(data, 0);
  await c.flush();
  await c.close();
  const r = await p.checkpoint();
  expect(r).toMatchObject({ epoch: expect.any(Number) });
}

async function sniffedPair(
  primaryArgs: string[],
  secondaryArgs: string[],
): Promise<{ p: Pair; sniff: Sniffer }> {
  const sniff = new Sniffer();
  proxies.push(sniff);
  const p = await startPair(fresh(), '8M', {
    primaryArgs,
    secondaryArgs,
    proxy: (port) => sniff.listen(port),
  });
  return { p, sniff };
}

/** The live link is still the one it was: connected, protected, never replaced. */
async function linkUndisturbed(p: Pair): Promise<void> {
  const s = await controlCall<{ link: { state: string }; peerState: string }>(
    p.primary.control,
    'GET',
    '/status',
  );
  expect(s.link.state).toBe('connected');
  expect(s.peerState).toBe('protected');
  expect(p.secondary.stderr()).not.toMatch(/replaces the old one/);
  await p.checkpoint();
}

describeWith(['openssl'], 'replication link over mutual TLS', () => {
  it('plain TCP carries the PVM bytes in the clear (the sniffer can see them)', async () => {
    const { p, sniff } = await sniffedPair([], []);
    pair = p;
    await waitLinkUp(p.primary);
    await writeMarkedAndCheckpoint(p);
    expect(sniff.sawMarker()).toBe(true);
  }, 60_000);

  it('X.509: links up, checkpoints, nothing in the clear; strangers are refused before a frame', async () => {
    const certs = ['--link-tls-certs', pki.both];
    const { p, sniff } = await sniffedPair(certs, certs);
    pair = p;
    await waitLinkUp(p.primary);
    await writeMarkedAndCheckpoint(p);
    expect(sniff.sawMarker()).toBe(false);

    // A stranger in plain TCP sends a well-formed hello: the TLS layer drops it unread.
    const raw = await RawConn.connect(p.replicationPort);
    raw.send(encodeFrameBuffer({ t: 'hello', proto: 1, size: 8 << 20, epoch: 1, session: 'x', history: [] }));
    expect(await raw.waitClosed(5_000)).toBe(true);
    expect(raw.received).toBeLessThan(64); // a TLS alert at most, never a frame

    // A stranger with a certificate from another CA (and trusting ours).
    const rogue = await RawConn.connect(p.replicationPort);
    const err = await rogue
      .upgrade({
        ca: fs.readFileSync(path.join(pki.both, 'ca-cert.pem')),
        cert: fs.readFileSync(path.join(pki.rogue, 'client-cert.pem')),
        key: fs.readFileSync(path.join(pki.rogue, 'client-key.pem')),
        host: '127.0.0.1',
      })
      .then(
        async () => ((await rogue.waitClosed(5_000)) ? 'closed' : 'open'),
        (e: Error) => e.message,
      );
    expect(err).not.toBe('open');
    await new Promise((r) => setTimeout(r, 300));
    expect(p.secondary.stderr()).toMatch(/replication link: refused/);
    await linkUndisturbed(p);
  }, 60_000);

  it('X.509: a primary with another CA, or with no TLS, never links to a TLS secondary', async () => {
    const dir = fresh();
    pair = await startPair(dir, '8M', {
      primaryArgs: ['--link-tls-certs', pki.rogue],
      secondaryArgs: ['--link-tls-certs', pki.both],
    });
    await expect(waitLinkUp(pair.primary, 2_500)).rejects.toThrow(/did not come up/);
    expect(pair.secondary.stderr()).toMatch(/replication link: refused/);
    await pair.stop();
    pair = await startPair(fresh(), '8M', { secondaryArgs: ['--link-tls-certs', pki.both] });
    await expect(waitLinkUp(pair.primary, 2_500)).rejects.toThrow(/did not come up/);
    expect(pair.secondary.stderr()).not.toMatch(/hello|replaces/);
  }, 60_000);

  it('PSK: links up with the shared key, nothing in the clear; a wrong key is refused', async () => {
    const good = makePsk(path.join(root, 'link-psk'), 'node-a');
    const { p, sniff } = await sniffedPair(['--link-tls-psk', good.file], ['--link-tls-psk', good.file]);
    pair = p;
    await waitLinkUp(p.primary);
    await writeMarkedAndCheckpoint(p);
    expect(sniff.sawMarker()).toBe(false);
    await p.stop();
    const bad = makePsk(path.join(root, 'link-psk-bad'), 'node-a');
    pair = await startPair(fresh(), '8M', {
      primaryArgs: ['--link-tls-psk', bad.file],
      secondaryArgs: ['--link-tls-psk', good.file],
    });
    await expect(waitLinkUp(pair.primary, 2_500)).rejects.toThrow(/did not come up/);
    expect(pair.secondary.stderr()).toMatch(/replication link: refused/);
  }, 60_000);
});

describeWith(['openssl'], 'the COLO loop with every port secured', () => {
  it('guests reach their disks over nbds://, the disks replicate over mutual TLS, control calls carry the token', async () => {
    const dir = fresh();
    const token = path.join(dir, 'control.token');
    fs.writeFileSync(token, 'Zq7vN2pL9xK4mR8tW3yB6cF1hJ5dG0sA\n', { mode: 0o600 });
    process.env[TOKEN_ENV] = token;
    setControlAuth({ token: 'Zq7vN2pL9xK4mR8tW3yB6cF1hJ5dG0sA' });
    const nbdPsk = makePsk(path.join(dir, 'nbd-psk'), 'vm');
    const node = ['--tls-psk', nbdPsk.file, '--link-tls-certs', pki.both];
    stack = await startColoStack(dir, {
      primaryArgs: node,
      secondaryArgs: node,
      diskTls: true,
      guestArgs: ['--tls-psk', nbdPsk.file],
      coloArgs: ['--interval', '200'],
    });
    await stack.waitState('protected', 30_000);
    const c = await HttpConn.connect(stack.port);
    for (let i = 0; i < 10; i++) expect((await c.request('PUT', `/kv/k${i}`, `v${i}`)).status).toBe(200);
    expect((await c.request('GET', '/kv/k3')).body.toString()).toBe('v3');
    await c.close();
    await controlCall(stack.colo.control, 'POST', '/checkpoint');
    expect((await stack.status()).checkpoints).toBeGreaterThanOrEqual(2);
    // The disks refuse a plaintext NBD client.
    const plain = await NbdClient.connect({ port: stack.pair.primary.nbdPort, exportName: 'disk0' }).catch(
      (e: Error) => e,
    );
    expect(plain).toBeInstanceOf(Error);
    expect(String(plain)).toMatch(/TLS/);
  }, 90_000);
});
