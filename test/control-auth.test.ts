// The control API's bearer token: checked before anything else, sent by
// every caller in a process that has one, shared by the nodes and the CLI
// through a file only its owner can read; a node refuses to serve the API
// beyond loopback without it. Real processes for the pair and the COLO loop.
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall, ControlServer } from '../src/checkpoint/control.js';
import {
  checkListenAllowed,
  readTokenFile,
  setControlAuth,
  TOKEN_ENV,
} from '../src/checkpoint/control-auth.js';
import { HttpConn } from '../tools/loop/http-conn.js';
import { startColoStack, type ColoStack } from './colo-helpers.js';
import { CLI, killAll, rmDir, run, tmpDir } from './helpers.js';
import { startPair, waitLinkUp, type Pair } from './replication-helpers.js';

const dirs: string[] = [];
const fresh = () => {
  const d = tmpDir('colo-blk-auth-');
  dirs.push(d);
  return d;
};
let pair: Pair | null = null;
let stack: ColoStack | null = null;
afterEach(async () => {
  await pair?.stop();
  pair = null;
  await stack?.stop();
  stack = null;
  await killAll();
  setControlAuth({ token: null });
  delete process.env[TOKEN_ENV];
});
afterAll(() => dirs.forEach(rmDir));

const TOKEN = 'k2yP8m1QxV0aLr7TzC4eN9uB3wH6sJ5d';

function tokenFile(dir: string, token = TOKEN, mode = 0o600): string {
  const f = path.join(dir, 'control.token');
  fs.writeFileSync(f, token + '\n', { mode });
  fs.chmodSync(f, mode);
  return f;
}

/** A bare request: status code and body, with the headers given. */
function raw(port: number, method: string, p: string, headers: Record<string, string> = {}) {
  return new Promise<{ status: number; body: string }>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, method, path: p, headers }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('control API authentication', () => {
  it('with a token, a request without it or with another is refused before any route; /metrics opens only if asked', async () => {
    setControlAuth({ token: TOKEN });
    const server = new ControlServer([
      { method: 'GET', path: '/status', handler: async () => ({ ok: true }) },
      { method: 'GET', path: '/metrics', handler: async () => 'm 1\n', text: true },
    ]);
    const { port } = await server.listen(0, '127.0.0.1');
    try {
      const none = await raw(port, 'GET', '/status');
      expect(none.status).toBe(401);
      expect(JSON.parse(none.body).error).toMatchObject({ code: 'EPERM' });
      expect(none.body).toMatch(/--token-file/);
      expect(none.body).not.toMatch(/known/); // the routes are not listed to a stranger
      expect((await raw(port, 'GET', '/nope')).status).toBe(401);
      expect((await raw(port, 'GET', '/status', { authorization: `Bearer ${TOKEN}x` })).status).toBe(401);
      expect((await raw(port, 'GET', '/status', { authorization: TOKEN })).status).toBe(401);
      expect((await raw(port, 'GET', '/status', { authorization: `Bearer ${TOKEN}` })).status).toBe(200);
      expect(await controlCall({ host: '127.0.0.1', port }, 'GET', '/status')).toEqual({ ok: true });
      expect((await raw(port, 'GET', '/metrics')).status).toBe(401);
      setControlAuth({ token: TOKEN, openMetrics: true });
      expect((await raw(port, 'GET', '/metrics')).status).toBe(200);
      expect((await raw(port, 'GET', '/status')).status).toBe(401);
    } finally {
      await server.close();
    }
  });

  it('refuses to serve beyond loopback without a token; the token file must be private and a real secret', () => {
    expect(() => checkListenAllowed('0.0.0.0', 8001)).toThrow(/reachable from other hosts.*--token-file/);
    expect(() => checkListenAllowed('10.1.2.3', 8001)).toThrow(/--token-file/);
    expect(() => checkListenAllowed('127.0.0.1', 8001)).not.toThrow();
    expect(() => checkListenAllowed('::1', 8001)).not.toThrow();
    setControlAuth({ token: TOKEN });
    expect(() => checkListenAllowed('0.0.0.0', 8001)).not.toThrow();

    const dir = fresh();
    expect(readTokenFile(tokenFile(dir))).toBe(TOKEN);
    expect(() => readTokenFile(tokenFile(dir, TOKEN, 0o644))).toThrow(/readable by others.*chmod 600/);
    expect(() => readTokenFile(tokenFile(dir, 'short'))).toThrow(/at least 16 characters/);
    expect(() => readTokenFile(path.join(dir, 'missing'))).toThrow(/cannot read the token file.*urandom/);
  });

  it('a pair and the CLI share the token file; without it the CLI is refused with a clear message', async () => {
    const dir = fresh();
    const file = tokenFile(dir);
    pair = await startPair(dir, '8M', {
      primaryArgs: ['--token-file', file],
      secondaryArgs: ['--token-file', file],
    });
    setControlAuth({ token: TOKEN }); // this test process talks to them too
    await waitLinkUp(pair.primary);
    const control = `127.0.0.1:${pair.primary.control.port}`;

    const refused = await run(process.execPath, [CLI, 'status', '--control', control, '--json']);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/needs its bearer token: give --token-file FILE/);

    const ok = await run(process.execPath, [
      CLI,
      'checkpoint',
      '--control',
      control,
      '--json',
      '--token-file',
      file,
    ]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout)).toMatchObject({ epoch: expect.any(Number) });

    const viaEnv = await run(process.execPath, [CLI, 'status', '--control', control, '--json'], {
      env: { ...process.env, [TOKEN_ENV]: file },
    });
    expect(viaEnv.code, viaEnv.stderr).toBe(0);
    expect(JSON.parse(viaEnv.stdout)).toMatchObject({ role: 'primary', peerState: 'protected' });

    const leaky = tokenFile(fresh(), TOKEN, 0o644);
    const bad = await run(process.execPath, [CLI, 'status', '--control', control, '--token-file', leaky]);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/readable by others/);

    const exposed = await run(process.execPath, [
      CLI,
      'secondary',
      '--listen',
      '127.0.0.1:0',
      '--export',
      `disk0=${path.join(dir, 'x.img')},size=1M`,
      '--state',
      path.join(dir, 'x-state'),
      '--replication-listen',
      '127.0.0.1:0',
      '--control',
      '0.0.0.0:0',
    ]);
    expect(exposed.code).toBe(2);
    expect(exposed.stderr).toMatch(/reachable from other hosts, with no authentication/);
  });

  it('the whole COLO loop runs with a token: the coordinator, the guests and the disk nodes call each other with it', async () => {
    const dir = fresh();
    process.env[TOKEN_ENV] = tokenFile(dir); // every process of the stack reads it
    setControlAuth({ token: TOKEN });
    stack = await startColoStack(dir, { coloArgs: ['--interval', '200'] });
    await stack.waitState('protected', 30_000);
    const c = await HttpConn.connect(stack.port);
    for (let i = 0; i < 20; i++) expect((await c.request('PUT', `/kv/k${i}`, `v${i}`)).status).toBe(200);
    const r = await controlCall<{ epoch: number }>(stack.colo.control, 'POST', '/checkpoint');
    expect(r).toBeTruthy();
    const st = await stack.status();
    expect(st.checkpoints).toBeGreaterThanOrEqual(2);
    await c.close();
    // A stranger reaches none of them.
    for (const p of [stack.colo, stack.pvm, stack.svm, stack.pair.primary, stack.pair.secondary])
      expect((await raw(p.control.port, 'GET', '/status')).status).toBe(401);
  });
});
