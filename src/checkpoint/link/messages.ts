/**
 * The replication link's messages, typed, and validated where they enter.
 *
 * A frame's metadata arrives as whatever msgpack decoded; `parseToSecondary`
 * and `parseToPrimary` check every field the receiver will use (types,
 * ranges, the error code against the vocabulary) and return a typed message,
 * or throw EPROTO: the link then drops the connection, and nothing of the
 * frame is acted on. Past this module no code casts a message.
 */
import { ColoError, isErrorCode, type ErrorCode } from '../../errors.js';
import type { Range } from '../../failover/activity.js';
import { HASH_ALGS, type HashAlg } from '../../failover/reprotect/hash-pool.js';
import type { Decision, Generation, SyncMode } from '../../failover/history.js';
import type { MutationRecord, SealRecord } from '../format/records.js';

export const LINK_PROTOCOL = 2;

/** A resync's mark on a commit: 'partial' makes the secondary inconsistent; 'done' carries the history to adopt. */
export interface SyncMark {
  state: 'partial' | 'done';
  target: string;
  mode: SyncMode;
  history?: Generation[];
}

/** The primary introduces itself. */
export interface PrimaryHello {
  t: 'hello';
  proto: number;
  size: number;
  /** The primary's open epoch. */
  epoch: number;
  session: string;
  history: Generation[];
  /** The primary cannot resend from its log what the secondary may lack. */
  needsResync: boolean;
  /** Flow control: the bytes of log the primary keeps on the wire; the secondary says what it took ('got') every quarter of it. */
  window?: number;
}

/** The secondary's answer: its state and decision, or (bare) the prelude of a refusal. */
export interface SecondaryHello {
  t: 'hello';
  proto: number;
  size: number;
  seq?: number;
  durable?: number;
  committed?: number;
  history?: Generation[];
  decision?: Decision;
  /** Regions the secondary itself may have written (an old primary's unfinished epochs): to roll back. */
  hot?: Range[];
  /** The block digests it can hash with (absent: SHA-256 only, a secondary before BLAKE3). */
  hashes?: HashAlg[];
}

export interface Beat {
  t: 'beat';
}
export interface CommitRequest {
  t: 'commit';
  e: number;
  sync?: SyncMark;
}
export interface HashRequest {
  t: 'hash?';
  id: number;
  o: number;
  l: number;
  bs: number;
  /** The digest to hash with (absent: SHA-256). */
  alg?: HashAlg;
}
export interface DurableReply {
  t: 'durable';
  e: number;
}
export interface CommittedReply {
  t: 'committed';
  e: number;
  epochs?: number[];
  overlayDiscarded?: { records: number; bytes: number };
}
/** Flow control: the secondary has taken `n` bytes of the log's frames on this connection. */
export interface Received {
  t: 'got';
  n: number;
}
export interface HashReply {
  t: 'hash';
  id: number;
}
export interface ErrorReply {
  t: 'error';
  code: ErrorCode;
  message: string;
  /** The epoch the error is about, if any. */
  e?: number;
}

export type ToSecondary = PrimaryHello | Beat | MutationRecord | SealRecord | CommitRequest | HashRequest;
export type ToPrimary =
  SecondaryHello | Beat | Received | DurableReply | CommittedReply | HashReply | ErrorReply;

// -----------------------------------------------------------------------------
// Field checks

type Obj = Record<string, unknown>;

function bad(what: string): never {
  throw new ColoError('EPROTO', `bad link message: ${what}`);
}

function obj(v: unknown, what: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) bad(`${what} is not a map`);
  return v as Obj;
}

function uint(m: Obj, k: string, what: string): number {
  const v = m[k];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
    bad(`${what}.${k} is not a non-negative integer (${String(v)})`);
  return v;
}

function optUint(m: Obj, k: string, what: string): number | undefined {
  return m[k] === undefined || m[k] === null ? undefined : uint(m, k, what);
}

