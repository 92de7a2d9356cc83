/**
 * `colo-blk vm` and `colo-blk vm-standby`: the memory-checkpoint hook of a
 * real QEMU VM (src/checkpoint/qemu/agent.ts), as the coordinator drives it
 * (`colo-blk colo --mode remus --pvm-control … --svm-control …`).
 */
import process from 'node:process';
import path from 'node:path';
import { ControlServer } from '../checkpoint/control.js';
import { QemuAgent } from '../checkpoint/qemu/agent.js';
import { parseVmCommand } from '../checkpoint/qemu/launch.js';
import { QmpClient } from '../checkpoint/qemu/qmp.js';
import { nodeStorage } from '../sys/storage.js';
import { parseHostPort } from '../util/address.js';
import { formatBytes } from '../util/size.js';
import type { Logger } from '../net/server.js';
import { stderrLogger, waitForSignal } from './log.js';

interface Common {
  control: string;
  json?: boolean;
  verbose?: boolean;
  quiet?: boolean;
}

export interface VmCliOptions extends Common {
  qmp: string;
  ram: string;
}

export interface VmStandbyCliOptions extends Common {
  dir: string;
}

/**
 * stdout carries this process's lines and, after a failover, the VM's
 * console: a line of ours starts on a line of its own, whatever the console
 * was in the middle of.
 */
let atLineStart = true;
const out = (line: string) => {
  process.stdout.write(`${atLineStart ? '' : '\n'}${line}\n`);
  atLineStart = true;
};
const vmConsole = (d: Buffer) => {
  if (d.length === 0) return;
  process.stdout.write(d);
  atLineStart = d[d.length - 1] === 0x0a;
};

const loggerFor = (opts: Common) => stderrLogger(opts.verbose ? 'debug' : opts.quiet ? 'quiet' : 'info');

async function serveAgent(agent: QemuAgent, opts: Common, logger: Logger, describe: string): Promise<void> {
  const control = new ControlServer(agent.routes());
  const where = parseHostPort(opts.control, '--control');
  const a = await control.listen(where.port, where.host);
  if (opts.json)
    out(
      JSON.stringify({
        event: 'listening',
        role: 'vm',
        agent: agent.role,
        controlPort: a.port,
        ramBytes: agent.ramBytes,
      }),
    );
  else out(`vm (${agent.role}): ${describe}; control API on http://${a.address}:${a.port}`);
  agent.on('started', (e: { pid: number; epoch: number; ms: number }) =>
    out(
      opts.json
        ? JSON.stringify({ event: 'vm-started', ...e })
        : `vm: failover: QEMU ${e.pid} runs the VM from checkpoint ${e.epoch} (${e.ms.toFixed(0)} ms)`,
    ),
  );
  // Without its VM the agent has nothing to offer: exit, so that the coordinator sees the side gone at once.
  const lost = new Promise<string>((resolve) => agent.once('lost', resolve));
  const why = await Promise.race([waitForSignal(logger).then(() => null), lost]);
  await control.close();
  agent.close();
  if (why !== null) {
    process.stderr.write(`colo-blk: the VM is gone (${why}): exiting, so that the coordinator fails over\n`);
    process.exitCode = 1;
  }
  logger.debug('closed');
}

export async function vmCommand(opts: VmCliOptions): Promise<void> {
  const logger = loggerFor(opts);
  const qmp = await QmpClient.connect({ path: opts.qmp });
  let agent: QemuAgent;
  try {
    agent = await QemuAgent.active(qmp, opts.ram, logger);
  } catch (err) {
    qmp.close();
    throw err;
  }
  await serveAgent(
    agent,
    opts,
    logger,
    `QEMU ${qmp.version} at ${opts.qmp}, ${formatBytes(agent.ramBytes)} of RAM in ${opts.ram}`,
  );
}

export async function vmStandbyCommand(opts: VmStandbyCliOptions, qemu: string[]): Promise<void> {
  const logger = loggerFor(opts);
  const command = parseVmCommand(qemu);
  const dir = path.resolve(opts.dir);
  const agent = await QemuAgent.standbyFor(nodeStorage, dir, command, logger, vmConsole);
  const epoch = agent.status().committedEpoch;
  await serveAgent(
    agent,
    opts,
    logger,
    `standby for a ${formatBytes(command.ramBytes)} VM in ${dir}${epoch ? ` (checkpoint ${epoch} committed)` : ''}; ` +
      `at failover it runs ${path.basename(command.argv[0])}`,
  );
}
