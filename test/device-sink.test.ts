import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { DeviceSink } from '../src/checkpoint/qemu/vm.js';

describe("the VM agent's device-state sink", () => {
  it('hands over what the next connection sends, until it ends', async () => {
    const sink = await DeviceSink.open();
    const got = sink.next();
    const port = Number(sink.uri.split(':').at(-1));
    const c = net.connect(port, '127.0.0.1', () => c.end(Buffer.from('device state')));
    expect((await got).toString()).toBe('device state');
    sink.close();
  });

  it('close ends a wait in progress at once (a QEMU killed mid-checkpoint never connects)', async () => {
    const sink = await DeviceSink.open();
    const t = Date.now();
    const got = sink.next();
    sink.close();
    await expect(got).rejects.toMatchObject({ code: 'ECONNECT' });
    expect(Date.now() - t).toBeLessThan(10_000); // ended by close, not by the wait's 30 s timer
  });

  it('close ends a stream half received', async () => {
    const sink = await DeviceSink.open();
    const got = sink.next();
    const port = Number(sink.uri.split(':').at(-1));
    const c = net.connect(port, '127.0.0.1', () => c.write('half'));
    c.on('error', () => {});
    await new Promise((r) => setTimeout(r, 100));
    const t = Date.now();
    sink.close();
    await expect(got).rejects.toMatchObject({ code: 'ECONNECT' });
    expect(Date.now() - t).toBeLessThan(10_000); // ended by close, not by the wait's 30 s timer
    c.destroy();
  });

  it('a new wait ends the one left over, and the new one still gets the next connection', async () => {
    const sink = await DeviceSink.open();
    const first = sink.next(); // its migrate command failed: nobody will connect for it
    const second = sink.next();
    await expect(first).rejects.toMatchObject({ code: 'ECONNECT' });
    const port = Number(sink.uri.split(':').at(-1));
    const c = net.connect(port, '127.0.0.1', () => c.end(Buffer.from('state')));
    expect((await second).toString()).toBe('state');
    sink.close();
  });
});
