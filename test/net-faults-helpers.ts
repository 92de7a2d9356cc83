/**
 * Helpers for the network and disk fault suites: a frame-aware fault proxy for
 * the replication link (delay, cut at byte n, blackhole, drop one frame type),
 * a reference model of what the PVM acknowledged, network namespaces joined by
 * a veth pair, and nodes running inside those namespaces.
 *
 * Nothing here listens on anything but 127.0.0.1, Unix sockets in the test's
 * own temporary directory, or the private /30 inside the test's namespaces.
 *
 * The fault proxy runs in the test process's event loop: that loop *is* the
 * network between the two nodes. Anything the test does synchronously for long
 * (hashing whole images, say) pauses the link, and on a busy machine a pause of
 * ~0.8 s is a heartbeat timeout. Hashing here is therefore done in slices that
 * yield to the event loop.
 */
import { spawn } from 'node:child_process';
import { createHash, randomInt } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { controlCall } from '../src/checkpoint/control.js';
import { decodeFrame, FRAME_HEADER_BYTES, peekFrameBytes } from '../src/checkpoint/format/frame.js';
import { ByteQueue } from '../src/net/bytequeue.js';
import type { NbdClient } from '../src/net/client.js';
import { CLI, prng, randomBytes, runOk, track } from './helpers.js';
import { hashExport, type NodeProc } from './replication-helpers.js';

// -----------------------------------------------------------------------------
// The fault proxy

/** 'up': primary → secondary; 'down': secondary → primary. */
export type Direction = 'up' | 'down';

interface DropRule {
  dir: Direction;
  type: string;
  epoch?: number;
  match?: (meta: Record<string, unknown>) => boolean;
  left: number;
}

type Item = { due: number; buf: Buffer } | { due: number; end: 'cut' | 'close' };

/** One direction of one proxied connection: frame parsing, drops, cut, delay. */
class Pipe {
  private readonly frames = new ByteQueue();
  private readonly queue: Item[] = [];
  private timer: NodeJS.Timeout | null = null;
  private raw = false;

  constructor(
    private readonly proxy: NetFaultProxy,
    private readonly conn: Conn,
    readonly dir: Direction,
    private readonly dst: net.Socket,
  ) {}

  data(chunk: Buffer): void {
    if (this.conn.blackholed) {
      this.proxy.blackholedBytes += chunk.length;
      return;
    }
    if (this.raw) return this.forward(chunk);
    this.frames.push(chunk);
    while (this.frames.length >= FRAME_HEADER_BYTES) {
      let total: number;
      try {
        total = peekFrameBytes(this.frames.peek(FRAME_HEADER_BYTES))!;
      } catch {
        // Not a frame stream (never the case on the replication link): pass bytes through.
        this.raw = true;
        return this.forward(this.frames.take(this.frames.length));
      }
      if (this.frames.length < total) break;
      const frame = this.frames.take(total);
      const meta = decodeFrame<Record<string, unknown> & { t: string }>(frame)!.meta;
      const key = `${this.dir}:${meta.t}`;
      this.proxy.frameCounts[key] = (this.proxy.frameCounts[key] ?? 0) + 1;
      this.proxy.seen.push({ dir: this.dir, t: meta.t, e: typeof meta.e === 'number' ? meta.e : undefined });
      if (this.proxy.shouldDrop(this.dir, meta)) continue;
      this.forward(frame, this.proxy.frameDelay?.(this.dir, meta) ?? 0);
    }
  }

  /** Apply the byte cut (primary → secondary only), then the delay (plus `extraMs` for this frame). */
  private forward(buf: Buffer, extraMs = 0): void {
    if (this.conn.cut) return;
    if (this.dir === 'up' && Number.isFinite(this.proxy.cutAfterBytes)) {
      const left = this.proxy.cutAfterBytes - this.proxy.forwarded;
      if (left <= 0) return this.conn.destroy();
      if (buf.length > left) {
        this.proxy.forwarded += left;
        this.proxy.cuts++;
        this.conn.cut = true;
        this.push(buf.subarray(0, left));
        this.pushEnd('cut');
        return;
      }
    }
    if (this.dir === 'up') this.proxy.forwarded += buf.length;
    this.push(buf, extraMs);
  }

  private push(buf: Buffer, extraMs = 0): void {
    if (this.proxy.delayMs <= 0 && extraMs <= 0 && this.queue.length === 0) {
      if (!this.dst.destroyed) this.dst.write(buf);
      return;
    }
    this.queue.push({ due: performance.now() + Math.max(0, this.proxy.delayMs) + extraMs, buf });
    this.schedule();
  }

