// The coordinator's decisions (src/checkpoint/coordinator/), with the VMs and
// the disk pair played by the test behind the hook interfaces: the order of a
// checkpoint's phases, coalescing, a failed phase that releases nothing, and
// a failover before and after the cut.
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { Coordinator, type CoordinatorOptions } from '../src/checkpoint/coordinator/coordinator.js';
import type { DiskHook, VmHook } from '../src/checkpoint/coordinator/hooks.js';
import { Comparer } from '../src/net/comparer/comparer.js';

const quiet = { info: () => {}, warn: () => {}, debug: () => {} };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const never = () => new Promise<never>(() => {});
const refused = () => Promise.reject(new Error('connect ECONNREFUSED 127.0.0.1:1'));

type Step = (...args: unknown[]) => Promise<unknown>;

/** A VM behind the hook: logs each call; `on[name]` replaces a call's behaviour. */
function fakeVm(
  name: string,
  log: string[],
  identity = 'fake',
  kind: { standby?: boolean; earlyResume?: boolean } = {},
) {
  const on: Record<string, Step> = {};
  let dead = false;
  const call = <T>(op: string, result: T, ...args: unknown[]) => {
    log.push(`${name}.${op}`);
    if (dead) return refused() as Promise<T>;
    return (on[op]?.(...args) as Promise<T>) ?? Promise.resolve(result);
  };
  const vm: VmHook & { on: typeof on; kill: () => void } = {
    name,
    data: { host: '127.0.0.1', port: 1 },
    on,
    kill: () => (dead = true),
    // A real VM (QEMU) cannot say where it stands on each connection.
    pause: () => call('pause', identity === 'qemu' ? null : {}),
    resume: () => call('resume', undefined),
    control: { host: '127.0.0.1', port: 1 },
    sendState: (full: boolean) => {
      log.push(`${name}.send${full ? '-full' : ''}`);
      return dead
        ? refused()
        : ((on['send']?.() as Promise<{ bytes: number }>) ?? Promise.resolve({ bytes: 5 }));
    },
    capture: () => call('capture', undefined),
    checkpointed: () => call('checkpointed', undefined),
    load: (_targets: Record<string, number>, checkpoint: string) => call('load', undefined, checkpoint),
    discard: () => call('discard', undefined),
    hash: () => call('hash', 'h'),
    diskHash: () => call('diskHash', 'd'),
    probe: () =>
      dead
        ? refused()
        : ((on['probe']?.() as Promise<never> | undefined) ??
          Promise.resolve({
            dirtyBytes: 0,
            identity,
            standby: kind.standby === true,
            earlyResume: kind.earlyResume === true,
          })),
  };
  return vm;
}

function fakeDisk(log: string[]) {
  const on: Record<string, Step> = {};
  let epoch = 1;
  let primaryDead = false;
  const call = <T>(op: string, result: T) => {
    log.push(`disk.${op}`);
    return (on[op]?.() as Promise<T>) ?? Promise.resolve(result);
  };
  const disk: DiskHook & { on: typeof on; killPrimary: () => void; promotions: (number | undefined)[] } = {
    primary: { host: '127.0.0.1', port: 2 },
    secondary: { host: '127.0.0.1', port: 3 },
    on,
    promotions: [],
    killPrimary: () => (primaryDead = true),
    seal: () => call('seal', { epoch: ++epoch, writes: 1, bytes: 512 }),
    durable: (e) => call(`durable ${e}`, undefined),
    commit: (e) => call(`commit ${e}`, undefined),
    promote: (_reason, commit) => {
      disk.promotions.push(commit);
      log.push(`disk.promote ${commit ?? '-'}`);
      return Promise.resolve({ generation: 2, committed: commit ?? epoch - 1, droppedEpochs: [] });
    },
    primaryStatus: () => (primaryDead ? refused() : Promise.resolve({ peerState: 'protected', pending: [] })),
    secondaryStatus: () => Promise.resolve({ failover: 'manual' as const }),
    promoted: () => disk,
  };
  return disk;
}

