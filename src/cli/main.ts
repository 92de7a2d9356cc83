/**
 * The colo-blk command line. Each command lives in src/cli/; this file only
 * wires them to commander and turns errors into messages and exit codes
 * (0 ok, 1 operation failed, 2 usage, 3 cannot connect).
 */
import process from 'node:process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command, CommanderError, Option } from 'commander';
import { traceFromEnv } from '../block/io-trace.js';
import { applyV8Flags } from '../sys/v8-flags.js';
import { tuneMalloc } from '../sys/malloc.js';
import { armCrashPoints } from '../crash.js';
import { ColoError, exitCodeOf, toColoError } from '../errors.js';
import { EXPORT_SPEC_HELP } from './exports.js';
import { readTokenFile, setControlAuth, TOKEN_ENV } from '../checkpoint/control-auth.js';
import { coloCommand } from './colo.js';
import { guestCommand } from './guest.js';
import { vmCommand, vmStandbyCommand } from './vm.js';
import { recoverCommand } from './recover.js';
import { serve } from './serve.js';
import { addLinkTlsOptions, addNbdTlsOptions, tlsPskCommand } from './tls.js';
import {
  checkpointCommand,
  failoverCommand,
  reprotectCommand,
  inspectCommand,
  primaryCommand,
  secondaryCommand,
  statusCommand,
} from './replication.js';

const collect = (value: string, previous: string[] = []) => [...previous, value];

