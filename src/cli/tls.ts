/**
 * TLS on the command line: the NBD port's flags (modelled on qemu-nbd and
 * nbdkit), the replication link's, and `colo-blk tls-psk` to make a PSK file.
 */
import process from 'node:process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import { Option, type Command } from 'commander';
import { ColoError } from '../errors.js';
import type { NbdTlsConfig } from '../net/server.js';
import {
  credentialsFromFlags,
  newPskLine,
  TLS_MODES,
  type TlsCredentials,
  type TlsMode,
} from '../net/tls/credentials.js';

export interface NbdTlsFlags {
  tls?: string;
  tlsCerts?: string;
  tlsPsk?: string;
  tlsVerifyPeer?: boolean;
}

export interface LinkTlsFlags {
  linkTlsCerts?: string;
  linkTlsPsk?: string;
  linkTlsIdentity?: string;
}

/** The NBD port's TLS flags on a serving command. */
export function addNbdTlsOptions(cmd: Command): Command {
  return cmd
    .addOption(
      new Option(
        '--tls <mode>',
        'NBD over TLS (STARTTLS): off; on (offered, plaintext still served); require (nothing before STARTTLS). ' +
          'Default: require when --tls-certs or --tls-psk is given, else off',
      ).choices([...TLS_MODES]),
    )
    .option(
      '--tls-certs <dir>',
      'X.509 for NBD: a directory with ca-cert.pem, server-cert.pem, server-key.pem',
    )
    .option('--tls-psk <file>', 'TLS-PSK for NBD: a psktool file of identity:hexkey lines')
    .option('--tls-verify-peer', 'X.509: demand a client certificate signed by the CA');
}

/** The replication link's TLS flags (primary and secondary). */
export function addLinkTlsOptions(cmd: Command): Command {
  return cmd
    .option(
      '--link-tls-certs <dir>',
      'mutual X.509 on the replication link: ca-cert.pem plus server-cert/key.pem (to accept) and client-cert/key.pem (to connect)',
    )
    .option('--link-tls-psk <file>', 'TLS-PSK on the replication link (the same file on both nodes)')
    .option(
      '--link-tls-identity <name>',
      'the PSK identity this node presents (default: the first in the file)',
    );
}

export function nbdTlsFromFlags(o: NbdTlsFlags): NbdTlsConfig | undefined {
  const creds = credentialsFromFlags({ certs: o.tlsCerts, psk: o.tlsPsk }, ['server']);
  const mode: TlsMode = (o.tls as TlsMode | undefined) ?? (creds ? 'require' : 'off');
  if (mode === 'off') {
    if (creds)
      throw new ColoError(
        'EUSAGE',
        `--tls off with ${o.tlsCerts ? '--tls-certs' : '--tls-psk'}: drop one (give --tls on to also serve plaintext)`,
      );
    if (o.tlsVerifyPeer) throw new ColoError('EUSAGE', '--tls-verify-peer needs --tls-certs');
    return undefined;
  }
  if (!creds)
    throw new ColoError('EUSAGE', `--tls ${mode} needs credentials: --tls-certs DIR or --tls-psk FILE`);
  if (o.tlsVerifyPeer && creds.kind !== 'x509')
    throw new ColoError(
      'EUSAGE',
      '--tls-verify-peer is for --tls-certs (a PSK already authenticates the client)',
    );
  return { mode, creds, verifyPeer: o.tlsVerifyPeer === true };
}

/** The link's credentials; a node may accept (secondary) and later connect (after a promotion): it needs both pairs. */
export function linkTlsFromFlags(o: LinkTlsFlags, role: 'primary' | 'secondary'): TlsCredentials | null {
  return credentialsFromFlags(
    { certs: o.linkTlsCerts, psk: o.linkTlsPsk, pskIdentity: o.linkTlsIdentity },
    role === 'primary' ? ['client'] : ['server', 'client'],
    { certs: '--link-tls-certs', psk: '--link-tls-psk' },
  );
}

/** `colo-blk tls-psk FILE`: a new PSK file, private from the first byte. */
export async function tlsPskCommand(file: string, opts: { identity: string; json?: boolean }): Promise<void> {
  const line = newPskLine(opts.identity, (n) => crypto.randomBytes(n));
  let fd: number;
  try {
    fd = fs.openSync(file, 'wx', 0o600);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new ColoError(
      'EUSAGE',
      e.code === 'EEXIST'
        ? `${file} already exists; remove it first or pick another name (keys are never overwritten)`
        : `cannot create ${file}: ${e.message}`,
    );
  }
  try {
    fs.writeSync(fd, line);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  if (opts.json) process.stdout.write(JSON.stringify({ file, identity: opts.identity }) + '\n');
  else
    process.stdout.write(
      `wrote a 256-bit key for identity '${opts.identity}' to ${file} (mode 600)\n` +
        `copy it to the other node over a trusted channel; qemu reads it as keys.psk in its tls-creds-psk dir\n`,
    );
}
