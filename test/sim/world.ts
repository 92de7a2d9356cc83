/**
 * The simulator's world: one virtual clock, one seeded generator, one queue
 * of timed tasks. Every node's timers, disk syncs and network deliveries are
 * tasks here, so a whole two-node run is a function of its seed.
 *
 * Notes on the design:
 * - Virtual time only moves when the queue says so; nothing waits for real
 *   time. Between two tasks the real event loop is given one turn (a real
 *   setImmediate), which runs every promise continuation and every
 *   setImmediate the code under test queued: with no real I/O and no real
 *   timers anywhere in it, that order is deterministic too.
 * - Each node incarnation is an `Owner`: its timers and deliveries die with
 *   it (a crash), so an abandoned incarnation's code never runs again.
 */
import type { Clock, Random, TimerHandle } from '../../src/sys/clock.js';

/** sfc32, seeded through splitmix32: small, fast, good enough for scheduling choices. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  constructor(seed: number) {
    let s = seed >>> 0;
    const next = () => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next();
    for (let i = 0; i < 12; i++) this.u32();
  }
  u32(): number {
    const t = (((this.a + this.b) >>> 0) + this.d) >>> 0;
    this.d = (this.d + 1) >>> 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) >>> 0;
    this.c = ((this.c << 21) | (this.c >>> 11)) >>> 0;
    this.c = (this.c + t) >>> 0;
    return t;
  }
  /** Integer in [0, n). */
  int(n: number): number {
    return n <= 1 ? 0 : this.u32() % n;
  }
  /** Integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  /** Pick by weight; entries with weight 0 are never chosen. */
  weighted<T>(entries: readonly [T, number][]): T {
    const total = entries.reduce((a, [, w]) => a + w, 0);
    let r = (this.u32() / 2 ** 32) * total;
    for (const [v, w] of entries) {
      if (r < w) return v;
      r -= w;
    }
    return entries[entries.length - 1][0];
  }
  /**
   * Data for a write of `n` bytes: a random 32-byte pattern, each 512-byte
   * sector stamped with its index (cheap, and a misplaced sector shows).
   */
  data(n: number): Buffer {
    const b = Buffer.allocUnsafe(n).fill(this.bytes(32));
    for (let o = 0; o + 4 <= n; o += 512) b.writeUInt32LE(o >>> 9, o);
    return b;
  }

  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    let i = 0;
    for (; i + 4 <= n; i += 4) b.writeUInt32LE(this.u32(), i);
    for (; i < n; i++) b[i] = this.u32() & 0xff;
    return b;
  }
}

export class Owner {
  alive = true;
  /**
   * The process is frozen until this time (a stop, a long pause of its host):
   * its timers, I/O completions and incoming data wait until then.
   */
  stalledUntil = 0;
  constructor(readonly name: string) {}
}

interface Task {
  at: number;
  seq: number;
  owner: Owner | null;
  fn: () => void;
  cancelled: boolean;
}

const originalSetImmediate = globalThis.setImmediate;
const realTurn = () => new Promise<void>((r) => originalSetImmediate(r));

/**
 * setImmediate callbacks queued by the code under test and not yet run: while
 * there are any, the simulated CPU is busy and virtual time must not move
 * (an infinitely fast machine). Counted by wrapping setImmediate for the
 * duration of a run (`SimWorld.track`).
 */
let pendingImmediates = 0;

function countingSetImmediate<A extends unknown[]>(fn: (...args: A) => void, ...args: A): NodeJS.Immediate {
  pendingImmediates++;
  return originalSetImmediate(() => {
    pendingImmediates--;
    fn(...args);
  });
}

export class SimWorld {
  /** Virtual milliseconds since the start. */
  t = 0;
  readonly wallBase = Date.UTC(2026, 0, 1);
  readonly rng: Rng;
  private queue: Task[] = [];
  private seq = 0;
  /** Tasks run (for the report). */
  steps = 0;

  constructor(readonly seed: number) {
    this.rng = new Rng(seed);
  }

  schedule(delayMs: number, fn: () => void, owner: Owner | null = null): Task {
    const task: Task = { at: this.t + Math.max(0, delayMs), seq: this.seq++, owner, fn, cancelled: false };
    this.insert(task);
    return task;
  }

