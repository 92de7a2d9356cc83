/**
 * A simulated network for the simulator: byte-stream connections between
 * named hosts, with latency, arbitrary segmentation, backpressure, and the
 * faults a real network has: a connection cut at any byte, a partition
 * (connection attempts time out, packets vanish), and the reset a peer sees
 * when a process dies.
 */
import { EventEmitter } from 'node:events';
import { ColoError } from '../../src/errors.js';
import type { Conn, Listener, Net } from '../../src/sys/net.js';
import type { Owner, SimWorld } from './world.js';

/** A socket's send buffer by default (bytes in flight before write() says to wait for 'drain'). */
const HIGH_WATER = 256 * 1024;

export class SimConn extends EventEmitter implements Conn {
  peer!: SimConn;
  destroyed = false;
  /** end() was called (Conn.writableEnded). */
  get writableEnded(): boolean {
    return this.ending;
  }
  private paused = false;
  private held: Buffer[] = [];
  /** Bytes written and not yet delivered to the peer. */
  inFlight = 0;
  private needDrain = false;
  /** Time the last delivery in this direction is scheduled for (keeps order). */
  private lastAt = 0;
  /** Bytes this end may still send before the connection is cut (a fault). */
  cutAfter = Infinity;
  sent = 0;
  private ending = false;
  /**
   * A piece sent this way was lost to a partition: every later one is lost
   * too. TCP never delivers bytes after a gap; across a partition the
   * connection stalls (here: for good) until a heartbeat closes it.
   */
  private blackholed = false;

  constructor(
    private readonly net: SimNet,
    readonly host: string,
    readonly owner: Owner,
    readonly remoteAddress: string,
    readonly remotePort: number,
  ) {
    super();
  }

  private get world(): SimWorld {
    return this.net.world;
  }

  write(buf: Buffer, done?: () => void): boolean {
    if (done) {
      // The caller reuses `buf` once `done` runs: keep a copy of our own.
      buf = Buffer.from(buf);
      queueMicrotask(done);
    }
    if (this.destroyed) return false;
    if (this.ending) {
      // As a socket does: a write after end() is an error that destroys it (a reset).
      this.world.schedule(0, () => this.emit('error', new Error('write after end')), this.owner);
      this.net.reset(this);
      return false;
    }
    let data = buf; // like a socket: the caller does not reuse what it wrote
    if (this.sent + data.length > this.cutAfter) {
      data = data.subarray(0, Math.max(0, this.cutAfter - this.sent));
      this.sent += data.length;
      this.net.cuts++;
      this.deliver(data);
      const at = this.lastAt;
      this.world.schedule(Math.max(0, at - this.world.t), () => this.net.reset(this), null);
      return false;
    }
    this.sent += data.length;
    this.deliver(data);
    if (this.inFlight > this.net.highWater) {
      this.needDrain = true;
      return false;
    }
    return true;
  }

  /** Send bytes to the peer in random segments, in order, after the link's latency. */
  private deliver(data: Buffer): void {
    const world = this.world;
    let off = 0;
    while (off < data.length) {
      const n = Math.min(data.length - off, world.rng.chance(0.3) ? world.rng.range(1, 4096) : 64 * 1024);
      const piece = data.subarray(off, off + n);
      off += n;
      this.inFlight += piece.length;
      const at = Math.max(this.lastAt, world.t + this.net.latency(this.host, this.peer.host));
      this.lastAt = at;
      world.schedule(
        at - world.t,
        () => {
          this.inFlight -= piece.length;
          if (this.needDrain && this.inFlight <= this.net.highWater / 2 && !this.destroyed) {
            this.needDrain = false;
            this.net.drains++;
            this.emit('drain');
          }
          if (this.blackholed || this.net.partitioned(this.host, this.peer.host)) {
            this.blackholed = true; // lost on the way, and so is all that follows
            return;
          }
          this.peer.receive(piece);
        },
        this.owner,
      );
    }
  }

  receive(piece: Buffer): void {
    if (this.destroyed) return;
    if (this.owner.stalledUntil > this.world.t) {
      // A frozen process reads nothing: the bytes wait in its socket, handed out at the thaw.
      this.held.push(piece);
      if (!this.paused) this.handOutHeld();
      return;
    }
    // Behind what resume() has still to hand out: a piece must never overtake an earlier one.
    if (this.paused || this.held.length) this.held.push(piece);
    else this.emit('data', piece);
  }

  private handingOut = false;

  /** Hand out the held pieces in a task of this end's process (after a thaw, if it is frozen). */
  private handOutHeld(): void {
    if (this.handingOut) return;
    this.handingOut = true;
    this.world.schedule(
      0,
      () => {
        this.handingOut = false;
        while (!this.paused && this.held.length && !this.destroyed) this.emit('data', this.held.shift()!);
      },
      this.owner,
    );
  }

