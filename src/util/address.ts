import { ColoError } from '../errors.js';

export interface Endpoint {
  host: string;
  port: number;
}

/** "127.0.0.1:10809", "localhost:10809", "[::1]:10809" or ":10809" (loopback). */
export function parseHostPort(text: string, what = 'address'): Endpoint {
  const m = /^(?:\[([^\]]+)\]|([^:]*)):(\d+)$/.exec(text.trim());
  if (!m) throw new ColoError('EUSAGE', `bad ${what} '${text}': expected HOST:PORT, e.g. 127.0.0.1:10809`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  const port = Number(m[3]);
  if (!(port >= 0 && port <= 65535)) throw new ColoError('EUSAGE', `bad port ${m[3]} in ${what} '${text}'`);
  return { host, port };
}
