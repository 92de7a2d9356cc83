/** Human sizes: "4096", "64K", "512M", "1G", "1GiB", "2T" (binary units). */
import { ColoError } from '../errors.js';

const units: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*$/.exec(text);
  if (!m) throw new ColoError('EUSAGE', `cannot parse size '${text}' (examples: 4096, 64K, 512M, 1G)`);
  const value = Number(m[1]) * units[m[2].toUpperCase()];
  if (!Number.isSafeInteger(value) || value <= 0)
    throw new ColoError('EUSAGE', `size '${text}' must be a positive whole number of bytes`);
  return value;
}

export function formatBytes(n: number): string {
  const abs = Math.abs(n);
  if (abs < 1024) return `${n} B`;
  const names = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n / 1024;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < names.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)} ${names[i]}`;
}
