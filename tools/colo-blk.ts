/**
 * The colo-blk command line. Each command lives in src/cli/; this file only
 * wires them to commander and turns errors into messages and exit codes
 * (0 ok, 1 operation failed, 2 usage, 3 cannot connect).
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, Option } from 'commander';
import { ColoError, exitCodeOf, toColoError } from '../src/errors.js';
import { EXPORT_SPEC_HELP } from '../src/cli/exports.js';
import { serve } from '../src/cli/serve.js';

const collect = (value: string, previous: string[] = []) => [...previous, value];

// eslint-disable-next-line @typescript-eslint/no-explicit-any
function run<A extends any[]>(action: (...args: A) => Promise<void>) {
  return async (...args: A) => {
    try {
      await action(...args);
    } catch (err) {
      const e = toColoError(err);
      process.stderr.write(`colo-blk: ${e.message}\n`);
      process.exitCode = exitCodeOf(e);
    }
  };
}

const pkg = JSON.parse(
  fs.readFileSync(
    path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'package.json'),
    'utf8',
  ),
) as { version: string };

const program = new Command();
program
  .name('colo-blk')
  .version(pkg.version)
  .description(
    'Disk replication for COLO fault-tolerant VMs: an NBD server with epoch journaling and checkpoints.',
  )
  .showHelpAfterError('(run with --help for usage)')
  .configureOutput({ outputError: (str, write) => write(`colo-blk: ${str.replace(/^error: /, '')}`) });

program
  .command('serve')
  .description('serve disk images over NBD (no replication)')
  .option('--listen <host:port>', 'address to listen on', '127.0.0.1:10809')
  .requiredOption('--export <spec>', `an export, repeatable: ${EXPORT_SPEC_HELP}`, collect)
  .addOption(
    new Option('--io <mode>', 'file I/O: sync (page-cache fast path) or async (thread pool)')
      .choices(['sync', 'async'])
      .default('sync'),
  )
  .option('--max-connections <n>', 'refuse connections beyond this many')
  .option('--handshake-timeout <ms>', 'drop clients that have not finished the handshake after this long')
  .option('--json', 'print the listening address as one JSON line')
  .option('-v, --verbose', 'log every connection and error')
  .option('-q, --quiet', 'log warnings only')
  .addHelpText(
    'after',
    `
Examples:
  colo-blk serve --export disk0=./disk.img,size=1G
  colo-blk serve --listen 127.0.0.1:10809 --export a=./a.img --export b=./b.img,ro
  qemu-img info nbd://127.0.0.1:10809/disk0`,
  )
  .action(run(serve));

// Commander's own errors (unknown option, missing argument) are usage errors: exit 2.
program.exitOverride();
for (const cmd of program.commands) cmd.exitOverride();

program.parseAsync(process.argv).catch((err) => {
  if (err instanceof CommanderError) {
    const ok =
      err.code === 'commander.helpDisplayed' ||
      err.code === 'commander.version' ||
      err.code === 'commander.help';
    process.exitCode = ok ? 0 : 2;
    return;
  }
  process.stderr.write(`colo-blk: ${err instanceof ColoError ? err.message : String(err)}\n`);
  process.exitCode = exitCodeOf(err);
});
