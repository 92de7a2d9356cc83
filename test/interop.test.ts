/**
 * Interoperability: colo-blk served to real NBD clients (qemu-img, qemu-io,
 * nbdinfo, nbdcopy, fio's nbd engine) over loopback. Every test writes through
 * a real client and checks that exactly that reads back (bytes, hashes, exit
 * codes, parsed outputs), against a MemoryDevice export and a FileDevice export
 * on a raw image in a tmpDir; plus a read-only export and the CLI as a process.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileDevice } from '../src/block/file.js';
import { MemoryDevice } from '../src/block/memory.js';
import { native } from '../src/block/native.js';
import { NbdClient } from '../src/net/client.js';
import {
  killAll,
  prng,
  randomBytes,
  rmDir,
  ROOT,
  run,
  runOk,
  startCliServer,
  startServer,
  tmpDir,
  type RunningServer,
} from './helpers.js';
import {
  fio,
  mapSlice,
  nbdinfoJson,
  nbdinfoMap,
  qemuIo,
  qemuIoOk,
  sha256,
  sha256File,
} from './interop-helpers.js';
import { describeWith, type Need } from './tools.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const RO_SIZE = 4 * MiB;
const RO_PATTERN = 0x5a;

/** base:allocation types as nbdinfo --map prints them. */
const DATA = 0;
const HOLE_ZERO = 3;

let dir: string;
let srv: RunningServer;
let memDev: MemoryDevice;
let fileDev: FileDevice;
let filePath: string;

beforeAll(async () => {
  dir = tmpDir('colo-blk-interop-');
  memDev = new MemoryDevice(SIZE);
  filePath = path.join(dir, 'disk.img');
  fileDev = await FileDevice.open(filePath, { size: SIZE });
  const roDev = new MemoryDevice(RO_SIZE);
  await roDev.pwrite(Buffer.alloc(RO_SIZE, RO_PATTERN), 0);
  srv = await startServer([
    { name: 'mem', device: memDev, description: 'memory export' },
    { name: 'file', device: fileDev, description: 'file export' },
    { name: 'ro', device: roDev, readOnly: true, description: 'read-only export' },
  ]);
});

afterAll(async () => {
  await killAll();
  await srv?.close();
  await fileDev?.close();
  if (dir) rmDir(dir);
});

/**
 * A SIZE-byte raw source image: seeded random data with zero runs in it, some
 * left as holes in the sparse file and one written as explicit zeroes, so
 * clients that detect zeroes must still make the export read back zero there.
 */
function makeSource(file: string, seed: number): Buffer {
  const data = randomBytes(SIZE, prng(seed));
  const holes = [
    [2 * MiB, 1 * MiB],
    [10 * MiB + 4096 + 123, 777_777],
    [SIZE - 1 * MiB, 1 * MiB],
  ];
  const writtenZeroes = [16 * MiB, 2 * MiB];
  for (const [off, len] of [...holes, writtenZeroes]) data.fill(0, off, off + len);
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, SIZE);
    let pos = 0;
    for (const [off, len] of [...holes].sort((a, b) => a[0] - b[0])) {
      if (off > pos) fs.writeSync(fd, data, pos, off - pos, pos);
      pos = off + len;
    }
    if (pos < SIZE) fs.writeSync(fd, data, pos, SIZE - pos, pos);
  } finally {
    fs.closeSync(fd);
  }
  return data;
}

/** Fill the whole export with a byte through qemu-io, so stale contents can't pass for copied zeroes. */
async function fillExport(uri: string, byte: number): Promise<void> {
  await qemuIoOk(uri, [`write -P 0x${byte.toString(16)} 0 ${SIZE}`]);
}

const kinds = [
  { name: 'mem', label: 'MemoryDevice export' },
  { name: 'file', label: 'FileDevice export (raw image in tmpfs)' },
] as const;

const CLIENTS: Need[] = ['qemu-img', 'qemu-io', 'nbdinfo', 'nbdcopy', 'fio'];

