/**
 * TLS credentials for every port that speaks TLS: the NBD servers (STARTTLS),
 * our NBD client and the replication link. Two kinds, as in qemu-nbd and
 * nbdkit:
 *
 * - X.509: a directory laid out like QEMU's `tls-creds-x509` (and nbdkit's
 *   --tls-certificates): `ca-cert.pem`, and `server-cert.pem` +
 *   `server-key.pem` for the side that accepts, `client-cert.pem` +
 *   `client-key.pem` for the side that connects; `ca-crl.pem` if present.
 *   The same directory can hold both pairs, so one directory serves a node
 *   that both accepts and connects (the replication link).
 * - PSK: a file in the format of GnuTLS's psktool (QEMU's `keys.psk`,
 *   nbdkit's --tls-psk, libnbd's tls-psk-file): lines `username:hexkey`.
 *   The side that connects uses one identity (the first, or the one named);
 *   the side that accepts knows them all.
 *
 * Notes on the design:
 * - Files are read once, when a command starts; errors say which file and
 *   what to do. Private keys and PSK files readable by others are refused,
 *   like the control API's token file.
 * - TLS 1.2 is the floor; TLS 1.3 is preferred, PSK included. For a TLS 1.2
 *   peer, PSK is offered with ephemeral (EC)DHE suites first, then plain PSK.
 */
import { Buffer } from 'node:buffer';
import fs from 'node:fs';
import path from 'node:path';
import type tls from 'node:tls';
import { ColoError } from '../../errors.js';

export type TlsMode = 'off' | 'on' | 'require';

export const TLS_MODES: readonly TlsMode[] = ['off', 'on', 'require'];

export interface X509Credentials {
  kind: 'x509';
  dir: string;
  ca: Buffer;
  crl?: Buffer;
  server?: { cert: Buffer; key: Buffer };
  client?: { cert: Buffer; key: Buffer };
}

export interface PskCredentials {
  kind: 'psk';
  file: string;
  /** identity → key, in file order. */
  keys: Map<string, Buffer>;
  /** The identity this side presents when it connects. */
  identity: string;
}

export type TlsCredentials = X509Credentials | PskCredentials;

/** Shortest PSK accepted: 128 bits. psktool makes 256. */
const MIN_PSK_BYTES = 16;

/**
 * PSK suites for TLS 1.2, strongest first (TLS 1.3 negotiates an external PSK
 * with its own suites, which need no listing).
 */
export const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

function readFile(file: string, what: string, hint: string): Buffer {
  try {
    return fs.readFileSync(file);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new ColoError(
      'EUSAGE',
      `cannot read ${what} ${file}: ${e.code === 'ENOENT' ? 'no such file' : e.message}; ${hint}`,
    );
  }
}

function refuseIfShared(file: string, what: string): void {
  const mode = fs.statSync(file).mode;
  if ((mode & 0o077) !== 0)
    throw new ColoError(
      'EUSAGE',
      `${what} ${file} is readable by others (mode ${(mode & 0o777).toString(8)}): chmod 600 ${file}`,
    );
}

const CERT_HINT = 'see "Security" in the README for making a CA and certificates with openssl';

function pair(dir: string, role: 'server' | 'client'): { cert: Buffer; key: Buffer } | undefined {
  const certFile = path.join(dir, `${role}-cert.pem`);
  const keyFile = path.join(dir, `${role}-key.pem`);
  const hasCert = fs.existsSync(certFile);
  const hasKey = fs.existsSync(keyFile);
  if (!hasCert && !hasKey) return undefined;
  if (hasCert !== hasKey)
    throw new ColoError(
      'EUSAGE',
      `${dir} has ${hasCert ? `${role}-cert.pem but no ${role}-key.pem` : `${role}-key.pem but no ${role}-cert.pem`}; ` +
        'a certificate needs its key beside it',
    );
  refuseIfShared(keyFile, 'the private key');
  return {
    cert: readFile(certFile, 'the certificate', CERT_HINT),
    key: readFile(keyFile, 'the private key', CERT_HINT),
  };
}

/** Load an X.509 directory. `need` names the pairs this process must have. */
export function loadX509Dir(dir: string, need: ReadonlyArray<'server' | 'client'>): X509Credentials {
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch {
    throw new ColoError('EUSAGE', `the TLS certificate directory ${dir} does not exist; ${CERT_HINT}`);
  }
  if (!st.isDirectory())
    throw new ColoError(
      'EUSAGE',
      `${dir} is not a directory: --tls-certs takes the directory holding ca-cert.pem`,
    );
  const creds: X509Credentials = {
    kind: 'x509',
    dir,
    ca: readFile(path.join(dir, 'ca-cert.pem'), 'the CA certificate', CERT_HINT),
    server: pair(dir, 'server'),
    client: pair(dir, 'client'),
  };
  const crl = path.join(dir, 'ca-crl.pem');
  if (fs.existsSync(crl)) creds.crl = fs.readFileSync(crl);
  for (const role of need)
    if (!creds[role])
      throw new ColoError(
        'EUSAGE',
        `${dir} has no ${role}-cert.pem and ${role}-key.pem, which this side needs to ` +
          `${role === 'server' ? 'accept' : 'connect'}; ${CERT_HINT}`,
      );
  return creds;
}

