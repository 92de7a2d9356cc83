/**
 * `npm run demo`: a live demonstration on localhost, needing nothing but this
 * package. It starts `colo-blk serve` as a real process on a fresh sparse
 * image, drives a guest-like workload over several NBD connections (writes,
 * overwrites, FUA writes, flushes, write-zeroes, trims), shows progress live,
 * verifies every byte against a model, shows the allocation map, stops the
 * server with SIGTERM and checks the image file on disk.
 *
 * Options: --seconds N (workload duration, default 6), --size SIZE (default
 * 256M), --connections N (default 4), --json (summary as JSON), --keep (keep
 * the image).
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { NbdClient } from '../src/net/client.js';
import { formatBytes, parseSize } from '../src/util/size.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const CLI = path.join(ROOT, 'bin', 'colo-blk.js');

interface Args {
  seconds: number;
  size: number;
  connections: number;
  json: boolean;
  keep: boolean;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { seconds: 6, size: 256 * 1024 * 1024, connections: 4, json: false, keep: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      const v = argv[++i];
      if (v === undefined) usage(`${a} needs a value`);
      return v;
    };
    if (a === '--seconds') args.seconds = Number(next());
    else if (a === '--size') args.size = parseSize(next());
    else if (a === '--connections') args.connections = Number(next());
    else if (a === '--json') args.json = true;
    else if (a === '--keep') args.keep = true;
    else usage(`unknown argument '${a}'`);
  }
  if (!(args.seconds > 0) || !(args.connections >= 1 && args.connections <= 16))
    usage('bad --seconds or --connections');
  if (args.size < args.connections * 1024 * 1024) usage('--size must be at least 1 MiB per connection');
  return args;
}

function usage(msg: string): never {
  process.stderr.write(
    `demo: ${msg}\nusage: npm run demo -- [--seconds N] [--size SIZE] [--connections N] [--json] [--keep]\n`,
  );
  process.exit(2);
}

function xorshift(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>>= 0);
  };
}

function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

function have(tool: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${tool}`]).status === 0;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const say = (s: string) => {
    if (!args.json) process.stdout.write(s + '\n');
  };
  const base = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, 'colo-blk-demo-'));
  const image = path.join(dir, 'disk0.img');

  say(`colo-blk demo: one NBD server, ${args.connections} client connections, a guest-like workload`);
  say(`  image ${image} (${formatBytes(args.size)}, sparse)`);
  const server = spawn(
    process.execPath,
    [
      CLI,
      'serve',
      '--listen',
      '127.0.0.1:0',
      '--json',
      '--quiet',
      '--export',
      `disk0=${image},size=${args.size}`,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  const cleanup = () => {
    if (server.exitCode === null) server.kill('SIGKILL');
    if (!args.keep) fs.rmSync(dir, { recursive: true, force: true });
  };
  process.on('exit', cleanup);
  const port = await new Promise<number>((resolve, reject) => {
    let out = '';
    server.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const line = out.split('\n').find((l) => l.startsWith('{'));
      if (line) resolve(JSON.parse(line).port);
    });
    server.once('exit', (code) => reject(new Error(`server exited with code ${code}`)));
  });
  say(`  server pid ${server.pid} listening on nbd://127.0.0.1:${port}/disk0\n`);

  const clients = await Promise.all(
    Array.from({ length: args.connections }, () => NbdClient.connect({ port, exportName: 'disk0' })),
  );
  say(`  negotiated: ${clients[0].mode} replies, size ${formatBytes(clients[0].size)}, multi-conn ok\n`);

  // The model: what the disk must contain. Each connection owns an interleaved
  // set of 1 MiB stripes so concurrent writers never race on the same bytes.
  const model = Buffer.alloc(args.size);
  const stripe = 1024 * 1024;
  const stripes = Math.floor(args.size / stripe);
  const counts = { write: 0, fua: 0, zero: 0, trim: 0, flush: 0, read: 0, readMismatch: 0 };
  let bytesWritten = 0;
  let bytesRead = 0;
  const started = Date.now();
  const deadline = started + args.seconds * 1000;

  const worker = async (c: NbdClient, id: number) => {
    const rand = xorshift(0xc0105eed + id);
    const perWorker = Math.floor(stripes / args.connections);
    while (Date.now() < deadline) {
      const s = id + args.connections * (rand() % perWorker);
      const op = rand() % 100;
      const len = 4096 * (1 + (rand() % 64));
      const off = s * stripe + 4096 * (rand() % ((stripe - len) / 4096 + 1));
      if (op < 55) {
        const data = randomFillSync(Buffer.allocUnsafe(len));
        const fua = op < 5;
        await c.write(data, off, { fua });
        data.copy(model, off);
        counts[fua ? 'fua' : 'write']++;
        bytesWritten += len;
      } else if (op < 63) {
        await c.zero(off, len, { noHole: op < 59 });
        model.fill(0, off, off + len);
        counts.zero++;
      } else if (op < 68) {
        // Trimmed bytes are undefined until rewritten: follow with a write of zeroes
        // so the model stays exact (this is what a guest's filesystem guarantees too).
        await c.trim(off, len);
        await c.zero(off, len);
        model.fill(0, off, off + len);
        counts.trim++;
      } else if (op < 71) {
        await c.flush();
        counts.flush++;
      } else {
        const got = await c.read(off, len);
        counts.read++;
        bytesRead += len;
        if (!got.equals(model.subarray(off, off + len))) counts.readMismatch++;
      }
    }
  };

  const tty = process.stdout.isTTY;
  const progress = setInterval(
    () => {
      if (args.json) return;
      const t = (Date.now() - started) / 1000;
      const ops = counts.write + counts.fua + counts.zero + counts.trim + counts.flush + counts.read;
      process.stdout.write(
        `${tty ? '\r' : ''}  ${t.toFixed(1)}s  ${ops} ops (${Math.round(ops / t)}/s)  written ${formatBytes(bytesWritten)}` +
          `  read ${formatBytes(bytesRead)}  mismatches ${counts.readMismatch}${tty ? '   ' : '\n'}`,
      );
    },
    tty ? 250 : 1000,
  );
  await Promise.all(clients.map((c, i) => worker(c, i)));
  clearInterval(progress);
  const elapsed = (Date.now() - started) / 1000;
  say('');

  // Verify the whole disk over NBD, then the map the server reports.
  const whole = Buffer.alloc(args.size);
  for (let off = 0; off < args.size; off += 8 * stripe) {
    const len = Math.min(8 * stripe, args.size - off);
    (await clients[0].read(off, len)).copy(whole, off);
  }
  const overNbd = sha256(whole) === sha256(model);
  const extents = await clients[0].blockStatus(0, args.size);
  const holeBytes = extents.filter((e) => e.flags & 1).reduce((a, e) => a + e.length, 0);
  await clients[0].flush();
  await Promise.all(clients.map((c) => c.close()));

  let qemuInfo = '';
  if (have('qemu-img')) {
    const r = spawnSync('qemu-img', ['info', '-f', 'raw', `nbd://127.0.0.1:${port}/disk0`], {
      encoding: 'utf8',
    });
    qemuInfo =
      r.status === 0 ? (r.stdout.split('\n').find((l) => l.startsWith('virtual size')) ?? '') : r.stderr;
  }

  // Clean shutdown, then the file on disk must hold exactly the model.
  server.kill('SIGTERM');
  const exitCode = await new Promise<number | null>((resolve) =>
    server.once('exit', (code) => resolve(code)),
  );
  const onDisk = sha256(fs.readFileSync(image)) === sha256(model);
  const ok = overNbd && onDisk && counts.readMismatch === 0 && exitCode === 0;

  const summary = {
    ok,
    seconds: elapsed,
    connections: args.connections,
    mode: clients[0].mode,
    ops: counts,
    opsPerSecond: Math.round(Object.values(counts).reduce((a, b) => a + b, 0) / elapsed),
    bytesWritten,
    bytesRead,
    verifiedOverNbd: overNbd,
    verifiedOnDisk: onDisk,
    holeBytes,
    extents: extents.length,
    serverExitCode: exitCode,
    qemuImgInfo: qemuInfo || undefined,
  };
  if (args.json) process.stdout.write(JSON.stringify(summary, null, 2) + '\n');
  else {
    say(
      `\nworkload: ${elapsed.toFixed(1)} s over ${args.connections} connections, ${summary.opsPerSecond} ops/s`,
    );
    say(
      `  writes ${counts.write} (+${counts.fua} FUA), zeroes ${counts.zero}, trims ${counts.trim}, ` +
        `flushes ${counts.flush}, reads ${counts.read}`,
    );
    say(`  written ${formatBytes(bytesWritten)}, read ${formatBytes(bytesRead)}`);
    say(`  block status: ${extents.length} extents, ${formatBytes(holeBytes)} unallocated`);
    if (qemuInfo) say(`  qemu-img info: ${qemuInfo.trim()}`);
    say(`\nchecks:`);
    say(`  ${counts.readMismatch === 0 ? 'ok  ' : 'FAIL'} every read during the workload matched the model`);
    say(`  ${overNbd ? 'ok  ' : 'FAIL'} whole disk over NBD equals the model (sha256)`);
    say(`  ${exitCode === 0 ? 'ok  ' : 'FAIL'} server stopped cleanly on SIGTERM (exit ${exitCode})`);
    say(`  ${onDisk ? 'ok  ' : 'FAIL'} image file on disk equals the model after shutdown`);
    say(`\n${ok ? 'demo passed' : 'demo FAILED'}`);
  }
  process.exitCode = ok ? 0 : 1;
}

main().catch((err) => {
  process.stderr.write(`demo: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exitCode = 1;
});
