// The COLO loop end to end, as real processes: a disk pair, a guest on each
// side, and `colo-blk colo` (comparer and coordinator) in front. Clients are
// raw TCP connections, so a test knows exactly which bytes arrived on which
// connection and whether any connection was ever reset.
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { controlCall } from '../src/checkpoint/control.js';
import { CLI, killAll, rmDir, run, tmpDir } from './helpers.js';
import { HttpConn } from '../tools/loop/http-conn.js';
import path from 'node:path';
import { startColoStack, startGuest, type ColoStack } from './colo-helpers.js';
import { hashExport, secondaryArgs, startNode } from './replication-helpers.js';

const dirs: string[] = [];
const stacks: ColoStack[] = [];
afterEach(async () => {
  for (const s of stacks.splice(0)) await s.stop().catch(() => {});
  await killAll();
  for (const d of dirs.splice(0)) rmDir(d);
});
afterAll(killAll);

async function stack(opts: Parameters<typeof startColoStack>[1]): Promise<ColoStack> {
  const dir = tmpDir('colo-loop-');
  dirs.push(dir);
  const s = await startColoStack(dir, opts);
  stacks.push(s);
  await s.waitState('protected');
  return s;
}

/** SVM = PVM now: state hash through the guests, disk hash read over NBD from both disk nodes. */
async function expectEqual(s: ColoStack): Promise<void> {
  const [a, b] = await Promise.all([
    controlCall<{ hash: string }>(s.pvm.control, 'GET', '/hash'),
    controlCall<{ hash: string }>(s.svm.control, 'GET', '/hash'),
  ]);
  expect(b.hash).toBe(a.hash);
  expect(await hashExport(s.pair.secondary.nbdPort)).toBe(await hashExport(s.pair.primary.nbdPort));
}

/** PUTs on every connection until stopped: what was acknowledged, failures, the longest wait between answers. */
function putLoad(conns: HttpConn[], prefix: string, keys: number) {
  const load = {
    acked: new Map<string, string>(),
    failures: 0,
    lastAt: Date.now(),
    maxGap: 0,
    stopped: false,
  };
  const loops = conns.map(async (c, i) => {
    for (let n = 0; !load.stopped; n++) {
      const key = `${prefix}${i}-${n % keys}`;
      const value = `v${n}-${i}`;
      try {
        const r = await c.request('PUT', `/kv/${key}`, value, 15_000);
        if (r.status !== 200) throw new Error(`status ${r.status}`);
        load.acked.set(key, value);
        const now = Date.now();
        load.maxGap = Math.max(load.maxGap, now - load.lastAt);
        load.lastAt = now;
      } catch (err) {
        load.failures++;
        console.log(`connection ${i}: ${(err as Error).message}`);
        return;
      }
    }
  });
  const stop = async () => {
    load.stopped = true;
    await Promise.all(loops);
  };
  return Object.assign(load, { stop });
}

/**
 * The primary side (its disk node and the PVM guest) SIGKILLed under `load` for 1.5 s: no
 * connection failed, the SVM answered after the kill, every acknowledged PUT reads back.
 */
async function failOverUnderLoad(s: ColoStack, conns: HttpConn[], load: ReturnType<typeof putLoad>) {
  const kills = [s.pair.primary, s.pvm].map((n) => n.exit);
  s.pair.primary.child.kill('SIGKILL');
  s.pvm.child.kill('SIGKILL');
  await Promise.all(kills);
  const killedAt = Date.now();
  await new Promise((res) => setTimeout(res, 1500));
  await load.stop();
  expect(load.failures).toBe(0);
  for (const c of conns) {
    expect(c.closed).toBe(false);
    expect(c.error).toBeNull();
  }
  expect(load.lastAt, 'the SVM answered after the kill').toBeGreaterThan(killedAt);
  // Every acknowledged PUT is readable, on the same connections, now served by the SVM.
  for (const [key, value] of load.acked) {
    const r = await conns[0].request('GET', `/kv/${key}`);
    expect(r.body.toString(), key).toBe(value);
  }
}

