// Coverage-guided fuzz target (Jazzer.js): the NBD server's handshake and
// transmission phases. Each input is the byte stream of one client, fed to a
// real Connection of a real NbdServer (a memory export and a read-only one)
// through an in-memory socket, in the chunk sizes the input's first byte
// picks. A finding is any exception that escapes, and any "internal error"
// the server logs (a bug of ours that it survived by dropping the client).
//
//   npx jazzer test/fuzz/nbd-server.fuzz.mjs fixtures/fuzz/nbd-server -- -max_total_time=60
import { EventEmitter } from 'node:events';
import { MemoryDevice } from '../../dist/src/block/memory.js';
import { NbdServer } from '../../dist/src/net/server.js';

const problems = [];
const logger = {
  info() {},
  debug() {},
  warn(msg) {
    if (/internal error/.test(msg)) problems.push(msg);
  },
};

const server = new NbdServer(
  [
    { name: 'disk0', device: new MemoryDevice(1 << 20) },
    { name: 'ro', device: new MemoryDevice(64 << 10), readOnly: true, description: 'read-only' },
  ],
  { logger, maxConnections: 1 << 30, maxConnectionsPerAddress: 1 << 30, handshakeTimeoutMs: 60_000 },
);

/** The part of net.Socket a Connection uses, in memory. */
class MemorySocket extends EventEmitter {
  remoteAddress = '127.0.0.1';
  remotePort = 40000;
  destroyed = false;
  writableLength = 0;
  out = 0;
  setNoDelay() {}
  cork() {}
  uncork() {}
  pause() {}
  resume() {}
  write(buf, cb) {
    if (this.destroyed) throw new Error('write after destroy');
    this.out += buf.length;
    if (typeof cb === 'function') queueMicrotask(() => cb());
    return true;
  }
  end() {
    this.destroy();
  }
  destroy() {
    if (this.destroyed) return;
    this.destroyed = true;
    queueMicrotask(() => this.emit('close'));
  }
}

const turn = () => new Promise((r) => setImmediate(r));

export async function fuzz(data) {
  const input = Buffer.from(data);
  if (input.length === 0) return;
  const chunk = 1 + (input[0] % 64) * 16;
  const socket = new MemorySocket();
  server.admit(socket);
  for (let off = 1; off < input.length && !socket.destroyed; off += chunk) {
    socket.emit('data', input.subarray(off, off + chunk));
    await turn();
  }
  // Let requests in flight finish (bounded), then hang up.
  for (let i = 0; i < 4; i++) await turn();
  socket.destroy();
  await turn();
  if (problems.length) {
    const msg = problems.splice(0).join('\n');
    throw new Error(`the server logged an internal error:\n${msg}`);
  }
}
