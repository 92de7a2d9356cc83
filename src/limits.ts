/**
 * Every fixed limit of colo-blk, in one place (TigerBeetle style): queues,
 * buffers, strings and loops are bounded by a number defined here, and the
 * validation code refers to these names rather than to literals.
 */

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

export const limits = {
  /** Largest NBD request payload (WRITE) or simple READ reply; the spec's portable bound. */
  maxPayloadBytes: 32 * MiB,
  /** Largest effect length for payload-less commands (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS). */
  maxEffectBytes: Number.MAX_SAFE_INTEGER,
  /** Longest export name, description or metadata context name. */
  maxStringBytes: 4096,
  /** Largest option payload accepted during negotiation; larger is a hard disconnect. */
  maxOptionBytes: 64 * KiB,
  /** Options a client may send before it must pick an export. */
  maxOptionsPerHandshake: 512,
  /** Metadata-context queries in one option. */
  maxMetaQueries: 128,
  /** Simultaneous client connections per server (default; configurable). */
  maxConnections: 4096,
  /** Simultaneous connections from one client address (default; configurable). */
  maxConnectionsPerAddress: 256,
  /** A client that has not finished the handshake after this is disconnected. */
  handshakeTimeoutMs: 10_000,
  /** Requests read but not yet answered, per connection, before reading pauses. */
  maxInflightRequests: 128,
  /** Bytes of payload held for requests in flight, per connection, before reading pauses. */
  maxInflightBytes: 64 * MiB,
  /** Descriptors in one BLOCK_STATUS reply chunk (the spec says SHOULD NOT exceed 2^20). */
  maxExtentsPerReply: 4096,
  /** Granularity of the memory device's pages. */
  memoryPageBytes: 64 * KiB,
  /** Scratch buffer for emulated write-zeroes. */
  zeroChunkBytes: 1 * MiB,
  /** How long a graceful shutdown waits for in-flight requests. */
  shutdownGraceMs: 5_000,
} as const;

export type Limits = typeof limits;

/**
 * The replication path's tunables: sizes an operator (or a test) may want
 * other than the defaults. They are passed in as options (never read from
 * the environment at import time); `tunables()` fills in the defaults.
 */
export interface Tunables {
  /**
   * Replication flow control: when the primary has this many bytes of log not
   * yet sent to a connected secondary, new PVM writes wait ...
   */
  replicationHighWaterBytes: number;
  /** ... until the backlog is down to this. */
  replicationLowWaterBytes: number;
  /**
   * Bytes of log on the wire (sent, not yet taken by the secondary). Socket
   * buffers would otherwise hold megabytes that a seal's durable answer must
   * wait behind. It must stay above the link's rate × round trip
   * (`colo-blk primary --window`). A seal's durable answer waits for what is
   * on the wire and unsent at the seal (the window plus the high-water mark);
   * the commit waits for neither (PrimaryLink.holdAfter). 2 MiB with a 1 MiB
   * mark: two 1 MiB frames in flight, where 1 MiB had one at a time and both
   * cores idled between them. Pinned pair, 1 MiB writes, four alternations
   * against 1 MiB with a 2 MiB mark: 624/592/672/669 → 778/798/734/709 MB/s,
   * checkpoint p50 4.63/4.57/4.19/4.18 → 3.57/3.66/3.69/4.16 ms; 4 KiB writes
   * unchanged.
   */
  replicationWindowBytes: number;
  /** On a promoted node, the overlay is folded into the image once it holds this much. */
  promotedFoldBytes: number;
  /** A resync commits (with a 'partial' mark) every so many bytes sent, so the logs on both sides stay bounded. */
  resyncCommitBytes: number;
  /**
   * Smallest extent of the activity log's durable (hot) bitmap; larger disks
   * get larger extents (at most 65536 of them). Recorded in the bitmap file.
   */
  activityExtentBytes: number;
  /**
   * A secondary keeps applied epoch journals, up to this many bytes together,
   * to write later epochs over (fresh pages cost more than reused ones; 0: none).
   */
  spareJournalBytes: number;
  /**
   * The primary's resend buffer in memory, shared by every epoch held; past
   * it frames go to files (the measurements are at PrimaryLog,
   * RESEND_MEMORY_BYTES). 0 keeps every frame in a file (the simulator runs
   * so half the time, to exercise that path).
   */
  resendMemoryBytes: number;
}

export const defaultTunables: Tunables = {
  replicationHighWaterBytes: 1 * MiB,
  replicationLowWaterBytes: 512 * 1024,
  replicationWindowBytes: 2 * MiB,
  promotedFoldBytes: 64 * MiB,
  resyncCommitBytes: 64 * MiB,
  activityExtentBytes: 1 * MiB,
  spareJournalBytes: 256 * MiB,
  resendMemoryBytes: 128 * MiB,
};

export function tunables(t: Partial<Tunables> = {}): Tunables {
  return { ...defaultTunables, ...t };
}
