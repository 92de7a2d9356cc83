/**
 * Two colo-blk nodes ('a' and 'b') in the simulator: each a disk (SimDisk +
 * SimMeta) that outlives its processes, and at most one running process, a
 * PrimaryReplica or a SecondaryReplica, on the simulated clock and network.
 * The actions are what an operator and the VMs do; after each one the
 * reference checks of `checks.ts` run.
 */
import type { BlockDevice } from '../../src/block/device.js';
import { PrimaryReplica } from '../../src/checkpoint/primary/replica.js';
import { SecondaryReplica } from '../../src/checkpoint/secondary/replica.js';
import { SecondaryStore } from '../../src/checkpoint/secondary/store.js';
import { readLayers } from '../../src/checkpoint/secondary/svm-view.js';
import { StateDir } from '../../src/checkpoint/state-dir.js';
import type { Tunables } from '../../src/limits.js';
import type { Env } from '../../src/sys/env.js';
import { SimImage } from './image.js';
import { SimMeta } from './meta.js';
import { SimNet } from './net.js';
import { SimDisk } from './storage.js';
import { Owner, type SimWorld } from './world.js';
import { HashPool } from '../../src/failover/reprotect/hash-pool.js';

export type NodeName = 'a' | 'b';
export const other = (n: NodeName): NodeName => (n === 'a' ? 'b' : 'a');

export const DISK = 1024 * 1024;
/** Hashing on the simulator's own thread: worker threads would make a run depend on real time. */
const INLINE_HASHING = new HashPool(0);
export const SECTOR = 512;
export const REPL_PORT = 900;
const STATE = '/state';
const IMAGE = '/disk.img';

export interface SimOptions {
  /** Small folds, partial resync commits and activity extents, so that all of them happen on a small disk. */
  tunables: Partial<Tunables>;
  heartbeat: { intervalMs: number; timeoutMs: number };
  loneAfterMs: number;
  failoverGraceMs: number;
}

export const defaultSimOptions: SimOptions = {
  tunables: {
    promotedFoldBytes: 48 * 1024,
    resyncCommitBytes: 128 * 1024,
    activityExtentBytes: 64 * 1024,
    replicationHighWaterBytes: 512 * 1024,
    replicationLowWaterBytes: 128 * 1024,
    replicationWindowBytes: 64 * 1024,
  },
  heartbeat: { intervalMs: 50, timeoutMs: 300 },
  loneAfterMs: 3000,
  failoverGraceMs: 400,
};

interface ProcBase {
  owner: Owner;
  env: Env;
  image: SimImage;
}
export type Proc =
  | (ProcBase & { kind: 'primary'; replica: PrimaryReplica })
  | (ProcBase & { kind: 'secondary'; replica: SecondaryReplica; autoFailover: boolean });

export class SimNode {
  /** Its disk (state directory and image) and metadata index: replaced with the hardware. */
  disk: SimDisk;
  meta = new SimMeta();
  proc: Proc | null = null;
  incarnation = 0;
  /** The last role this node was started in (what the operator knows). */
  lastStart: 'primary' | 'secondary' | null = null;

  constructor(
    readonly world: SimWorld,
    readonly name: NodeName,
  ) {
    this.disk = new SimDisk(world, name);
  }

  get up(): boolean {
    return this.proc !== null;
  }

  /** The secondary replica, if this node runs one. */
  get secondary(): SecondaryReplica | null {
    return this.proc?.kind === 'secondary' ? this.proc.replica : null;
  }

  /** The primary replica serving PVM writes here: a plain primary, or a re-protecting promoted node's. */
  get primary(): PrimaryReplica | null {
    if (this.proc?.kind === 'primary') return this.proc.replica;
    return this.proc?.kind === 'secondary' ? this.proc.replica.primary : null;
  }

  /** Does this node serve the disk as its own (a primary, or a promoted secondary)? */
  get serving(): boolean {
    return this.proc?.kind === 'primary' || (this.secondary?.store.promoted ?? null) !== null;
  }

  /** The device the VM on this node writes to. */
  get device(): BlockDevice | null {
    if (!this.proc) return null;
    return this.proc.kind === 'primary' ? this.proc.replica.device : this.proc.replica.exportDevice;
  }

  /** The generation id this node writes under (its history's last), or null. */
  get generationId(): string | null {
    const h = this.proc?.kind === 'primary' ? this.proc.replica.history : this.secondary?.history;
    return h?.last?.id ?? null;
  }
}

