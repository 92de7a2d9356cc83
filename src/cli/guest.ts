/** `colo-blk guest`: the stand-in VM (src/guest/). */
import process from 'node:process';
import { ColoError } from '../errors.js';
import { GuestNode } from '../guest/node.js';
import { parseHostPort } from '../util/address.js';
import { parseSize } from '../util/size.js';
import { stderrLogger, waitForSignal } from './log.js';
import { credentialsFromFlags } from '../net/tls/credentials.js';

export interface GuestCliOptions {
  listen: string;
  disk: string;
  control: string;
  seed: string;
  nondeterminism: string;
  interleave?: boolean;
  jitter: string;
  preload: string;
  tlsCerts?: string;
  tlsPsk?: string;
  json?: boolean;
  verbose?: boolean;
  quiet?: boolean;
}

function number(text: string, what: string, ok: (n: number) => boolean, expect: string): number {
  const n = Number(text);
  if (!ok(n)) throw new ColoError('EUSAGE', `${what} must be ${expect}, not '${text}'`);
  return n;
}

export async function guestCommand(opts: GuestCliOptions): Promise<void> {
  const logger = stderrLogger(opts.verbose ? 'debug' : opts.quiet ? 'quiet' : 'info');
  const node = await GuestNode.start({
    listen: parseHostPort(opts.listen, '--listen'),
    control: parseHostPort(opts.control, '--control'),
    disk: opts.disk,
    diskTls: credentialsFromFlags({ certs: opts.tlsCerts, psk: opts.tlsPsk }, []),
    seed: number(opts.seed, '--seed', (n) => Number.isSafeInteger(n) && n >= 0, 'a non-negative integer'),
    nondeterminism: number(
      opts.nondeterminism,
      '--nondeterminism',
      (n) => n >= 0 && n <= 1,
      'a fraction from 0 to 1',
    ),
    interleave: opts.interleave === true,
    jitterMs: number(opts.jitter, '--jitter', (n) => n >= 0, 'a number of ms'),
    preloadBytes: opts.preload === '0' ? 0 : parseSize(opts.preload),
    logger,
  });
  const a = node.addresses;
  if (opts.json)
    process.stdout.write(
      JSON.stringify({ event: 'listening', role: 'guest', port: a.http.port, controlPort: a.control.port }) +
        '\n',
    );
  else
    process.stdout.write(
      `guest: HTTP on ${a.http.host}:${a.http.port} (PUT/GET /kv/KEY), disk ${opts.disk}; control API on http://${a.control.host}:${a.control.port}\n`,
    );
  await waitForSignal(logger);
  await node.close();
}
