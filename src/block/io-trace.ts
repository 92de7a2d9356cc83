/**
 * An optional trace of every file operation that matters for durability, for
 * the power-loss tests (test/power-loss.ts replays it to build the disk as a
 * power cut at any point of it would leave it).
 *
 * Notes on the design:
 * - Off by default, and then free: every hook is `ioTracer?.op(...)`, one
 *   null check, and its arguments are not even evaluated.
 * - Turned on in-process with `setIoTracer(sink)`, or for a whole process
 *   (a CLI node started by a test, `traceFromEnv`) with COLO_BLK_IO_TRACE=<file>: one JSON
 *   line per event, appended with a plain write (it survives a SIGKILL).
 * - What is recorded, in the order it happened: every byte range written to a
 *   file (with a copy of the bytes; `dsync` for the O_DSYNC descriptor, durable
 *   on return), ranges zeroed or punched, truncations, fdatasync calls (when
 *   they start: they cover what was written before; and when they return),
 *   file creation, deletion and renaming, and directory syncs (started and
 *   returned, like fdatasync).
 * - Data writes, truncates and syncs are hooked where they happen (journal.ts,
 *   file.ts). Deletions and renames happen in many modules, so while a tracer
 *   is set, `fs.rm`, `fs.rmSync`, `fs.unlink`, `fs.unlinkSync`, `fs.rename`
 *   and `fs.renameSync` are wrapped to report them (regular files only;
 *   directories and `fs.promises` are not traced). A deletion is recorded when
 *   it is asked for, even if it completes later in the thread pool. A wrapper
 *   some module kept after tracing stopped records nothing.
 * - Test-only seam: nothing in the service depends on it.
 */
import { Buffer } from 'node:buffer';
import fs from 'node:fs';

export type IoEvent =
  | { op: 'write'; path: string; offset: number; data: Buffer; dsync?: boolean }
  | { op: 'zero'; path: string; offset: number; length: number }
  | { op: 'truncate'; path: string; size: number }
  | { op: 'sync'; path: string; id: number }
  | { op: 'synced'; path: string; id: number }
  | { op: 'create'; path: string }
  | { op: 'delete'; path: string }
  | { op: 'rename'; path: string; to: string }
  | { op: 'dirsync'; path: string; id: number }
  | { op: 'dirsynced'; path: string; id: number };

export interface IoTraceSink {
  record(ev: IoEvent): void;
}

/** The hooks the I/O code calls (only ever through `ioTracer?.`). */
export class IoTraceHooks {
  private syncs = 0;

  constructor(readonly sink: IoTraceSink) {}

  /** Bytes written at `offset` (copied: callers reuse their buffers). */
  write(path: string, offset: number, data: Buffer | readonly Buffer[], dsync = false): void {
    const copy = Buffer.concat(Array.isArray(data) ? data : [data as Buffer]);
    this.sink.record({ op: 'write', path, offset, data: copy, ...(dsync ? { dsync } : {}) });
  }

