/**
 * `colo-blk colo`: the comparer and the coordinator as one process, with a
 * control API:
 *   GET  /status        mode, state, checkpoints by reason, phase times, held bytes, connections
 *   GET  /checkpoints   the last checkpoints (?limit=N)
 *   POST /checkpoint    a manual checkpoint; answers with its record
 *   POST /reprotect     pair a new SVM {svm, svmControl, secondaryControl}
 *   GET  /metrics       Prometheus text
 */
import { ColoError } from '../../errors.js';
import { Comparer } from '../../net/comparer/comparer.js';
import type { Mode } from '../../net/comparer/comparer.js';
import type { SessionLimits } from '../../net/comparer/session.js';
import type { Logger } from '../../net/server.js';
import { parseHostPort, type Endpoint } from '../../util/address.js';
import { ControlServer, numberParam, type Route } from '../control.js';
import { renderPrometheus } from '../metrics.js';
import { Coordinator, type CoordinatorOptions } from './coordinator.js';
import { DiskPair } from './disk.js';
import { GuestVm } from './guest-vm.js';

export interface ColoNodeOptions {
  listen: Endpoint;
  control: Endpoint;
  mode: Mode;
  pvm: Endpoint;
  pvmControl: Endpoint;
  svm: Endpoint | null;
  svmControl: Endpoint | null;
  primaryControl: Endpoint;
  secondaryControl: Endpoint | null;
  intervalMs: number;
  compareTimeoutMs: number;
  maxPendingBytes: number;
  heartbeatMs: number;
  failoverAfterMs: number;
  phaseTimeoutMs: number;
  verify: boolean;
  /** Resume a PVM that can be captured before the send and the commit (default true). */
  earlyResume?: boolean;
  limits?: Partial<SessionLimits>;
  logger: Logger;
}

export const COLO_DEFAULTS = {
  intervalMs: { colo: 5000, remus: 100, none: 0 } as Record<Mode, number>,
  compareTimeoutMs: 200,
  maxPendingBytes: 64 * 1024 * 1024,
  heartbeatMs: 100,
  failoverAfterMs: 500,
  phaseTimeoutMs: 10_000,
};

export class ColoNode {
  addresses!: { listen: Endpoint; control: Endpoint };

  private constructor(
    readonly comparer: Comparer,
    readonly coordinator: Coordinator,
    readonly control: ControlServer,
  ) {}

  static async start(opts: ColoNodeOptions): Promise<ColoNode> {
    if (opts.mode !== 'none' && (!opts.svm || !opts.svmControl || !opts.secondaryControl))
      throw new ColoError(
        'EUSAGE',
        `mode ${opts.mode} needs the SVM: --svm, --svm-control and --secondary-control (or --mode none for pass-through)`,
      );
    const comparer = new Comparer({
      mode: opts.mode,
      pvm: opts.pvm,
      compareTimeoutMs: opts.compareTimeoutMs,
      limits: opts.limits,
      logger: opts.logger,
    });
    const pvm = new GuestVm(opts.pvm, opts.pvmControl, opts.phaseTimeoutMs);
    const svm =
      opts.svm && opts.svmControl ? new GuestVm(opts.svm, opts.svmControl, opts.phaseTimeoutMs) : null;
    const copts: CoordinatorOptions = {
      mode: opts.mode,
      comparer,
      pvm,
      svm,
      disk: new DiskPair(opts.primaryControl, opts.secondaryControl, opts.phaseTimeoutMs),
      intervalMs: opts.intervalMs,
      maxPendingBytes: opts.maxPendingBytes,
      heartbeatMs: opts.heartbeatMs,
      failoverAfterMs: opts.failoverAfterMs,
      phaseTimeoutMs: opts.phaseTimeoutMs,
      verify: opts.verify,
      earlyResume: opts.earlyResume,
      logger: opts.logger,
    };
    const coordinator = new Coordinator(copts);
    const control = new ControlServer(coloRoutes(coordinator, comparer, opts.phaseTimeoutMs));
    const node = new ColoNode(comparer, coordinator, control);
    const l = await comparer.listen(opts.listen.port, opts.listen.host);
    const c = await control.listen(opts.control.port, opts.control.host);
    node.addresses = {
      listen: { host: l.address, port: l.port },
      control: { host: c.address, port: c.port },
    };
    coordinator.start();
    return node;
  }

  async close(): Promise<void> {
    await this.coordinator.close();
    await this.comparer.close();
    await this.control.close();
  }
}

export function coloRoutes(co: Coordinator, cmp: Comparer, timeoutMs: number): Route[] {
  const endpoint = (b: Record<string, unknown>, key: string) => {
    const v = b[key];
    if (typeof v !== 'string') throw new ColoError('EINVAL', `'${key}' (HOST:PORT) is required`);
    return parseHostPort(v, key);
  };
  return [
    {
      method: 'GET',
      path: '/status',
      handler: async (q) => ({
        ...co.status(),
        comparer: cmp.status(
          numberParam(q, {}, 'limit', { min: 0, max: 100_000, integer: true, fallback: 20 }),
        ),
      }),
    },
    {
      method: 'GET',
      path: '/checkpoints',
      handler: async (q) => {
        const limit = numberParam(q, {}, 'limit', { min: 0, max: 100_000, integer: true, fallback: 100 });
        return { checkpoints: limit === 0 ? [] : co.records.slice(-limit) };
      },
    },
    { method: 'POST', path: '/checkpoint', handler: async () => co.checkpointNow() },
    {
      method: 'POST',
      path: '/reprotect',
      handler: async (_q, b) =>
        co.reprotect(
          new GuestVm(endpoint(b, 'svm'), endpoint(b, 'svmControl'), timeoutMs),
          endpoint(b, 'secondaryControl'),
        ),
    },
    {
      method: 'GET',
      path: '/metrics',
      text: true,
      handler: async () => {
        const s = co.status();
        const c = cmp.status(0);
        return renderPrometheus([
          {
            name: 'colo_loop_protected',
            help: '1 while an SVM is paired',
            type: 'gauge',
            value: s.state === 'protected' ? 1 : 0,
          },
          ...Object.entries(s.byReason).map(([reason, v]) => ({
            name: 'colo_loop_checkpoints_total',
            help: 'Checkpoints by reason',
            type: 'counter' as const,
            value: v,
            labels: { reason },
          })),
          {
            name: 'colo_loop_checkpoint_failures_total',
            help: 'Checkpoints failed',
            type: 'counter',
            value: s.checkpointFailures,
          },
          {
            name: 'colo_loop_memory_bytes_total',
            help: 'Memory state sent',
            type: 'counter',
            value: s.memoryBytes,
          },
          { name: 'colo_loop_held_bytes', help: 'PVM output held', type: 'gauge', value: c.heldBytes },
          { name: 'colo_loop_connections', help: 'Client connections', type: 'gauge', value: c.connections },
          {
            name: 'colo_loop_released_bytes_total',
            help: 'Output released',
            type: 'counter',
            value: c.bytesReleased,
          },
        ]);
      },
    },
  ];
}