describeWith(CLIENTS, 'real NBD clients', () => {
  describe.each(kinds)('$label', ({ name }) => {
    const uri = () => srv.uri(name);

    it('qemu-img info reports the virtual size', async () => {
      const r = await runOk('qemu-img', ['info', '--output=json', '-f', 'raw', uri()], { timeoutMs: 20_000 });
      const info = JSON.parse(r.stdout) as { 'virtual-size': number; format: string };
      expect(info['virtual-size']).toBe(SIZE);
      expect(info.format).toBe('raw');
    });

    it('qemu-img convert onto the export and back off it is exact; qemu-img compare sees equality and a changed byte', async () => {
      const src = path.join(dir, `${name}-convert-src.raw`);
      const back = path.join(dir, `${name}-convert-back.raw`);
      const data = makeSource(src, 0xc0c0 + name.length);
      await fillExport(uri(), 0xee);

      // -m 16 -W: 16 coroutines writing out of order, so the server sees pipelined, reordered writes.
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', '-n', '-m', '16', '-W', src, uri()], {
        timeoutMs: 30_000,
      });
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(), back], { timeoutMs: 30_000 });
      expect(fs.statSync(back).size).toBe(SIZE);
      expect(sha256File(back)).toBe(sha256(data));
      const cmp = await run('cmp', [src, back]);
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      if (name === 'file') expect(sha256File(filePath)).toBe(sha256(data)); // the image itself

      const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri()], {
        timeoutMs: 30_000,
      });
      expect(same.code, same.stdout + same.stderr).toBe(0);
      expect(same.stdout).toContain('Images are identical');

      // Change one byte (inside random data) through the export: compare must say 1 and where.
      const at = 12_345_679;
      const flipped = data[at] ^ 0xff;
      await qemuIoOk(uri(), [`write -P 0x${flipped.toString(16)} ${at} 1`]);
      const diff = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri()], {
        timeoutMs: 30_000,
      });
      expect(diff.code, diff.stdout + diff.stderr).toBe(1);
      const m = /Content mismatch at offset (\d+)/.exec(diff.stdout);
      expect(m, diff.stdout).not.toBeNull();
      const reported = Number(m![1]);
      expect(reported).toBeLessThanOrEqual(at);
      expect(reported).toBeGreaterThan(at - 64 * KiB);
      // ...and nothing but that byte changed.
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri(), back], { timeoutMs: 30_000 });
      const expected = Buffer.from(data);
      expected[at] = flipped;
      expect(sha256File(back)).toBe(sha256(expected));
    });

    it('qemu-io patterned writes (unaligned, FUA, at the tail) read back; a wrong pattern is reported', async () => {
      const r = await qemuIoOk(uri(), [
        `write -P 0xa1 0 ${1 * MiB}`,
        `write -P 0xb2 ${1 * MiB} ${512 * KiB}`,
        'write -P 0xc3 3000 5000',
        `write -f -P 0xd4 ${2 * MiB} ${64 * KiB}`,
        `write -P 0xe5 ${SIZE - 512} 512`,
        'flush',
        'read -P 0xa1 0 3000',
        'read -P 0xc3 3000 5000',
        `read -P 0xa1 8000 ${1 * MiB - 8000}`,
        `read -P 0xb2 ${1 * MiB} ${512 * KiB}`,
        `read -P 0xd4 ${2 * MiB} ${64 * KiB}`,
        `read -P 0xe5 ${SIZE - 512} 512`,
      ]);
      expect(r.stdout).toContain(`wrote 5000/5000 bytes at offset 3000`);
      expect(r.stdout).toContain(`read 5000/5000 bytes at offset 3000`);
      expect(r.stdout.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(6);

      // Deliberate mismatches: the checks above could have failed.
      const bad = await qemuIo(uri(), ['read -P 0xa2 0 4096']);
      expect(bad.code).not.toBe(0);
      expect(bad.stdout + bad.stderr).toContain('Pattern verification failed');
      const bad2 = await qemuIo(uri(), [`read -P 0xa1 ${1 * MiB - 4096} 8192`]); // straddles 0xa1 | 0xb2
      expect(bad2.code).not.toBe(0);
      expect(bad2.stdout + bad2.stderr).toContain('Pattern verification failed');
    });

    it('qemu-io discard, write -z and write -z -u: zeroed ranges read as zero, neighbours untouched', async () => {
      const z1 = { off: 2 * MiB + 1000, len: 300_000 }; // unaligned write -z (NO_HOLE)
      const z2 = { off: 3 * MiB, len: 512 * KiB }; // aligned write -z -u (may unmap)
      const z3 = { off: 3 * MiB + 700 * KiB + 5, len: 4091 }; // small unaligned write -z -u
      const d = { off: 1 * MiB, len: 1 * MiB }; // discard, 64 KiB aligned
      await qemuIoOk(uri(), [
        `write -P 0x77 0 ${4 * MiB}`,
        `discard ${d.off} ${d.len}`,
        `write -z ${z1.off} ${z1.len}`,
        `write -z -u ${z2.off} ${z2.len}`,
        `write -z -u ${z3.off} ${z3.len}`,
      ]);
      // Trimmed contents are unspecified by NBD. Both devices zero a 64 KiB-aligned
      // trim (memory drops the pages; the file punches a hole with the native helper;
      // without it the file keeps the data, which is documented as allowed).
      const trimmed = name === 'mem' || native !== null ? '0' : '0x77';
      const r = await qemuIoOk(uri(), [
        `read -P 0x77 0 ${d.off}`,
        `read -P ${trimmed} ${d.off} ${d.len}`,
        `read -P 0x77 ${d.off + d.len} ${z1.off - (d.off + d.len)}`,
        `read -P 0 ${z1.off} ${z1.len}`,
        `read -P 0x77 ${z1.off + z1.len} ${z2.off - (z1.off + z1.len)}`,
        `read -P 0 ${z2.off} ${z2.len}`,
        `read -P 0x77 ${z2.off + z2.len} ${z3.off - (z2.off + z2.len)}`,
        `read -P 0 ${z3.off} ${z3.len}`,
        `read -P 0x77 ${z3.off + z3.len} ${4 * MiB - (z3.off + z3.len)}`,
      ]);
      expect(r.stdout.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(9);
      // The zeroed range really was data before: a non-zero pattern there fails.
      const bad = await qemuIo(uri(), [`read -P 0x77 ${z1.off} 4096`]);
      expect(bad.code).not.toBe(0);
      expect(bad.stdout + bad.stderr).toContain('Pattern verification failed');
    });

    it('qemu-io aio_write + aio_flush: every pipelined write lands', async () => {
      const chunk = 256 * KiB;
      const cmds: string[] = [`write -P 0x99 ${4 * MiB} ${256 * KiB}`];
      for (let i = 0; i < 12; i++)
        cmds.push(`aio_write -P 0x${(0x30 + i).toString(16)} ${i * chunk} ${chunk}`);
      cmds.push(
        `aio_write -z ${4 * MiB} ${256 * KiB}`,
        `aio_write -f -P 0x4f ${5 * MiB + 17} 100000`,
        'aio_flush',
      );
      await qemuIoOk(uri(), cmds);
      const reads: string[] = [];
      for (let i = 0; i < 12; i++) reads.push(`read -P 0x${(0x30 + i).toString(16)} ${i * chunk} ${chunk}`);
      reads.push(`read -P 0 ${4 * MiB} ${256 * KiB}`, `read -P 0x4f ${5 * MiB + 17} 100000`);
      const r = await qemuIoOk(uri(), reads);
      expect(r.stdout.match(/^read \d+\/\d+ bytes/gm)).toHaveLength(14);
    });

    it('nbdinfo --json reports size, flags and block sizes', async () => {
      const doc = (await nbdinfoJson(uri())) as { exports: Record<string, unknown>[]; structured: boolean };
      expect(doc.structured).toBe(true);
      expect(doc.exports).toHaveLength(1);
      const e = doc.exports[0];
      expect(e['export-name']).toBe(name);
      expect(e.description).toBe(name === 'mem' ? 'memory export' : 'file export');
      expect(e['export-size']).toBe(SIZE);
      expect(e.is_read_only).toBe(false);
      expect(e.can_trim).toBe(true);
      expect(e.can_zero).toBe(true);
      expect(e.can_flush).toBe(true);
      expect(e.can_fua).toBe(true);
      expect(e.can_multi_conn).toBe(true);
      expect(e.block_size_minimum).toBe(1);
      expect(e.block_size_preferred).toBe(4096);
      expect(e.block_size_maximum).toBe(32 * MiB);
      expect(e.contexts).toContain('base:allocation');
    });

    it('nbdinfo --map shows holes and data where they were written and trimmed', async () => {
      if (name === 'mem') {
        await qemuIoOk(uri(), [
          `discard 0 ${SIZE}`,
          `write -P 1 0 ${256 * KiB}`,
          `write -P 2 ${1 * MiB} ${64 * KiB}`,
          `write -P 3 ${4 * MiB} ${1 * MiB}`,
          `discard ${4 * MiB + 256 * KiB} ${256 * KiB}`,
          `write -z ${8 * MiB} ${128 * KiB}`, // NO_HOLE: stays allocated
          `write -P 4 ${9 * MiB} ${128 * KiB}`,
          `write -z -u ${9 * MiB} ${128 * KiB}`, // may unmap: becomes a hole again
        ]);
        const map = await nbdinfoMap(uri());
        const slice = mapSlice(map, 0, SIZE);
        expect(slice).toEqual([
          { offset: 0, length: 256 * KiB, type: DATA },
          { offset: 256 * KiB, length: 768 * KiB, type: HOLE_ZERO },
          { offset: 1 * MiB, length: 64 * KiB, type: DATA },
          { offset: 1 * MiB + 64 * KiB, length: 3 * MiB - 64 * KiB, type: HOLE_ZERO },
          { offset: 4 * MiB, length: 256 * KiB, type: DATA },
          { offset: 4 * MiB + 256 * KiB, length: 256 * KiB, type: HOLE_ZERO },
          { offset: 4 * MiB + 512 * KiB, length: 512 * KiB, type: DATA },
          { offset: 5 * MiB, length: 3 * MiB, type: HOLE_ZERO },
          { offset: 8 * MiB, length: 128 * KiB, type: DATA },
          { offset: 8 * MiB + 128 * KiB, length: SIZE - 8 * MiB - 128 * KiB, type: HOLE_ZERO },
        ]);
        // What the map calls zero reads as zero; what it calls data holds the data.
        await qemuIoOk(uri(), [
          `read -P 1 0 ${256 * KiB}`,
          `read -P 0 ${256 * KiB} ${768 * KiB}`,
          `read -P 3 ${4 * MiB + 512 * KiB} ${512 * KiB}`,
          `read -P 0 ${8 * MiB} ${SIZE - 8 * MiB}`,
        ]);
      } else {
        expect(
          native,
          'native helpers (build/Release/colo_native.node) are needed for holes in files',
        ).not.toBeNull();
        await qemuIoOk(uri(), [
          `discard 0 ${SIZE}`,
          `write -P 1 0 ${4 * MiB}`,
          `discard ${1 * MiB} ${1 * MiB}`,
        ]);
        const slice = mapSlice(await nbdinfoMap(uri()), 0, SIZE);
        expect(slice).toEqual([
          { offset: 0, length: 1 * MiB, type: DATA },
          { offset: 1 * MiB, length: 1 * MiB, type: HOLE_ZERO },
          { offset: 2 * MiB, length: 2 * MiB, type: DATA },
          { offset: 4 * MiB, length: SIZE - 4 * MiB, type: HOLE_ZERO },
        ]);
        // The image file agrees: 3 MiB of data allocated, the rest (written by earlier tests) punched.
        const allocated = fs.statSync(filePath).blocks * 512;
        expect(allocated).toBeGreaterThanOrEqual(3 * MiB);
        expect(allocated).toBeLessThanOrEqual(4 * MiB); // slack for huge pages on tmpfs
        await qemuIoOk(uri(), [
          `read -P 1 0 ${1 * MiB}`,
          `read -P 0 ${1 * MiB} ${1 * MiB}`,
          `read -P 1 ${2 * MiB} ${2 * MiB}`,
        ]);
      }
    });

    it('nbdcopy round trips with 4 connections and with the default, and copies to null:', async () => {
      const src = path.join(dir, `${name}-nbdcopy-src.raw`);
      const out1 = path.join(dir, `${name}-nbdcopy-out1.raw`);
      const out2 = path.join(dir, `${name}-nbdcopy-out2.raw`);
      const data = makeSource(src, 0x5eed + name.length);
      const want = sha256(data);

      await fillExport(uri(), 0xee);
      await runOk('nbdcopy', ['--connections=4', '--flush', src, uri()], { timeoutMs: 30_000 });
      await runOk('nbdcopy', [uri(), out1], { timeoutMs: 30_000 });
      expect(sha256File(out1)).toBe(want);

      await fillExport(uri(), 0xdd);
      await runOk('nbdcopy', [src, uri()], { timeoutMs: 30_000 });
      await runOk('nbdcopy', ['--connections=4', uri(), out2], { timeoutMs: 30_000 });
      expect(sha256File(out2)).toBe(want);
      if (name === 'file') expect(sha256File(filePath)).toBe(want);

      const toNull = await run('nbdcopy', [uri(), 'null:'], { timeoutMs: 30_000 });
      expect(toNull.code, toNull.stderr).toBe(0);
    });

    it('fio nbd engine: randwrite 4k iodepth 16 and seq write 1M verify with crc32c; corruption is caught', async () => {
      const common = [
        '--ioengine=nbd',
        `--uri=${uri()}`,
        `--size=${SIZE}`,
        '--verify=crc32c',
        '--runtime=20',
      ];
      const rand = await fio(
        ['--name=randw', ...common, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--do_verify=1'],
        dir,
      );
      expect(rand.code, rand.raw.stderr).toBe(0);
      expect(rand.error).toBe(0);
      expect(rand.writeBytes).toBe(SIZE);
      expect(rand.readBytes).toBe(SIZE); // the verify pass read everything back

      const seqArgs = ['--name=seqw', ...common, '--rw=write', '--bs=1M', '--iodepth=4'];
      const seq = await fio([...seqArgs, '--do_verify=1'], dir);
      expect(seq.code, seq.raw.stderr).toBe(0);
      expect(seq.error).toBe(0);
      expect(seq.writeBytes).toBe(SIZE);
      expect(seq.readBytes).toBe(SIZE);

      // Negative control: corrupt one block behind fio's back; a verify-only pass must fail.
      await qemuIoOk(uri(), [`write -P 0x55 ${5 * MiB + 4096} 4096`]);
      const check = await fio([...seqArgs, '--verify_only'], dir);
      expect(check.code).not.toBe(0);
      expect(check.error).not.toBe(0);
      expect(check.raw.stderr).toMatch(/verify/);
    });
  });
});