const mismatches = (s: ColoStack) =>
  s.checkpoints().filter((c) => (c.reasons as string[]).includes('mismatch')).length;

describe('colo-blk colo (processes)', () => {
  for (const early of [true, false])
    it(`equal outputs cause no checkpoint of their own; SVM = PVM in memory and on disk at every checkpoint (${early ? 'the PVM runs again once its state is captured' : '--no-early-resume'})`, async () => {
      const s = await stack({
        coloArgs: ['--verify', '--interval', '300', ...(early ? [] : ['--no-early-resume'])],
      });
      const conns = await Promise.all(Array.from({ length: 6 }, () => HttpConn.connect(s.port)));
      const t0 = Date.now();
      await Promise.all(
        conns.map(async (c, i) => {
          for (let n = 0; n < 60 || Date.now() - t0 < 1200; n++) {
            const key = `c${i}-${n % 7}`;
            const r = await c.request('PUT', `/kv/${key}`, `value ${n} of ${i}`);
            expect(r.status).toBe(200);
            const g = await c.request('GET', `/kv/${key}`);
            expect(g.body.toString()).toBe(`value ${n} of ${i}`);
          }
        }),
      );
      const st = await s.status();
      expect(st.byReason.mismatch ?? 0).toBe(0);
      expect(st.comparer.requests.mismatch).toBe(0);
      // Periodic checkpoints ran meanwhile, each verified while the SVM was paused: against the
      // PVM's state as captured (early resume: it ran on meanwhile), or as paused.
      const cps = s.checkpoints();
      expect(cps.length).toBeGreaterThanOrEqual(3);
      for (const c of cps) {
        expect(c.verified).toMatchObject({ state: true, disk: true });
        const phases = c.phases as Record<string, number>;
        if (early) expect(phases.capture, 'the PVM was captured').toBeGreaterThan(0);
        else expect(phases.capture).toBe(0);
        expect(c.svmPauseMs as number).toBeGreaterThan(0);
      }
      expect(cps.some((c) => (c.diskBytes as number) > 0 && (c.memoryBytes as number) > 0)).toBe(true);
      // And independently of the coordinator's own check, after one more checkpoint:
      await controlCall(s.colo.control, 'POST', '/checkpoint');
      await expectEqual(s);
      for (const c of conns) expect(c.closed).toBe(false);
    });

  it('a forced divergence causes exactly one checkpoint, and the client sees only the PVM’s bytes', async () => {
    const s = await stack({});
    const c = await HttpConn.connect(s.port);
    expect((await c.request('PUT', '/kv/a', 'both')).status).toBe(200);
    // The SVM alone gets a key (behind the comparer's back): its state diverges.
    const direct = await HttpConn.connect(Number(s.svm.info.port));
    expect((await direct.request('PUT', '/kv/x', 'svm-only')).status).toBe(200);
    direct.close();
    const before = s.checkpoints().length;
    const r = await c.request('GET', '/kv/x');
    // The PVM's answer, whole and alone.
    expect(r.status).toBe(404);
    expect(r.body.toString()).toBe('{"error":"no such key"}');
    expect(r.raw.includes('svm-only')).toBe(false);
    expect(c.pending).toBe(0);
    await new Promise((res) => setTimeout(res, 600));
    const after = s.checkpoints().slice(before);
    expect(after).toHaveLength(1);
    expect(after[0].reasons).toEqual(['mismatch']);
    // The checkpoint rolled the SVM back to the PVM: the key is gone there too, and outputs agree again.
    await expectEqual(s);
    expect((await c.request('GET', '/kv/x')).status).toBe(404);
    expect((await c.request('GET', '/kv/a')).body.toString()).toBe('both');
    await new Promise((res) => setTimeout(res, 300));
    expect(s.checkpoints().length - before).toBe(1);
    expect(mismatches(s)).toBe(1);
  });

  it('nondeterministic responses: one checkpoint per differing response, and the client gets the PVM’s', async () => {
    const s = await stack({ nondeterminism: 1 });
    const c = await HttpConn.connect(s.port);
    const before = s.checkpoints().length;
    for (let i = 0; i < 3; i++) {
      const r = await c.request('PUT', `/kv/n${i}`, `v${i}`);
      expect(r.status).toBe(200);
      expect(r.headers['x-noise']).toMatch(/^\d+-[0-9a-f]{12}$/);
    }
    await new Promise((res) => setTimeout(res, 300));
    expect(s.checkpoints().length - before).toBe(3);
    await expectEqual(s);
  });

  it('remus mode holds every byte of output until the commit', async () => {
    const s = await stack({ mode: 'remus', coloArgs: ['--interval', '600000'] });
    const c = await HttpConn.connect(s.port);
    c.send('PUT', '/kv/r', 'held');
    await new Promise((res) => setTimeout(res, 500));
    expect(c.received).toBe(0);
    const st = await s.status();
    expect(st.comparer.heldBytes).toBeGreaterThan(0);
    const rec = await controlCall<{ releasedBytes: number; reasons: string[] }>(
      s.colo.control,
      'POST',
      '/checkpoint',
    );
    expect(rec.reasons).toEqual(['manual']);
    const r = await c.response(5000);
    expect(r.status).toBe(200);
    expect(rec.releasedBytes).toBe(r.raw.length);
    // Again: nothing leaves before the next commit.
    c.send('GET', '/kv/r');
    await new Promise((res) => setTimeout(res, 300));
    expect(c.received).toBe(r.raw.length);
    await controlCall(s.colo.control, 'POST', '/checkpoint');
    expect((await c.response(5000)).body.toString()).toBe('held');
    await expectEqual(s);
  });

  it('remus with a PVM that runs again before each commit: every checkpoint verified, then the primary side SIGKILLed under load loses no byte and no acknowledged PUT', async () => {
    // The PVM's output after its resume is held for the next cut; at the failover each connection
    // goes on from where the last cut left the client, on the SVM's connection.
    const s = await stack({
      mode: 'remus',
      nondeterminism: 0.02,
      coloArgs: ['--interval', '50', '--verify'],
    });
    const conns = await Promise.all(Array.from({ length: 4 }, () => HttpConn.connect(s.port)));
    const load = putLoad(conns, 'r', 5);
    await new Promise((res) => setTimeout(res, 1000));
    const cps = s.checkpoints().filter((c) => !(c.reasons as string[]).includes('pair'));
    expect(cps.length).toBeGreaterThan(3);
    for (const c of cps) {
      expect(c.verified).toMatchObject({ state: true, disk: true });
      expect((c.phases as Record<string, number>).capture, 'the PVM was captured').toBeGreaterThan(0);
      expect(c.svmPauseMs).toBeNull();
    }
    await failOverUnderLoad(s, conns, load);
    const st = await s.status();
    expect(st.failovers).toHaveLength(1);
    expect(st.failovers[0].survived).toBe(4);
  });

  it('the primary side SIGKILLed under load: every connection survives and no acknowledged PUT is lost', async () => {
    // The guest's log only grows: a disk big enough for a few seconds of PUTs.
    const s = await stack({ nondeterminism: 0.02, size: '256M', coloArgs: ['--interval', '400'] });
    const conns = await Promise.all(Array.from({ length: 8 }, () => HttpConn.connect(s.port)));
    const load = putLoad(conns, 'k', 11);
    await new Promise((res) => setTimeout(res, 1000));
    await failOverUnderLoad(s, conns, load);
    const st = await s.status();
    expect(st.state).toBe('unprotected');
    expect(st.failovers).toHaveLength(1);
    expect(st.failovers[0].survived).toBe(8);
    expect(st.comparer.connectionsLost).toBe(0);
    expect(load.acked.size).toBeGreaterThan(20);
    console.log(
      `failover: ${st.failovers[0].ms.toFixed(0)} ms in the coordinator, longest client-visible gap ${load.maxGap} ms, ${load.acked.size} keys acknowledged`,
    );

    // Re-protection: a fresh secondary disk node and SVM guest, paired with one command.
    const dir = dirs.at(-1)!;
    const sec2 = await startNode(
      'secondary',
      secondaryArgs(path.join(dir, 'svm2.img'), '256M', path.join(dir, 'svm2-state')),
    );
    // The same guest as the PVM (same seed and nondeterminism: the same VM).
    const svm2 = await startGuest(sec2.nbdPort, ['--nondeterminism', '0.02']);
    const rp = await run(process.execPath, [
      CLI,
      'reprotect',
      '--control',
      `127.0.0.1:${s.colo.control.port}`,
      '--peer',
      `127.0.0.1:${sec2.info.replicationPort}`,
      '--svm',
      `127.0.0.1:${svm2.info.port}`,
      '--svm-control',
      `127.0.0.1:${svm2.info.controlPort}`,
      '--secondary-control',
      `127.0.0.1:${sec2.control.port}`,
      '--json',
    ]);
    expect(rp.code, rp.stderr).toBe(0);
    expect(JSON.parse(rp.stdout).state).toBe('protected');
    const st2 = await s.status();
    expect(st2.state).toBe('protected');
    // The connections opened before the failover joined the new SVM.
    expect(st2.comparer.sessions.filter((x: { svmPort: number | null }) => x.svmPort !== null)).toHaveLength(
      8,
    );
    // They are compared again: a forced divergence is caught and only the new PVM's bytes go out.
    const direct = await HttpConn.connect(Number(svm2.info.port));
    expect((await direct.request('PUT', '/kv/k0-0', 'svm2-only')).status).toBe(200);
    direct.close();
    const r = await conns[3].request('GET', '/kv/k0-0');
    expect(r.body.toString()).toBe(load.acked.get('k0-0'));
    await new Promise((res) => setTimeout(res, 300));
    const last = (await s.status()).lastCheckpoint;
    expect(last.reasons).toContain('mismatch');
    for (const [key, value] of [...load.acked].slice(0, 20))
      expect((await conns[5].request('GET', `/kv/${key}`)).body.toString()).toBe(value);
    const [h1, h2] = await Promise.all([
      controlCall<{ hash: string }>(s.svm.control, 'GET', '/hash'),
      controlCall<{ hash: string }>(svm2.control, 'GET', '/hash'),
    ]);
    expect(h2.hash).toBe(h1.hash);
    expect(await hashExport(sec2.nbdPort)).toBe(await hashExport(s.pair.secondary.nbdPort));
  });

  it('garbage, a half-closed connection and a client that never reads do not stall other connections', async () => {
    const s = await stack({});
    const big = 'x'.repeat(256 * 1024);
    const setup = await HttpConn.connect(s.port);
    expect((await setup.request('PUT', '/kv/big', big)).status).toBe(200);
    // A client that asks for megabytes and never reads them.
    const sink = await HttpConn.connect(s.port);
    sink.socket.pause();
    for (let i = 0; i < 200; i++) sink.send('GET', '/kv/big');
    // Garbage: an error response from the guests, then the connection closes.
    const junk = await HttpConn.connect(s.port);
    junk.socket.write('\x00\x01 GARBAGE \xff\r\n\r\n');
    const bad = await junk.response();
    expect(bad.status).toBe(400);
    // A half-closed connection still gets its answer.
    const half = await HttpConn.connect(s.port);
    half.send('PUT', '/kv/h', 'half');
    half.socket.end();
    expect((await half.response()).status).toBe(200);
    // Meanwhile a well-behaved client goes on at full speed.
    const ok = await HttpConn.connect(s.port);
    for (let i = 0; i < 50; i++) {
      expect((await ok.request('PUT', `/kv/ok${i}`, `v${i}`, 5000)).status).toBe(200);
      expect((await ok.request('GET', `/kv/ok${i}`, undefined, 5000)).body.toString()).toBe(`v${i}`);
    }
    await new Promise((res) => setTimeout(res, 200));
    expect(junk.closed).toBe(true);
    expect(bad.headers.connection).toBe('close');
    expect(half.closed).toBe(true);
    expect(sink.closed).toBe(false);
    const st = await s.status();
    expect(st.state).toBe('protected');
    // The sink's unread answers wait in its own connection, not in everyone's way.
    expect(sink.received).toBeLessThan(200 * big.length);
    expect(mismatches(s)).toBe(0);
  });
});
