// The comparer (src/net/comparer/) in-process, on real TCP sockets, with the
// two "VMs" played by the test: it decides byte by byte what the client sees.
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { Comparer, type CheckpointReason, type Mode } from '../src/net/comparer/comparer.js';
import { firstDifference, StreamBuffer } from '../src/net/comparer/stream.js';

const quiet = { info: () => {}, warn: () => {}, debug: () => {} };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A fake VM: accepts the comparer's connections and lets the test write as the VM. */
class FakeVm {
  server = net.createServer((s) => {
    this.conns.push(s);
    s.on('data', (d) => (this.input += d.toString()));
    s.on('error', () => {});
    this.waiter?.();
  });
  conns: net.Socket[] = [];
  input = '';
  private waiter: (() => void) | null = null;
  port = 0;
  async start(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this;
  }
  async conn(i = 0): Promise<net.Socket> {
    while (!this.conns[i]) await new Promise<void>((r) => (this.waiter = r));
    return this.conns[i];
  }
  close(): void {
    for (const c of this.conns) c.destroy();
    this.server.close();
  }
}

class Client {
  data = Buffer.alloc(0);
  ended = false;
  constructor(readonly socket: net.Socket) {
    socket.on('data', (d) => (this.data = Buffer.concat([this.data, d])));
    socket.on('end', () => (this.ended = true));
    socket.on('error', () => {});
  }
  get text(): string {
    return this.data.toString();
  }
}

const cleanup: (() => unknown)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function setup(mode: Mode, opts: { timeout?: number; queueBytes?: number } = {}) {
  const pvm = await new FakeVm().start();
  const svm = await new FakeVm().start();
  const requests: CheckpointReason[] = [];
  const cmp = new Comparer({
    mode,
    pvm: { host: '127.0.0.1', port: pvm.port },
    compareTimeoutMs: opts.timeout ?? 60_000,
    limits: opts.queueBytes ? { queueBytes: opts.queueBytes } : undefined,
    logger: quiet,
  });
  cmp.handlers.request = (r) => requests.push(r);
  const addr = await cmp.listen(0, '127.0.0.1');
  if (mode !== 'none') await cmp.attach({ host: '127.0.0.1', port: svm.port }, {});
  const sock = net.connect({ port: addr.port, host: '127.0.0.1', allowHalfOpen: true });
  const client = new Client(sock);
  cleanup.push(
    () => cmp.close(),
    () => pvm.close(),
    () => svm.close(),
    () => sock.destroy(),
  );
  const p = await pvm.conn();
  const s = mode === 'none' ? null : await svm.conn();
  return { cmp, pvm, svm, p, s, client, requests };
}

async function until(f: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error('condition not reached');
    await sleep(5);
  }
}

describe('stream buffer', () => {
  it('finds the first differing byte across chunk boundaries that differ on each side', () => {
    const a = new StreamBuffer();
    const b = new StreamBuffer();
    for (const c of ['he', 'llo wo', 'rld']) a.push(Buffer.from(c));
    for (const c of ['hel', 'lo', ' w', 'orLd']) b.push(Buffer.from(c));
    expect(firstDifference(a, 0, b, 0, 9)).toBe(-1);
    expect(firstDifference(a, 0, b, 0, 11)).toBe(9);
    a.dropTo(4);
    expect(a.start).toBe(4);
    expect(Buffer.concat([...a.views(4, 11)]).toString()).toBe('o world');
    expect(firstDifference(a, 6, b, 6, 3)).toBe(-1);
  });
});

