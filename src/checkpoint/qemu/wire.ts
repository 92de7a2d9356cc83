/**
 * A memory checkpoint on the wire, from the PVM's agent to the standby's
 * (`POST /mem/receive`):
 *
 *   u32 LE   header length H
 *   H bytes  msgpack header {v: 1, ramBytes, full, pages: N, deviceBytes}
 *            (full: the pages are every non-zero page; every other page is zero)
 *   N × u32 LE   page numbers, ascending
 *   N × 4096     the pages' contents, in that order
 *   deviceBytes  QEMU's device state (an x-ignore-shared migration stream)
 *
 * The sender passes the pages as views of its checkpoint copy (no copy is
 * made); the receiver checks every length and bound before it keeps anything.
 */
import { Buffer } from 'node:buffer';
import { pack, unpack } from 'msgpackr';
import { ColoError } from '../../errors.js';
import { PAGE_BYTES } from './ram.js';

const MAX_HEADER = 4096;

export interface WireCheckpoint {
  ramBytes: number;
  /** Every non-zero page of the RAM (a pairing): the others are zero. */
  full: boolean;
  pages: Uint32Array;
  data: Buffer;
  device: Buffer;
}

/** The body as a list of buffers (sent in order, never joined). */
export function encodeCheckpoint(
  ramBytes: number,
  pages: Uint32Array,
  ranges: Buffer[],
  device: Buffer,
  full = false,
): Buffer[] {
  const header = pack({ v: 1, ramBytes, full, pages: pages.length, deviceBytes: device.length });
  const len = Buffer.alloc(4);
  len.writeUInt32LE(header.length, 0);
  const numbers = Buffer.alloc(pages.length * 4);
  for (let i = 0; i < pages.length; i++) numbers.writeUInt32LE(pages[i], i * 4);
  return [len, header, numbers, ...ranges, device];
}

export function decodeCheckpoint(body: Buffer): WireCheckpoint {
  const bad = (why: string) => new ColoError('EPROTO', `not a memory checkpoint: ${why}`);
  if (body.length < 4) throw bad(`${body.length} bytes`);
  const h = body.readUInt32LE(0);
  if (h === 0 || h > MAX_HEADER || 4 + h > body.length) throw bad(`a header of ${h} bytes`);
  let header: unknown;
  try {
    header = unpack(body.subarray(4, 4 + h));
  } catch {
    throw bad('its header is not msgpack');
  }
  const { v, ramBytes, full, pages: n, deviceBytes } = (header ?? {}) as Record<string, unknown>;
  const count = (x: unknown) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 0;
  if (v !== 1) throw bad(`version ${String(v)}`);
  if (!count(ramBytes) || (ramBytes as number) % PAGE_BYTES !== 0 || !count(n) || !count(deviceBytes))
    throw bad('its header has no sizes');
  const numbersAt = 4 + h;
  const dataAt = numbersAt + (n as number) * 4;
  const deviceAt = dataAt + (n as number) * PAGE_BYTES;
  if (deviceAt + (deviceBytes as number) !== body.length)
    throw bad(
      `${n} pages and ${deviceBytes} bytes of device state need ${deviceAt + (deviceBytes as number)} bytes, not ${body.length}`,
    );
  const limit = (ramBytes as number) / PAGE_BYTES;
  const pages = new Uint32Array(n as number);
  for (let i = 0; i < pages.length; i++) {
    const p = body.readUInt32LE(numbersAt + i * 4);
    if (p >= limit) throw bad(`page ${p} is outside a RAM of ${ramBytes} bytes`);
    if (i > 0 && p <= pages[i - 1]) throw bad('its page numbers are not ascending');
    pages[i] = p;
  }
  return {
    ramBytes: ramBytes as number,
    full: full === true,
    pages,
    data: body.subarray(dataAt, deviceAt),
    device: body.subarray(deviceAt),
  };
}