describeWith(CLIENTS, 'export listing', () => {
  it('nbdinfo --list shows every export with its name and description', async () => {
    const r = await runOk('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${srv.port}`], {
      timeoutMs: 20_000,
    });
    const doc = JSON.parse(r.stdout) as { exports: Record<string, unknown>[] };
    const got = doc.exports.map((e) => [e['export-name'], e.description, e['export-size'], e.is_read_only]);
    expect(got).toEqual([
      ['mem', 'memory export', SIZE, false],
      ['file', 'file export', SIZE, false],
      ['ro', 'read-only export', RO_SIZE, true],
    ]);
    const text = await runOk('nbdinfo', ['--list', `nbd://127.0.0.1:${srv.port}`], { timeoutMs: 20_000 });
    expect(text.stdout).toContain('export="mem"');
    expect(text.stdout).toContain('description: memory export');
    expect(text.stdout).toContain('export="file"');
    expect(text.stdout).toContain('description: file export');
  });
});

describeWith(CLIENTS, 'read-only export', () => {
  it('refuses qemu-io writes, serves reads, and keeps its data', async () => {
    const uri = srv.uri('ro');
    const info = (await nbdinfoJson(uri)) as { exports: Record<string, unknown>[] };
    expect(info.exports[0].is_read_only).toBe(true);
    expect(info.exports[0].can_trim).toBe(false);
    expect(info.exports[0].can_zero).toBe(false);

    // Opened read-write: qemu refuses the read-only export.
    const rw = await qemuIo(uri, ['write -P 0x11 0 4096']);
    expect(rw.code).not.toBe(0);
    expect(rw.stdout).not.toMatch(/^wrote /m);
    expect(rw.stdout + rw.stderr).toMatch(/Permission denied|read-only/i);
    // Opened read-only: the write command fails, reads work.
    const ro = await qemuIo(uri, ['write -P 0x11 0 4096'], { readOnly: true });
    expect(ro.code).not.toBe(0);
    expect(ro.stdout).not.toMatch(/^wrote /m);
    await qemuIoOk(uri, [`read -P 0x5a 0 ${RO_SIZE}`], { readOnly: true });

    // qemu checks the flag itself, so send the writes directly: the server must refuse them.
    const client = await NbdClient.connect({ port: srv.port, exportName: 'ro' });
    try {
      expect(client.readOnly).toBe(true);
      await expect(client.write(Buffer.alloc(4096, 0x11), 0)).rejects.toMatchObject({ code: 'EPERM' });
      await expect(client.zero(4096, 4096)).rejects.toMatchObject({ code: 'EPERM' });
      await expect(client.trim(0, 64 * KiB)).rejects.toMatchObject({ code: 'EPERM' });
      const back = await client.read(0, RO_SIZE);
      expect(back.equals(Buffer.alloc(RO_SIZE, RO_PATTERN))).toBe(true);
    } finally {
      await client.close();
    }
    await qemuIoOk(uri, [`read -P 0x5a 0 ${RO_SIZE}`], { readOnly: true });
    const toNull = await run('nbdcopy', [uri, 'null:'], { timeoutMs: 30_000 });
    expect(toNull.code, toNull.stderr).toBe(0);
    const out = path.join(dir, 'ro-copy.raw');
    await runOk('nbdcopy', [uri, out], { timeoutMs: 30_000 });
    expect(sha256File(out)).toBe(sha256(Buffer.alloc(RO_SIZE, RO_PATTERN)));
  });
});

