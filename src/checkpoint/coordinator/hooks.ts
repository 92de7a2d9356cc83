/**
 * What the coordinator drives: the memory-checkpoint hook of each VM and the
 * disk pair. The guest (src/guest/) is the first VM behind the hook; a
 * hypervisor fits behind the same calls (QEMU over QMP: `stop` for pause,
 * `migrate` of device state plus the RAM pages the PVM dirtied for save,
 * `migrate-incoming` for load, `cont` for resume).
 *
 * One interface for both roles, because roles swap: after a failover the SVM
 * is the PVM of the next pairing.
 */
import { ColoError } from '../../errors.js';
import type { Positions } from '../../net/comparer/comparer.js';
import type { Endpoint } from '../../util/address.js';

export interface VmProbe {
  /** State bytes changed since the last checkpoint (what the next save would carry), if the VM knows. */
  dirtyBytes: number | null;
  /** The VM's configuration, which must be the same on both sides of a pair (null: cannot say). */
  identity: string | null;
  /**
   * An SVM that does not run until failover (a QEMU standby holding the last
   * committed memory): nothing listens at its data address, so the comparer
   * connects no client to it, and it can be paired in remus mode only.
   */
  standby: boolean;
  /**
   * Its state can be captured while paused (`capture`) and sent after it runs
   * again: the coordinator then resumes it before the send and the commit,
   * holding its output meanwhile (Remus's speculative execution; in colo
   * mode its output waits for the SVM's from the checkpoint's state).
   */
  earlyResume: boolean;
}

export interface VmHook {
  /** For messages: where its control is. */
  readonly name: string;
  /** Where the service it runs listens (the comparer connects there). */
  readonly data: Endpoint;
  /**
   * Stop the VM with its in-flight I/O drained (every write it acknowledged
   * is on its disk). Returns where it stands on each connection, by the
   * comparer's local port; null when it cannot say (a real VM: the comparer
   * then takes every byte received before the pause).
   */
  pause(): Promise<Positions | null>;
  resume(): Promise<void>;
  /** Where its memory-checkpoint hook listens (another VM sends its state there). */
  readonly control: Endpoint;
  /**
   * PVM: send the state to `to` directly (not through the coordinator): what
   * changed since its last checkpoint, or everything if `full`. `to` holds it
   * until load or discard. `captured`: send what `capture` took at the pause
   * (the VM may be running again). Returns the bytes sent.
   */
  sendState(full: boolean, to: VmHook, captured?: boolean): Promise<{ bytes: number }>;
  /** PVM, paused, when its probe says `earlyResume`: take the state for a later `sendState(…, captured)`. */
  capture(full: boolean): Promise<void>;
  /** PVM: the checkpoint of its last sent state is decided; changes count from here. */
  checkpointed(): Promise<void>;
  /**
   * SVM: drop its own changes, apply the received state, move each connection to `targets[port]`.
   * `checkpoint` names the checkpoint: the same load again, after one that took effect but whose
   * answer was lost, succeeds and does nothing (a failover loads again what it cannot know loaded).
   */
  load(targets: Record<string, number>, checkpoint: string): Promise<void>;
  /** SVM: a received state that will not be loaded. */
  discard(): Promise<void>;
  /**
   * A hash of the state (to verify SVM = PVM), null if the VM cannot give one.
   * `captured`: the checkpoint's PVM ran again after its capture (early
   * resume): a PVM hashes the state as of its last capture; an SVM, as always,
   * its own (loaded) state.
   */
  hash(captured: boolean): Promise<string | null>;
  /**
   * A hash of the disk as the VM sees it, null if it cannot give one.
   * `captured`: as `hash`, both sides cover only what the state as of the
   * capture holds (the PVM has written past it since).
   */
  diskHash(captured: boolean): Promise<string | null>;
  /** Liveness; throws when the VM cannot be reached. */
  probe(timeoutMs: number): Promise<VmProbe>;
}

/**
 * A PVM's send of what `capture` took (`sendState(…, captured)`): that capture, which a send takes
 * once, and of the kind (full or not) the send names; else EINVAL.
 */
export function takeCapture<T extends { full: boolean }>(c: T | null, full: boolean): T {
  if (!c) throw new ColoError('EINVAL', 'send: nothing was captured since the last send');
  if (c.full !== full)
    throw new ColoError(
      'EINVAL',
      `send: the capture was ${c.full ? '' : 'not '}full, the send ${full ? '' : 'not '}full`,
    );
  return c;
}

export interface DiskProbe {
  /** Bytes written in the open epoch (what the next checkpoint's disk part carries). */
  pendingBytes: number;
}

/** The disk pair as the coordinator drives it (disk.ts: over the nodes' control APIs). */
export interface DiskHook {
  readonly primary: Endpoint;
  secondary: Endpoint | null;
  /** Seal the open epoch: every write acknowledged so far is in it. */
  seal(): Promise<{ epoch: number; writes: number; bytes: number }>;
  /** Wait until the secondary holds the epoch durably. */
  durable(epoch: number): Promise<void>;
  commit(epoch: number): Promise<void>;
  /** The secondary becomes the primary; `commitThrough` is committed first. */
  promote(
    reason: string,
    commitThrough?: number,
  ): Promise<{ generation: number; committed: number; droppedEpochs: number[] }>;
  primaryStatus(
    timeoutMs: number,
  ): Promise<{ peerState: string; pending?: { state: string; bytes: number }[] }>;
  secondaryStatus(timeoutMs: number): Promise<{ failover?: 'auto' | 'manual'; committedEpoch?: number }>;
  /** After a failover: the promoted secondary as the primary of a pair without a secondary. */
  promoted(): DiskHook;
}
