/**
 * The guest: a small HTTP/1.1 key-value service that stands in for a VM in
 * the COLO loop. The same code runs as the primary's VM, the secondary's, or
 * alone.
 *
 *   PUT /kv/KEY   store the body durably on the disk, then answer 200 {"version":V}
 *   GET /kv/KEY   the value (404 if absent)
 *   GET /hash     the state's hash
 *
 * Notes on the design:
 * - Each connection is a byte stream with two positions the COLO loop needs:
 *   `consumed` (the bytes of whole requests taken from it) and `written` (the
 *   bytes of responses sent). A pause stops taking requests and waits for the
 *   ones in flight, then reports both positions per connection. A checkpoint
 *   load moves each of the secondary's connections to the primary's
 *   `consumed` position: bytes it had not taken yet are skipped; requests it
 *   had taken beyond are taken again (they are kept since the last checkpoint),
 *   because the state they acted on is gone.
 * - Connections are named by the peer's port: the COLO comparer connects to
 *   both guests and knows its own ports.
 * - Nondeterminism, on purpose: a fraction of responses carries an
 *   `X-Noise` header of real time and randomness; `--interleave` adds the
 *   global operation counter (different when concurrent requests are taken in
 *   another order); `--jitter` delays answers by a random few milliseconds.
 */
import { Buffer } from 'node:buffer';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { toColoError } from '../errors.js';
import type { Logger } from '../net/server.js';
import { listenOn } from '../util/listen.js';
import { encodeResponse, HttpError, parseRequest, type HttpRequest } from './http.js';
import type { GuestState } from './state.js';

export interface GuestOptions {
  /** Include the global operation counter in responses (interleaving shows). */
  interleave?: boolean;
  /** Delay each answer by up to this many ms (real randomness: timing only). */
  jitterMs?: number;
  maxBody?: number;
  logger: Logger;
}

interface Conn {
  id: number;
  socket: net.Socket;
  input: Buffer;
  consumed: number;
  written: number;
  /** Bytes still to skip before the next request (a checkpoint moved this connection forward). */
  skip: number;
  /** Requests taken since the last checkpoint, as bytes (a checkpoint may move this connection back). */
  taken: Buffer[];
  takenBytes: number;
  takenFrom: number;
  busy: boolean;
  closing: boolean;
  /** The client ended its side: once its requests are answered, so does the guest. */
  ended: boolean;
}

const KEEP_BYTES = 16 * 1024 * 1024;
const WRITE_HIGH_WATER = 1024 * 1024;
/** Closed connections whose final positions are kept at most (a checkpoint forgets those it reported). */
const MAX_CLOSED = 65536;

export interface ConnPosition {
  consumed: number;
  written: number;
}

export class GuestServer {
  private readonly server: net.Server;
  private conns = new Map<number, Conn>();
  private paused = false;
  /**
   * Keep the requests taken since the last checkpoint (a load may take them
   * again): only an SVM needs them. Set by a load, cleared when this guest's
   * own checkpoint is committed (it serves as the PVM).
   */
  private keeping = false;
  private idleWaiters: (() => void)[] = [];
  requests = 0;
  /**
   * Connections closed since the last checkpoint, with their final positions:
   * a pause still reports them. The comparer releases a connection's output
   * and moves the other side's connection by these positions whether or not
   * it is still open here; without them a connection this guest had answered
   * and closed (a client that half-closed after its request) read as
   * "nothing taken, nothing written": its last answer was never released and
   * the other side took its request again. `pause` is the pause that came
   * after the close (so the last pause reported it once `pauses` has moved on).
   */
  private closed = new Map<number, ConnPosition & { pause: number }>();
  private pauses = 0;

  constructor(
    readonly state: GuestState,
    private readonly opts: GuestOptions,
  ) {
    // Half-open: a client that ends its side after its requests still gets the answers.
    this.server = net.createServer({ noDelay: true, allowHalfOpen: true }, (s) => this.accept(s));
  }

  get interleave(): boolean {
    return this.opts.interleave === true;
  }

