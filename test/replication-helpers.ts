/**
 * Helpers for replication tests: a primary/secondary pair as real processes
 * (the CLI), a TCP fault proxy for the replication link, and image hashing
 * over NBD.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { controlCall } from '../src/checkpoint/control.js';
import { NbdClient } from '../src/net/client.js';
import { CLI, track } from './helpers.js';

export interface NodeProc {
  child: ChildProcess;
  info: Record<string, number | string>;
  stderr: () => string;
  /** Every JSON line it printed on stdout so far (events of `colo --json`). */
  events: () => Record<string, unknown>[];
  /** All it printed on stdout (a VM's console, for vm-standby's QEMU). */
  stdout: () => string;
  control: { host: string; port: number };
  nbdPort: number;
  exit: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Start `colo-blk <role> ... --json` and wait for its listening line. */
export async function startNode(
  role: 'primary' | 'secondary' | 'guest' | 'colo' | 'vm' | 'vm-standby',
  args: string[],
  env: NodeJS.ProcessEnv = {},
  timeoutMs = 20_000,
): Promise<NodeProc> {
  const child = track(
    spawn(process.execPath, [CLI, role, '--json', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...env },
    }),
  );
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  let stdout = '';
  child.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  const events = () =>
    stdout
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  const info = await new Promise<Record<string, number | string>>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`${role} did not start: ${stderr}`)), timeoutMs);
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
      reject(new Error(`${role} exited (${code ?? signal}) before listening: ${stderr}`));
    });
  });
  return {
    child,
    info,
    stderr: () => stderr,
    events,
    stdout: () => stdout,
    control: { host: '127.0.0.1', port: Number(info.controlPort) },
    nbdPort: Number(info.port),
    exit,
  };
}

export interface Pair {
  dir: string;
  primary: NodeProc;
  secondary: NodeProc;
  replicationPort: number;
  startSecondary: (env?: NodeJS.ProcessEnv) => Promise<NodeProc>;
  checkpoint: () => Promise<Record<string, number>>;
  stop: () => Promise<void>;
}

/**
 * A secondary's arguments on loopback: its export (`disk0` on `image`, created at `size` if new),
 * state directory, NBD and control ports picked by the system, failover manual unless `extra`
 * gives --failover.
 */
export function secondaryArgs(
  image: string,
  size: string | number,
  state: string,
  extra: string[] = [],
  replicationPort = 0,
): string[] {
  return [
    '--listen',
    '127.0.0.1:0',
    '--export',
    `disk0=${image},size=${size}`,
    '--state',
    state,
    '--replication-listen',
    `127.0.0.1:${replicationPort}`,
    '--control',
    '127.0.0.1:0',
    ...(extra.includes('--failover') ? [] : ['--failover', 'manual']),
    ...extra,
  ];
}

export async function startPair(
  dir: string,
  size = '16M',
  opts: {
    secondarySize?: string;
    proxy?: (secondaryReplPort: number) => Promise<number>;
    secondaryEnv?: NodeJS.ProcessEnv;
    primaryArgs?: string[];
    /** Failover mode of the secondary; tests default to manual so link faults never promote. */
    failover?: 'auto' | 'manual';
    secondaryArgs?: string[];
  } = {},
): Promise<Pair> {
  let replicationPort = 0;
  const startSecondary = async (env: NodeJS.ProcessEnv = {}) => {
    const s = await startNode(
      'secondary',
      secondaryArgs(
        path.join(dir, 'svm.img'),
        opts.secondarySize ?? size,
        path.join(dir, 'svm-state'),
        ['--failover', opts.failover ?? 'manual', ...(opts.secondaryArgs ?? [])],
        replicationPort,
      ),
      env,
    );
    replicationPort = Number(s.info.replicationPort);
    return s;
  };
  const secondary = await startSecondary(opts.secondaryEnv);
  const peerPort = opts.proxy ? await opts.proxy(replicationPort) : replicationPort;
  const primary = await startNode('primary', [
    '--listen',
    '127.0.0.1:0',
    '--export',
    `disk0=${path.join(dir, 'pvm.img')},size=${size}`,
    '--state',
    path.join(dir, 'pvm-state'),
    '--peer',
    `127.0.0.1:${peerPort}`,
    '--control',
    '127.0.0.1:0',
    ...(opts.primaryArgs ?? []),
  ]);
  const pair: Pair = {
    dir,
    primary,
    secondary,
    get replicationPort() {
      return replicationPort;
    },
    startSecondary: async (env) => {
      pair.secondary = await startSecondary(env);
      return pair.secondary;
    },
    checkpoint: () => controlCall(primary.control, 'POST', '/checkpoint', { timeoutMs: 15_000 }),
    stop: async () => {
      for (const n of [pair.primary, pair.secondary]) {
        if (n.child.exitCode === null && n.child.signalCode === null) {
          n.child.kill('SIGCONT'); // a test may have frozen it
          n.child.kill('SIGTERM');
          const timer = setTimeout(() => n.child.kill('SIGKILL'), 5000);
          await n.exit;
          clearTimeout(timer);
        }
      }
    },
  };
  return pair;
}

