// The live sender's runs (PrimaryLink.queueRun): the frames a turn appends one
// after another in one resend chunk leave as one socket write, and whatever
// else the link writes (a control frame, a frame that is not in memory) goes
// after them. An in-process pair over real TCP on 127.0.0.1: a secondary node
// and a PrimaryReplica whose network records every write on the link.
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { PrimaryReplica } from '../src/checkpoint/primary/replica.js';
import { SecondaryNode } from '../src/checkpoint/secondary/node.js';
import { StateDir } from '../src/checkpoint/state-dir.js';
import { realEnv, type Env } from '../src/sys/env.js';
import { tcpNet, type Conn, type Net } from '../src/sys/net.js';
import { rmDir, tmpDir } from './helpers.js';

const dirs: string[] = [];
afterAll(() => dirs.forEach(rmDir));

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const quiet = { debug: () => {}, info: () => {}, warn: () => {} };
const turn = () => new Promise<void>((resolve) => setImmediate(resolve));

/** tcpNet, with the size of every write on the connections it makes recorded in order. */
function recordingNet(writes: number[]): Net {
  return {
    listen: tcpNet.listen,
    connect(host, port) {
      const conn = tcpNet.connect(host, port);
      const write = conn.write.bind(conn);
      (conn as { write: Conn['write'] }).write = (buf, done) => {
        writes.push(buf.length);
        return write(buf, done);
      };
      return conn;
    },
  };
}

async function waitFor(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const until = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

describe('the live sender', () => {
  it('sends the frames one turn appends as one write, and what the secondary holds is what was written', async () => {
    const dir = tmpDir('colo-blk-link-runs-');
    dirs.push(dir);
    const secondary = await SecondaryNode.start({
      listen: { host: '127.0.0.1', port: 0 },
      exportName: 'disk0',
      image: path.join(dir, 'svm.img'),
      size: SIZE,
      stateDir: path.join(dir, 'svm-state'),
      replicationListen: { host: '127.0.0.1', port: 0 },
      control: { host: '127.0.0.1', port: 0 },
      logger: quiet,
    });
    const writes: number[] = [];
    const env: Env = { ...realEnv, net: recordingNet(writes) };
    const image = await FileDevice.open(path.join(dir, 'pvm.img'), { size: SIZE, log: quiet });
    const replica = await PrimaryReplica.open(
      env,
      new StateDir(path.join(dir, 'pvm-state'), env.storage),
      image,
      {
        exportName: 'disk0',
        image: path.join(dir, 'pvm.img'),
        peer: secondary.addresses.replication,
        logger: quiet,
      },
    );
    try {
      replica.start();
      await waitFor('the pair to be protected', () => replica.peerState === 'protected');
      const dev = replica.device;
      // Every extent written once (hot in the activity log: later writes there need no sync,
      // so each is done before it returns), and that checkpointed.
      for (let at = 0; at < SIZE; at += MiB) await dev.pwrite(Buffer.alloc(4096, 0xee), at + 8192);
      await replica.checkpoint();
      await turn();
      const n = 64;
      const blocks = Array.from({ length: n }, (_, i) => Buffer.alloc(4096, i + 1));
      // One turn: 64 writes at scattered offsets, each done before it returns (pwritevNow).
      const before = writes.length;
      const done = blocks.map((b, i) => dev.pwrite(b, ((i * 37) % 4096) * 4096));
      await Promise.all(done);
      await turn();
      await turn();
      const sent = writes.slice(before);
      expect(sent).toHaveLength(1); // one socket write for the turn's 64 frames
      expect(sent[0]).toBeGreaterThan(n * 4096);
      expect(sent[0]).toBeLessThan(n * (4096 + 64));
      // Ordered with what follows: the seal (a frame of the run's epoch), the durable answer and
      // the commit (control frames); then the secondary's view is the primary's disk.
      const r = await replica.checkpoint();
      expect(r.writes).toBe(n);
      const ours = Buffer.alloc(SIZE);
      const theirs = Buffer.alloc(SIZE);
      await image.pread(ours, 0);
      await secondary.replica.exportDevice.pread(theirs, 0);
      expect(theirs.equals(ours)).toBe(true);
      for (let i = 0; i < n; i++) {
        const at = ((i * 37) % 4096) * 4096;
        expect(theirs.subarray(at, at + 4096).equals(blocks[i])).toBe(true);
      }
    } finally {
      await replica.close();
      await image.close();
      await secondary.close();
    }
  });
});