  /** The source closed (or the stream was cut): pass it on after the bytes before it. */
  pushEnd(end: 'cut' | 'close'): void {
    this.queue.push({ due: performance.now() + Math.max(0, this.proxy.delayMs), end });
    this.schedule();
  }

  private schedule(): void {
    if (this.timer || this.queue.length === 0) return;
    this.timer = setTimeout(
      () => {
        this.timer = null;
        const now = performance.now();
        // Strictly in order: an item never overtakes the one before it.
        while (this.queue.length > 0 && this.queue[0].due <= now + 1) {
          const item = this.queue.shift()!;
          if ('buf' in item) {
            if (!this.dst.destroyed) this.dst.write(item.buf);
          } else if (item.end === 'cut') this.conn.destroy();
          else this.dst.end();
        }
        this.schedule();
      },
      Math.max(0, this.queue[0].due - performance.now()),
    );
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.queue.length = 0;
  }
}

class Conn {
  blackholed = false;
  cut = false;
  private readonly pipes: Pipe[] = [];

  constructor(
    private readonly proxy: NetFaultProxy,
    readonly client: net.Socket,
    readonly upstream: net.Socket | null,
  ) {
    if (!upstream) {
      // Accepted while the blackhole is on: a dead end that never answers.
      this.blackholed = true;
      client.on('data', (d: Buffer) => (proxy.blackholedBytes += d.length));
      client.on('error', () => {});
      client.on('close', () => proxy.forget(this));
      return;
    }
    const up = new Pipe(proxy, this, 'up', upstream);
    const down = new Pipe(proxy, this, 'down', client);
    this.pipes.push(up, down);
    client.on('data', (d: Buffer) => up.data(d));
    upstream.on('data', (d: Buffer) => down.data(d));
    for (const [src, pipe] of [
      [client, up],
      [upstream, down],
    ] as const) {
      src.on('error', () => {});
      src.on('close', () => {
        if (this.cut) return;
        // Through a blackhole nothing gets across, not even a close: the other
        // end must find out by itself (its heartbeat).
        if (!this.blackholed) pipe.pushEnd('close');
        if (client.destroyed && upstream.destroyed) proxy.forget(this);
      });
    }
  }

  destroy(): void {
    this.cut = true;
    for (const p of this.pipes) p.stop();
    this.client.destroy();
    this.upstream?.destroy();
    this.proxy.forget(this);
  }
}

/**
 * A TCP proxy for the replication link that parses the frame stream in both
 * directions and can:
 * - delay every chunk by `delayMs` in each direction, keeping the order;
 * - cut the primary → secondary stream after `cutAfterBytes` bytes in total
 *   (mid-frame, typically), destroying both sides;
 * - blackhole: while `blackhole` is set, live connections silently lose every
 *   byte in both directions and are never closed by the proxy (a connection
 *   that lost bytes stays a blackhole: its stream is broken), and new
 *   connections are accepted and never answered. Only the heartbeat can tell;
 * - drop frames of one type in one direction (`dropNext`);
 * - hold one frame longer (`frameDelay`), and log every frame it saw (`seen`);
 * - refuse connections (`refuse`).
 */
export class NetFaultProxy {
  private readonly server: net.Server;
  private readonly conns = new Set<Conn>();
  private rules: DropRule[] = [];
  private blackholeOn = false;
  delayMs = 0;
  cutAfterBytes = Infinity;
  refuse = false;
  /** Bytes forwarded primary → secondary (all connections). */
  forwarded = 0;
  blackholedBytes = 0;
  cuts = 0;
  accepted = 0;
  /** Frames seen per `${dir}:${type}`. */
  frameCounts: Record<string, number> = {};
  /** Frames the proxy dropped, in order. */
  dropped: { dir: Direction; meta: Record<string, unknown> }[] = [];
  /** Every frame seen, both directions, in the order they arrived (type and epoch). */
  seen: { dir: Direction; t: string; e?: number }[] = [];
  /** Extra milliseconds to hold one frame (and, keeping the order, whatever follows it that way). */
  frameDelay: ((dir: Direction, meta: Record<string, unknown> & { t: string }) => number) | null = null;
  port = 0;

  constructor(
    private readonly target: number,
    private readonly targetHost = '127.0.0.1',
  ) {
    this.server = net.createServer((client) => this.accept(client));
  }

  async listen(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this.port;
  }