// eslint-disable-next-line @typescript-eslint/no-explicit-any
function run<A extends any[]>(action: (...args: A) => Promise<void>) {
  return async (...args: A) => {
    try {
      applyV8Flags();
      tuneMalloc();
      // Fault-injection tests: see src/crash.ts and src/block/io-trace.ts.
      armCrashPoints(process.env);
      traceFromEnv(process.env);
      // The control API's token, for the APIs this process serves and the ones it calls.
      const cmd = args[args.length - 1] as Command | undefined;
      const o = (cmd instanceof Command ? cmd.opts() : {}) as { tokenFile?: string; metricsOpen?: boolean };
      const tokenFile = o.tokenFile ?? process.env[TOKEN_ENV];
      if (tokenFile) setControlAuth({ token: readTokenFile(tokenFile), openMetrics: o.metricsOpen === true });
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
    path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'package.json'),
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
    new Option(
      '--io <mode>',
      'file I/O: auto (small requests on the event loop, large ones in the thread pool), sync or async',
    )
      .choices(['sync', 'async', 'auto'])
      .default('auto'),
  )
  .option(
    '--max-connections <n>',
    'connections at once; when full, the oldest unfinished handshake makes room (default 4096)',
  )
  .option('--max-connections-per-address <n>', 'connections at once from one client address (default 256)')
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

const ioOption = () =>
  new Option(
    '--io <mode>',
    'file I/O: auto (small requests on the event loop, large ones in the thread pool), sync or async',
  )
    .choices(['sync', 'async', 'auto'])
    .default('auto');

/** Options every replication node takes: heartbeat, I/O mode, output and logging. */
const nodeOptions = (cmd: Command) =>
  cmd
    .option('--heartbeat-interval <ms>', 'send a beat on the replication link this often', '200')
    .option('--heartbeat-timeout <ms>', 'declare the peer lost after this much silence', '800')
    .addOption(ioOption())
    .option('--json', 'print the listening addresses as one JSON line')
    .option('-v, --verbose', 'log every connection and error')
    .option('-q, --quiet', 'log warnings only');

nodeOptions(
  program
    .command('primary')
    .description("serve the PVM's disk and replicate every write to a secondary, epoch by epoch")
    .option('--listen <host:port>', 'NBD address for the PVM', '127.0.0.1:10809')
    .requiredOption('--export <spec>', 'the PVM disk: NAME=PATH[,size=SIZE]')
    .requiredOption('--state <dir>', 'state directory (epoch log, metadata)')
    .requiredOption('--peer <host:port>', "the secondary's --replication-listen address")
    .option('--control <host:port>', 'control API (checkpoint, status, metrics)', '127.0.0.1:10950')
    .option('--budget <size>', 'log held for a lagging secondary before it is marked out of sync', '1G')
    .option(
      '--window <size>',
      'log on the wire to the secondary at once (sent, not yet taken); a checkpoint waits behind it. ' +
        "Raise it above the link's rate × round trip where that is larger",
      '2M',
    )
    .option(
      '--lone-after <ms>',
      'go on alone (a new generation; writes recorded for a later resync) after the secondary is unreachable this long',
      '10000',
    )
    .addHelpText(
      'after',
      `
Example:
  colo-blk primary --listen 127.0.0.1:10809 --export disk0=./pvm.img,size=1G --state ./pvm-state \\
                   --peer 127.0.0.1:10900 --control 127.0.0.1:10950`,
    ),
).action(run(primaryCommand));

nodeOptions(
  program
    .command('secondary')
    .description("buffer the PVM's writes until each checkpoint, and serve the SVM its own disk")
    .option('--listen <host:port>', 'NBD address for the SVM', '127.0.0.1:10810')
    .requiredOption(
      '--export <spec>',
      'the checkpoint image: NAME=PATH[,size=SIZE] (same size as the primary)',
    )
    .requiredOption('--state <dir>', 'state directory (epoch buffer, overlay, metadata)')
    .option('--replication-listen <host:port>', 'where the primary connects', '127.0.0.1:10900')
    .option('--control <host:port>', 'control API (status, inspect, metrics, failover)', '127.0.0.1:10951')
    .addOption(
      new Option(
        '--failover <mode>',
        'auto: take over when the primary is lost; manual: only on `colo-blk failover`',
      )
        .choices(['auto', 'manual'])
        .default('auto'),
    )
    .option(
      '--failover-grace <ms>',
      'in auto mode, how long the primary may be lost before the takeover',
      '1000',
    )
    .option(
      '--fold-size <size>',
      "once promoted, fold the SVM's overlay into the image whenever it holds this much",
      '64M',
    )
    .option(
      '--window <size>',
      'once promoted and re-protected, log on the wire to its new secondary at once (as primary --window)',
      '2M',
    )
    .option(
      '--rejoin',
      'this state directory served as a primary after a failover: rejoin as a secondary, to be resynchronised',
    )
    .option(
      '--discard-my-data',
      "forget this node's generation history, so it is fully resynchronised from the primary (after a split brain)",
    )
    .addHelpText(
      'after',
      `
Example:
  colo-blk secondary --listen 127.0.0.1:10810 --export disk0=./svm.img,size=1G --state ./svm-state \\
                     --replication-listen 127.0.0.1:10900 --control 127.0.0.1:10951`,
    ),
).action(run(secondaryCommand));

program
  .command('guest')
  .description('a stand-in VM for the COLO loop: an HTTP key-value service whose disk is a colo-blk export')
  .option('--listen <host:port>', 'HTTP address (PUT and GET /kv/KEY)', '127.0.0.1:8080')
  .requiredOption(
    '--disk <nbd-uri>',
    "its disk: nbd://HOST:PORT/EXPORT, or nbds:// over TLS (a primary export, or a secondary's SVM export)",
  )
  .option('--control <host:port>', 'control API (memory checkpoints, hash, status)', '127.0.0.1:8081')
  .option('--seed <n>', 'seed of its deterministic choices (the same on both sides)', '1')
  .option('--nondeterminism <p>', 'fraction 0-1 of responses carrying real time and randomness', '0')
  .option(
    '--interleave',
    'show the global operation counter in responses (concurrent requests then interleave visibly)',
  )
  .option('--jitter <ms>', 'delay each answer by a random 0..ms', '0')
  .option('--preload <size>', 'start with this much state in memory (not on the disk), like RAM in use', '0')
  .option(
    '--tls-certs <dir>',
    'nbds:// disk: a directory with ca-cert.pem (and client-cert/key.pem if asked for)',
  )
  .option('--tls-psk <file>', 'nbds:// disk: a psktool file (its first identity is used)')
  .option('--json', 'print the listening addresses as one JSON line')
  .option('-v, --verbose', 'log more')
  .option('-q, --quiet', 'log warnings only')
  .action(run(guestCommand));

program
  .command('vm')
  .description(
    'protect a running QEMU VM: its memory-checkpoint hook (pause, send its changed RAM and device state, resume) over QMP',
  )
  .requiredOption('--qmp <path>', "the VM's QMP socket (QEMU: -qmp unix:PATH,server=on,wait=off)")
  .requiredOption(
    '--ram <file>',
    "the VM's RAM file (QEMU: -object memory-backend-file,id=mem,size=…,mem-path=FILE,share=on -machine memory-backend=mem)",
  )
  .option('--control <host:port>', 'control API (the coordinator drives the VM here)', '127.0.0.1:8081')
  .option('--json', 'print the listening address as one JSON line')
  .option('-v, --verbose', 'log more')
  .option('-q, --quiet', 'log warnings only')
  .addHelpText(
    'after',
    `
The VM is yours: start QEMU with its RAM in a shared file and a QMP socket, and its
disk on a colo-blk primary's export. Pair it with a \`vm-standby\` on the secondary
through \`colo-blk colo --mode remus\`. See README "Protect a QEMU VM".`,
  )
  .action(run(vmCommand));

program
  .command('vm-standby')
  .description(
    "the secondary's side of a protected QEMU VM: holds its last committed memory, and runs the VM from it at failover",
  )
  .usage('--dir <dir> [options] -- <qemu command line>')
  .requiredOption(
    '--dir <dir>',
    'where the committed RAM image and device state are kept (its own directory)',
  )
  .option(
    '--control <host:port>',
    "control API (the coordinator and the PVM's agent call it)",
    '127.0.0.1:8082',
  )
  .option('--json', 'print the listening address as one JSON line')
  .option('-v, --verbose', 'log more')
  .option('-q, --quiet', 'log warnings only')
  .argument('<qemu...>', "the VM's QEMU command line, as on the primary; its disk the secondary's export")
  .addHelpText(
    'after',
    `
At failover QEMU is started from this command line with its memory-backend-file's
mem-path replaced by the committed image, -incoming defer and a QMP socket of ours;
it is given the committed device state and continued.

Example:
  colo-blk vm-standby --dir /var/lib/colo/vm0 --control 127.0.0.1:8082 -- \\
    qemu-system-x86_64 -machine q35,memory-backend=mem -m 256M \\
      -object memory-backend-file,id=mem,size=256M,mem-path=/dev/shm/vm0,share=on \\
      -drive file=nbd://127.0.0.1:10810/disk0,format=raw,if=virtio,cache=none ...`,
  )
  .action(
    run((qemu: string[], opts: Parameters<typeof vmStandbyCommand>[0]) => vmStandbyCommand(opts, qemu)),
  );

program
  .command('colo')
  .description(
    'the COLO loop: a comparer in front of the PVM and the SVM guests, and the checkpoint coordinator',
  )
  .option('--listen <host:port>', 'where clients connect', '127.0.0.1:8000')
  .requiredOption('--pvm <host:port>', "the PVM guest's service address")
  .option('--svm <host:port>', "the SVM guest's service address")
  .requiredOption('--pvm-control <host:port>', "the PVM guest's control address")
  .option('--svm-control <host:port>', "the SVM guest's control address")
  .requiredOption('--primary-control <host:port>', "the primary disk node's control address")
  .option(
    '--secondary-control <host:port>',
    "the secondary disk node's control address (run it with --failover manual)",
  )
  .option('--control <host:port>', 'control API (status, checkpoint, reprotect, metrics)', '127.0.0.1:8001')
  .addOption(
    new Option(
      '--mode <mode>',
      'colo: compare outputs; remus: hold all output until each commit; none: pass through',
    )
      .choices(['colo', 'remus', 'none'])
      .default('colo'),
  )
  .option('--interval <ms>', 'colo: the longest time between checkpoints (5000); remus: the period (100)')
  .option('--compare-timeout <ms>', 'checkpoint when output stays unmatched this long', '200')
  .option('--max-pending <size>', 'checkpoint when dirty memory plus the open disk epoch exceed this', '64M')
  .option('--heartbeat <ms>', 'probe every VM and disk node this often', '100')
  .option('--failover-after <ms>', 'a side that has not answered for this long is lost', '500')
  .option('--timeout <ms>', 'how long each checkpoint phase may take', '10000')
  .option(
    '--verify',
    'after each checkpoint, check SVM = PVM (the SVM paused, the PVM as the checkpoint captured it): state hash, and hash of the disk region the guest uses',
  )
  .option(
    '--no-early-resume',
    'keep the PVM paused until the checkpoint is decided (by default a PVM whose state can be captured runs again before the send; its output waits meanwhile)',
  )
  .option('--json', 'print events (listening, checkpoint, failover, state) as JSON lines')
  .option('-v, --verbose', 'log more')
  .option('-q, --quiet', 'log warnings only')
  .addHelpText(
    'after',
    `
Example (guests on 8080/8081 and 8090/8091, disk nodes' control on 10950/10951):
  colo-blk colo --listen 127.0.0.1:8000 --pvm 127.0.0.1:8080 --pvm-control 127.0.0.1:8081 \\
                --svm 127.0.0.1:8090 --svm-control 127.0.0.1:8091 \\
                --primary-control 127.0.0.1:10950 --secondary-control 127.0.0.1:10951`,
  )
  .action(run(coloCommand));

program
  .command('checkpoint')
  .description(
    'seal the current epoch, wait until the secondary holds it durably, then commit it (on a colo process: a whole checkpoint, memory and disk)',
  )
  .requiredOption('--control <host:port>', "the primary's control address (or a colo process's)")
  .option('--timeout <ms>', 'how long to wait for each phase', '10000')
  .option('--json', 'print {"epoch": N, ...} as JSON')
  .action(run(checkpointCommand));

program
  .command('failover')
  .description("make a secondary take over as primary now (discards uncommitted PVM writes, keeps the SVM's)")
  .requiredOption('--control <host:port>', "the secondary's control address")
  .option(
    '--force',
    'promote even a node that holds no complete checkpoint (new, or part-way through a resync): its disk is ' +
      'served as it is; only when its primary is lost for good',
  )
  .option('--json', 'print the result as JSON')
  .action(run(failoverCommand));

program
  .command('reprotect')
  .description(
    'pair a running primary (promoted, or gone on alone) with a secondary and resynchronise it; shows progress',
  )
  .requiredOption('--control <host:port>', "the primary's control address (or a colo process's)")
  .option('--peer <host:port>', "the secondary's --replication-listen address")
  .option('--svm <host:port>', 'colo: the new SVM guest')
  .option('--svm-control <host:port>', "colo: the new SVM guest's control address")
  .option('--secondary-control <host:port>', "colo: the new secondary disk node's control address")
  .option('--timeout <ms>', 'give up waiting after this long (the resync goes on)', '600000')
  .option('--no-wait', 'return once connecting has started')
  .option('--json', 'print the result as JSON')
  .addHelpText(
    'after',
    `
Example (the old primary came back as a secondary on 10.0.0.1:10900):
  colo-blk reprotect --control 127.0.0.1:10951 --peer 10.0.0.1:10900

A whole VM after a COLO failover (a fresh secondary disk node and SVM guest):
  colo-blk reprotect --control 127.0.0.1:8001 --peer 127.0.0.1:10902 \\
                     --svm 127.0.0.1:8092 --svm-control 127.0.0.1:8093 --secondary-control 127.0.0.1:10953`,
  )
  .action(run(reprotectCommand));

program
  .command('status')
  .description("a node's role, epoch, pending epochs, link state and lag")
  .requiredOption('--control <host:port>', "the node's control address")
  .option('--json', 'print JSON')
  .action(run(statusCommand));

program
  .command('inspect')
  .description('show the pending write sets: per epoch its state, writes, bytes and extents')
  .option(
    '--state <dir>',
    'a stopped node: read its state directory (a primary that was killed, not stopped, leaves there only what its resend buffer had spilled to disk)',
  )
  .option('--control <host:port>', 'a running node: ask its control API')
  .option('--epoch <n>', 'only this epoch')
  .option('--merged', 'show the final state of each range instead of the records as logged')
  .option('--limit <n>', 'extents listed per epoch (text output)', '20')
  .option('--json', 'print everything as JSON')
  .action(run(inspectCommand));

program
  .command('recover')
  .description("bring a stopped node's state back to a consistent checkpoint, and report what was done")
  .requiredOption('--state <dir>', 'the state directory of the stopped node')
  .option('--json', 'print the report as JSON')
  .addHelpText(
    'after',
    `
Verifies every journal by checksum, cuts torn tails, refuses corruption in the
middle (exit 1, naming the file and offset), rebuilds the metadata index if it
is missing or stale, and applies committed epochs not yet in the image.
Running it twice equals running it once.`,
  )
  .action(run(recoverCommand));

program
  .command('tls-psk')
  .description(
    'make a TLS pre-shared key file (for --tls-psk and --link-tls-psk; qemu and libnbd read it too)',
  )
  .argument('<file>', 'the file to create (never overwritten; mode 600)')
  .option('--identity <name>', 'the identity (username) the key belongs to', 'colo')
  .option('--json', 'print {"file", "identity"} as JSON')
  .addHelpText(
    'after',
    `
Example:
  colo-blk tls-psk ./keys.psk --identity qemu
  colo-blk serve --export disk0=./disk.img --tls-psk ./keys.psk
  nbdinfo 'nbds://127.0.0.1:10809/disk0?tls-psk-file=./keys.psk&tls-username=qemu'`,
  )
  .action(run(tlsPskCommand));

// The NBD port's TLS, on every command that serves NBD; the link's, on both nodes.
for (const cmd of program.commands) {
  if (['serve', 'primary', 'secondary'].includes(cmd.name())) addNbdTlsOptions(cmd);
  if (['primary', 'secondary'].includes(cmd.name())) addLinkTlsOptions(cmd);
}

// Every command that serves or calls a control API takes its token.
const SERVING = new Set(['primary', 'secondary', 'guest', 'colo', 'vm', 'vm-standby']);
for (const cmd of program.commands) {
  if (!cmd.options.some((o) => o.long === '--control')) continue;
  cmd.option(
    '--token-file <file>',
    `bearer token of the control APIs, shared by the nodes and the CLI (default: $${TOKEN_ENV}); ` +
      'required to serve one beyond loopback',
  );
  if (SERVING.has(cmd.name()))
    cmd.option('--metrics-open', 'serve GET /metrics without the token (for a scraper)');
}

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
