/** The memory-checkpoint hook over a VM's control API: the guest's (src/guest/node.ts) or a QEMU agent's (src/checkpoint/qemu/agent.ts). */
import { controlCall } from '../control.js';
import type { Positions } from '../../net/comparer/comparer.js';
import type { Endpoint } from '../../util/address.js';
import type { VmHook, VmProbe } from './hooks.js';

export class GuestVm implements VmHook {
  readonly name: string;

  constructor(
    readonly data: Endpoint,
    readonly control: Endpoint,
    private readonly timeoutMs = 10_000,
  ) {
    this.name = `VM at ${control.host}:${control.port}`;
  }

  private post<T = Record<string, unknown>>(path: string, body?: object): Promise<T> {
    return controlCall<T>(this.control, 'POST', path, body ?? {}, this.timeoutMs);
  }

  async pause(): Promise<Positions> {
    return (await this.post<{ conns: Positions }>('/mem/pause')).conns;
  }

  async resume(): Promise<void> {
    await this.post('/mem/resume');
  }

  async sendState(full: boolean, to: VmHook, captured = false): Promise<{ bytes: number }> {
    return this.post<{ bytes: number }>('/mem/send', {
      to: `${to.control.host}:${to.control.port}`,
      full,
      captured,
    });
  }

  async capture(full: boolean): Promise<void> {
    await this.post('/mem/capture', { full });
  }

  async checkpointed(): Promise<void> {
    await this.post('/mem/checkpointed');
  }

  async load(targets: Record<string, number>, checkpoint: string): Promise<void> {
    await this.post('/mem/load', { targets, checkpoint });
  }

  async discard(): Promise<void> {
    await this.post('/mem/discard');
  }

  async hash(captured: boolean): Promise<string | null> {
    return (
      await controlCall<{ hash: string | null }>(
        this.control,
        'GET',
        captured ? '/hash?captured=1' : '/hash',
        undefined,
        this.timeoutMs,
      )
    ).hash;
  }

  /** The disk the guest uses (its log): equal states cover the same range. Null: the VM cannot say. */
  async diskHash(captured: boolean): Promise<string | null> {
    const r = await controlCall<{ hash: string | null; bytes: number | null }>(
      this.control,
      'GET',
      captured ? '/disk-hash?captured=1' : '/disk-hash',
      undefined,
      this.timeoutMs,
    );
    return r.hash === null ? null : `${r.bytes}:${r.hash}`;
  }

  async probe(timeoutMs: number): Promise<VmProbe> {
    const s = await controlCall<{
      dirtyBytes?: number;
      identity?: string;
      standby?: boolean;
      earlyResume?: boolean;
    }>(this.control, 'GET', '/status', undefined, timeoutMs);
    return {
      dirtyBytes: s.dirtyBytes ?? null,
      identity: s.identity ?? null,
      standby: s.standby === true,
      earlyResume: s.earlyResume === true,
    };
  }
}