export class Cluster {
  readonly net: SimNet;
  readonly nodes: Record<NodeName, SimNode>;
  readonly log: string[] = [];
  crashes = 0;
  readonly tunables: Partial<Tunables>;

  constructor(
    readonly world: SimWorld,
    readonly opts: SimOptions = defaultSimOptions,
  ) {
    this.net = new SimNet(world);
    this.tunables = opts.tunables;
    this.nodes = { a: new SimNode(world, 'a'), b: new SimNode(world, 'b') };
  }

  note(msg: string): void {
    this.log.push(`[${this.world.t}ms] ${msg}`);
    if (this.log.length > 2000) this.log.splice(0, this.log.length - 2000);
  }

  private envFor(node: SimNode, owner: Owner): Env {
    return {
      storage: node.disk.mount(owner),
      clock: this.world.clock(owner),
      random: this.world.random(),
      net: this.net.forHost(node.name, owner),
      hashing: INLINE_HASHING,
    };
  }

  private logger(node: SimNode) {
    const say = (level: string) => (msg: string) =>
      this.note(`${node.name}#${node.incarnation} ${level} ${msg}`);
    return { debug: () => {}, info: say('info'), warn: say('warn') };
  }

  private newProcess(node: SimNode): { owner: Owner; env: Env; image: SimImage } {
    if (node.proc) throw new Error(`node ${node.name} is already running`);
    node.incarnation++;
    const owner = new Owner(`${node.name}#${node.incarnation}`);
    const env = this.envFor(node, owner);
    const image = new SimImage(env.storage, IMAGE, DISK, this.world.rng);
    return { owner, env, image };
  }

  /** Start `colo-blk primary` on a node, replicating to the other. */
  /**
   * Called once a restarted node has opened its state and before it talks to
   * its peer: what it serves then is what survived the crash.
   */
  afterOpen: ((name: NodeName, read: () => Promise<Buffer>) => Promise<void>) | null = null;

  private async opened(name: NodeName, dev: BlockDevice): Promise<void> {
    if (!this.afterOpen) return;
    await this.afterOpen(name, async () => {
      const buf = Buffer.allocUnsafe(DISK);
      const r = await this.world.await(dev.pread(buf, 0), 1000);
      if (!r?.ok) throw new Error(`${name}: cannot read its disk after a restart`);
      return buf;
    });
  }

  async startPrimary(name: NodeName): Promise<boolean> {
    const node = this.nodes[name];
    const { owner, env, image } = this.newProcess(node);
    const p = PrimaryReplica.open(env, new StateDir(STATE, env.storage), image, {
      exportName: 'disk0',
      image: IMAGE,
      peer: { host: other(name), port: REPL_PORT },
      heartbeat: this.opts.heartbeat,
      loneAfterMs: this.opts.loneAfterMs,
      tunables: this.tunables,
      meta: node.meta.open(() => owner.alive),
      logger: this.logger(node),
    });
    const r = await this.world.await(p, 5000);
    if (!r || !r.ok) {
      owner.alive = false;
      this.note(`${name}: primary refused to start: ${r ? r.error.message : 'timeout'}`);
      return false;
    }
    await this.opened(name, r.value.device);
    r.value.start();
    node.proc = { kind: 'primary', owner, env, image, replica: r.value };
    node.lastStart = 'primary';
    this.note(`${name}: started as primary`);
    return true;
  }

  /** Start `colo-blk secondary` on a node. */
  async startSecondary(
    name: NodeName,
    flags: { rejoin?: boolean; discardMyData?: boolean; autoFailover?: boolean } = {},
  ): Promise<boolean> {
    const node = this.nodes[name];
    const { owner, env, image } = this.newProcess(node);
    const p = SecondaryReplica.open(env, new StateDir(STATE, env.storage), image, {
      exportName: 'disk0',
      image: IMAGE,
      heartbeat: this.opts.heartbeat,
      failover: flags.autoFailover ? 'auto' : 'manual',
      failoverGraceMs: this.opts.failoverGraceMs,
      rejoin: flags.rejoin,
      discardMyData: flags.discardMyData,
      tunables: this.tunables,
      meta: node.meta.open(() => owner.alive),
      logger: this.logger(node),
    });
    const r = await this.world.await(p, 5000);
    if (!r || !r.ok) {
      owner.alive = false;
      this.note(`${name}: secondary refused to start: ${r ? r.error.message : 'timeout'}`);
      return false;
    }
    await this.opened(name, r.value.exportDevice);
    const l = await this.world.await(r.value.listen(REPL_PORT, name), 1000);
    if (!l?.ok) throw new Error(`${name}: cannot listen`);
    node.proc = {
      kind: 'secondary',
      owner,
      env,
      image,
      replica: r.value,
      autoFailover: !!flags.autoFailover,
    };
    node.lastStart = 'secondary';
    this.note(`${name}: started as secondary ${JSON.stringify(flags)}`);
    return true;
  }

