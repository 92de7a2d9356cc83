/**
 * Block hashes for resynchronisation: both sides hash the same ranges in
 * fixed-size blocks, and only blocks whose hashes differ are sent. SHA-256,
 * truncated to 16 bytes per block: a comparison of disk contents, not a
 * security boundary (a collision would need both disks to be crafted).
 */
import { createHash } from 'node:crypto';

export const HASH_BYTES = 16;
/** First-level block (whole-disk comparison); differing blocks are compared again in sub-blocks. */
export const HASH_BLOCK = 64 * 1024;
export const HASH_SUBBLOCK = 4 * 1024;

export type RangeReader = (buf: Buffer, offset: number) => Promise<void>;

/** Hashes of [offset, offset+length) in blocks of `block` bytes (the last one may be short). */
export async function blockHashes(
  read: RangeReader,
  offset: number,
  length: number,
  block: number,
): Promise<Buffer> {
  const n = Math.ceil(length / block);
  const out = Buffer.allocUnsafe(n * HASH_BYTES);
  const chunk = Buffer.allocUnsafe(Math.min(length, Math.max(block, 1024 * 1024)));
  let i = 0;
  for (let at = 0; at < length; at += chunk.length) {
    const len = Math.min(chunk.length, length - at);
    const view = chunk.subarray(0, len);
    await read(view, offset + at);
    for (let b = 0; b < len; b += block) {
      createHash('sha256')
        .update(view.subarray(b, Math.min(b + block, len)))
        .digest()
        .copy(out, i * HASH_BYTES, 0, HASH_BYTES);
      i++;
    }
  }
  return out;
}