  listen(port: number, host: string): Promise<net.AddressInfo> {
    return listenOn(this.server, port, host);
  }

  private accept(socket: net.Socket): void {
    const id = socket.remotePort ?? 0;
    const c: Conn = {
      id,
      socket,
      input: Buffer.alloc(0),
      consumed: 0,
      written: 0,
      skip: 0,
      taken: [],
      takenBytes: 0,
      takenFrom: 0,
      busy: false,
      closing: false,
      ended: false,
    };
    this.conns.set(id, c);
    socket.on('data', (d: Buffer) => {
      c.input = c.input.length ? Buffer.concat([c.input, d]) : d;
      this.pump(c);
    });
    socket.on('end', () => {
      c.ended = true;
      this.pump(c);
    });
    socket.on('error', () => {});
    socket.on('close', () => {
      this.conns.delete(id);
      this.closed.delete(c.id); // set anew, not updated: the eviction below drops the longest closed
      this.closed.set(c.id, { consumed: c.consumed, written: c.written, pause: this.pauses });
      if (this.closed.size > MAX_CLOSED) this.closed.delete(this.closed.keys().next().value!);
      this.notifyIdle();
    });
  }

  /** Take and answer requests of a connection, one at a time, in order. */
  private pump(c: Conn): void {
    while (!this.paused && !c.busy && !c.closing) {
      // A client that does not read its answers: take no more of its requests until it does.
      if (c.socket.writableLength > WRITE_HIGH_WATER) {
        c.socket.once('drain', () => this.pump(c));
        return;
      }
      if (c.skip > 0) {
        const n = Math.min(c.skip, c.input.length);
        if (n === 0) return;
        c.input = c.input.subarray(n);
        c.consumed += n;
        c.skip -= n;
        continue;
      }
      let req: HttpRequest | null;
      try {
        req = parseRequest(c.input, this.opts.maxBody ?? 16 * 1024 * 1024);
      } catch (err) {
        const e = err as HttpError;
        this.send(c, encodeResponse(e.status ?? 400, JSON.stringify({ error: e.message }), true));
        c.closing = true;
        c.socket.end();
        return;
      }
      if (!req) {
        if (c.ended && !c.socket.destroyed) {
          c.closing = true;
          c.socket.end();
        }
        return;
      }
      this.keep(c, c.input.subarray(0, req.bytes));
      c.input = c.input.subarray(req.bytes);
      c.consumed += req.bytes;
      c.busy = true;
      // Nothing a client sends may end the process: an answer that fails ends its connection only.
      this.answer(c, req).catch(() => c.socket.destroy());
    }
  }

  /**
   * Keep a request taken since the last checkpoint (a load may take it again).
   * Bounded: past KEEP_BYTES the oldest are forgotten, and a load that needs
   * them fails (it never happens with checkpoints at least that often).
   */
  private keep(c: Conn, bytes: Buffer): void {
    if (!this.keeping) {
      c.takenFrom = c.consumed + bytes.length;
      return;
    }
    c.taken.push(Buffer.from(bytes));
    c.takenBytes += bytes.length;
    while (c.takenBytes > KEEP_BYTES && c.taken.length > 1) {
      const old = c.taken.shift()!;
      c.takenBytes -= old.length;
      c.takenFrom += old.length;
    }
  }

  private send(c: Conn, bytes: Buffer): void {
    c.written += bytes.length;
    if (!c.socket.destroyed) c.socket.write(bytes);
  }