  get blackhole(): boolean {
    return this.blackholeOn;
  }

  set blackhole(on: boolean) {
    this.blackholeOn = on;
    if (on) for (const c of this.conns) c.blackholed = true;
  }

  /** Drop the next `count` frames of `type` going `dir` (optionally only of epoch `epoch`, or matching `match`). */
  dropNext(
    dir: Direction,
    type: string,
    opts: { epoch?: number; count?: number; match?: (meta: Record<string, unknown>) => boolean } = {},
  ): void {
    this.rules.push({ dir, type, epoch: opts.epoch, match: opts.match, left: opts.count ?? 1 });
  }

  /** Called by the pipes for every whole frame. */
  shouldDrop(dir: Direction, meta: Record<string, unknown> & { t: string }): boolean {
    const rule = this.rules.find(
      (r) =>
        r.left > 0 && r.dir === dir && r.type === meta.t && (r.epoch === undefined || r.epoch === meta.e),
    );
    if (!rule) return false;
    rule.left--;
    this.rules = this.rules.filter((r) => r.left > 0);
    this.dropped.push({ dir, meta });
    return true;
  }

  private accept(client: net.Socket): void {
    this.accepted++;
    if (this.refuse) {
      client.destroy();
      return;
    }
    client.setNoDelay(true);
    const upstream = this.blackholeOn ? null : net.connect({ host: this.targetHost, port: this.target });
    upstream?.setNoDelay(true);
    this.conns.add(new Conn(this, client, upstream));
  }

  forget(c: Conn): void {
    this.conns.delete(c);
  }

  /** Cut every live connection now. */
  cutAll(): void {
    for (const c of [...this.conns]) c.destroy();
  }

  async close(): Promise<void> {
    this.cutAll();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

// -----------------------------------------------------------------------------
// What the PVM acknowledged

const HASH_SLICE = 1024 * 1024;
const yieldToLoop = () => new Promise<void>((r) => setImmediate(r));

/** sha256 of a buffer, 1 MiB at a time, letting the event loop (the proxy) run in between. */
export async function hashBuffer(buf: Buffer): Promise<string> {
  const h = createHash('sha256');
  for (let off = 0; off < buf.length; off += HASH_SLICE) {
    h.update(buf.subarray(off, off + HASH_SLICE));
    await yieldToLoop();
  }
  return h.digest('hex');
}

/** sha256 of a file, streamed (never a whole image read and hashed in one synchronous step). */
export async function hashFile(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: HASH_SLICE }))
    h.update(chunk as Buffer);
  return h.digest('hex');
}

/** The expected content of a disk: every acknowledged mutation applied in order. */
export class ModelDisk {
  readonly data: Buffer;
  acknowledged = 0;

  constructor(readonly size: number) {
    this.data = Buffer.alloc(size);
  }

  /** sha256 of the expected content (take it while no request is in flight). */
  hash(): Promise<string> {
    return hashBuffer(this.data);
  }
}

/**
 * A guest-like workload over every mutating command, with its effect recorded
 * in `model` once acknowledged. Requests run `lanes` at a time, each in its own
 * slice of [start, end), so the outcome of concurrent requests is well defined.
 */
export async function modelWorkload(
  c: NbdClient,
  model: ModelDisk,
  seed: number,
  ops: number,
  opts: { start?: number; end?: number; lanes?: number; maxLen?: number; stop?: () => boolean } = {},
): Promise<number> {
  const rand = prng(seed);
  const start = opts.start ?? 0;
  const end = opts.end ?? model.size;
  const lanes = opts.lanes ?? 8;
  const laneSize = Math.floor((end - start) / lanes);
  const maxLen = Math.min(opts.maxLen ?? 256 * 1024, laneSize);
  let done = 0;
  while (done < ops && !opts.stop?.()) {
    const batch: Promise<void>[] = [];
    for (let lane = 0; lane < lanes && done < ops; lane++, done++) {
      const len = 1 + (rand() % maxLen);
      const off = start + lane * laneSize + (rand() % (laneSize - len + 1));
      const op = rand() % 10;
      if (op < 6) {
        const data = randomBytes(len, rand);
        batch.push(c.write(data, off, { fua: op === 5 }).then(() => void data.copy(model.data, off)));
      } else if (op === 6)
        batch.push(c.zero(off, len, { noHole: true }).then(() => void model.data.fill(0, off, off + len)));
      else if (op === 7) batch.push(c.zero(off, len).then(() => void model.data.fill(0, off, off + len)));
      else if (op === 8) batch.push(c.trim(off, len).then(() => void model.data.fill(0, off, off + len)));
      else batch.push(c.flush());
    }
    await Promise.all(batch);
    model.acknowledged += batch.length;
  }
  return done;
}