describeWith(CLIENTS, 'CLI process', () => {
  beforeAll(async () => {
    // npm test builds first (pretest); a run of this file alone may not have.
    if (!fs.existsSync(path.join(ROOT, 'dist', 'src', 'cli', 'main.js')))
      await runOk('npx', ['tsc', '-p', 'tsconfig.build.json'], { cwd: ROOT, timeoutMs: 55_000 });
  });

  it('creates the image, serves qemu-io, and exits 0 on SIGTERM with the data in the file', async () => {
    const img = path.join(dir, 'cli.img');
    const cliSize = 16 * MiB;
    const cli = await startCliServer(['--export', `disk0=${img},size=16M`]);
    let stopped = false;
    try {
      expect(fs.statSync(img).size).toBe(cliSize);
      const uri = `nbd://127.0.0.1:${cli.port}/disk0`;
      const info = await runOk('qemu-img', ['info', '--output=json', '-f', 'raw', uri], {
        timeoutMs: 20_000,
      });
      expect(JSON.parse(info.stdout)['virtual-size']).toBe(cliSize);
      await qemuIoOk(uri, [
        `write -P 0x6b 0 ${1 * MiB}`,
        'write -P 0x6d 3000000 12345',
        `write -f -P 0x6c ${cliSize - 4096} 4096`,
        `read -P 0x6b 0 ${1 * MiB}`,
        'read -P 0x6d 3000000 12345',
        `read -P 0x6c ${cliSize - 4096} 4096`,
      ]);
      const exit = await cli.stop('SIGTERM');
      stopped = true;
      expect(exit, cli.stderr()).toEqual({ code: 0, signal: null });
    } finally {
      if (!stopped) await cli.stop('SIGKILL');
    }
    const expected = Buffer.alloc(cliSize);
    expected.fill(0x6b, 0, 1 * MiB);
    expected.fill(0x6d, 3_000_000, 3_000_000 + 12_345);
    expected.fill(0x6c, cliSize - 4096);
    const got = fs.readFileSync(img);
    expect(got.length).toBe(cliSize);
    expect(sha256(got)).toBe(sha256(expected));
  });
});
