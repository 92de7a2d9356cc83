// The control API against whatever a client sends: request targets the URL
// parser refuses, every method, bodies of every shape, on every route a node
// has (asked of the node itself). Real node processes over real sockets: each
// request gets an answer (a status and, for an error, a JSON body that says
// what was wrong), a client mistake is never an internal error, and the node
// keeps serving. One request target ("//") used to end the process, before
// the token check.
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startColoStack, type ColoStack } from './colo-helpers.js';
import { killAll, rmDir, tmpDir } from './helpers.js';
import { secondaryArgs, startNode, startPair, type NodeProc } from './replication-helpers.js';

const dirs: string[] = [];
// Not after each test: the loop's nodes serve several tests.
afterAll(async () => {
  await killAll();
  dirs.forEach(rmDir);
});

const TOKEN = 'q8Vn2LsX5cR1tY7bK0mZ4wE9pJ3hA6dG';

interface Answer {
  status: number;
  headers: string;
  body: string;
}

/**
 * One request written by hand (so the target reaches the server as given), on its own connection:
 * the answer, or an error if none came in `timeoutMs`.
 */
function rawRequest(
  port: number,
  method: string,
  target: string,
  body: Buffer | null = null,
  headers: Record<string, string> = {},
  timeoutMs = 10_000,
): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`no answer to ${method} ${JSON.stringify(target)} in ${timeoutMs} ms`));
    }, timeoutMs);
    s.on('connect', () => {
      const head = [
        `${method} ${target} HTTP/1.1`,
        'host: 127.0.0.1',
        'connection: close',
        ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`),
        ...(body ? [`content-length: ${body.length}`] : []),
      ].join('\r\n');
      s.write(head + '\r\n\r\n');
      if (body) s.write(body);
    });
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('error', () => {}); // a reset shows as an answer without a status line
    s.on('close', () => {
      clearTimeout(timer);
      const text = Buffer.concat(chunks).toString('utf8');
      const m = /^HTTP\/1\.1 (\d{3})/.exec(text);
      const split = text.indexOf('\r\n\r\n');
      const headers = split >= 0 ? text.slice(0, split) : text;
      const raw = split >= 0 ? text.slice(split + 4) : '';
      resolve({
        status: m ? Number(m[1]) : 0,
        headers,
        body: /^transfer-encoding: chunked/im.test(headers) ? unchunk(raw) : raw,
      });
    });
  });
}

/** A chunked body's data. */
function unchunk(raw: string): string {
  let out = '';
  for (let at = 0; ;) {
    const eol = raw.indexOf('\r\n', at);
    if (eol < 0) return out;
    const n = parseInt(raw.slice(at, eol), 16);
    if (!(n > 0)) return out;
    out += raw.slice(eol + 2, eol + 2 + n);
    at = eol + 2 + n + 2;
  }
}

async function secondary(extra: string[] = []): Promise<NodeProc> {
  const dir = tmpDir('colo-blk-control-input-');
  dirs.push(dir);
  return startNode(
    'secondary',
    secondaryArgs(path.join(dir, 'svm.img'), '16M', path.join(dir, 'state'), extra),
  );
}

/** Targets the WHATWG URL parser refuses, relative to an http: base. */
const UNPARSABLE = ['//', '///', '//[', '//a:99999', '//[::1', '//x:1:2'];

/** The node still answers, and has not exited. */
async function stillServing(node: NodeProc, headers: Record<string, string> = {}): Promise<void> {
  const a = await rawRequest(node.control.port, 'GET', '/status', null, headers);
  expect(a.status, a.body).toBe(200);
  expect(node.child.exitCode).toBeNull();
  expect(node.child.signalCode).toBeNull();
}

describe('control API: request targets the URL parser refuses', () => {
  it('are answered 400 with a JSON error, and the node keeps serving', async () => {
    const node = await secondary();
    for (const target of UNPARSABLE)
      for (const method of ['GET', 'POST']) {
        const a = await rawRequest(
          node.control.port,
          method,
          target,
          method === 'POST' ? Buffer.from('{}') : null,
        );
        expect(a.status, `${method} ${target}: ${a.headers}`).toBe(400);
        const e = JSON.parse(a.body) as { error: { code: string; message: string } };
        expect(e.error.code).toBe('EINVAL');
        expect(e.error.message).toContain('is not a path');
      }
    await stillServing(node);
  });

  it('with a token: 401 without it (before anything else), 400 with it', async () => {
    const dir = tmpDir('colo-blk-control-input-token-');
    dirs.push(dir);
    const tokenFile = path.join(dir, 'token');
    fs.writeFileSync(tokenFile, TOKEN + '\n', { mode: 0o600 });
    const node = await secondary(['--token-file', tokenFile]);
    const auth = { authorization: `Bearer ${TOKEN}` };
    for (const target of UNPARSABLE) {
      const anonymous = await rawRequest(node.control.port, 'GET', target);
      expect(anonymous.status, anonymous.headers).toBe(401);
      expect(anonymous.body).not.toContain('not a path');
      const a = await rawRequest(node.control.port, 'GET', target, null, auth);
      expect(a.status, a.headers).toBe(400);
    }
    await stillServing(node, auth);
  });
});

describe('control API: the numbers a route takes', () => {
  it("'', 'x', out of range or not whole: refused with the parameter named, before anything is done", async () => {
    const dir = tmpDir('colo-blk-control-input-pair-');
    dirs.push(dir);
    const pair = await startPair(dir, '8M');
    try {
      const p = pair.primary.control.port;
      const s = pair.secondary.control.port;
      const refused = async (port: number, method: string, target: string, name: string) => {
        const a = await rawRequest(port, method, target, method === 'POST' ? Buffer.from('{}') : null);
        expect(a.status, `${method} ${target}: ${a.body}`).toBe(400);
        expect((JSON.parse(a.body) as { error: { message: string } }).error.message).toContain(`'${name}'`);
      };
      // "?timeoutMs=" was a wait of 0 ms: a checkpoint that failed as timed out, after its seal.
      await refused(p, 'POST', '/checkpoint?timeoutMs=', 'timeoutMs');
      await refused(p, 'POST', '/checkpoint?timeoutMs=soon', 'timeoutMs');
      await refused(p, 'POST', '/checkpoint?timeoutMs=-5', 'timeoutMs');
      await refused(p, 'POST', '/durable?epoch=1.5', 'epoch');
      await refused(p, 'POST', '/commit?epoch=', 'epoch');
      for (const port of [p, s]) {
        await refused(port, 'GET', '/inspect?limit=x', 'limit');
        await refused(port, 'GET', '/inspect?epoch=0', 'epoch');
      }
      // "?commit=" was "commit through epoch 0", and the secondary was promoted.
      await refused(s, 'POST', '/failover?commit=', 'commit');
      await refused(s, 'POST', '/failover?commit=two', 'commit');
      const st = await rawRequest(s, 'GET', '/status');
      expect((JSON.parse(st.body) as { role: string }).role).toBe('secondary');
      // Nothing was sealed by the refused checkpoints; a valid one goes through.
      const ok = await rawRequest(p, 'POST', '/checkpoint?timeoutMs=5000', Buffer.from('{}'));
      expect(ok.status, ok.body).toBe(200);
      expect((JSON.parse(ok.body) as { epoch: number }).epoch).toBeGreaterThan(0);
    } finally {
      await pair.stop();
    }
  });
});

// ------------------------------------------------------------------ everything else, seeded

/** Longer hunts: COLO_BLK_CONTROL_RUNS=N (requests per node), COLO_BLK_CONTROL_SEED=S. */
const RUNS = Number(process.env.COLO_BLK_CONTROL_RUNS ?? 200);
const SEED = Number(process.env.COLO_BLK_CONTROL_SEED ?? 0xc0e7);

const KEYS = ['commit', 'epoch', 'reason', 'force', 'full', 'peer', 'to', 'checkpoint', 'mode', 'limit'];
/**
 * `timeoutMs` apart: what is not a valid wait, and valid waits of up to 2 s (a node may wait out a
 * valid one: a checkpoint on a primary whose secondary an earlier request promoted).
 */
const timeoutArb = fc.oneof(
  fc.constantFrom<unknown>(0, -1, '', 'soon', 1e308, 2 ** 53, null, [5], { ms: 5 }, 86_400_001),
  fc.integer({ min: 1, max: 2000 }),
);
const value: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  v: fc.oneof(
    { depthSize: 'small' },
    fc.integer(),
    fc.constantFrom(-1, 0, 2 ** 53, 1e308, -0.5),
    fc.string({ maxLength: 20 }),
    fc.boolean(),
    fc.constant(null),
    fc.array(tie('v'), { maxLength: 3 }),
    fc.dictionary(fc.constantFrom(...KEYS), tie('v'), { maxKeys: 3 }),
  ),
})).v;

const bodyArb: fc.Arbitrary<Buffer | null> = fc.oneof(
  fc.constant(null),
  fc
    .tuple(fc.dictionary(fc.constantFrom(...KEYS), value, { maxKeys: 4 }), fc.option(timeoutArb))
    .map(([o, t]) => Buffer.from(JSON.stringify(t === null ? o : { ...o, timeoutMs: t }))),
  value.map((v) => Buffer.from(JSON.stringify(v) ?? 'null')),
  fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
  fc.constantFrom('{', '{"commit":', '[1,2', 'null', '"x"', '   ').map((s) => Buffer.from(s)),
);

const junkPath = fc
  .array(
    fc.constantFrom('/', '//', '\\', '%', '%zz', '[', ']', ':', '@', '?', '#', '..', 'a', 'é', '*', '~'),
    {
      minLength: 1,
      maxLength: 8,
    },
  )
  .map((parts) => encodeURI('/' + parts.join('')).replace(/%25/g, '%'));

function targetArb(routes: string[]): fc.Arbitrary<string> {
  const query = fc
    .tuple(
      fc.array(fc.tuple(fc.constantFrom(...KEYS), fc.string({ maxLength: 8 })), { maxLength: 3 }),
      fc.option(timeoutArb.map((t) => ['timeoutMs', typeof t === 'string' ? t : JSON.stringify(t)] as const)),
    )
    .map(([kv, t]) => (t ? [...kv, t] : kv))
    .map((kv) => (kv.length ? '?' + kv.map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join('&') : ''));
  return fc.oneof(
    fc.tuple(fc.constantFrom(...routes), query).map(([p, q]) => p + q),
    junkPath,
    fc.constantFrom(...UNPARSABLE),
  );
}

/** Seeded requests of every shape at one node's control API; `numRuns` of them. */
async function hammer(node: NodeProc, seed: number, numRuns: number): Promise<void> {
  // The node's own route list, from its answer to a path it does not have.
  const unknown = await rawRequest(node.control.port, 'GET', '/no-such-route');
  expect(unknown.status).toBe(404);
  const known = /known: (.*)$/.exec(
    (JSON.parse(unknown.body) as { error: { message: string } }).error.message,
  );
  const routes = [...new Set(known![1].split(', ').map((r) => r.split(' ')[1]))];
  expect(routes).toContain('/status');
  const request = fc.record({
    method: fc.constantFrom('GET', 'POST', 'PUT', 'DELETE', 'HEAD', 'OPTIONS'),
    target: targetArb(routes),
    body: bodyArb,
  });
  const seen = new Map<number, number>();
  await fc.assert(
    fc.asyncProperty(request, async ({ method, target, body }) => {
      const a = await rawRequest(node.control.port, method, target, body);
      seen.set(a.status, (seen.get(a.status) ?? 0) + 1);
      // Answered: a status, 200 or a client error (or 503: try again); a 500 only for a valid wait
      // that ran out (the node's own condition, said as such), never for a client's mistake.
      const waitedOut = a.status === 500 && /timed out after \d+ ms waiting/.test(a.body);
      if (!waitedOut)
        expect([200, 400, 401, 403, 404, 405, 409, 413, 503], `${a.headers}\n${a.body}`).toContain(a.status);
      if (a.status !== 200 && method !== 'HEAD') {
        const e = JSON.parse(a.body) as { error: { code: string; message: string } };
        expect(e.error.message.length).toBeGreaterThan(0);
      }
      expect(node.child.exitCode).toBeNull();
    }),
    { numRuns, seed, endOnFailure: true },
  );
  // The seeds reached routes, not only the 404 path.
  expect(seen.get(200) ?? 0).toBeGreaterThan(0);
  expect(seen.get(400) ?? 0).toBeGreaterThan(0);
  await stillServing(node);
}

describe('control API: seeded requests of every shape, at every node of a COLO loop', () => {
  let stack: ColoStack;
  beforeAll(async () => {
    const dir = tmpDir('colo-blk-control-input-loop-');
    dirs.push(dir);
    stack = await startColoStack(dir);
    await stack.waitState('protected');
  }, 60_000);
  afterAll(async () => {
    await stack?.stop();
  });
  const nodes: [string, () => NodeProc][] = [
    ['the coordinator (colo)', () => stack.colo],
    ['the PVM guest', () => stack.pvm],
    ['the SVM guest', () => stack.svm],
    ['the primary disk node', () => stack.pair.primary],
    ['the secondary disk node', () => stack.pair.secondary],
  ];
  nodes.forEach(([name, node], i) =>
    it(`${name}: every request is answered (never an internal error), and the node keeps serving`, async () => {
      await hammer(node(), SEED + i, RUNS);
    }, 120_000),
  );
});
