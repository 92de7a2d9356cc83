// The device conformance suite run end to end: NbdDevice (our client) ->
// TCP -> NbdServer -> MemoryDevice / FileDevice, in every reply mode.
import fs from 'node:fs';
import path from 'node:path';
import { afterAll } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { MemoryDevice } from '../src/block/memory.js';
import { NbdDevice } from '../src/net/nbd-device.js';
import { deviceSuite } from './device-suite.js';
import { rmDir, startServer, tmpDir } from './helpers.js';

const dir = tmpDir();
afterAll(() => rmDir(dir));
let n = 0;

const modes = [
  { name: 'extended headers', extended: true, structured: true },
  { name: 'structured replies', extended: false, structured: true },
  { name: 'simple replies', extended: false, structured: false },
];

for (const mode of modes) {
  deviceSuite(`NbdDevice over TCP to a memory export (${mode.name})`, async (size) => {
    const srv = await startServer(new MemoryDevice(size));
    const device = await NbdDevice.connect({ port: srv.port, exportName: 'disk0', ...mode });
    return { device, cleanup: () => srv.close() };
  });
}

deviceSuite('NbdDevice over TCP to a file export', async (size) => {
  const p = path.join(dir, `nbd-${n++}.img`);
  const file = await FileDevice.open(p, { size });
  const srv = await startServer(file);
  const device = await NbdDevice.connect({ port: srv.port, exportName: 'disk0' });
  return {
    device,
    cleanup: async () => {
      await srv.close();
      await file.close();
      fs.rmSync(p);
    },
  };
});
