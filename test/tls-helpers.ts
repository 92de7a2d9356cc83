/**
 * Test PKI, made fresh with openssl for each suite: a CA with a server and a
 * client certificate (laid out as QEMU's tls-creds-x509 directories), a
 * second, unrelated CA with its own pairs (the "wrong CA"), and PSK files.
 */
import { spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

function openssl(args: string[], cwd: string): void {
  const r = spawnSync('openssl', args, { cwd, encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`openssl ${args.join(' ')} failed:\n${r.stderr}`);
}

const EC = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

function leaf(dir: string, ca: string, role: 'server' | 'client', cn: string): void {
  const ext = path.join(dir, `${role}.ext`);
  fs.writeFileSync(
    ext,
    [
      'basicConstraints=CA:FALSE',
      'keyUsage=digitalSignature,keyEncipherment',
      `extendedKeyUsage=${role === 'server' ? 'serverAuth' : 'clientAuth'}`,
      role === 'server' ? 'subjectAltName=IP:127.0.0.1,DNS:localhost' : `subjectAltName=DNS:${cn}`,
    ].join('\n') + '\n',
  );
  openssl(['req', ...EC, '-keyout', `${role}-key.pem`, '-out', `${role}.csr`, '-subj', `/CN=${cn}`], dir);
  openssl(
    [
      'x509',
      '-req',
      '-in',
      `${role}.csr`,
      '-CA',
      path.join(ca, 'ca-cert.pem'),
      '-CAkey',
      path.join(ca, 'ca-key.pem'),
      '-CAcreateserial',
      '-out',
      `${role}-cert.pem`,
      '-days',
      '3650',
      '-extfile',
      ext,
    ],
    dir,
  );
  fs.chmodSync(path.join(dir, `${role}-key.pem`), 0o600);
  fs.rmSync(path.join(dir, `${role}.csr`));
  fs.rmSync(ext);
}

export interface TestPki {
  /** ca-cert.pem, server-*.pem, client-*.pem: what a node uses. */
  both: string;
  /** ca-cert.pem + server pair: an NBD server. */
  server: string;
  /** ca-cert.pem + client pair: a client that presents a certificate. */
  client: string;
  /** ca-cert.pem only: a client that only checks the server. */
  caOnly: string;
  /** Another CA's everything: a stranger. */
  rogue: string;
  /** Another CA's ca-cert.pem only: a client that trusts the wrong CA. */
  rogueCaOnly: string;
}

function makeCa(dir: string, cn: string): void {
  fs.mkdirSync(dir, { recursive: true });
  fs.writeFileSync(
    path.join(dir, 'ca.cnf'),
    [
      '[req]',
      'distinguished_name=dn',
      'x509_extensions=v3',
      'prompt=no',
      '[dn]',
      `CN=${cn}`,
      '[v3]',
      'basicConstraints=critical,CA:TRUE',
      'keyUsage=critical,keyCertSign,cRLSign',
      'subjectKeyIdentifier=hash',
    ].join('\n') + '\n',
  );
  openssl(
    [
      'req',
      '-x509',
      ...EC,
      '-keyout',
      'ca-key.pem',
      '-out',
      'ca-cert.pem',
      '-days',
      '3650',
      '-config',
      'ca.cnf',
    ],
    dir,
  );
}

/** A whole test PKI under `root`. */
export function makePki(root: string): TestPki {
  const ca = path.join(root, 'ca');
  makeCa(ca, 'colo-blk test CA');
  const rogueCa = path.join(root, 'rogue-ca');
  makeCa(rogueCa, 'someone else');
  const both = path.join(root, 'both');
  const rogue = path.join(root, 'rogue');
  for (const [dir, issuer] of [
    [both, ca],
    [rogue, rogueCa],
  ]) {
    fs.mkdirSync(dir, { recursive: true });
    fs.copyFileSync(path.join(issuer, 'ca-cert.pem'), path.join(dir, 'ca-cert.pem'));
    leaf(dir, issuer, 'server', 'localhost');
    leaf(dir, issuer, 'client', 'colo-node');
  }
  const subset = (name: string, from: string, files: string[]): string => {
    const dir = path.join(root, name);
    fs.mkdirSync(dir, { recursive: true });
    for (const f of files) {
      fs.copyFileSync(path.join(from, f), path.join(dir, f));
      if (f.endsWith('-key.pem')) fs.chmodSync(path.join(dir, f), 0o600);
    }
    return dir;
  };
  return {
    both,
    rogue,
    server: subset('server', both, ['ca-cert.pem', 'server-cert.pem', 'server-key.pem']),
    client: subset('client', both, ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']),
    caOnly: subset('ca-only', both, ['ca-cert.pem']),
    rogueCaOnly: subset('rogue-ca-only', rogue, ['ca-cert.pem']),
  };
}

/** A psktool-format file with one identity; also written as DIR/keys.psk for qemu's tls-creds-psk. */
export function makePsk(
  dir: string,
  identity: string,
  key = crypto.randomBytes(32),
): { file: string; dir: string } {
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, 'keys.psk');
  fs.writeFileSync(file, `${identity}:${key.toString('hex')}\n`, { mode: 0o600 });
  return { file, dir };
}
