import process from 'node:process';
import type { Logger } from '../net/server.js';

export type LogLevel = 'quiet' | 'info' | 'debug';

/** A stderr logger with timestamps; `quiet` keeps warnings only. */
export function stderrLogger(level: LogLevel): Logger {
  const line = (tag: string, msg: string) =>
    process.stderr.write(`${new Date().toISOString()} ${tag} ${msg}\n`);
  return {
    info: (msg) => level !== 'quiet' && line('info', msg),
    warn: (msg) => line('warn', msg),
    debug: (msg) => level === 'debug' && line('debug', msg),
  };
}

/** Resolve on SIGINT or SIGTERM (logged, with `what` the process does next). */
export function waitForSignal(logger: Logger, what = 'shutting down'): Promise<void> {
  return new Promise<void>((resolve) => {
    const stop = (sig: string) => {
      logger.info(`${sig}: ${what}`);
      resolve();
    };
    process.once('SIGINT', () => stop('SIGINT'));
    process.once('SIGTERM', () => stop('SIGTERM'));
  });
}
