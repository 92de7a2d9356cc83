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