// -----------------------------------------------------------------------------
// Checks

type PStatus = {
  epoch: number;
  peerState: string;
  link: { state: string; since: number | null; lastError: string | null; reconnects: number; peer: string };
  deposed: string | null;
  pending: { epoch: number }[];
};
type SStatus = {
  role: string;
  committedEpoch: number;
  failoverPending: boolean;
  promoted: unknown;
  link: { state: string; peer: string | null; primaryLost: { at: number; reason: string } | null };
};
export const primaryStatus = (p: NodeProc) => controlCall<PStatus>(p.control, 'GET', '/status');
export const secondaryStatus = (s: NodeProc) => controlCall<SStatus>(s.control, 'GET', '/status');

export { waitFor } from './helpers.js';

/** Run a checkpoint through the primary's control API; the error (if any) instead of a throw. */
export async function tryCheckpoint(
  primary: NodeProc,
  timeoutMs: number,
): Promise<{ ok: true; result: Record<string, number> } | { ok: false; error: Error & { code?: string } }> {
  try {
    const result = await controlCall<Record<string, number>>(primary.control, 'POST', '/checkpoint', {
      timeoutMs,
    });
    return { ok: true, result };
  } catch (err) {
    return { ok: false, error: err as Error & { code?: string } };
  }
}

/**
 * After a checkpoint: drain the secondary's apply, then the PVM export, the SVM
 * export (no SVM writes: it equals the PVM after a commit), the model and, when
 * given, the two image files must all be the same bytes.
 */
export async function expectEqualImages(
  primary: NodeProc,
  secondary: NodeProc,
  model: ModelDisk | null,
  files?: { pvm: string; svm: string },
): Promise<string> {
  await controlCall(secondary.control, 'POST', '/drain-apply');
  const [a, b] = await Promise.all([hashExport(primary.nbdPort), hashExport(secondary.nbdPort)]);
  if (model && a !== (await model.hash()))
    throw new Error(`the PVM export lost acknowledged writes (${model.acknowledged} requests)`);
  if (b !== a) throw new Error('the SVM export differs from the PVM export after a successful checkpoint');
  if (files) {
    const [svm, pvm] = [await hashFile(files.svm), await hashFile(files.pvm)];
    if (svm !== pvm) throw new Error(`${files.svm} differs from ${files.pvm}`);
  }
  return a;
}

// -----------------------------------------------------------------------------
// Network namespaces

export interface NetnsPair {
  a: string;
  b: string;
  vethA: string;
  vethB: string;
  addrA: string;
  addrB: string;
  setLink: (up: boolean) => Promise<void>;
  destroy: () => Promise<void>;
}

const ip = (...args: string[]) => runOk('ip', args, { timeoutMs: 10_000 });

/**
 * Two fresh namespaces joined by a veth pair on a random private /30, loopback
 * and veth up in each. Names carry the test process's pid and `tag`.
 */
export async function createNetnsPair(tag: string): Promise<NetnsPair> {
  const id = `${process.pid}${tag}`;
  const a = `cbt-${id}-a`;
  const b = `cbt-${id}-b`;
  const vethA = `cbt${id}a`.slice(0, 15);
  const vethB = `cbt${id}b`.slice(0, 15);
  const net3 = `10.${randomInt(16, 250)}.${randomInt(0, 256)}`;
  const base = 4 * randomInt(0, 63);
  const addrA = `${net3}.${base + 1}`;
  const addrB = `${net3}.${base + 2}`;
  const created: string[] = [];
  const destroy = async () => {
    for (const ns of created.splice(0)) await ip('netns', 'del', ns).catch(() => {});
  };
  try {
    for (const ns of [a, b]) {
      await ip('netns', 'add', ns);
      created.push(ns);
    }
    await ip('link', 'add', vethA, 'netns', a, 'type', 'veth', 'peer', 'name', vethB, 'netns', b);
    await ip('-n', a, 'addr', 'add', `${addrA}/30`, 'dev', vethA);
    await ip('-n', b, 'addr', 'add', `${addrB}/30`, 'dev', vethB);
    for (const [ns, dev] of [
      [a, vethA],
      [b, vethB],
    ]) {
      await ip('-n', ns, 'link', 'set', 'lo', 'up');
      await ip('-n', ns, 'link', 'set', dev, 'up');
    }
  } catch (err) {
    await destroy();
    throw err;
  }
  return {
    a,
    b,
    vethA,
    vethB,
    addrA,
    addrB,
    setLink: async (up) => {
      await ip('-n', a, 'link', 'set', vethA, up ? 'up' : 'down');
    },
    destroy,
  };
}

