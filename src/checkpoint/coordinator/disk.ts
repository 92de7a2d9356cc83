/**
 * The disk half as the coordinator drives it: the primary's two-phase
 * checkpoint API (seal, durable, commit) and the secondary's failover, over
 * their control APIs.
 */
import { controlCall } from '../control.js';
import type { Endpoint } from '../../util/address.js';
import type { DiskHook } from './hooks.js';

export interface PrimaryDiskStatus {
  peerState: string;
  epoch: number;
  pending: { epoch: number; state: string; bytes: number }[];
}

export interface SecondaryDiskStatus {
  role: string;
  failover?: 'auto' | 'manual';
  committedEpoch: number;
}

export class DiskPair implements DiskHook {
  constructor(
    public primary: Endpoint,
    public secondary: Endpoint | null,
    private readonly timeoutMs = 10_000,
  ) {}

  private post<T>(at: Endpoint, path: string, body: object): Promise<T> {
    return controlCall<T>(at, 'POST', path, { timeoutMs: this.timeoutMs, ...body }, this.timeoutMs + 1000);
  }

  /** Seal the open epoch (after the PVM is paused): every write acknowledged so far is in it. */
  seal(): Promise<{ epoch: number; writes: number; bytes: number }> {
    return this.post(this.primary, '/seal', {});
  }

  /** Wait until the secondary holds the epoch durably. */
  async durable(epoch: number): Promise<void> {
    await this.post(this.primary, '/durable', { epoch });
  }

  async commit(epoch: number): Promise<void> {
    await this.post(this.primary, '/commit', { epoch });
  }

  /** The secondary becomes the primary; `commitThrough` is committed first (see SecondaryStore.promote). */
  promote(
    reason: string,
    commitThrough?: number,
  ): Promise<{ generation: number; committed: number; droppedEpochs: number[]; ms: number }> {
    if (!this.secondary) throw new Error('no secondary to promote');
    return this.post(this.secondary, '/failover', { reason, commit: commitThrough });
  }

  promoted(): DiskPair {
    if (!this.secondary) throw new Error('no secondary was promoted');
    return new DiskPair(this.secondary, null, this.timeoutMs);
  }

  primaryStatus(timeoutMs: number): Promise<PrimaryDiskStatus> {
    return controlCall<PrimaryDiskStatus>(this.primary, 'GET', '/status', undefined, timeoutMs);
  }

  secondaryStatus(timeoutMs: number): Promise<SecondaryDiskStatus> {
    if (!this.secondary) throw new Error('no secondary');
    return controlCall<SecondaryDiskStatus>(this.secondary, 'GET', '/status', undefined, timeoutMs);
  }
}