function str(m: Obj, k: string, what: string, max = 4096): string {
  const v = m[k];
  if (typeof v !== 'string' || v.length > max) bad(`${what}.${k} is not a string`);
  return v;
}

function optBool(m: Obj, k: string, what: string): boolean | undefined {
  const v = m[k];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'boolean') bad(`${what}.${k} is not a boolean`);
  return v;
}

function generations(v: unknown, what: string): Generation[] {
  if (!Array.isArray(v) || v.length > 10_000) bad(`${what} is not a list of generations`);
  return v.map((g, i) => {
    const o = obj(g, `${what}[${i}]`);
    const w = `${what}[${i}]`;
    return {
      n: uint(o, 'n', w),
      id: str(o, 'id', w, 64),
      by: str(o, 'by', w, 64),
      base: uint(o, 'base', w),
      at: uint(o, 'at', w),
      reason: str(o, 'reason', w),
      ...(optBool(o, 'protected', w) ? { protected: true } : {}),
      ...(optBool(o, 'forced', w) ? { forced: true } : {}),
    };
  });
}

function hashAlg(v: unknown, what: string): HashAlg {
  if (!HASH_ALGS.includes(v as HashAlg)) bad(`${what} is not a digest this node knows (${String(v)})`);
  return v as HashAlg;
}

/** A peer's digests: the ones this node knows (a newer peer may list others). */
function hashAlgs(v: unknown, what: string): HashAlg[] {
  if (!Array.isArray(v) || v.length > 16 || !v.every((a) => typeof a === 'string' && a.length <= 32))
    bad(`${what} is not a list of digest names`);
  return (v as string[]).filter((a): a is HashAlg => HASH_ALGS.includes(a as HashAlg));
}

function ranges(v: unknown, what: string): Range[] {
  if (!Array.isArray(v) || v.length > 1 << 20) bad(`${what} is not a list of ranges`);
  return v.map((r, i) => {
    const o = obj(r, `${what}[${i}]`);
    return { offset: uint(o, 'offset', what), length: uint(o, 'length', what) };
  });
}

function syncMode(v: unknown, what: string): SyncMode {
  if (v !== 'incremental' && v !== 'full') bad(`${what} is not a sync mode`);
  return v;
}

function decision(v: unknown): Decision {
  const o = obj(v, 'decision');
  const reason = str(o, 'reason', 'decision');
  switch (o.action) {
    case 'none':
      return { action: 'none', reason };
    case 'resync':
      return {
        action: 'resync',
        mode: syncMode(o.mode, 'decision.mode'),
        reason,
        ...(o.common ? { common: generations([o.common], 'decision.common')[0] } : {}),
      };
    case 'refuse':
      if (o.kind !== 'stale-primary' && o.kind !== 'split-brain') bad('decision.kind');
      return { action: 'refuse', kind: o.kind, reason };
    default:
      return bad(`decision.action '${String(o.action)}'`);
  }
}

function syncMark(v: unknown): SyncMark | undefined {
  if (v === undefined || v === null) return undefined;
  const o = obj(v, 'sync');
  if (o.state !== 'partial' && o.state !== 'done') bad('sync.state');
  return {
    state: o.state,
    target: str(o, 'target', 'sync', 64),
    mode: syncMode(o.mode, 'sync.mode'),
    ...(o.history !== undefined && o.history !== null
      ? { history: generations(o.history, 'sync.history') }
      : {}),
  };
}

/** A mutation record or a seal (the frames of an epoch). */
function epochRecord(m: Obj): MutationRecord | SealRecord {
  const w = `'${String(m.t)}' record`;
  const e = uint(m, 'e', w);
  if (m.t === 'seal') return { t: 'seal', e, n: uint(m, 'n', w), b: uint(m, 'b', w) };
  const s = uint(m, 's', w);
  const o = uint(m, 'o', w);
  const f = optBool(m, 'f', w) ? { f: true } : {};
  if (m.t === 'w') return { t: 'w', e, s, o, ...f };
  const l = uint(m, 'l', w);
  if (m.t === 't') return { t: 't', e, s, o, l, ...f };
  return { t: 'z', e, s, o, l, ...(optBool(m, 'h', w) ? { h: true } : {}), ...f };
}