/** A coordinator as the tests run it: no interval, a fast heartbeat, quiet. */
function coordinator(
  o: Pick<CoordinatorOptions, 'mode' | 'comparer' | 'pvm' | 'svm' | 'disk'> & Partial<CoordinatorOptions>,
) {
  return new Coordinator({
    intervalMs: 600_000,
    maxPendingBytes: 1 << 30,
    heartbeatMs: 20,
    failoverAfterMs: 100,
    phaseTimeoutMs: 5000,
    verify: false,
    logger: quiet,
    ...o,
  });
}

const running: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const f of running.splice(0)) await f();
});

async function setup(extra: Partial<CoordinatorOptions> = {}, pvmKind: { earlyResume?: boolean } = {}) {
  const log: string[] = [];
  const pvm = fakeVm('pvm', log, 'fake', pvmKind);
  const svm = fakeVm('svm', log);
  const disk = fakeDisk(log);
  const comparer = new Comparer({ mode: 'colo', pvm: pvm.data, compareTimeoutMs: 200, logger: quiet });
  const co = coordinator({ mode: 'colo', comparer, pvm, svm, disk: disk, ...extra });
  co.start();
  running.push(() => co.close());
  for (let i = 0; co.state !== 'protected'; i++) {
    if (i > 200) throw new Error(`never protected: ${co.lastError}`);
    await sleep(10);
  }
  log.length = 0;
  return { log, pvm, svm, disk, co };
}

/** The primary side dies (the PVM and the primary disk node); wait until the coordinator has failed over. */
async function losePrimary(
  pvm: ReturnType<typeof fakeVm>,
  disk: ReturnType<typeof fakeDisk>,
  co: Coordinator,
): Promise<void> {
  pvm.kill();
  disk.killPrimary();
  for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
}

const before = (log: string[], a: string, b: string) => {
  expect(log.indexOf(a), `${a} in ${log.join(', ')}`).toBeGreaterThanOrEqual(0);
  expect(log.indexOf(a), `${a} before ${b} in ${log.join(', ')}`).toBeLessThan(log.indexOf(b));
};