  /** Status, body and type for a request. */
  private async handle(req: HttpRequest): Promise<{ status: number; body: Buffer | string; type?: string }> {
    const m = /^\/kv\/([^?#]+)$/.exec(req.path);
    if (!m) {
      if (req.path === '/hash' && req.method === 'GET')
        return { status: 200, body: JSON.stringify({ hash: this.state.hash() }) };
      return { status: 404, body: '{"error":"no such path"}' };
    }
    let key: string;
    try {
      key = decodeURIComponent(m[1]);
    } catch {
      return { status: 400, body: '{"error":"the key is not a valid percent-encoded string"}' };
    }
    try {
      if (req.method === 'PUT')
        return { status: 200, body: JSON.stringify({ version: await this.state.put(key, req.body) }) };
      if (req.method === 'GET') {
        const e = this.state.get(key);
        return e
          ? { status: 200, body: e.value, type: 'application/octet-stream' }
          : { status: 404, body: '{"error":"no such key"}' };
      }
      return { status: 405, body: '{"error":"PUT or GET"}' };
    } catch (err) {
      const e = toColoError(err);
      return { status: e.code === 'ENOSPC' ? 507 : 500, body: JSON.stringify({ error: e.message }) };
    }
  }

  private async answer(c: Conn, req: HttpRequest): Promise<void> {
    this.requests++;
    const { op, noise } = this.state.step();
    const { status, body, type } = await this.handle(req);
    if (this.opts.jitterMs) await sleep(Math.random() * this.opts.jitterMs);
    let bytes = encodeResponse(status, body, req.close, type);
    // Nondeterminism, on purpose: extra headers made of the op counter or of real time and randomness.
    const extra = (this.opts.interleave ? `X-Op: ${op}\r\n` : '') + (noise ? `X-Noise: ${noise}\r\n` : '');
    if (extra) {
      const split = bytes.indexOf('\r\n') + 2;
      bytes = Buffer.concat([bytes.subarray(0, split), Buffer.from(extra, 'latin1'), bytes.subarray(split)]);
    }
    this.send(c, bytes);
    c.busy = false;
    if (req.close) {
      c.closing = true;
      c.socket.end();
    }
    this.notifyIdle();
    this.pump(c);
  }

  private notifyIdle(): void {
    if (!this.idle()) return;
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  private idle(): boolean {
    for (const c of this.conns.values()) if (c.busy) return false;
    return true;
  }

  /** Stop taking requests; once none is in flight, say where each connection stands. */
  async pause(): Promise<Record<string, ConnPosition>> {
    this.paused = true;
    this.pauses++;
    if (!this.idle()) await new Promise<void>((r) => this.idleWaiters.push(r));
    return this.positions();
  }

  positions(): Record<string, ConnPosition> {
    const out: Record<string, ConnPosition> = {};
    for (const [id, p] of this.closed) out[id] = { consumed: p.consumed, written: p.written };
    for (const c of this.conns.values()) out[c.id] = { consumed: c.consumed, written: c.written };
    return out;
  }

  /** Forget the connections that closed before the last pause: it reported them. */
  private forgetReportedClosed(): void {
    for (const [id, p] of this.closed) if (p.pause < this.pauses) this.closed.delete(id);
  }

  resume(): void {
    this.paused = false;
    for (const c of this.conns.values()) this.pump(c);
  }

  /** A checkpoint was committed: requests taken so far will never be taken again. */
  checkpointed(): void {
    this.keeping = false;
    this.forgetReportedClosed();
    for (const c of this.conns.values()) {
      c.taken = [];
      c.takenBytes = 0;
      c.takenFrom = c.consumed;
    }
  }

  /**
   * After a memory checkpoint was loaded: each connection continues from the
   * primary's position (`targets`, by connection id; a connection the primary
   * had not seen continues from its start).
   */
  align(targets: Record<string, number>): void {
    this.keeping = true;
    this.forgetReportedClosed();
    for (const c of this.conns.values()) {
      const target = targets[c.id] ?? 0;
      if (target >= c.consumed) c.skip = target - c.consumed;
      else {
        // Take again what this side took beyond the primary's position.
        const all = Buffer.concat(c.taken);
        const from = target - c.takenFrom;
        if (from < 0)
          throw new Error(
            `connection ${c.id}: the primary's position ${target} is before the last checkpoint`,
          );
        c.input = Buffer.concat([all.subarray(from), c.input]);
        c.consumed = target;
      }
      c.taken = [];
      c.takenBytes = 0;
      c.takenFrom = target;
    }
  }

  async close(): Promise<void> {
    for (const c of this.conns.values()) c.socket.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
