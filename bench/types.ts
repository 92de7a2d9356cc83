/**
 * The shapes the benchmark is built from: a server definition knows how to
 * start one NBD server on the shared image, a workload definition knows how
 * to measure one figure against a running server. run.ts crosses the two lists.
 *
 * To add a server, add a ServerDef to servers.ts whose start() brings up every
 * process it needs and whose stop() takes them all down (colo-blk-replicated
 * is one: a primary, a secondary and a checkpoint loop). To add a workload,
 * add a WorkloadDef to workloads.ts. Measurements that are not "a server × a
 * client workload" (checkpoint latency, memory) are scenarios: scenarios.ts.
 */

export interface BenchContext {
  /** The repository root (where package.json is). */
  root: string;
  /** Raw image every server serves, on tmpfs. */
  image: string;
  imageSize: number;
  /** The export name clients ask for. */
  exportName: string;
  /** A tmpfs directory private to this run (image, configs, scratch files); removed at the end. */
  workDir: string;
  /** Shorter runs, for a smoke check. */
  quick: boolean;
  /** Runs of each workload per server; the best is reported. */
  runs?: number;
  /** A progress line on stderr. */
  log(message: string): void;
}

/** A server that is up and verified. */
export interface RunningServer {
  host: string;
  port: number;
  /** nbd://host:port/export */
  uri: string;
  /** The server's main process. */
  pid: number;
  /** CPUs the clients run on (`taskset -c`), when the server is pinned. */
  clientCpus?: string;
  /** null while it runs; otherwise why it is gone. */
  exited(): string | null;
  /** Stop every process of this server (SIGTERM, then SIGKILL) and wait for them. */
  stop(): Promise<void>;
  /**
   * Start tallying what the server does besides serving (e.g. the checkpoints a replicated
   * server runs); the function returned reports the tally since then. run.ts calls it around
   * each workload and keeps the tally in the measurement's detail.
   */
  tally?(): () => Promise<Record<string, unknown>>;
}

export interface ServerDef {
  /** Short name used in tables and on the command line (--servers). */
  name: string;
  /**
   * 'subject': a colo-blk variant, compared with the peers (variants are not peers of each other).
   * 'peer': a reference server.
   */
  role: 'subject' | 'peer';
  /** One line on what this is, for the report. */
  summary: string;
  /** The ids of the workloads that apply to this server; all of them when absent. */
  workloads?: string[];
  /** Start it afresh for each workload (state built up by one workload must not carry over). */
  freshPerWorkload?: boolean;
  /** The version string of the server program. */
  version(ctx: BenchContext): Promise<string>;
  /** The exact command(s) that start it, for the report. */
  commandLine(ctx: BenchContext, port: number | string): string;
  /** Start it on 127.0.0.1:port and return once it accepts connections. */
  start(ctx: BenchContext, port: number): Promise<RunningServer>;
}

export type Unit = 'MB/s' | 'IOPS';

export interface Measurement {
  /** The figure, in the workload's unit; higher is better. */
  value: number;
  /** Secondary facts (latency, repetitions, …), kept in the JSON output. */
  detail?: Record<string, unknown>;
}

export interface WorkloadDef {
  /** Name used on the command line (--only) and in JSON. */
  id: string;
  /** Groups (fio, nbdcopy, qemu-img) can be selected as a whole with --only. */
  group: string;
  title: string;
  unit: Unit;
  /** The client program, for versions in the report. */
  tool: string;
  /** The exact command with placeholders for the URI, for the report. */
  commandLine(ctx: BenchContext, uri: string): string;
  /** Prepare shared inputs once per run (e.g. a source file); optional. */
  prepare?(ctx: BenchContext): Promise<void>;
  run(ctx: BenchContext, server: RunningServer): Promise<Measurement>;
}

export type Outcome = ({ ok: true } & Measurement) | { ok: false; error: string };

/** A target of the project's issue, checked against a measured figure. */
export interface Target {
  /** What is measured, e.g. "p50 total at 64 MiB". */
  what: string;
  /** The target as text, e.g. "≤ 5 ms". */
  target: string;
  /** The measured figure as text; null when it could not be measured. */
  measured: string | null;
  pass: boolean | null;
}

/** A table of a scenario's figures, rendered in text and Markdown. */
export interface Table {
  columns: string[];
  rows: string[][];
  /** Per column: 'l' (text) or 'r' (figures); default: the first left, the rest right. */
  align?: ('l' | 'r')[];
}

export interface ScenarioReport {
  tables: { caption?: string; table: Table }[];
  targets: Target[];
  /** Facts worth a sentence in the report (where the time goes, …). */
  notes: string[];
  /** Everything measured, for --json. */
  data: Record<string, unknown>;
}

/** A measurement that is not "a client workload against a server": it starts its own processes. */
export interface ScenarioDef {
  /** Name used with --only and in JSON. */
  id: string;
  title: string;
  /** How it is set up and measured (Markdown), for the report. */
  method(ctx: BenchContext): string;
  /** tmpfs bytes it needs at most. */
  tmpfsBytes(ctx: BenchContext): number;
  run(ctx: BenchContext): Promise<ScenarioReport>;
}

export type ScenarioOutcome = ({ ok: true } & ScenarioReport) | { ok: false; error: string };
