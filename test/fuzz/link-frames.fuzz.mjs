// Coverage-guided fuzz target (Jazzer.js): the replication link's frame
// decoder and message validation, as the secondary and the primary run them
// on bytes from the network. The first byte picks the mode:
// - even: the rest is a raw stream, fed in chunks to the link's FrameReader
//   with both sides' message parsers (bad magic, lengths, checksums);
// - odd: the rest is a frame body (u16 meta length, msgpack meta, data)
//   given a valid header and checksum, so the fuzzer gets past the CRC into
//   msgpack decoding and message validation.
// A finding is any error other than the two the link expects (FrameError,
// and ColoError EPROTO "bad link message"), or metadata that the hand-written
// flat-map decoder reads differently from msgpackr (or reads where msgpackr
// refuses it).
//
//   npx jazzer test/fuzz/link-frames.fuzz.mjs fixtures/fuzz/link-frames -- -max_total_time=60
import { EventEmitter } from 'node:events';
import { isDeepStrictEqual } from 'node:util';
import { Packr } from 'msgpackr';
import { unpackFlat } from '../../dist/src/checkpoint/format/flat-meta.js';
import { crc32c, decodeFrame, FrameError } from '../../dist/src/checkpoint/format/frame.js';
import { parseToPrimary, parseToSecondary } from '../../dist/src/checkpoint/link/messages.js';
import { FrameReader } from '../../dist/src/checkpoint/link/transport.js';
import { ColoError } from '../../dist/src/errors.js';

const MAGIC_C = 0x43424c47; // "CBLG"

function expected(err) {
  return err instanceof FrameError || (err instanceof ColoError && err.code === 'EPROTO');
}

class MemoryConn extends EventEmitter {
  destroyed = false;
  pause() {}
  resume() {}
  write() {
    return true;
  }
}

function parseBoth(meta) {
  for (const parse of [parseToSecondary, parseToPrimary]) {
    try {
      parse(meta);
    } catch (err) {
      if (!expected(err)) throw err;
    }
  }
}

async function stream(bytes) {
  const conn = new MemoryConn();
  let failure = null;
  new FrameReader(
    conn,
    (meta) => {
      parseBoth(meta);
      return meta;
    },
    () => {},
    (err) => (failure = err),
  );
  const chunk = 1 + (bytes.length % 97);
  for (let off = 0; off < bytes.length && !failure; off += chunk)
    conn.emit('data', bytes.subarray(off, off + chunk));
  await Promise.resolve();
  if (failure && !expected(failure)) throw failure;
}

const packr = new Packr({ useRecords: false, moreTypes: false });

/** What the flat-map decoder takes, msgpackr must read the same way. */
function sameAsMsgpackr(body) {
  if (body.length < 2) return;
  const end = Math.min(body.length, 2 + body.readUInt16BE(0));
  const flat = unpackFlat(body, 2, end);
  if (flat === undefined) return;
  let want;
  try {
    want = packr.unpack(body, { start: 2, end });
  } catch (err) {
    throw new Error(`the flat decoder read metadata msgpackr refuses (${err.message})`);
  }
  if (!isDeepStrictEqual(flat, want))
    throw new Error('the flat decoder and msgpackr read different metadata');
}

function framed(body) {
  sameAsMsgpackr(body);
  const head = Buffer.alloc(12);
  head.writeUInt32BE(MAGIC_C, 0);
  head.writeUInt32BE(body.length, 4);
  head.writeUInt32BE(crc32c(body), 8);
  const frame = Buffer.concat([head, body]);
  let f;
  try {
    f = decodeFrame(frame);
  } catch (err) {
    if (!expected(err)) throw err;
    return;
  }
  if (f) parseBoth(f.meta);
}

export async function fuzz(data) {
  const input = Buffer.from(data);
  if (input.length < 1) return;
  if (input[0] % 2 === 0) await stream(input.subarray(1));
  else if (input.length >= 3) framed(input.subarray(1));
}
