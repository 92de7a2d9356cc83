/**
 * The whole COLO loop as real processes: a disk pair (primary and secondary,
 * the secondary with --failover manual), a guest on each side (the PVM on
 * the primary's export, the SVM on the secondary's), and `colo-blk colo` in
 * front of them.
 */
import { controlCall } from '../src/checkpoint/control.js';
import { startNode, startPair, type NodeProc, type Pair } from './replication-helpers.js';

export interface ColoStack {
  pair: Pair;
  pvm: NodeProc;
  svm: NodeProc;
  colo: NodeProc;
  /** Where clients connect. */
  port: number;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  status: () => Promise<any>;
  checkpoints: () => Record<string, unknown>[];
  waitState: (state: string, timeoutMs?: number) => Promise<void>;
  stop: () => Promise<void>;
}

export interface ColoStackOptions {
  mode?: 'colo' | 'remus' | 'none';
  nondeterminism?: number;
  size?: string;
  coloArgs?: string[];
  guestArgs?: string[];
  /** Extra arguments of the disk nodes (TLS, tokens). */
  primaryArgs?: string[];
  secondaryArgs?: string[];
  /** The guests reach their disks over TLS (nbds://; give the credentials in guestArgs). */
  diskTls?: boolean;
}

export async function startGuest(nbdPort: number, args: string[] = [], tls = false): Promise<NodeProc> {
  return startNode('guest', [
    '--listen',
    '127.0.0.1:0',
    '--control',
    '127.0.0.1:0',
    '--disk',
    `${tls ? 'nbds' : 'nbd'}://127.0.0.1:${nbdPort}/disk0`,
    ...args,
  ]);
}

export async function startColoStack(dir: string, opts: ColoStackOptions = {}): Promise<ColoStack> {
  const pair = await startPair(dir, opts.size ?? '8M', {
    primaryArgs: opts.primaryArgs,
    secondaryArgs: opts.secondaryArgs,
  });
  const gargs = ['--nondeterminism', String(opts.nondeterminism ?? 0), ...(opts.guestArgs ?? [])];
  const [pvm, svm] = await Promise.all([
    startGuest(pair.primary.nbdPort, gargs, opts.diskTls),
    startGuest(pair.secondary.nbdPort, gargs, opts.diskTls),
  ]);
  const colo = await startNode('colo', [
    '--listen',
    '127.0.0.1:0',
    '--control',
    '127.0.0.1:0',
    '--mode',
    opts.mode ?? 'colo',
    '--pvm',
    `127.0.0.1:${pvm.info.port}`,
    '--pvm-control',
    `127.0.0.1:${pvm.info.controlPort}`,
    '--svm',
    `127.0.0.1:${svm.info.port}`,
    '--svm-control',
    `127.0.0.1:${svm.info.controlPort}`,
    '--primary-control',
    `127.0.0.1:${pair.primary.control.port}`,
    '--secondary-control',
    `127.0.0.1:${pair.secondary.control.port}`,
    ...(opts.coloArgs ?? []),
  ]);
  const status = () => controlCall(colo.control, 'GET', '/status');
  const stack: ColoStack = {
    pair,
    pvm,
    svm,
    colo,
    port: Number(colo.info.port),
    status,
    checkpoints: () => colo.events().filter((e) => e.event === 'checkpoint'),
    waitState: async (state, timeoutMs = 20_000) => {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const s = await status();
        if (s.state === state) return;
        if (Date.now() > deadline)
          throw new Error(
            `colo did not reach '${state}' (it is ${s.state}: ${s.lastError})\n${colo.stderr().slice(-3000)}`,
          );
        await new Promise((r) => setTimeout(r, 25));
      }
    },
    stop: async () => {
      for (const n of [colo, pvm, svm]) {
        if (n.child.exitCode === null && n.child.signalCode === null) {
          n.child.kill('SIGTERM');
          const t = setTimeout(() => n.child.kill('SIGKILL'), 3000);
          await n.exit;
          clearTimeout(t);
        }
      }
      await pair.stop();
    },
  };
  return stack;
}