  /** SIGKILL alone: the process dies, what it wrote stays (in the page cache), unsynced. */
  kill(name: NodeName): void {
    const node = this.nodes[name];
    if (!node.proc) return;
    node.proc.owner.alive = false;
    this.net.killHost(node.proc.owner);
    node.proc = null;
    node.disk.kill();
    this.note(`${name}: KILLED (no power cut)`);
  }

  /** SIGKILL and a power cut: the process dies, unsynced data may be lost or torn. */
  crash(name: NodeName, policy: 'random' | 'lose-unsynced' = 'random'): void {
    const node = this.nodes[name];
    if (!node.proc) return;
    node.proc.owner.alive = false;
    this.net.killHost(node.proc.owner);
    node.proc = null;
    const r = node.disk.crash(policy);
    node.meta.crash(this.world.rng);
    this.crashes++;
    this.note(`${name}: CRASH (lost ${r.lost}, kept ${r.kept}, torn ${r.torn}, names lost ${r.namesLost})`);
  }

  /**
   * An operator's repair on a stopped node: a new disk (`all`: an empty image,
   * no state), or the state directory and metadata index deleted with the
   * image kept as it was (`state`). Either way the node starts again as a
   * node the pair has never seen.
   */
  replaceDisk(name: NodeName, what: 'all' | 'state'): void {
    const node = this.nodes[name];
    if (node.proc) throw new Error(`node ${name} is running`);
    if (what === 'all') node.disk = new SimDisk(this.world, name);
    else {
      node.disk.removeTree(STATE);
      node.disk.syncNames();
    }
    node.meta = new SimMeta();
    node.lastStart = null;
    this.note(
      `${name}: ${what === 'all' ? 'disk replaced (empty image, no state)' : 'state directory deleted'}`,
    );
  }

  /**
   * `colo-blk recover --state` on a stopped node's secondary store (a
   * secondary's or a promoted node's): opened as the command opens it (no
   * history, no activity log), every committed epoch and folded overlay
   * applied, closed. `crashAfterMs`: the power fails that long into it.
   */
  async recover(name: NodeName, crashAfterMs: number | null): Promise<void> {
    const node = this.nodes[name];
    const { owner, env, image } = this.newProcess(node);
    const run = async () => {
      const store = await SecondaryStore.open(new StateDir(STATE, env.storage), image, {
        meta: node.meta.open(() => owner.alive),
        clock: env.clock,
        random: env.random,
        hashing: env.hashing,
        log: (m) => this.note(`${name} recover: ${m}`),
      });
      await store.drainApply();
      await store.close();
    };
    const done = run();
    const r = await this.world.await(
      crashAfterMs === null ? done : Promise.race([done, new Promise<void>(() => {})]),
      crashAfterMs ?? 20_000,
    );
    owner.alive = false;
    if (crashAfterMs !== null && !r) {
      const c = node.disk.crash('random');
      node.meta.crash(this.world.rng);
      this.crashes++;
      this.note(
        `${name}: recover cut by a power failure after ${crashAfterMs} ms (lost ${c.lost}, torn ${c.torn})`,
      );
      return;
    }
    this.note(`${name}: recover ${r?.ok ? 'done' : `failed: ${r ? r.error.message : 'no answer'}`}`);
  }

  /** What a secondary holds as the PVM's disk at its last commit (image + committed layers, no overlay). */
  async committedView(name: NodeName): Promise<Buffer | null> {
    const s = this.nodes[name].secondary;
    if (!s) return null;
    const buf = Buffer.allocUnsafe(DISK);
    await readLayers(s.store.committedLayers(), s.store.image, buf, 0);
    return buf;
  }

  /** The whole disk as the VM on a node sees it. */
  async read(name: NodeName): Promise<Buffer | null> {
    const dev = this.nodes[name].device;
    if (!dev) return null;
    const buf = Buffer.allocUnsafe(DISK);
    const r = await this.world.await(dev.pread(buf, 0), 1000);
    return r?.ok ? buf : null;
  }
}
