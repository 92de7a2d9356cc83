/** Creating the benchmark's image files. */
import { Buffer } from 'node:buffer';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';

const CHUNK = 16 * 2 ** 20;

/** Write `size` bytes of random data to `file` (created or truncated), so every block is real data. */
export function fillRandom(file: string, size: number): void {
  const buf = Buffer.allocUnsafe(CHUNK);
  const fd = fs.openSync(file, 'w', 0o644);
  try {
    for (let off = 0; off < size; off += CHUNK) {
      const n = Math.min(CHUNK, size - off);
      randomFillSync(buf, 0, n);
      let done = 0;
      while (done < n) done += fs.writeSync(fd, buf, done, n - done, off + done);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Free bytes on the filesystem holding `dir`. */
export function freeBytes(dir: string): number {
  const st = fs.statfsSync(dir);
  return st.bavail * st.bsize;
}