// -----------------------------------------------------------------------------
// The two directions

/** What a secondary receives from its primary. */
export function parseToSecondary(meta: unknown): ToSecondary {
  const m = obj(meta, 'message');
  switch (m.t) {
    case 'hello':
      return {
        t: 'hello',
        proto: uint(m, 'proto', 'hello'),
        size: uint(m, 'size', 'hello'),
        epoch: uint(m, 'epoch', 'hello'),
        session: str(m, 'session', 'hello', 128),
        history: m.history === undefined ? [] : generations(m.history, 'hello.history'),
        needsResync: optBool(m, 'needsResync', 'hello') ?? false,
        window: optUint(m, 'window', 'hello'),
      };
    case 'beat':
      return { t: 'beat' };
    case 'w':
    case 'z':
    case 't':
    case 'seal':
      return epochRecord(m);
    case 'commit':
      return { t: 'commit', e: uint(m, 'e', 'commit'), sync: syncMark(m.sync) };
    case 'hash?':
      return {
        t: 'hash?',
        id: uint(m, 'id', 'hash?'),
        o: uint(m, 'o', 'hash?'),
        l: uint(m, 'l', 'hash?'),
        bs: uint(m, 'bs', 'hash?'),
        alg: m.alg === undefined || m.alg === null ? undefined : hashAlg(m.alg, 'hash?.alg'),
      };
    default:
      return bad(`unknown message type '${String(m.t)}' from the primary`);
  }
}

/** What a primary receives from its secondary. */
export function parseToPrimary(meta: unknown): ToPrimary {
  const m = obj(meta, 'message');
  switch (m.t) {
    case 'hello':
      return {
        t: 'hello',
        proto: uint(m, 'proto', 'hello'),
        size: uint(m, 'size', 'hello'),
        seq: optUint(m, 'seq', 'hello'),
        durable: optUint(m, 'durable', 'hello'),
        committed: optUint(m, 'committed', 'hello'),
        history: m.history === undefined ? undefined : generations(m.history, 'hello.history'),
        decision: m.decision === undefined ? undefined : decision(m.decision),
        hot: m.hot === undefined ? undefined : ranges(m.hot, 'hello.hot'),
        hashes: m.hashes === undefined ? undefined : hashAlgs(m.hashes, 'hello.hashes'),
      };
    case 'beat':
      return { t: 'beat' };
    case 'got':
      return { t: 'got', n: uint(m, 'n', 'got') };
    case 'durable':
      return { t: 'durable', e: uint(m, 'e', 'durable') };
    case 'committed': {
      const d = m.overlayDiscarded === undefined ? undefined : obj(m.overlayDiscarded, 'overlayDiscarded');
      return {
        t: 'committed',
        e: uint(m, 'e', 'committed'),
        ...(d
          ? {
              overlayDiscarded: {
                records: uint(d, 'records', 'overlayDiscarded'),
                bytes: uint(d, 'bytes', 'overlayDiscarded'),
              },
            }
          : {}),
      };
    }
    case 'hash':
      return { t: 'hash', id: uint(m, 'id', 'hash') };
    case 'error': {
      if (!isErrorCode(m.code)) bad(`error code '${String(m.code)}' is not one colo-blk knows`);
      return {
        t: 'error',
        code: m.code,
        message: str(m, 'message', 'error', 64 * 1024),
        e: optUint(m, 'e', 'error'),
      };
    }
    default:
      return bad(`unknown message type '${String(m.t)}' from the secondary`);
  }
}
