/**
 * A QMP client: QEMU's JSON control protocol over a unix (or TCP) socket.
 * The transport of the QEMU memory-checkpoint hook (issue 12): `stop`,
 * `cont`, migration of device state, and the events QEMU sends meanwhile.
 *
 * Notes on the design:
 * - Connecting reads the greeting and negotiates capabilities
 *   (`qmp_capabilities`) before anything else can be sent.
 * - Every command carries an id; replies are matched by it, so events
 *   (which have no id) may arrive between a command and its reply, and are
 *   emitted as 'event' (name, data, timestamp) without disturbing calls.
 * - Every call has a deadline. An error reply becomes a QmpError with QEMU's
 *   class and description. When QEMU goes away, every call in flight and
 *   every later one fails with one clear error, and 'close' is emitted once.
 * - Input is bounded: a line longer than MAX_LINE_BYTES ends the connection.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { ColoError } from '../../errors.js';

const MAX_LINE_BYTES = 16 * 1024 * 1024;
const DEFAULT_TIMEOUT_MS = 10_000;

/** A command QEMU refused: its error class (GenericError, CommandNotFound, DeviceNotActive, ...) and text. */
export class QmpError extends Error {
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QEMU refused ${command}: ${desc} (${errorClass})`);
    this.name = 'QmpError';
  }
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** Seconds and microseconds since the epoch, as QEMU stamped it. */
  timestamp: { seconds: number; microseconds: number };
}

interface Call {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

export type QmpAddress = { path: string } | { host: string; port: number };

export class QmpClient extends EventEmitter {
  /** QEMU's version, from the greeting. */
  version = '';
  private buf = '';
  private readonly calls = new Map<string, Call>();
  private nextId = 1;
  private closedWith: Error | null = null;

  private constructor(
    private readonly socket: net.Socket,
    private readonly where: string,
  ) {
    super();
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.feed(chunk));
    socket.on('error', (err: NodeJS.ErrnoException) =>
      this.shut(
        new ColoError(
          'ECONNECT',
          err.code === 'ECONNRESET' || err.code === 'EPIPE'
            ? `QMP ${this.where}: QEMU closed the connection (${err.code})`
            : `QMP ${this.where}: ${err.message}`,
        ),
      ),
    );
    socket.on('close', () =>
      this.shut(new ColoError('ECONNECT', `QMP ${this.where}: QEMU closed the connection`)),
    );
  }

  /** Connect, read the greeting and negotiate capabilities. */
  static async connect(addr: QmpAddress, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<QmpClient> {
    const where = 'path' in addr ? addr.path : `${addr.host}:${addr.port}`;
    const socket = await new Promise<net.Socket>((resolve, reject) => {
      const s = 'path' in addr ? net.connect(addr.path) : net.connect(addr.port, addr.host);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new ColoError('ECONNECT', `QMP ${where}: no connection after ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(
          new ColoError(
            'ECONNECT',
            `QMP ${where}: ${err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? 'QEMU is not listening there (is it running with -qmp?)' : err.message}`,
          ),
        );
      });
    });
    const qmp = new QmpClient(socket, where);
    try {
      const greeting = await qmp.greeting(timeoutMs);
      const v = greeting.version?.qemu;
      qmp.version = v ? `${v.major}.${v.minor}.${v.micro}` : 'unknown';
      await qmp.execute('qmp_capabilities', undefined, timeoutMs);
    } catch (err) {
      qmp.close();
      throw err;
    }
    return qmp;
  }

  private greetingWaiter: ((g: { version?: { qemu?: Record<string, number> } }) => void) | null = null;

  private greeting(timeoutMs: number): Promise<{ version?: { qemu?: Record<string, number> } }> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new ColoError('ECONNECT', `QMP ${this.where}: no greeting after ${timeoutMs} ms`)),
        timeoutMs,
      );
      this.greetingWaiter = (g) => {
        clearTimeout(timer);
        resolve(g);
      };
      this.once('close', (err: Error) => {
        clearTimeout(timer);
        reject(err);
      });
    });
  }

  private feed(chunk: string): void {
    this.buf += chunk;
    if (this.buf.length > MAX_LINE_BYTES && !this.buf.includes('\n')) {
      this.shut(new ColoError('EPROTO', `QMP ${this.where}: a line longer than ${MAX_LINE_BYTES} bytes`));
      this.socket.destroy();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.message(line);
    }
  }

  private message(line: string): void {
    let m: Record<string, unknown>;
    try {
      m = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.shut(new ColoError('EPROTO', `QMP ${this.where}: not JSON: ${line.slice(0, 200)}`));
      this.socket.destroy();
      return;
    }
    if ('QMP' in m) {
      this.greetingWaiter?.(m.QMP as { version?: { qemu?: Record<string, number> } });
      this.greetingWaiter = null;
      return;
    }
    if (typeof m.event === 'string') {
      const ev: QmpEvent = {
        event: m.event,
        data: (m.data as Record<string, unknown>) ?? {},
        timestamp: m.timestamp as QmpEvent['timestamp'],
      };
      this.emit('event', ev);
      this.emit(ev.event, ev.data);
      return;
    }
    const id = typeof m.id === 'string' ? m.id : null;
    const call = id ? this.calls.get(id) : undefined;
    if (!call) return; // a reply to a call that timed out
    this.calls.delete(id!);
    clearTimeout(call.timer);
    if ('error' in m) {
      const e = m.error as { class?: string; desc?: string };
      call.reject(new QmpError(call.command, e.class ?? 'GenericError', e.desc ?? 'no description'));
    } else call.resolve(m.return);
  }

  /** Run a command; resolves with its `return` value. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    timeoutMs = DEFAULT_TIMEOUT_MS,
  ): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = `colo-${this.nextId++}`;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.calls.delete(id);
        reject(new ColoError('ECONNECT', `QMP ${this.where}: no answer to ${command} after ${timeoutMs} ms`));
      }, timeoutMs);
      this.calls.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.socket.write(
        JSON.stringify(args ? { execute: command, arguments: args, id } : { execute: command, id }) + '\n',
      );
    });
  }

  /** Resolve with the next event named `name` (and matching `match`, if given) within the deadline. */
  waitEvent(
    name: string,
    timeoutMs = DEFAULT_TIMEOUT_MS,
    match: (data: Record<string, unknown>) => boolean = () => true,
  ): Promise<Record<string, unknown>> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    return new Promise((resolve, reject) => {
      const onEvent = (data: Record<string, unknown>) => {
        if (!match(data)) return;
        done();
        resolve(data);
      };
      const onClose = (err: Error) => {
        done();
        reject(err);
      };
      const timer = setTimeout(() => {
        done();
        reject(new ColoError('ECONNECT', `QMP ${this.where}: no ${name} event after ${timeoutMs} ms`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.off(name, onEvent);
        this.off('close', onClose);
      };
      this.on(name, onEvent);
      this.on('close', onClose);
    });
  }

  get closed(): boolean {
    return this.closedWith !== null;
  }

  private shut(err: Error): void {
    if (this.closedWith) return;
    this.closedWith = err;
    for (const call of this.calls.values()) {
      clearTimeout(call.timer);
      call.reject(new ColoError('ECONNECT', `${err.message} (while running ${call.command})`));
    }
    this.calls.clear();
    this.emit('close', err);
  }

  close(): void {
    this.shut(new ColoError('ECONNECT', `QMP ${this.where}: closed`));
    this.socket.destroy();
  }
}
