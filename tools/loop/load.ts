/**
 * A load of our own for the demo and the failover measurement (the
 * throughput figures use wrk): clients on keep-alive connections, each
 * PUTting and GETting its own keys and checking what it reads back, with the
 * time of every response (for the client-visible gap of a failover) and
 * every acknowledged PUT (to read back afterwards).
 */
import { HttpConn } from './http-conn.js';

/** Clients on keep-alive connections, each PUTting and GETting its own keys until stopped. */
export class Load {
  stopped = false;
  requests = 0;
  errors: string[] = [];
  readonly acked = new Map<string, string>();
  readonly latencies: number[] = [];
  lastResponseAt = 0;
  /** When each response arrived (ms). */
  readonly times: number[] = [];
  private loops: Promise<void>[] = [];
  constructor(readonly conns: HttpConn[]) {}

  static async open(port: number, n: number): Promise<Load> {
    return new Load(await Promise.all(Array.from({ length: n }, () => HttpConn.connect(port))));
  }

  start(): void {
    this.stopped = false;
    this.loops = this.conns.map((c, i) => this.run(c, i));
  }

  private async run(c: HttpConn, i: number): Promise<void> {
    for (let n = 0; !this.stopped; n++) {
      const key = `client${i}-key${n % 16}`;
      const value = `value ${n} from client ${i} at ${Date.now()}`;
      const t = performance.now();
      try {
        const put = n % 3 !== 2;
        const r = put
          ? await c.request('PUT', `/kv/${key}`, value, 20_000)
          : await c.request('GET', `/kv/${key}`, undefined, 20_000);
        if (r.status !== 200 && r.status !== 404) throw new Error(`HTTP ${r.status}: ${r.body.toString()}`);
        if (put) this.acked.set(key, value);
        else if (this.acked.has(key) && r.body.toString() !== this.acked.get(key))
          throw new Error(`GET ${key} returned '${r.body.toString()}', expected '${this.acked.get(key)}'`);
        this.latencies.push(performance.now() - t);
        this.requests++;
        this.lastResponseAt = Date.now();
        this.times.push(this.lastResponseAt);
      } catch (err) {
        this.errors.push(`client ${i}: ${(err as Error).message}`);
        return;
      }
    }
  }

  async pause(): Promise<void> {
    this.stopped = true;
    await Promise.all(this.loops);
  }

  resets(): number {
    return this.conns.filter((c) => c.closed || c.error).length;
  }
}

/** The longest wait between two responses from `from` on (Infinity if none came after `after`). */
export function longestGap(times: number[], from: number, after: number): number {
  const around = times.filter((t) => t >= from);
  if (around.length < 2 || around.at(-1)! < after) return Infinity;
  let gap = 0;
  for (let k = 1; k < around.length; k++) gap = Math.max(gap, around[k] - around[k - 1]);
  return gap;
}