  private insert(task: Task): void {
    // Binary insertion keeps (at, seq) order.
    let lo = 0;
    let hi = this.queue.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const q = this.queue[mid];
      if (q.at < task.at || (q.at === task.at && q.seq < task.seq)) lo = mid + 1;
      else hi = mid;
    }
    this.queue.splice(lo, 0, task);
  }

  /**
   * Give the real event loop turns while no task is due now, so continuations
   * and setImmediate chains of the code under test run (they may queue tasks
   * or satisfy `done`). A fixed number of turns: deterministic.
   */
  private async idle(done: () => boolean): Promise<void> {
    // Always one turn (promise continuations); more while queued immediates remain.
    for (let i = 0; i < 100_000; i++) {
      if (i > 0 && pendingImmediates === 0) return;
      if (done() || (this.queue.length && this.queue[0].at <= this.t)) return;
      await realTurn();
    }
  }

  /** Run `fn` with setImmediate counted (see pendingImmediates). */
  static async track<T>(fn: () => Promise<T>): Promise<T> {
    globalThis.setImmediate = countingSetImmediate as typeof setImmediate;
    try {
      return await fn();
    } finally {
      globalThis.setImmediate = originalSetImmediate;
    }
  }

  /** Run the next task (advancing time to it); false if there is none before `until`. */
  private async runOne(until: number): Promise<boolean> {
    while (this.queue.length) {
      const task = this.queue[0];
      if (task.at > until) return false;
      this.queue.shift();
      if (task.cancelled || (task.owner && !task.owner.alive)) continue;
      if (task.owner && task.owner.stalledUntil > Math.max(this.t, task.at)) {
        // A frozen process runs nothing: its task waits for the thaw (in its order).
        task.at = task.owner.stalledUntil;
        this.insert(task);
        continue;
      }
      this.t = Math.max(this.t, task.at);
      this.steps++;
      task.fn();
      await realTurn();
      return true;
    }
    return false;
  }

  /** Let the code under test run what it queued without virtual time moving. */
  async settle(): Promise<void> {
    for (;;) {
      await this.idle(() => false);
      if (!(await this.runOne(this.t))) return;
    }
  }

  /** Run for `ms` of virtual time. */
  async runFor(ms: number): Promise<void> {
    await this.runUntil(() => false, ms);
  }

  /**
   * Run until `done()` holds (checked after every task) or `maxMs` of virtual
   * time passed; returns whether it holds.
   */
  async runUntil(done: () => boolean, maxMs: number): Promise<boolean> {
    const until = this.t + maxMs;
    for (;;) {
      await this.idle(done);
      if (done()) return true;
      if (!(await this.runOne(until))) break;
    }
    this.t = Math.max(this.t, until);
    await this.settle();
    return done();
  }

  /** Await a promise while the world runs (at most `maxMs` of virtual time). */
  async await<T>(
    p: Promise<T>,
    maxMs: number,
  ): Promise<{ ok: true; value: T } | { ok: false; error: Error } | null> {
    let result: { ok: true; value: T } | { ok: false; error: Error } | null = null;
    p.then(
      (value) => (result = { ok: true, value }),
      (error: Error) => (result = { ok: false, error }),
    );
    await this.runUntil(() => result !== null, maxMs);
    return result;
  }

  /** A clock whose timers belong to `owner` (they die with it). */
  clock(owner: Owner): Clock {
    const schedule = (ms: number, fn: () => void) => this.schedule(ms, fn, owner);
    return {
      now: () => this.wallBase + this.t,
      mono: () => this.t,
      setTimeout: (fn, ms): TimerHandle => {
        const task = schedule(ms, fn);
        return { clear: () => (task.cancelled = true) };
      },
      setInterval: (fn, ms): TimerHandle => {
        let task: Task;
        let stopped = false;
        const tick = () => {
          if (stopped) return;
          task = schedule(ms, tick);
          fn();
        };
        task = schedule(ms, tick);
        return {
          clear: () => {
            stopped = true;
            task.cancelled = true;
          },
        };
      },
    };
  }

  random(): Random {
    return {
      bytes: (n) => this.rng.bytes(n),
      id: (n) => this.rng.bytes(n).toString('hex'),
    };
  }
}