/** Start `colo-blk <role> ... --json` inside network namespace `ns` and wait for its listening line. */
export async function startNodeInNs(
  ns: string,
  role: 'primary' | 'secondary',
  args: string[],
  timeoutMs = 20_000,
): Promise<Omit<NodeProc, 'control' | 'nbdPort'>> {
  // `ip netns exec` execs the command in place: the pid is the node's own.
  const child = track(
    spawn('ip', ['netns', 'exec', ns, process.execPath, CLI, role, '--json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
    }),
  );
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  let lines = '';
  child.stdout!.on('data', (d: Buffer) => (lines += d.toString()));
  const info = await new Promise<Record<string, number | string>>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${role} in ${ns} did not start: ${stderr}`)), timeoutMs);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line));
      }
    });
    void exit.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`${role} in ${ns} exited (${code ?? signal}) before listening: ${stderr}`));
    });
  });
  const events = () =>
    lines
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  return { child, info, stderr: () => stderr, events, stdout: () => lines, exit };
}

// The forwarder that runs inside a namespace: Unix socket (visible from every
// namespace, it lives in the file system) → 127.0.0.1:port of that namespace.
const NS_FORWARDER = `
const net = require('net');
const fs = require('fs');
const maps = process.argv.slice(1);
let ready = 0;
for (const m of maps) {
  const [p, port] = m.split('=');
  fs.rmSync(p, { force: true });
  net.createServer((c) => {
    const u = net.connect({ host: '127.0.0.1', port: Number(port) });
    c.pipe(u);
    u.pipe(c);
    const kill = () => { c.destroy(); u.destroy(); };
    for (const s of [c, u]) { s.on('error', kill); s.on('close', kill); }
  }).listen(p, () => { if (++ready === maps.length) process.stdout.write('ready\\n'); });
}`;

/**
 * Make ports that listen on 127.0.0.1 inside namespace `ns` reachable from the
 * test process: a forwarder inside the namespace listens on Unix sockets in
 * `dir`, and the test process forwards local 127.0.0.1 ports to them.
 * Returns the local ports (same order) and a close function.
 */
export async function bridgeFromNs(
  ns: string,
  dir: string,
  ports: number[],
): Promise<{ ports: number[]; pid: number; close: () => Promise<void> }> {
  const socks = ports.map((p) => path.join(dir, `${ns}-${p}.sock`));
  const child = track(
    spawn(
      'ip',
      ['netns', 'exec', ns, process.execPath, '-e', NS_FORWARDER, ...ports.map((p, i) => `${socks[i]}=${p}`)],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    ),
  );
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`forwarder in ${ns} did not start: ${err}`)), 10_000);
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`forwarder in ${ns} exited (${code}): ${err}`));
    });
  });
  const servers: net.Server[] = [];
  const open = new Set<net.Socket>();
  const local: number[] = [];
  for (const sock of socks) {
    const srv = net.createServer((c) => {
      const u = net.connect({ path: sock });
      open.add(c);
      c.once('close', () => open.delete(c));
      c.pipe(u);
      u.pipe(c);
      const kill = () => {
        c.destroy();
        u.destroy();
      };
      for (const s of [c, u]) {
        s.on('error', kill);
        s.on('close', kill);
      }
    });
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
    servers.push(srv);
    local.push((srv.address() as net.AddressInfo).port);
  }
  return {
    ports: local,
    pid: child.pid!,
    close: async () => {
      for (const c of open) c.destroy();
      for (const s of servers) await new Promise<void>((r) => s.close(() => r()));
      if (child.exitCode === null && child.signalCode === null) {
        const gone = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await gone;
      }
      for (const s of socks) fs.rmSync(s, { force: true });
    },
  };
}

/** Stop a node: SIGTERM, SIGKILL after 5 s. */
export async function stopNode(n: { child: NodeProc['child']; exit: NodeProc['exit'] }): Promise<void> {
  if (n.child.exitCode !== null || n.child.signalCode !== null) return;
  n.child.kill('SIGCONT');
  n.child.kill('SIGTERM');
  const timer = setTimeout(() => n.child.kill('SIGKILL'), 5000);
  await n.exit;
  clearTimeout(timer);
}