describe('comparer', () => {
  it('releases output that matches as byte streams, however each side splits it', async () => {
    const { p, s, client, requests, pvm, svm } = await setup('colo');
    client.socket.write('GET / HTTP/1.1\r\n\r\n');
    await until(() => pvm.input.length > 0 && svm.input.length > 0);
    expect(pvm.input).toBe(svm.input); // the client's bytes went to both
    const answer = 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello';
    for (const ch of answer) {
      p.write(ch);
      await sleep(1);
    }
    await sleep(20);
    expect(client.text).toBe(''); // nothing until the SVM says the same
    s!.write(answer);
    await until(() => client.text === answer);
    expect(requests).toEqual([]);
  });

  it('a mismatch asks for a checkpoint and holds the rest until the cut; then only PVM bytes go out', async () => {
    const { cmp, p, s, client, requests } = await setup('colo');
    p.write('same-PVM-tail');
    s!.write('same-SVM-tail');
    await until(() => requests.length === 1);
    expect(requests).toEqual(['mismatch']);
    // The matching prefix went out (the client may not have read it yet when the request is
    // seen: it is on its way over TCP), and nothing after it until the cut.
    await until(() => client.text.length >= 5);
    await sleep(20);
    expect(client.text).toBe('same-');
    const targets = cmp.cut(
      { [String(p.remotePort)]: { consumed: 0, written: 13 } },
      {
        [String(s!.remotePort)]: { consumed: 0, written: 13 },
      },
    );
    expect(targets).toEqual({ [String(s!.remotePort)]: 0 });
    await until(() => client.text === 'same-PVM-tail');
    // Realigned: the next bytes compare from the new bases.
    p.write('next');
    s!.write('next');
    await until(() => client.text === 'same-PVM-tailnext');
    expect(requests).toEqual(['mismatch']);
  });

  it('a difference deep inside large outputs, each sent whole, is a mismatch at that byte', async () => {
    const { p, s, client, requests } = await setup('colo');
    const pvmOut = Buffer.alloc(64 * 1024, 'a');
    const svmOut = Buffer.from(pvmOut);
    svmOut[40_000] = 'b'.charCodeAt(0);
    p.write(pvmOut);
    s!.write(svmOut);
    await until(() => requests.length === 1);
    expect(requests).toEqual(['mismatch']);
    // Everything before the differing byte matched and went out; nothing after it.
    await until(() => client.data.length === 40_000);
    await sleep(20);
    expect(client.data.length).toBe(40_000);
  });

  it('output one side does not match within the timeout asks for a checkpoint', async () => {
    const { p, client, requests } = await setup('colo', { timeout: 50 });
    p.write('only the PVM speaks');
    await until(() => requests.includes('timeout'), 2000);
    expect(client.text).toBe('');
  });

  it('the timeout holds when the wall clock steps back an hour meanwhile (NTP, a resumed host)', async () => {
    const { p, client, requests } = await setup('colo', { timeout: 300 });
    p.write('only the PVM speaks');
    await until(() => client.data.length === 0 && requests.length === 0);
    await sleep(30); // received and unmatched, on the old clock
    const real = Date.now;
    Date.now = () => real() - 3_600_000;
    try {
      // The old comparer measured the wait on the wall clock: -1 h, and the client waited an hour.
      await until(() => requests.includes('timeout'), 2000);
    } finally {
      Date.now = real;
    }
  });

  it('FIN is a stream event: released when both sides end at the same byte', async () => {
    const { p, s, client } = await setup('colo');
    p.end('bye');
    await sleep(30);
    expect(client.ended).toBe(false);
    s!.end('bye');
    await until(() => client.ended);
    expect(client.text).toBe('bye');
  });

  it('a connection the SVM closed before a checkpoint and the PVM did not goes on unprotected: a failover resets it, never sends a FIN', async () => {
    // The checkpoint gives the SVM the PVM's state, where the connection is open, but its TCP
    // connection here is closed. Before the fix the session kept it, and a failover handed the
    // client a clean FIN no side's state had sent: a close-delimited response looks complete.
    const { cmp, p, s, client, svm } = await setup('colo');
    client.socket.on('close', () => (closed = true));
    let closed = false;
    p.write('partial ');
    s!.end('partial ');
    await until(() => client.text === 'partial ');
    const pos = (sock: net.Socket, written: number) => ({
      [String(sock.remotePort)]: { consumed: 0, written },
    });
    await cmp.drain(pos(p, 8), pos(s!, 8), 1000);
    cmp.cut(pos(p, 8), pos(s!, 8));
    expect(cmp.status().unprotectedConnections).toBe(1);
    p.write('body');
    await until(() => client.text === 'partial body'); // passed through, unprotected
    expect(cmp.failover({ host: '127.0.0.1', port: svm.port })).toEqual({ survived: 0, lost: 1 });
    await until(() => closed);
    expect(client.ended, 'the client was told the response ended').toBe(false);
  });

  it('a FIN against more bytes is a mismatch', async () => {
    const { p, s, requests } = await setup('colo');
    p.end('ab');
    s!.write('abc');
    await until(() => requests.includes('mismatch'));
  });

  it('a queue at its bound asks for a checkpoint, stops reading and drops nothing', async () => {
    const { cmp, p, client, requests } = await setup('colo', { queueBytes: 64 * 1024 });
    const big = Buffer.alloc(1024 * 1024, 7);
    p.write(big);
    await until(() => requests.includes('queue'));
    const held = cmp.status().heldBytes;
    expect(held).toBeGreaterThan(64 * 1024);
    expect(held).toBeLessThan(big.length); // reading paused: the rest waits in TCP
    await cmp.drain({ [String(p.remotePort)]: { consumed: 0, written: big.length } }, null, 5000);
    cmp.cut({ [String(p.remotePort)]: { consumed: 0, written: big.length } }, null);
    await until(() => client.data.length === big.length);
    expect(client.data.equals(big)).toBe(true);
  });

  it('remus mode releases nothing before the cut, everything written before the pause at it', async () => {
    const { cmp, p, client } = await setup('remus');
    p.write('response one');
    await sleep(50);
    expect(client.text).toBe('');
    await cmp.drain({ [String(p.remotePort)]: { consumed: 0, written: 12 } }, {}, 1000);
    cmp.cut({ [String(p.remotePort)]: { consumed: 0, written: 12 } }, {});
    await until(() => client.text === 'response one');
  });

  it('a PVM that runs again before the cut (early resume, a standby SVM): its FIN after the resume waits for the next checkpoint', async () => {
    // A FIN that came after the PVM resumed is not the checkpoint's: the state it loads into the
    // standby has the connection open. Before the fix the cut released it with the bytes.
    const { cmp, p, client } = await setup('remus');
    await cmp.attach(null, {});
    p.write('response');
    await until(() => cmp.status().heldBytes === 8);
    cmp.freeze(null); // positions unknown (a real VM): what has arrived is covered
    p.end(); // the PVM runs on and closes the connection
    await sleep(50); // the FIN arrives
    await cmp.drain(null, null, 1000);
    cmp.cut(null, null);
    await until(() => client.text === 'response');
    await sleep(30);
    expect(client.ended, 'a FIN from past the checkpoint was released').toBe(false);
    await cmp.drain(null, null, 1000);
    cmp.cut(null, null);
    await until(() => client.ended);
    expect(client.text).toBe('response');
  });

  it('colo with a PVM that runs again before the cut: its output past the pause is not matched against the SVM’s before it', async () => {
    // The SVM was ahead at the pause: its bytes past the PVM's position are discarded at the cut,
    // so PVM bytes written after the resume must not be released against them.
    const { cmp, p, s, client, requests } = await setup('colo');
    const pos = (sock: net.Socket, written: number) => ({
      [String(sock.remotePort)]: { consumed: 0, written },
    });
    p.write('abc');
    s!.write('abcdef');
    await until(() => client.text === 'abc');
    cmp.freeze(pos(p, 3));
    p.write('def'); // the PVM runs on, writing what the SVM wrote before its pause
    await sleep(50);
    expect(client.text, 'released PVM output from past the checkpoint').toBe('abc');
    expect(requests).toEqual([]);
    await cmp.drain(pos(p, 3), pos(s!, 6), 1000);
    cmp.cut(pos(p, 3), pos(s!, 6));
    await sleep(30);
    expect(client.text).toBe('abc');
    s!.write('def'); // the SVM, from the PVM's state at the pause, writes the same
    await until(() => client.text === 'abcdef');
  });

  it('a checkpoint whose PVM ran ahead fails before its cut: what arrived meanwhile is compared at once', async () => {
    // Found by the model test (seed 777): a FIN that came after the freeze was not looked at
    // again when the checkpoint failed, so its difference from the SVM's output asked for no
    // checkpoint until more bytes came (or the compare timeout).
    const { cmp, p, s, requests } = await setup('colo');
    s!.write('x');
    await until(() => cmp.status().unmatchedSvmBytes === 1);
    cmp.freeze({ [String(p.remotePort)]: { consumed: 0, written: 0 } });
    p.end(); // the PVM, running again, closes: not this checkpoint's
    await sleep(50);
    expect(requests).toEqual([]);
    cmp.endDrain(); // the checkpoint failed before its cut
    await until(() => requests.includes('mismatch'));
  });

  it('none mode passes the PVM’s output through', async () => {
    const { p, client } = await setup('none');
    p.write('straight through');
    await until(() => client.text === 'straight through');
  });

  it('failover: the SVM’s connection carries on from what the client already has', async () => {
    const { cmp, p, s, client, svm } = await setup('colo');
    p.write('abcdef');
    s!.write('abcdefGHI');
    await until(() => client.text === 'abcdef');
    const r = cmp.failover({ host: '127.0.0.1', port: svm.port });
    expect(r).toEqual({ survived: 1, lost: 0 });
    await until(() => client.text === 'abcdefGHI');
    s!.write('JK');
    await until(() => client.text === 'abcdefGHIJK');
    client.socket.write('more input');
    await until(() => svm.input.endsWith('more input'));
  });
});
