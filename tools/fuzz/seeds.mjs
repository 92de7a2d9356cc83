#!/usr/bin/env node
// Writes the fuzz targets' seed corpora into fixtures/fuzz/: valid NBD
// sessions (every option, every command, in each reply mode) and valid link
// frames (every message both ways), from which the fuzzer mutates. Run after
// `npm run build`; the output is committed, so this only reruns when the
// protocol grows.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  writeRequestHeader,
} from '../../dist/src/net/codec.js';
import { encodeFrameBuffer } from '../../dist/src/checkpoint/format/frame.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED: 8,
  LIST_META: 9,
  SET_META: 10,
  EXTENDED: 11,
};
const Cmd = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, ZEROES: 6, BLOCK_STATUS: 7 };
const FLAGS = encodeClientFlags(3);

function request(type, offset, length, flags = 0, extended = false, cookie = 1) {
  const buf = Buffer.alloc(extended ? 32 : 28);
  writeRequestHeader(buf, 0, { flags, type, cookieHi: 0, cookieLo: cookie, offset, length }, extended);
  return buf;
}

function session(mode, exportName = 'disk0') {
  const ext = mode === 'extended';
  const parts = [FLAGS];
  if (mode === 'structured') parts.push(encodeOption(Opt.STRUCTURED));
  if (ext) parts.push(encodeOption(Opt.EXTENDED));
  if (mode !== 'simple')
    parts.push(encodeOption(Opt.SET_META, encodeMetaContextRequest(exportName, ['base:allocation'])));
  parts.push(encodeOption(Opt.GO, encodeInfoRequest(exportName, [0, 1, 2, 3])));
  const payload = Buffer.alloc(4096, 0x5a);
  const wflags = ext ? 1 << 5 : 0; // PAYLOAD_LEN with extended headers
  parts.push(request(Cmd.WRITE, 8192, payload.length, wflags | 1, ext, 2), payload);
  parts.push(request(Cmd.READ, 8192, 4096, 0, ext, 3));
  parts.push(request(Cmd.READ, 0, 65536, mode === 'simple' ? 0 : 4, ext, 4));
  parts.push(request(Cmd.FLUSH, 0, 0, 0, ext, 5));
  parts.push(request(Cmd.TRIM, 0, 4096, 0, ext, 6));
  parts.push(request(Cmd.ZEROES, 4096, 4096, 2, ext, 7));
  parts.push(request(Cmd.CACHE, 0, 4096, 0, ext, 8));
  if (mode !== 'simple') parts.push(request(Cmd.BLOCK_STATUS, 0, 1 << 20, 0, ext, 9));
  parts.push(request(Cmd.DISC, 0, 0, 0, ext, 10));
  return Buffer.concat(parts);
}

// The target's first byte picks the chunk size; 0 means one byte at a time, 63 big chunks.
const nbd = {
  'go-simple': [63, session('simple')],
  'go-structured': [63, session('structured')],
  'go-extended': [63, session('extended')],
  'go-structured-bytewise': [0, session('structured')],
  'read-only-export': [63, session('structured', 'ro')],
  'export-name': [
    63,
    Buffer.concat([
      FLAGS,
      encodeOption(Opt.EXPORT_NAME, Buffer.from('disk0')),
      request(Cmd.READ, 0, 512),
      request(Cmd.DISC, 0, 0),
    ]),
  ],
  'list-info-abort': [
    7,
    Buffer.concat([
      FLAGS,
      encodeOption(Opt.LIST),
      encodeOption(Opt.INFO, encodeInfoRequest('ro', [1, 2])),
      encodeOption(Opt.STRUCTURED),
      encodeOption(Opt.LIST_META, encodeMetaContextRequest('disk0', ['base:'])),
      encodeOption(Opt.STARTTLS),
      encodeOption(Opt.ABORT),
    ]),
  ],
};

const hello = { t: 'hello', proto: 1, size: 1 << 20, epoch: 3, session: 's1', history: [] };
const frames = {
  hello: encodeFrameBuffer(hello),
  'hello-back': encodeFrameBuffer({
    t: 'hello',
    proto: 1,
    size: 1 << 20,
    seq: 1,
    durable: 2,
    committed: 2,
    history: [],
  }),
  beat: encodeFrameBuffer({ t: 'beat' }),
  write: encodeFrameBuffer({ t: 'w', e: 3, s: 1, o: 4096 }, Buffer.alloc(512, 7)),
  zero: encodeFrameBuffer({ t: 'z', e: 3, s: 2, o: 0, l: 8192, h: true }),
  trim: encodeFrameBuffer({ t: 't', e: 3, s: 3, o: 0, l: 4096 }),
  seal: encodeFrameBuffer({ t: 'seal', e: 3, n: 3, b: 12800 }),
  commit: encodeFrameBuffer({ t: 'commit', e: 3 }),
  'hash-request': encodeFrameBuffer({ t: 'hash?', id: 1, o: 0, l: 1 << 20, bs: 65536 }),
  durable: encodeFrameBuffer({ t: 'durable', e: 3 }),
  committed: encodeFrameBuffer({ t: 'committed', e: 3, overlayDiscarded: { records: 1, bytes: 512 } }),
  error: encodeFrameBuffer({ t: 'error', code: 'EPROTO', message: 'no', e: 3 }),
};

function write(dir, name, bytes) {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(path.join(dir, `seed-${name}`), bytes);
}
const nbdDir = path.join(root, 'fixtures', 'fuzz', 'nbd-server');
for (const [name, [chunk, bytes]] of Object.entries(nbd))
  write(nbdDir, name, Buffer.concat([Buffer.from([chunk]), bytes]));
const frameDir = path.join(root, 'fixtures', 'fuzz', 'link-frames');
const all = Buffer.concat(Object.values(frames));
write(frameDir, 'stream-all', Buffer.concat([Buffer.from([0]), all]));
for (const [name, f] of Object.entries(frames)) {
  write(frameDir, `stream-${name}`, Buffer.concat([Buffer.from([0]), f]));
  write(frameDir, `body-${name}`, Buffer.concat([Buffer.from([1]), f.subarray(12)]));
}
console.log(
  `wrote ${Object.keys(nbd).length} NBD seeds to ${nbdDir} and ${1 + 2 * Object.keys(frames).length} frame seeds to ${frameDir}`,
);