/**
 * Wait until the primary's link to the secondary is up and the secondary is
 * synchronised (the first connection of a pair runs a resync that compares
 * the two disks by hash). Returns the primary's status.
 */
export async function waitLinkUp(
  primary: NodeProc,
  timeoutMs = 10_000,
): Promise<{ epoch: number; peerState: string }> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await controlCall<{
      epoch: number;
      peerState: string;
      link: { state: string; lastError: string | null };
    }>(primary.control, 'GET', '/status');
    if (s.link.state === 'connected' && s.peerState === 'protected') return s;
    if (Date.now() > deadline)
      throw new Error(
        `link did not come up: ${s.link.lastError} (peer ${s.peerState})\nprimary log:\n${primary.stderr().slice(-3000)}`,
      );
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** sha256 of a whole export, read over NBD. */
export async function hashExport(port: number, name = 'disk0'): Promise<string> {
  const c = await NbdClient.connect({ port, exportName: name });
  const h = createHash('sha256');
  const chunk = 4 * 1024 * 1024;
  for (let off = 0; off < c.size; off += chunk) h.update(await c.read(off, Math.min(chunk, c.size - off)));
  await c.close();
  return h.digest('hex');
}

/** sha256 of both nodes' exports, read at once: [primary, secondary]. */
export function pairHashes(pair: {
  primary: { nbdPort: number };
  secondary: { nbdPort: number };
}): Promise<[string, string]> {
  return Promise.all([hashExport(pair.primary.nbdPort), hashExport(pair.secondary.nbdPort)]);
}

/**
 * A TCP proxy for the replication link that can cut the stream: after
 * `cutAfterBytes` bytes from the client (mid-frame, typically) it destroys
 * both sides, and while `blackhole` is set it refuses new connections.
 */
export class FaultProxy {
  private server: net.Server;
  private sockets = new Set<net.Socket>();
  cutAfterBytes = Infinity;
  refuse = false;
  forwarded = 0;
  port = 0;

  constructor(private readonly target: number) {
    this.server = net.createServer((client) => this.accept(client));
  }

  async listen(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', () => r()));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this.port;
  }

  private accept(client: net.Socket): void {
    if (this.refuse) {
      client.destroy();
      return;
    }
    const upstream = net.connect({ host: '127.0.0.1', port: this.target });
    this.sockets.add(client);
    this.sockets.add(upstream);
    const cut = () => {
      client.destroy();
      upstream.destroy();
    };
    client.on('data', (d: Buffer) => {
      const left = this.cutAfterBytes - this.forwarded;
      if (left <= 0) return cut();
      if (d.length > left) {
        upstream.write(d.subarray(0, left));
        this.forwarded += left;
        return setImmediate(cut);
      }
      this.forwarded += d.length;
      upstream.write(d);
    });
    upstream.on('data', (d: Buffer) => client.write(d));
    for (const s of [client, upstream]) {
      s.on('error', cut);
      s.on('close', () => {
        this.sockets.delete(s);
        cut();
      });
    }
  }

  /** Cut every live connection now. */
  cutAll(): void {
    for (const s of this.sockets) s.destroy();
  }

  async close(): Promise<void> {
    this.cutAll();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