describe('coordinator', () => {
  it('pairs with a full checkpoint, then runs each phase in order', async () => {
    const { log, co } = await setup();
    expect(co.records[0]).toMatchObject({ full: true, reasons: ['pair'] });
    const r = await co.checkpointNow();
    expect(r.reasons).toEqual(['manual']);
    const e = r.epoch;
    before(log, 'svm.pause', 'pvm.pause');
    before(log, 'pvm.pause', 'disk.seal');
    before(log, 'pvm.pause', 'pvm.send');
    before(log, `disk.durable ${e}`, 'svm.load');
    before(log, 'pvm.send', 'svm.load');
    before(log, `disk.durable ${e}`, `disk.commit ${e}`);
    before(log, 'pvm.send', 'pvm.checkpointed');
    before(log, `disk.durable ${e}`, 'pvm.checkpointed');
    // The PVM runs again once the cut decided the epoch and its dirty set restarted: it does not wait
    // for the SVM's load or the disk commit. The SVM resumes only after both.
    before(log, 'pvm.checkpointed', 'pvm.resume');
    before(log, 'svm.load', 'svm.resume');
    before(log, `disk.commit ${e}`, 'svm.resume');
    expect(log).not.toContain('svm.discard');
  });

  it('the PVM runs again while the SVM is still loading, and the SVM resumes after its load', async () => {
    const { log, co, svm } = await setup();
    let loaded!: () => void;
    svm.on['load'] = () => new Promise<void>((r) => (loaded = r));
    const done = co.checkpointNow();
    for (let i = 0; !log.includes('pvm.resume') && i < 200; i++) await sleep(5);
    expect(log).toContain('pvm.resume');
    expect(log).not.toContain('svm.resume');
    delete svm.on['load'];
    loaded();
    const r = await done;
    before(log, 'pvm.resume', 'svm.resume');
    expect(r.pauseMs).toBeLessThan(r.totalMs);
  });

  for (const earlyResume of [true, false])
    it(`colo with a PVM that can be captured: ${earlyResume ? 'it runs again before the send; the SVM stays paused until its load' : '--no-early-resume keeps it paused until the cut'}`, async () => {
      const { log, co } = await setup({ earlyResume }, { earlyResume: true });
      const r = await co.checkpointNow();
      const e = r.epoch;
      before(log, 'svm.pause', 'pvm.pause');
      before(log, 'svm.load', 'svm.resume');
      before(log, `disk.commit ${e}`, 'svm.resume');
      if (earlyResume) {
        before(log, 'pvm.pause', 'pvm.capture');
        before(log, 'disk.seal', 'pvm.resume');
        before(log, 'pvm.capture', 'pvm.resume');
        before(log, 'pvm.resume', 'pvm.send');
        before(log, 'pvm.resume', `disk.durable ${e}`);
        before(log, 'pvm.send', 'svm.load');
      } else {
        expect(log).not.toContain('pvm.capture');
        before(log, 'pvm.send', 'pvm.resume');
        before(log, `disk.durable ${e}`, 'pvm.resume');
      }
      expect(r.svmPauseMs).not.toBeNull();
      expect(r.svmPauseMs!).toBeGreaterThanOrEqual(r.pauseMs);
    });

  it('the SVM fails its load after the PVM runs again: unprotected, the PVM is not paused again', async () => {
    const { log, co, svm } = await setup();
    svm.on['load'] = () => Promise.reject(new Error('the SVM could not load the state'));
    co.request('mismatch');
    for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
    expect(co.state).toBe('unprotected');
    expect(co.failovers).toHaveLength(0);
    expect(co.lastError).toMatch(/after the cut.*could not load/);
    // The PVM ran again beside the failed load, and nothing paused it afterwards.
    before(log, 'pvm.checkpointed', 'pvm.resume');
    expect(log.filter((l) => l === 'pvm.pause')).toHaveLength(1);
    expect(log.slice(log.indexOf('pvm.resume'))).not.toContain('pvm.pause');
    expect(log).not.toContain('svm.resume');
  });

  it('with verify, the PVM stays paused until both hashes are compared', async () => {
    const { log, co } = await setup({ verify: true });
    const r = await co.checkpointNow();
    expect(r.verified).toMatchObject({ state: true, disk: true });
    before(log, 'svm.load', 'pvm.resume');
    before(log, 'pvm.hash', 'pvm.resume');
    before(log, 'svm.hash', 'pvm.resume');
  });

  it('coalesces requests that arrive together into one checkpoint', async () => {
    const { co, disk } = await setup();
    let release!: () => void;
    disk.on['seal'] = () =>
      new Promise<void>((r) => (release = r)).then(() => ({ epoch: 50, writes: 0, bytes: 0 }));
    co.request('mismatch');
    await sleep(20);
    for (let i = 0; i < 5; i++) co.request('timeout');
    co.request('queue');
    delete disk.on['seal'];
    release();
    await sleep(100);
    // Everything asked for until the cut is folded into the checkpoint under way.
    expect(co.records.slice(1).map((r) => r.reasons)).toEqual([['mismatch', 'timeout', 'queue']]);
  });

  it('a phase that fails before the cut releases nothing: the SVM discards, both resume, and it is tried again', async () => {
    const { log, co, disk } = await setup();
    let fail = true;
    disk.on[`durable 3`] = () => (fail ? Promise.reject(new Error('injected failure')) : Promise.resolve());
    co.request('mismatch');
    for (let i = 0; co.counts.failures === 0 && i < 100; i++) await sleep(10);
    expect(co.counts.failures).toBe(1);
    await sleep(20);
    expect(log).toContain('svm.discard');
    expect(log).not.toContain('svm.load');
    expect(log.filter((l) => l.startsWith('disk.commit'))).toEqual([]);
    expect(log).toContain('pvm.resume');
    expect(log).toContain('svm.resume');
    fail = false;
    for (let i = 0; co.counts.checkpoints < 2 && i < 300; i++) await sleep(10);
    expect(co.records.at(-1)?.reasons).toEqual(['mismatch']);
    expect(co.state).toBe('protected');
  });

  it('losing the primary after the cut: the secondary commits that epoch and the SVM loads that state', async () => {
    const { log, co, disk, pvm } = await setup();
    disk.on['commit 3'] = never; // the primary dies before its commit reaches the secondary
    co.request('mismatch');
    for (let i = 0; !log.includes('disk.commit 3') && i < 100; i++) await sleep(5);
    await losePrimary(pvm, disk, co);
    expect(co.state).toBe('unprotected');
    expect(disk.promotions).toEqual([3]);
    expect(co.failovers[0]).toMatchObject({ committedEpoch: 3, loadedDecided: true });
    expect(log.filter((l) => l === 'svm.load')).toHaveLength(1); // loaded once, with the cut's targets
    expect(log).not.toContain('svm.discard');
    before(log, 'disk.promote 3', 'svm.checkpointed');
    expect(log.at(-1)).toBe('svm.resume');
    expect(co.pvm.name).toBe('svm');
  });

  it("the primary lost while the SVM's load of the cut is under way: the failover waits for that load and does not load again", async () => {
    // Found by test/coordinator-model.test.ts: the abort that a failover sends the checkpoint made
    // it miss the load's answer, so the failover loaded the same state a second time (a guest
    // refuses that: nothing is received to load, and the failover failed on every retry).
    const { log, co, disk, pvm, svm } = await setup();
    disk.on['commit 3'] = never;
    svm.on['load'] = () => sleep(150);
    co.request('mismatch');
    for (let i = 0; !log.includes('svm.load') && i < 100; i++) await sleep(5);
    await losePrimary(pvm, disk, co);
    expect(co.state).toBe('unprotected');
    expect(co.failovers[0]).toMatchObject({ committedEpoch: 3, loadedDecided: true });
    expect(log.filter((l) => l === 'svm.load')).toHaveLength(1);
    before(log, 'disk.promote 3', 'svm.checkpointed');
  });

  it('an SVM load that took effect but whose answer was lost is loaded again by the failover, and that is answered', async () => {
    // Found by test/coordinator-model.test.ts: the failover loads again a cut it cannot know loaded;
    // a guest refused that (nothing received), so the failover failed on every retry. A load names
    // its checkpoint now, and the same load again is answered.
    const { log, co, disk, pvm, svm } = await setup();
    let staged = true;
    let loaded: unknown = null;
    disk.on['commit 3'] = never;
    svm.on['load'] = async (id) => {
      if (!staged && id !== undefined && id === loaded) return; // the same load again
      if (!staged) throw new Error('no memory checkpoint was received to load');
      staged = false;
      loaded = id;
      if (log.filter((l) => l === 'svm.load').length === 1) throw new Error('socket hang up'); // the answer lost
    };
    co.request('mismatch');
    for (let i = 0; !log.includes('disk.commit 3') && i < 100; i++) await sleep(5);
    await losePrimary(pvm, disk, co);
    expect(co.state, co.lastError ?? '').toBe('unprotected');
    expect(co.failovers[0]).toMatchObject({ committedEpoch: 3, loadedDecided: true });
    expect(log.filter((l) => l === 'svm.load')).toHaveLength(2);
  });

  it('no checkpoint starts between the abort a failover sends and the failover itself', async () => {
    // Found by test/coordinator-model.test.ts: with requests waiting, the loop that runs checkpoints
    // started the next one as soon as the failover's abort ended the current one (still
    // 'protected'): it paused the SVM and had the PVM send its state, racing the aborted one's PVM
    // resume, before the failover ran.
    const { log, co, disk, pvm } = await setup();
    disk.on['commit 3'] = never;
    co.request('mismatch');
    for (let i = 0; !log.includes('disk.commit 3') && i < 100; i++) await sleep(5);
    co.request('mismatch'); // waiting behind the checkpoint under way
    await losePrimary(pvm, disk, co);
    expect(co.failovers).toHaveLength(1);
    const between = log.slice(log.indexOf('disk.commit 3'), log.indexOf('disk.promote 3'));
    expect(
      between.filter((l) => l.endsWith('.pause')),
      between.join(', '),
    ).toEqual([]);
  });

  it('the primary side killed after the cut, its call failing at once: the failure is pinned on it and the SVM takes over', async () => {
    const { log, co, disk, pvm } = await setup();
    // The PVM dies as the cut's calls go out: its call is refused at once (no hang for the heartbeat to
    // notice), and its first probe is only one refusal.
    pvm.on['checkpointed'] = () => {
      pvm.kill();
      disk.killPrimary();
      return refused();
    };
    co.request('mismatch');
    for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
    expect(co.failovers).toHaveLength(1);
    expect(co.failovers[0]).toMatchObject({ committedEpoch: 3, loadedDecided: true });
    expect(disk.promotions).toEqual([3]);
    expect(co.pvm.name).toBe('svm');
    expect(log.at(-1)).toBe('svm.resume');
  });

  it('losing the primary before the cut: the epoch is dropped and the SVM carries on from its own state', async () => {
    const { log, co, disk, pvm } = await setup();
    disk.on['durable 3'] = never;
    co.request('mismatch');
    for (let i = 0; !log.includes('disk.durable 3') && i < 100; i++) await sleep(5);
    await losePrimary(pvm, disk, co);
    expect(disk.promotions).toEqual([undefined]);
    expect(log).not.toContain('svm.load');
    expect(log).toContain('svm.discard');
    expect(co.failovers[0]).toMatchObject({ loadedDecided: false });
    expect(log.at(-1)).toBe('svm.resume');
  });

  it("losing the secondary while the PVM's pause is on its way: the PVM is resumed after that pause lands", async () => {
    // Found by test/coordinator-model.test.ts: the unprotect's resume went out at once and was
    // answered before the slow pause, which then stopped the PVM for good (nothing checkpoints
    // an unprotected pair, so nothing resumed it).
    const { log, co, svm, pvm } = await setup();
    const effects: string[] = [];
    pvm.on['pause'] = () => sleep(150).then(() => effects.push('paused'));
    pvm.on['resume'] = () => Promise.resolve(effects.push('resumed'));
    co.request('mismatch');
    for (let i = 0; !log.includes('pvm.pause') && i < 100; i++) await sleep(5);
    svm.kill();
    for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
    expect(co.state).toBe('unprotected');
    await sleep(200);
    expect(effects.at(-1), effects.join(', ')).toBe('resumed');
  });

  it('a PVM whose resume failed after a checkpoint paused it is resumed by the heartbeat once unprotected', async () => {
    // Found by test/coordinator-model.test.ts: the unprotect's resume failed (its call, not the VM),
    // and nothing resumed the PVM again: unprotected, no checkpoint comes to do it.
    const { log, co, svm, pvm } = await setup();
    const effects: string[] = [];
    let failures = 0;
    pvm.on['pause'] = () => sleep(30).then(() => effects.push('paused'));
    pvm.on['resume'] = async () => {
      // The failed checkpoint's resume and the unprotect's both fail.
      if (failures < 2) {
        failures++;
        throw new Error('socket hang up');
      }
      effects.push('resumed');
    };
    co.request('mismatch');
    for (let i = 0; !log.includes('pvm.pause') && i < 100; i++) await sleep(5);
    svm.kill();
    for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
    for (let i = 0; effects.at(-1) !== 'resumed' && i < 100; i++) await sleep(10);
    expect(effects.at(-1), effects.join(', ')).toBe('resumed');
    expect(co.state).toBe('unprotected');
  });

  it('losing the secondary: unprotected, the PVM resumes, and a pairing is tried again when it answers', async () => {
    const { co, svm, log } = await setup();
    svm.kill();
    for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
    expect(co.state).toBe('unprotected');
    expect(log).toContain('pvm.resume');
    const back = fakeVm('svm2', log);
    co.svm = back;
    for (let i = 0; co.state !== 'protected' && i < 300; i++) await sleep(10);
    expect(co.state).toBe('protected');
    expect(co.records.at(-1)).toMatchObject({ full: true, reasons: ['pair'] });
  });

  it('a wall clock stepped back an hour does not blind the detection of a silent side', async () => {
    const { co, svm } = await setup();
    const real = Date.now;
    Date.now = () => real() - 3_600_000;
    try {
      // Silent, not refused: probes time out. The old coordinator's last success was an hour in
      // its future: it waited that hour before calling the side lost.
      svm.on.probe = () => sleep(10).then(() => Promise.reject(new Error('probe timed out')));
      for (let i = 0; co.state !== 'unprotected' && i < 200; i++) await sleep(10);
      expect(co.state).toBe('unprotected');
    } finally {
      Date.now = real;
    }
  });

  it('a wall clock stepped forward an hour does not make one failed probe a lost side', async () => {
    const { co, svm } = await setup();
    const real = Date.now;
    let failures = 1;
    Date.now = () => real() + 3_600_000;
    try {
      // One probe fails (a blip); the next ones answer as before (undefined: the fake's own answer).
      svm.on.probe = () =>
        (failures-- > 0 ? Promise.reject(new Error('probe timed out')) : undefined) as Promise<unknown>;
      // The old coordinator found the last success an hour old at the first failure.
      await sleep(300);
      expect(failures).toBeLessThan(0); // probed again since
      expect(co.state).toBe('protected');
    } finally {
      Date.now = real;
    }
  });

  it('refuses to pair two VMs that are not the same VM, and says why', async () => {
    const log: string[] = [];
    const pvm = fakeVm('pvm', log, 'guest nondeterminism=0.1');
    const svm = fakeVm('svm', log, 'guest nondeterminism=0');
    const comparer = new Comparer({ mode: 'colo', pvm: pvm.data, compareTimeoutMs: 200, logger: quiet });
    const co = coordinator({ mode: 'colo', comparer, pvm, svm, disk: fakeDisk(log) });
    co.start();
    running.push(() => co.close());
    await sleep(100);
    expect(co.state).toBe('unprotected');
    expect(co.lastError).toMatch(/not the same VM.*nondeterminism=0\.1.*nondeterminism=0'/);
    expect(log).not.toContain('pvm.pause');
  });

  it('remus with a standby SVM and a PVM that resumes early: output made after the resume waits for the next cut', async () => {
    // The PVM's service: a real TCP server; the test decides when it writes.
    const conns: net.Socket[] = [];
    const server = net.createServer((c) => conns.push(c));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    running.push(() => new Promise<void>((r) => server.close(() => r())));
    const pvmData = { host: '127.0.0.1', port: (server.address() as net.AddressInfo).port };
    const log: string[] = [];
    const pvm = Object.assign(fakeVm('pvm', log, 'qemu', { earlyResume: true }), { data: pvmData });
    const svm = fakeVm('svm', log, 'qemu', { standby: true });
    const disk = fakeDisk(log);
    const comparer = new Comparer({ mode: 'remus', pvm: pvmData, compareTimeoutMs: 200, logger: quiet });
    const front = await comparer.listen(0, '127.0.0.1');
    running.push(() => comparer.close());
    const co = coordinator({ mode: 'remus', comparer, pvm, svm, disk: disk, failoverAfterMs: 5000 });
    co.start();
    running.push(() => co.close());
    for (let i = 0; co.state !== 'protected'; i++) {
      if (i > 200) throw new Error(`never protected: ${co.lastError}`);
      await sleep(10);
    }
    const client = net.connect(front.port, '127.0.0.1');
    let got = '';
    client.on('data', (d: Buffer) => (got += d.toString()));
    for (let i = 0; conns.length === 0; i++) {
      if (i > 200) throw new Error('the comparer never connected to the PVM');
      await sleep(5);
    }
    conns[0].write('before-pause;');
    await sleep(50);
    expect(got).toBe(''); // remus: held
    // While the state is on its way (the PVM runs again), the PVM answers more.
    pvm.on['send'] = async () => {
      conns[0].write('after-resume;');
      await sleep(50);
      return { bytes: 5 };
    };
    log.length = 0;
    const r = await co.checkpointNow();
    await sleep(50);
    expect(got).toBe('before-pause;');
    before(log, 'pvm.pause', 'pvm.capture');
    before(log, 'pvm.capture', 'pvm.resume');
    before(log, 'pvm.resume', 'pvm.send');
    before(log, 'pvm.send', `disk.commit ${r.epoch}`);
    expect(log).not.toContain('svm.resume');
    expect(r.pauseMs).toBeLessThan(r.totalMs);
    // The next checkpoint covers it.
    delete pvm.on['send'];
    await co.checkpointNow();
    await sleep(50);
    expect(got).toBe('before-pause;after-resume;');
    client.destroy();
  });
});