/** Parse a psktool file: `identity:hexkey` per line. */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([^:\s]+):([0-9a-fA-F]+)$/.exec(line);
    if (!m || m[2].length % 2 !== 0)
      throw new ColoError(
        'EUSAGE',
        `${file} line ${i + 1} is not 'identity:hexkey'; make a PSK file with: colo-blk tls-psk ${file}`,
      );
    const key = Buffer.from(m[2], 'hex');
    if (key.length < MIN_PSK_BYTES)
      throw new ColoError(
        'EUSAGE',
        `${file} line ${i + 1}: the key of '${m[1]}' is ${key.length} bytes; a PSK needs at least ${MIN_PSK_BYTES}`,
      );
    if (keys.has(m[1])) throw new ColoError('EUSAGE', `${file} names identity '${m[1]}' twice`);
    keys.set(m[1], key);
  }
  if (keys.size === 0)
    throw new ColoError('EUSAGE', `${file} holds no keys; make one with: colo-blk tls-psk ${file}`);
  return keys;
}

/** Load a PSK file; `identity` picks the one this side presents (default: the first). */
export function loadPskFile(file: string, identity?: string): PskCredentials {
  const text = readFile(file, 'the PSK file', `make one with: colo-blk tls-psk ${file}`).toString('utf8');
  refuseIfShared(file, 'the PSK file');
  const keys = parsePskFile(text, file);
  const id = identity ?? keys.keys().next().value!;
  if (!keys.has(id)) throw new ColoError('EUSAGE', `${file} has no key for identity '${id}'`);
  return { kind: 'psk', file, keys, identity: id };
}

/** One line of a new PSK file: a random 256-bit key. */
export function newPskLine(identity: string, random: (n: number) => Buffer): string {
  if (!/^[^:\s]+$/.test(identity))
    throw new ColoError('EUSAGE', `a PSK identity is one word without ':' (got '${identity}')`);
  return `${identity}:${random(32).toString('hex')}\n`;
}

/**
 * Options for the side that accepts (tls.createServer or a server TLSSocket).
 * `verifyPeer`: demand a client certificate signed by the CA (X.509 only;
 * a PSK is itself mutual).
 */
export function serverTlsOptions(creds: TlsCredentials, verifyPeer: boolean): tls.TlsOptions {
  if (creds.kind === 'psk')
    return {
      minVersion: 'TLSv1.2',
      ciphers: PSK_CIPHERS,
      pskCallback: (_socket: tls.TLSSocket, identity: string) => creds.keys.get(identity) ?? null,
    } as tls.TlsOptions;
  if (!creds.server) throw new ColoError('EUSAGE', `${creds.dir} has no server-cert.pem and server-key.pem`);
  return {
    minVersion: 'TLSv1.2',
    ca: creds.ca,
    crl: creds.crl,
    cert: creds.server.cert,
    key: creds.server.key,
    requestCert: verifyPeer,
    rejectUnauthorized: verifyPeer,
  };
}

/** Options for the side that connects (tls.connect). The server is always verified. */
export function clientTlsOptions(creds: TlsCredentials): tls.ConnectionOptions {
  if (creds.kind === 'psk')
    return {
      minVersion: 'TLSv1.2',
      ciphers: PSK_CIPHERS,
      pskCallback: () => ({ identity: creds.identity, psk: creds.keys.get(creds.identity)! }),
      // A PSK authenticates both ends; there is no certificate to check.
      checkServerIdentity: () => undefined,
    };
  return {
    minVersion: 'TLSv1.2',
    ca: creds.ca,
    crl: creds.crl,
    cert: creds.client?.cert,
    key: creds.client?.key,
    rejectUnauthorized: true,
  };
}

/** Credentials from the CLI flags (--tls-certs DIR | --tls-psk FILE); null when neither is given. */
export function credentialsFromFlags(
  flags: { certs?: string; psk?: string; pskIdentity?: string },
  need: ReadonlyArray<'server' | 'client'>,
  names = { certs: '--tls-certs', psk: '--tls-psk' },
): TlsCredentials | null {
  if (flags.certs && flags.psk)
    throw new ColoError('EUSAGE', `give ${names.certs} or ${names.psk}, not both`);
  if (flags.certs) return loadX509Dir(flags.certs, need);
  if (flags.psk) return loadPskFile(flags.psk, flags.pskIdentity);
  return null;
}
