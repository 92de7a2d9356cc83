/**
 * The msgpack of a frame's metadata, for the shape nearly every frame has:
 * a flat map of short ASCII keys to non-negative integers, booleans and
 * short ASCII strings (a mutation record: `{t: 'w', o, e, s}`).
 *
 * Why: msgpackr's general encoder and decoder were 3-5 % of each node's CPU
 * under 4 KiB replicated writes (a frame per write on both sides); for this
 * one shape a loop over the bytes does the same work several times faster.
 *
 * Bytes: exactly what msgpackr gives for the same object (a map16 header,
 * the smallest integer form up to 2^32, float64 beyond, fixstr), so a frame
 * does not depend on which encoder wrote it; tests check both directions
 * against msgpackr. Anything else (and any object not made by `{...}`)
 * makes `packFlat` return null and `unpackFlat` undefined: the caller then
 * uses msgpackr, which also gives the errors for malformed metadata.
 */
import { Buffer } from 'node:buffer';

/** One-character strings by code, so a decoded key is not a new string each time. */
const CHARS = Array.from({ length: 128 }, (_, i) => String.fromCharCode(i));

/** Longest key or string value taken here (fixstr). */
const MAX_STR = 31;

const scratch = Buffer.allocUnsafe(1024);
/** Past this, a map is left to msgpackr (the largest entry is 1 + 31 + 1 + 31 bytes). */
const SCRATCH_LIMIT = scratch.length - 2 * (MAX_STR + 1);

/** Write `s` as a fixstr at `p`; -1 if it is not 0..31 ASCII characters. */
function writeStr(s: string, p: number): number {
  const n = s.length;
  if (n > MAX_STR) return -1;
  scratch[p++] = 0xa0 | n;
  for (let i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c > 0x7f) return -1;
    scratch[p++] = c;
  }
  return p;
}

/**
 * The msgpack of `meta` (msgpackr's bytes), as a view of a buffer that the
 * next call overwrites: copy it before packing again. Null when `meta` is
 * not of the flat shape.
 */
export function packFlat(meta: object): Buffer | null {
  if ((meta as { constructor?: unknown }).constructor !== Object) return null;
  const o = meta as Record<string, unknown>;
  scratch[0] = 0xde;
  let p = 3;
  let n = 0;
  for (const k in o) {
    if (p > SCRATCH_LIMIT || k === '__proto__') return null;
    p = writeStr(k, p);
    if (p < 0) return null;
    const v = o[k];
    if (typeof v === 'number') {
      if (!(v >= 0 && v <= Number.MAX_SAFE_INTEGER && Math.floor(v) === v)) return null;
      if (v < 0x80) scratch[p++] = v;
      else if (v < 0x100) {
        scratch[p++] = 0xcc;
        scratch[p++] = v;
      } else if (v < 0x10000) {
        scratch[p++] = 0xcd;
        p = scratch.writeUInt16BE(v, p);
      } else if (v < 0x100000000) {
        scratch[p++] = 0xce;
        p = scratch.writeUInt32BE(v, p);
      } else {
        scratch[p++] = 0xcb;
        p = scratch.writeDoubleBE(v, p);
      }
    } else if (typeof v === 'boolean') scratch[p++] = v ? 0xc3 : 0xc2;
    else if (typeof v === 'string') {
      p = writeStr(v, p);
      if (p < 0) return null;
    } else return null;
    n++;
  }
  if (n > 0xffff) return null;
  scratch.writeUInt16BE(n, 1);
  return scratch.subarray(0, p);
}

/** The keys and values of the map being unpacked (a map of more entries is left to msgpackr). */
const KEYS: string[] = new Array<string>(64).fill('');
const VALS: unknown[] = new Array<unknown>(64).fill(0);

/** The fixstr of `len` ASCII bytes at `p`, or undefined if a byte is not ASCII. */
function readStr(b: Buffer, p: number, len: number): string | undefined {
  let s = '';
  for (let i = 0; i < len; i++) {
    const c = b[p + i];
    if (c > 0x7f) return undefined;
    s += CHARS[c];
  }
  return s;
}

/**
 * The map msgpack holds in b[start, end), if it is of the flat shape and
 * fills the range exactly (what msgpackr would return for it); undefined
 * otherwise, with nothing judged: the caller asks msgpackr.
 */
export function unpackFlat(b: Buffer, start: number, end: number): Record<string, unknown> | undefined {
  let p = start;
  if (end - p < 1) return undefined;
  let n: number;
  const h = b[p];
  if (h === 0xde) {
    if (end - p < 3) return undefined;
    n = (b[p + 1] << 8) | b[p + 2];
    p += 3;
  } else if ((h & 0xf0) === 0x80) {
    n = h & 0x0f;
    p += 1;
  } else return undefined;
  if (n > KEYS.length) return undefined;
  for (let i = 0; i < n; i++) {
    if (p >= end) return undefined;
    const kh = b[p];
    if ((kh & 0xe0) !== 0xa0) return undefined;
    const kl = kh & 0x1f;
    if (p + 1 + kl >= end) return undefined; // the key, and at least one byte of value
    const key = kl === 1 && b[p + 1] < 0x80 ? CHARS[b[p + 1]] : readStr(b, p + 1, kl);
    if (key === undefined || key === '__proto__') return undefined;
    p += 1 + kl;
    const vh = b[p];
    let v: unknown;
    if (vh < 0x80) {
      v = vh;
      p += 1;
    } else if ((vh & 0xe0) === 0xa0) {
      const vl = vh & 0x1f;
      if (p + 1 + vl > end) return undefined;
      v = readStr(b, p + 1, vl);
      if (v === undefined) return undefined;
      p += 1 + vl;
    } else if (vh === 0xc2 || vh === 0xc3) {
      v = vh === 0xc3;
      p += 1;
    } else if (vh === 0xcc) {
      if (p + 2 > end) return undefined;
      v = b[p + 1];
      p += 2;
    } else if (vh === 0xcd) {
      if (p + 3 > end) return undefined;
      v = b.readUInt16BE(p + 1);
      p += 3;
    } else if (vh === 0xce) {
      if (p + 5 > end) return undefined;
      v = b.readUInt32BE(p + 1);
      p += 5;
    } else if (vh === 0xcb) {
      if (p + 9 > end) return undefined;
      v = b.readDoubleBE(p + 1);
      p += 9;
    } else return undefined;
    KEYS[i] = key;
    VALS[i] = v;
  }
  if (p !== end) return undefined;
  // A write record, the frame of nearly every 4 KiB write: made as a literal, of one shape from
  // its creation. (Stored key by key, the stores went megamorphic: 2 % of a secondary's CPU.)
  if (n === 4 && KEYS[0] === 't' && KEYS[1] === 'o' && KEYS[2] === 'e' && KEYS[3] === 's')
    return { t: VALS[0], o: VALS[1], e: VALS[2], s: VALS[3] };
  const out: Record<string, unknown> = {};
  for (let i = 0; i < n; i++) out[KEYS[i]] = VALS[i];
  return out;
}
