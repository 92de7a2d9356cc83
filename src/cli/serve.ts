/** `colo-blk serve`: a plain NBD server (no replication). */
import process from 'node:process';
import { ColoError } from '../errors.js';
import type { IoMode } from '../block/file.js';
import { NbdServer } from '../net/server.js';
import { parseHostPort } from '../util/address.js';
import { formatBytes } from '../util/size.js';
import { openExport, parseExportSpec } from './exports.js';
import { stderrLogger, waitForSignal, type LogLevel } from './log.js';
import { nbdTlsFromFlags, type NbdTlsFlags } from './tls.js';

export interface ServeOptions extends NbdTlsFlags {
  listen: string;
  export: string[];
  io: string;
  maxConnections?: string;
  maxConnectionsPerAddress?: string;
  handshakeTimeout?: string;
  verbose?: boolean;
  quiet?: boolean;
  json?: boolean;
}

function positive(text: string | undefined, flag: string): number | undefined {
  if (text === undefined) return undefined;
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1)
    throw new ColoError('EUSAGE', `${flag} must be a positive integer, not '${text}'`);
  return n;
}

export async function serve(opts: ServeOptions): Promise<void> {
  const level: LogLevel = opts.verbose ? 'debug' : opts.quiet ? 'quiet' : 'info';
  const logger = stderrLogger(level);
  if (!opts.export || opts.export.length === 0)
    throw new ColoError('EUSAGE', 'no --export given; e.g. --export disk0=./disk.img,size=1G');
  if (!['sync', 'async', 'auto'].includes(opts.io))
    throw new ColoError('EUSAGE', `--io must be sync, async or auto, not '${opts.io}'`);
  const { host, port } = parseHostPort(opts.listen, '--listen');
  const tls = nbdTlsFromFlags(opts);
  const specs = opts.export.map(parseExportSpec);
  const exports = [];
  try {
    for (const spec of specs) exports.push(await openExport(spec, opts.io as IoMode, logger));
  } catch (err) {
    await Promise.all(exports.map((e) => e.device.close()));
    throw err;
  }
  const server = new NbdServer(exports, {
    logger,
    tls,
    maxConnections: positive(opts.maxConnections, '--max-connections'),
    maxConnectionsPerAddress: positive(opts.maxConnectionsPerAddress, '--max-connections-per-address'),
    handshakeTimeoutMs: positive(opts.handshakeTimeout, '--handshake-timeout'),
  });
  let addr;
  try {
    addr = await server.listen(port, host);
  } catch (err) {
    await Promise.all(exports.map((e) => e.device.close()));
    const code = (err as { code?: string }).code;
    if (code === 'EADDRINUSE')
      throw new ColoError(
        'EUSAGE',
        `${host}:${port} is already in use; pick another --listen port or stop the other server`,
      );
    throw err;
  }
  const scheme = tls?.mode === 'require' ? 'nbds' : 'nbd';
  const url = (name: string) => `${scheme}://${addr.address}:${addr.port}/${name}`;
  if (opts.json) {
    process.stdout.write(
      JSON.stringify({
        event: 'listening',
        host: addr.address,
        port: addr.port,
        tls: tls ? { mode: tls.mode, kind: tls.creds!.kind } : null,
        exports: exports.map((e) => ({
          name: e.name,
          size: e.device.size,
          readOnly: !!e.readOnly,
          url: url(e.name),
        })),
      }) + '\n',
    );
  } else {
    const how = tls ? ` (TLS ${tls.mode}, ${tls.creds!.kind === 'psk' ? 'PSK' : 'X.509'})` : '';
    process.stdout.write(`listening on ${addr.address}:${addr.port}${how}\n`);
    for (const e of exports)
      process.stdout.write(
        `  ${url(e.name)}  ${formatBytes(e.device.size)}${e.readOnly ? ' read-only' : ''}  ${e.description ?? ''}\n`,
      );
  }
  await waitForSignal(logger, 'shutting down (finishing in-flight requests)');
  await server.close();
  await Promise.all(exports.map((e) => e.device.close()));
  logger.info('stopped');
}
