/**
 * One error vocabulary for the whole project.
 *
 * Notes on the design: every error that crosses a module boundary is a
 * ColoError with a stable `code` string. The code decides three things in one
 * place: the NBD error number a client sees (NBD replies), the exit code of a
 * CLI command, and the `code` field in `--json` output. Callers never match on
 * messages. Errors from Node (`err.code` such as 'ENOSPC') are folded into the
 * same vocabulary by `toColoError`.
 */

/** NBD error values (NBD proto.md, "Error values"). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export type NbdErrnoName = keyof typeof NbdErrno;

/** Stable codes (the comment says who raises them); the list is also what a peer's code is checked against. */
export const ERROR_CODES = [
  ...(Object.keys(NbdErrno) as NbdErrnoName[]), // storage and protocol errors that map 1:1 onto NBD
  'EPROTO', // a peer broke the wire protocol (hard disconnect)
  'EUSAGE', // bad command-line usage or configuration
  'ENOENT', // a file or export that does not exist
  'EEXIST', // refusing to overwrite something
  'ECONNECT', // could not reach a server or peer
  'ESTALE', // a node whose generation is over (deposed primary, promoted secondary)
  'ESPLIT', // split brain: both nodes wrote after their histories diverged
  'EBUSY', // the operation cannot run in the node's current state (e.g. resync in progress)
  'EINTERNAL', // a broken internal invariant: a bug of colo-blk, never a client's or operator's mistake
] as const;
export type ErrorCode = NbdErrnoName | (typeof ERROR_CODES)[number];

export function isErrorCode(v: unknown): v is ErrorCode {
  return typeof v === 'string' && (ERROR_CODES as readonly string[]).includes(v);
}

/** A broken internal invariant (a bug): never reported as a client's EINVAL. */
export function internal(message: string): ColoError {
  return new ColoError('EINTERNAL', `internal error: ${message}`);
}

export class ColoError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'ColoError';
    this.code = code;
  }
}

const nodeCodeMap: Record<string, ErrorCode> = {
  EPERM: 'EPERM',
  EACCES: 'EPERM',
  EROFS: 'EPERM',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EINVAL: 'EINVAL',
  ENOMEM: 'ENOMEM',
  EOPNOTSUPP: 'ENOTSUP',
  ENOTSUP: 'ENOTSUP',
  ENOENT: 'ENOENT',
  EEXIST: 'EEXIST',
  ECONNREFUSED: 'ECONNECT',
  ECONNRESET: 'ECONNECT',
  ETIMEDOUT: 'ECONNECT',
};

/** Fold any thrown value into a ColoError (I/O errors default to EIO). */
export function toColoError(err: unknown): ColoError {
  if (err instanceof ColoError) return err;
  const e = err as { code?: unknown; message?: unknown };
  const mapped = typeof e?.code === 'string' ? nodeCodeMap[e.code] : undefined;
  const message = typeof e?.message === 'string' ? e.message : String(err);
  return new ColoError(mapped ?? 'EIO', message, { cause: err });
}

/** The NBD error number a client sees for an error. */
export function nbdErrnoOf(err: unknown): number {
  const code = toColoError(err).code;
  if (code in NbdErrno) return NbdErrno[code as NbdErrnoName];
  if (code === 'ENOENT') return NbdErrno.EINVAL;
  if (code === 'ESTALE') return NbdErrno.EPERM;
  return NbdErrno.EIO;
}

/** Name of an NBD error number, for messages ('EINVAL'), or 'E<n>'. */
export function nbdErrnoName(errno: number): string {
  for (const [name, value] of Object.entries(NbdErrno)) if (value === errno) return name;
  return `E${errno}`;
}

/** CLI exit codes: 0 ok, 1 operational failure, 2 usage, 3 cannot connect. */
export function exitCodeOf(err: unknown): number {
  const code = toColoError(err).code;
  if (code === 'EUSAGE') return 2;
  if (code === 'ECONNECT') return 3;
  return 1;
}