  cork(): void {}
  uncork(): void {}
  setNoDelay(): this {
    return this;
  }

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.handOutHeld();
  }

  /** Close after everything written has been delivered. */
  end(): void {
    if (this.destroyed || this.ending) return;
    this.ending = true;
    const at = Math.max(this.lastAt, this.world.t);
    this.world.schedule(at - this.world.t + 1, () => this.net.close(this), null);
  }

  destroy(): void {
    if (this.destroyed) return;
    this.net.reset(this);
  }

  /** This end is gone: mark it and emit 'close' (asynchronously, as a socket does). */
  closeLocal(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    this.held = [];
    this.world.schedule(0, () => this.emit('close'), this.owner);
  }
}

interface SimListener {
  host: string;
  port: number;
  owner: Owner;
  onConnection: (c: Conn) => void;
}

export class SimNet {
  private listeners = new Map<string, SimListener>();
  private conns = new Set<SimConn>();
  private parts = new Set<string>();
  private nextPort = 40000;
  /** Faults injected (for the report). */
  cuts = 0;
  resets = 0;
  /** Writes a sender had to wait for 'drain' after (backpressure met). */
  drains = 0;
  /** Extra one-way delay between two hosts (ms), on top of the base latency. */
  delays = new Map<string, number>();
  /**
   * Bytes a connection holds in flight before write() returns false (the
   * sender waits for 'drain'). Some runs make it small, so that senders meet
   * backpressure, as a slow or distant peer makes them on a real network.
   */
  highWater = HIGH_WATER;

  constructor(readonly world: SimWorld) {}

  private key(a: string, b: string): string {
    return a < b ? `${a}|${b}` : `${b}|${a}`;
  }

  latency(a: string, b: string): number {
    return this.world.rng.range(0, 1) + (this.delays.get(this.key(a, b)) ?? 0);
  }

  partitioned(a: string, b: string): boolean {
    return this.parts.has(this.key(a, b));
  }

  partition(a: string, b: string): void {
    this.parts.add(this.key(a, b));
  }

  heal(a: string, b: string): void {
    this.parts.delete(this.key(a, b));
  }

  /** The network a process on `host` uses; its connections and listeners belong to `owner`. */
  forHost(host: string, owner: Owner): Net {
    return {
      connect: (toHost, port) => this.connect(host, owner, toHost, port),
      listen: async (_h, port, onConnection) => {
        const p = port || this.nextPort++;
        const key = `${host}:${p}`;
        if (this.listeners.has(key)) throw new ColoError('EUSAGE', `${key} is in use`);
        this.listeners.set(key, { host, port: p, owner, onConnection });
        const listener: Listener = {
          address: host,
          port: p,
          close: async () => {
            if (this.listeners.get(key)?.owner === owner) this.listeners.delete(key);
          },
        };
        return listener;
      },
    };
  }

  private connect(fromHost: string, owner: Owner, toHost: string, port: number): Conn {
    const client = new SimConn(this, fromHost, owner, toHost, port);
    const world = this.world;
    world.schedule(
      this.latency(fromHost, toHost) + 1,
      () => {
        const l = this.listeners.get(`${toHost}:${port}`);
        if (!l || !l.owner.alive || this.partitioned(fromHost, toHost)) {
          // Refused (nobody listens), or no answer across a partition: the attempt fails.
          const why = l ? 'ETIMEDOUT (partitioned)' : 'ECONNREFUSED';
          world.schedule(
            l ? 200 : 0,
            () => {
              client.emit('error', new Error(`connect ${why} ${toHost}:${port}`));
              client.closeLocal();
            },
            owner,
          );
          return;
        }
        const server = new SimConn(this, toHost, l.owner, fromHost, 50000 + world.rng.int(10000));
        client.peer = server;
        server.peer = client;
        this.conns.add(client);
        this.conns.add(server);
        l.onConnection(server);
        world.schedule(0, () => client.emit('connect'), owner);
      },
      owner,
    );
    return client;
  }

  /** An abrupt end (destroy, or a cut): both ends close; what was in flight is lost. */
  reset(end: SimConn): void {
    this.resets++;
    const peer = end.peer;
    end.closeLocal();
    this.conns.delete(end);
    if (peer && !peer.destroyed) {
      this.conns.delete(peer);
      this.world.schedule(this.latency(end.host, peer.host), () => peer.closeLocal(), null);
    }
  }

  /** A graceful end: the peer sees the close after the data. */
  close(end: SimConn): void {
    const peer = end.peer;
    end.closeLocal();
    this.conns.delete(end);
    if (peer && !peer.destroyed) {
      this.conns.delete(peer);
      peer.closeLocal();
    }
  }

  /** A process on `host` died: its connections reset, its listeners vanish. */
  killHost(owner: Owner): void {
    for (const c of [...this.conns]) if (c.owner === owner) this.reset(c);
    for (const [k, l] of [...this.listeners]) if (l.owner === owner) this.listeners.delete(k);
  }

  /** Cut every open connection between two hosts after `bytes` more bytes in each direction. */
  cutBetween(a: string, b: string, bytes: number): number {
    let n = 0;
    for (const c of this.conns)
      if (this.key(c.host, c.peer?.host ?? '') === this.key(a, b)) {
        c.cutAfter = c.sent + bytes;
        n++;
      }
    return n;
  }
}