  /** `length` bytes were copied into `fd` at `offset` by the kernel: record them as written. */
  copied(path: string, fd: number, offset: number, length: number): void {
    const data = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(fd, data, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    this.sink.record({ op: 'write', path, offset, data });
  }

  /** A range zeroed or punched (reads back as zeroes; the file size is unchanged). */
  zero(path: string, offset: number, length: number): void {
    this.sink.record({ op: 'zero', path, offset, length });
  }

  truncate(path: string, size: number): void {
    this.sink.record({ op: 'truncate', path, size });
  }

  create(path: string): void {
    this.sink.record({ op: 'create', path });
  }

  /** An fdatasync/fsync of `path` that was just started; returns `done`, which records its success. */
  sync(path: string, done: Promise<void>): Promise<void> {
    const id = ++this.syncs;
    this.sink.record({ op: 'sync', path, id });
    return done.then(() => this.sink.record({ op: 'synced', path, id }));
  }

  /** An fsync of directory `path` that was just started; `done` records its success. */
  dirSync(path: string, done: Promise<void>): Promise<void> {
    const id = ++this.syncs;
    this.sink.record({ op: 'dirsync', path, id });
    return done.then(() => this.sink.record({ op: 'dirsynced', path, id }));
  }

  /** A synchronous fsync of directory `path` returned (nothing happened while it ran). */
  dirSynced(path: string): void {
    const id = ++this.syncs;
    this.sink.record({ op: 'dirsync', path, id });
    this.sink.record({ op: 'dirsynced', path, id });
  }
}

export let ioTracer: IoTraceHooks | null = null;

type FsFn = (...args: unknown[]) => unknown;
const NAMESPACE_OPS = ['rm', 'rmSync', 'unlink', 'unlinkSync', 'rename', 'renameSync'] as const;
const originals = new Map<string, FsFn>();
const fsTable = fs as unknown as Record<string, FsFn>;

function isFile(p: unknown): p is string {
  try {
    return typeof p === 'string' && fs.lstatSync(p).isFile();
  } catch {
    return false;
  }
}

/** Nesting guards: fs.rm calls fs.unlink itself (and keeps the wrapped one it saw first). */
let syncDepth = 0;
const removing = new Set<string>();

function wrapNamespaceOps(): void {
  for (const name of NAMESPACE_OPS) {
    const original = originals.get(name) ?? fsTable[name];
    originals.set(name, original);
    const isAsync = !name.endsWith('Sync');
    fsTable[name] = function (this: unknown, ...args: unknown[]) {
      const [from, to] = args;
      const outer = ioTracer !== null && syncDepth === 0 && !removing.has(from as string);
      if (outer && isFile(from)) {
        ioTracer!.sink.record(
          name.startsWith('rename')
            ? { op: 'rename', path: from, to: String(to) }
            : { op: 'delete', path: from },
        );
        const cb = args[args.length - 1];
        if (isAsync && typeof cb === 'function') {
          removing.add(from);
          args[args.length - 1] = (...res: unknown[]) => {
            removing.delete(from);
            return (cb as FsFn)(...res);
          };
        }
      }
      syncDepth++;
      try {
        return original.apply(this, args);
      } finally {
        syncDepth--;
      }
    };
  }
}

function unwrapNamespaceOps(): void {
  for (const [name, original] of originals) fsTable[name] = original;
  originals.clear();
}

/** Start (sink) or stop (null) tracing in this process. */
export function setIoTracer(sink: IoTraceSink | null): void {
  unwrapNamespaceOps();
  ioTracer = sink ? new IoTraceHooks(sink) : null;
  if (ioTracer) wrapNamespaceOps();
}

/** Appends one JSON line per event to a file (data as base64). */
export class FileTraceSink implements IoTraceSink {
  private readonly fd: number;

  constructor(file: string) {
    this.fd = fs.openSync(file, 'a');
  }

  record(ev: IoEvent): void {
    const line = ev.op === 'write' ? { ...ev, data: ev.data.toString('base64') } : ev;
    fs.writeSync(this.fd, JSON.stringify(line) + '\n');
  }
}

/** Read a trace written by FileTraceSink (a torn last line is ignored). */
export function readIoTrace(file: string): IoEvent[] {
  const out: IoEvent[] = [];
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    if (!line) continue;
    let ev: IoEvent & { data?: unknown };
    try {
      ev = JSON.parse(line) as IoEvent & { data?: unknown };
    } catch {
      break;
    }
    if (ev.op === 'write') ev.data = Buffer.from(ev.data as unknown as string, 'base64');
    out.push(ev);
  }
  return out;
}

/** Trace this whole process to the file COLO_BLK_IO_TRACE names, if it does (the CLI calls this at start). */
export function traceFromEnv(env: NodeJS.ProcessEnv): void {
  if (env.COLO_BLK_IO_TRACE) setIoTracer(new FileTraceSink(env.COLO_BLK_IO_TRACE));
}
