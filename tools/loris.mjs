#!/usr/bin/env node
// A connection flood against an NBD server, from its own process: COUNT
// connections from one source address that never finish the handshake,
// either idle (they read the greeting and say nothing) or slowloris (they
// drip a valid handshake one byte at a time, so a per-read timeout never
// fires). For load tests and for an operator checking a deployment's limits.
//
//   node tools/loris.mjs --port 10809 --count 10000 --from 127.0.0.2 --mode slow --json
//
// Prints progress once a second, a "ready" line once every connection has
// been tried and answered (greeted or closed; at most --settle-ms), and a
// final summary on SIGTERM/SIGINT or after --duration.
// Counts: opened (TCP connected), greeted (got the NBD greeting), refused
// (closed by the server before a greeting), dropped (closed after one),
// failed (could not connect).
import net from 'node:net';
import { toolArgs } from './cli-args.mjs';

const usage = `usage: node tools/loris.mjs --port PORT [options]

  --host H         the server (default 127.0.0.1)
  --port P         its NBD port (required)
  --count N        connections to open (default 10000)
  --from ADDR      the source address to connect from (e.g. 127.0.0.2)
  --mode M         idle (read the greeting, say nothing) or slow (drip a handshake; default)
  --drip-ms MS     a slow connection's byte every MS (default 1000)
  --batch N        connections opened at a time (default 500)
  --duration MS    stop after MS milliseconds (default 0: on SIGINT/SIGTERM)
  --settle-ms MS   longest wait for every connection's answer before "ready" (default 30000)
  --json           JSON lines instead of text`;

const o = toolArgs('loris', usage, {
  host: { type: 'string', default: '127.0.0.1' },
  port: { type: 'string' },
  count: { type: 'string', default: '10000' },
  from: { type: 'string' },
  mode: { type: 'string', default: 'slow' },
  'drip-ms': { type: 'string', default: '1000' },
  batch: { type: 'string', default: '500' },
  duration: { type: 'string', default: '0' },
  'settle-ms': { type: 'string', default: '30000' },
  json: { type: 'boolean', default: false },
});

function fail(msg) {
  process.stderr.write(`loris: ${msg}\n`);
  process.exit(2);
}
const port = Number(o.port);
const count = Number(o.count);
const dripMs = Number(o['drip-ms']);
const batch = Number(o.batch);
const durationMs = Number(o.duration);
const settleMs = Number(o['settle-ms']);
if (!(port > 0 && port < 65536)) fail('--port is required (the NBD server port)');
if (!(count > 0 && count <= 60000)) fail('--count must be 1..60000');
if (!['idle', 'slow'].includes(o.mode)) fail("--mode must be 'idle' or 'slow'");
if (!(dripMs >= 10)) fail('--drip-ms must be at least 10');
if (!(batch > 0)) fail('--batch must be positive');
if (!(settleMs >= 0)) fail('--settle-ms must be 0 or more');

// What a slowloris drips: the client flags, then a GO option for "disk0" (never completed in time).
const DRIP = Buffer.concat([
  Buffer.from([0, 0, 0, 3]),
  Buffer.from('49484156454f5054', 'hex'), // IHAVEOPT
  Buffer.from([0, 0, 0, 7, 0, 0, 0, 11, 0, 0, 0, 5]),
  Buffer.from('disk0'),
  Buffer.from([0, 0]),
]);

const c = { opened: 0, greeted: 0, refused: 0, dropped: 0, failed: 0, open: 0, dripped: 0 };
const sockets = new Set();
const GREETING = 18;
const started = Date.now();

function say(event, extra = {}) {
  const rec = { event, ms: Date.now() - started, ...c, ...extra };
  if (o.json) process.stdout.write(JSON.stringify(rec) + '\n');
  else
    process.stdout.write(
      `${event}: ${c.open} open, ${c.opened} opened, ${c.greeted} greeted, ${c.refused} refused, ` +
        `${c.dropped} dropped, ${c.failed} failed (${rec.ms} ms)\n`,
    );
}

function one() {
  return new Promise((resolve) => {
    const s = net.connect({ host: o.host, port, localAddress: o.from });
    let got = 0;
    let sent = 0;
    let settled = false;
    const settle = () => {
      if (!settled) {
        settled = true;
        resolve();
      }
    };
    s.on('connect', () => {
      c.opened++;
      c.open++;
      sockets.add(s);
      settle();
    });
    s.on('data', (d) => {
      const before = got;
      got += d.length;
      if (before < GREETING && got >= GREETING) {
        c.greeted++;
        s.greeted = true;
        if (o.mode === 'slow') s.drip = true;
      }
    });
    s.on('error', () => {});
    s.on('close', () => {
      if (sockets.delete(s)) {
        c.open--;
        if (got >= GREETING) c.dropped++;
        else c.refused++;
      } else c.failed++;
      settle();
    });
    s.next = () => {
      if (!s.drip || sent >= DRIP.length || s.destroyed) return;
      s.write(DRIP.subarray(sent, sent + 1));
      sent++;
      c.dripped++;
    };
  });
}

const ticker = setInterval(() => say('progress'), 1000);
// One byte per slow connection per drip interval, bounded by DRIP's length.
const dripper = setInterval(() => {
  for (const s of sockets) s.next();
}, dripMs);

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  clearInterval(ticker);
  clearInterval(dripper);
  say('done');
  for (const s of sockets) s.destroy();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

for (let i = 0; i < count && !stopping; i += batch) {
  const n = Math.min(batch, count - i);
  await Promise.all(Array.from({ length: n }, one));
}
// The flood is in place once the server has answered every connection it
// accepted (a greeting, or a close before one) and nothing has changed for
// 300 ms (its evictions and refusals have arrived); a busy server may take a
// while to get to the last batches, so wait for that, up to --settle-ms.
const settleBy = Date.now() + settleMs;
let last = '';
let quietSince = Date.now();
while (Date.now() < settleBy) {
  await new Promise((r) => setTimeout(r, 50));
  const now = JSON.stringify(c);
  if (now !== last) {
    last = now;
    quietSince = Date.now();
  }
  let waiting = 0;
  for (const s of sockets) if (!s.greeted) waiting++;
  if (waiting === 0 && Date.now() - quietSince >= 300) break;
}
say('ready');
if (durationMs > 0) setTimeout(stop, durationMs);
