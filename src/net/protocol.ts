/**
 * NBD protocol constants (NetworkBlockDevice/nbd doc/proto.md, including the
 * extended-headers extension). Names follow the spec with the NBD_ prefix
 * dropped, grouped by where they appear on the wire.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;

/** Handshake flags (server, 16 bits) and client flags (32 bits). */
export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
  ERR_EXT_HEADER_REQD: 0x8000000a,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags (16 bits). */
export const TxFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STAT_PAYLOAD: 1 << 12,
} as const;

export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

export const REQUEST_HEADER_BYTES = 28;
export const EXTENDED_REQUEST_HEADER_BYTES = 32;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;
export const EXTENDED_REPLY_HEADER_BYTES = 32;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
} as const;

/**
 * Every transmission command the server accepts: the flags it takes (besides
 * PAYLOAD_LEN) and whether it changes the disk's contents. This table drives
 * request validation: an unknown command is refused, a mutating one is
 * refused on a read-only export. The mirror suite (test/mirror.test.ts) sends
 * every mutating command through a replicating primary and checks the
 * secondary's copy after each, so a new one cannot slip past the log.
 */
export const COMMANDS: Readonly<Record<number, { flags: number; mutates: boolean }>> = {
  [Cmd.READ]: { flags: CmdFlag.DF, mutates: false },
  [Cmd.WRITE]: { flags: CmdFlag.FUA, mutates: true },
  [Cmd.DISC]: { flags: 0, mutates: false },
  [Cmd.FLUSH]: { flags: 0, mutates: false },
  [Cmd.TRIM]: { flags: CmdFlag.FUA, mutates: true },
  [Cmd.CACHE]: { flags: 0, mutates: false },
  [Cmd.WRITE_ZEROES]: { flags: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, mutates: true },
  [Cmd.BLOCK_STATUS]: { flags: CmdFlag.REQ_ONE, mutates: false },
};

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

/** base:allocation status flags. */
export const StateFlag = { HOLE: 1 << 0, ZERO: 1 << 1 } as const;

export const BASE_ALLOCATION = 'base:allocation';
/** Context id we hand out for base:allocation. */
export const BASE_ALLOCATION_ID = 1;

export function cmdName(type: number): string {
  for (const [name, value] of Object.entries(Cmd)) if (value === type) return name;
  return `CMD_${type}`;
}

export function optName(opt: number): string {
  for (const [name, value] of Object.entries(Opt)) if (value === opt) return name;
  return `OPT_${opt}`;
}
