/**
 * Authentication of the control API: a bearer token read from a file that
 * every node of a deployment and the CLI share (`--token-file`, or the
 * environment variable COLO_BLK_TOKEN_FILE).
 *
 * Notes on the design:
 * - The control API can promote a secondary, commit an epoch or re-pair a
 *   disk: whoever reaches it runs the cluster. It binds loopback by default,
 *   and a node refuses to listen anywhere else without a token.
 * - One process, one token: the nodes call each other's control APIs (the
 *   COLO coordinator calls the primary, the secondary and both guests) with
 *   the same token they check, so the setting is process-wide.
 * - The token file must not be readable by group or others (like ssh keys):
 *   a token anyone on the host can read protects nothing.
 * - `/metrics` may be left open for a scraper (`--metrics-open`); nothing
 *   else is.
 */
import { Buffer } from 'node:buffer';
import { timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import { ColoError } from '../errors.js';

export const TOKEN_ENV = 'COLO_BLK_TOKEN_FILE';
const MIN_TOKEN_CHARS = 16;

interface ControlAuth {
  token: Buffer | null;
  openMetrics: boolean;
}

const auth: ControlAuth = { token: null, openMetrics: false };

/** Use this token (null: none) for the control APIs this process serves and calls. */
export function setControlAuth(opts: { token: string | null; openMetrics?: boolean }): void {
  auth.token = opts.token === null ? null : Buffer.from(opts.token, 'utf8');
  auth.openMetrics = opts.openMetrics ?? false;
}

/** Read a token file, refusing one that others can read or that is too short to be a secret. */
export function readTokenFile(file: string): string {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (err) {
    throw new ColoError(
      'EUSAGE',
      `cannot read the token file ${file}: ${(err as Error).message}; ` +
        `make one with: (umask 077; head -c 32 /dev/urandom | base64 > ${file})`,
    );
  }
  if ((st.mode & 0o077) !== 0)
    throw new ColoError(
      'EUSAGE',
      `the token file ${file} is readable by others (mode ${(st.mode & 0o777).toString(8)}): chmod 600 ${file}`,
    );
  const token = fs.readFileSync(file, 'utf8').trim();
  if (token.length < MIN_TOKEN_CHARS || /\s/.test(token))
    throw new ColoError(
      'EUSAGE',
      `the token in ${file} must be one word of at least ${MIN_TOKEN_CHARS} characters; ` +
        `make one with: (umask 077; head -c 32 /dev/urandom | base64 > ${file})`,
    );
  return token;
}

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** Refuse to serve the control API beyond this host without a token. */
export function checkListenAllowed(host: string, port: number): void {
  if (auth.token || isLoopback(host)) return;
  throw new ColoError(
    'EUSAGE',
    `the control API would listen on ${host}:${port}, reachable from other hosts, with no authentication: ` +
      `give --token-file FILE (a secret the nodes and the CLI share; or set ${TOKEN_ENV}), ` +
      'or bind it to 127.0.0.1',
  );
}

/** Whether a request may go ahead: the right bearer token, or an open route. */
export function authorized(header: string | undefined, method: string, path: string): boolean {
  if (!auth.token) return true;
  if (auth.openMetrics && method === 'GET' && path === '/metrics') return true;
  const m = /^Bearer (\S+)$/.exec(header ?? '');
  if (!m) return false;
  const given = Buffer.from(m[1], 'utf8');
  return given.length === auth.token.length && timingSafeEqual(given, auth.token);
}

/** The header a client sends, if this process has a token. */
export function authHeader(): Record<string, string> {
  return auth.token ? { authorization: `Bearer ${auth.token.toString('utf8')}` } : {};
}
