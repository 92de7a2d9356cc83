/**
 * One NBD client connection: the handshake, option negotiation and the
 * transmission phase, driving the pure codec over a socket.
 *
 * Notes on the design:
 * - Input is a ByteQueue fed by 'data' events; `pump()` consumes as many whole
 *   messages as are there and returns when it needs more bytes. Nothing is
 *   allocated for a length the client claims until that length is checked
 *   against the limits.
 * - Every client mistake is validated here and answered per the spec (option
 *   errors, NBD errno replies); devices see only in-range requests. Only an
 *   unrecoverable stream (bad magic, oversized payload, unknown export on
 *   EXPORT_NAME) ends in a hard disconnect, and the server lives on.
 * - Requests run concurrently and are answered as soon as each is ready.
 *   Reading pauses (TCP backpressure) when too many requests or too many
 *   payload bytes are in flight, or when the socket's write buffer is full.
 * - Replies produced in the same turn of the event loop are corked into one
 *   writev; the socket is uncorked from setImmediate, which runs right after
 *   the I/O poll phase, so batching adds no timer latency.
 */
import { Buffer } from 'node:buffer';
import type net from 'node:net';
import tls from 'node:tls';
import { nbdErrnoName, nbdErrnoOf, NbdErrno, toColoError } from '../errors.js';
import { limits } from '../limits.js';
import { ExtentFlag, writePieces, type BlockDevice, type WriteOptions } from '../block/device.js';
import { fileRepliesAvailable, FILE_REPLY_MIN_BYTES, sendFromFile, socketFd } from './file-replies.js';
import { ByteQueue } from './bytequeue.js';
import { MIN_BYTES as REPLY_POOL_MIN_BYTES } from './reply-buffers.js';
import {
  allocReadReply,
  readReplyHeaderBytes,
  writeReadReplyHeader,
  decodeOptionHeader,
  decodeRequest,
  encodeBlockStatusReply,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReplyData,
  encodeOptionReply,
  encodeServerReplyData,
  encodeStatusReply,
  OPTION_HEADER_BYTES,
  OptionPayloadError,
  parseInfoRequest,
  parseMetaContextRequest,
  ProtocolError,
  requestHeaderBytes,
  type ReplyMode,
  type Request,
  type StatusExtent,
} from './codec.js';
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  ClientFlag,
  Cmd,
  CmdFlag,
  cmdName,
  COMMANDS,
  HandshakeFlag,
  Info,
  Opt,
  optName,
  Rep,
  StateFlag,
  TxFlag,
} from './protocol.js';
import type { NbdServer, ServedExport } from './server.js';
import { directNextRead, endsAt } from '../sys/slab-reads.js';

type Phase = 'flags' | 'options' | 'transmission' | 'closed';

/**
 * The rest of a WRITE payload read straight into a pooled buffer when it is
 * this large (smaller: the slab it arrives in is as good) and no larger (the
 * pool keeps at most 32 MiB idle).
 */
const DIRECT_PAYLOAD_MIN_BYTES = 64 * 1024;
const DIRECT_PAYLOAD_MAX_BYTES = 4 * 1024 * 1024;

const NO_FUA: WriteOptions = {};
const WITH_FUA: WriteOptions = { fua: true };

/** Largest block-status query in compact mode, so every descriptor length fits 32 bits. */
const MAX_STATUS_QUERY_COMPACT = 2 ** 31;

class RequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

export class Connection {
  private phase: Phase = 'flags';
  /** The socket the protocol speaks over: the TCP socket, or the TLS socket on it after STARTTLS. */
  private socket: net.Socket;
  private tlsState: 'none' | 'handshaking' | 'active' = 'none';
  private closed = false;
  private readonly queue = new ByteQueue();
  private readonly peer: string;
  /** The client's address, for the per-address cap. */
  readonly address: string;
  private handshakeTimer: NodeJS.Timeout | null;
  private noZeroes = false;
  private structured = false;
  private extended = false;
  private optionsSeen = 0;
  /** Metadata contexts selected by SET_META_CONTEXT, and the export they were selected for. */
  private meta: { exportName: string; ids: number[] } | null = null;
  private exp: ServedExport | null = null;
  private mode: ReplyMode = 'simple';
  /**
   * A request header whose payload has not fully arrived; `buffer`: the
   * payload buffer the socket reads its rest into (directPayload).
   */
  private pendingPayload: { req: Request; length: number; buffer: Buffer | null } | null = null;
  private inflight = 0;
  private inflightBytes = 0;
  private readPaused = false;
  private writeBlocked = false;
  private corked = false;
  private disconnecting = false;
  private shuttingDown = false;

  constructor(
    private readonly server: NbdServer,
    private readonly raw: net.Socket,
    readonly id: number,
    private readonly onClosed: () => void,
  ) {
    this.socket = raw;
    this.address = raw.remoteAddress ?? '?';
    this.peer = `${raw.remoteAddress}:${raw.remotePort}`;
    raw.setNoDelay(true);
    this.attach(raw);
    this.handshakeTimer = setTimeout(() => {
      this.log('warn', `handshake not finished after ${server.options.handshakeTimeoutMs} ms; disconnecting`);
      this.destroy();
    }, server.options.handshakeTimeoutMs);
    this.handshakeTimer.unref();
    raw.write(encodeGreeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES));
  }

  private attach(socket: net.Socket): void {
    socket.on('data', (chunk: Buffer) => {
      if (this.phase === 'closed') return; // after our end: read only to see the client's
      this.queue.push(chunk);
      this.pump();
    });
    socket.on('error', (err) => this.log('debug', `socket error: ${err.message}`));
    socket.on('close', () => this.onClose());
    socket.on('drain', () => {
      this.writeBlocked = false;
      this.maybeResume();
    });
  }

  private log(level: 'info' | 'warn' | 'debug', msg: string): void {
    this.server.options.logger[level](`conn ${this.id} (${this.peer}): ${msg}`);
  }

  /** Hard disconnect. */
  destroy(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.socket.destroy();
    if (this.socket !== this.raw) this.raw.destroy();
  }

  /** Server shutdown: finish what is in flight, refuse the rest. */
  shutdown(): void {
    this.shuttingDown = true;
    if (this.phase !== 'transmission' || this.inflight === 0) this.endGracefully();
  }

  private endGracefully(): void {
    if (this.phase === 'closed') return;
    this.phase = 'closed';
    this.uncork();
    this.socket.end();
    // Read on, to see the client close its side: a paused socket stops its kernel reads
    // (sys/slab-reads.ts) and would never see the end of the stream.
    this.socket.resume();
  }

  private onClose(): void {
    this.phase = 'closed';
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.queue.clear();
    if (this.socket !== this.raw) this.raw.destroy();
    if (this.closed) return;
    this.closed = true;
    this.onClosed();
  }

  // -------------------------------------------------------------------------
  // Input

  private pump(): void {
    try {
      while (this.phase !== 'closed' && !this.readPaused && this.tlsState !== 'handshaking') {
        if (this.phase === 'flags') {
          if (!this.readClientFlags()) return;
        } else if (this.phase === 'options') {
          if (!this.readOption()) return;
        } else if (!this.readRequest()) return;
      }
    } catch (err) {
      if (err instanceof ProtocolError) {
        this.log('warn', `protocol error, disconnecting: ${err.message}`);
        this.destroy();
        return;
      }
      // A bug of ours: log it, drop this client, keep the server alive.
      this.log('warn', `internal error, disconnecting: ${(err as Error).stack ?? err}`);
      this.destroy();
    }
  }

  private readClientFlags(): boolean {
    if (this.queue.length < 4) return false;
    const flags = this.queue.take(4).readUInt32BE(0);
    const known = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES;
    if (flags & ~known) throw new ProtocolError(`unknown client flags 0x${flags.toString(16)}`);
    this.noZeroes = (flags & ClientFlag.NO_ZEROES) !== 0;
    this.phase = 'options';
    return true;
  }

  private readOption(): boolean {
    if (this.queue.length < OPTION_HEADER_BYTES) return false;
    const hdr = decodeOptionHeader(this.queue.peek(OPTION_HEADER_BYTES), 0)!;
    if (hdr.length > limits.maxOptionBytes)
      throw new ProtocolError(
        `option ${optName(hdr.option)} claims ${hdr.length} bytes, more than the limit of ${limits.maxOptionBytes}`,
      );
    if (this.queue.length < OPTION_HEADER_BYTES + hdr.length) return false;
    this.queue.skip(OPTION_HEADER_BYTES);
    const payload = this.queue.take(hdr.length);
    if (++this.optionsSeen > limits.maxOptionsPerHandshake)
      throw new ProtocolError(`more than ${limits.maxOptionsPerHandshake} options`);
    this.handleOption(hdr.option, payload);
    return true;
  }

  private readRequest(): boolean {
    if (this.inflight >= this.server.options.maxInflightRequests) return this.pauseReading();
    if (this.inflightBytes >= this.server.options.maxInflightBytes) return this.pauseReading();
    if (this.pendingPayload) {
      const { req, length, buffer } = this.pendingPayload;
      if (this.queue.length < length) return false;
      this.pendingPayload = null;
      const pieces = this.queue.takePieces(length);
      this.dispatch(req, pieces, length, buffer && endsAt(pieces, buffer) ? buffer : null);
      this.readNextHeaderAlone(length);
      return true;
    }
    const hdrBytes = requestHeaderBytes(this.extended);
    if (this.queue.length < hdrBytes) return false;
    const req = decodeRequest(this.queue.peek(hdrBytes), 0, this.extended)!;
    const payloadLength = this.payloadLengthOf(req);
    // Memory bound: a request's payload or read reply counts against the
    // in-flight budget before anything is allocated for it (one request may
    // always run alone, so a single large request never deadlocks).
    const cost = this.costOf(req, payloadLength);
    if (this.inflight > 0 && this.inflightBytes + cost > this.server.options.maxInflightBytes)
      return this.pauseReading();
    this.queue.skip(hdrBytes);
    if (payloadLength > 0) {
      if (payloadLength > limits.maxPayloadBytes)
        throw new ProtocolError(
          `${cmdName(req.type)} payload of ${payloadLength} bytes exceeds the limit of ${limits.maxPayloadBytes}`,
        );
      if (this.queue.length < payloadLength) {
        this.pendingPayload = { req, length: payloadLength, buffer: this.directPayload(req, payloadLength) };
        return false;
      }
      this.dispatch(req, this.queue.takePieces(payloadLength), payloadLength);
      this.readNextHeaderAlone(payloadLength);
      return true;
    }
    this.dispatch(req, null);
    return true;
  }

  /**
   * Have the socket read the rest of a large WRITE's payload straight into a
   * buffer of the server's pool, given back once the write has settled: the
   * kernel then copies into memory the last writes left in cache, where a new
   * slab is memory untouched for a while (sys/slab-reads.ts, directNextRead).
   * Only where the device keeps none of the buffer after the write
   * (`releasesWrites`: a file, not a replicating primary whose link may still
   * queue it), and only over a socket read into slabs (not TLS). The queue
   * holds nothing but this payload's first bytes here, so the buffer, sized to
   * the rest, receives this payload's bytes and no others.
   */
  private directPayload(req: Request, payloadLength: number): Buffer | null {
    const rest = payloadLength - this.queue.length;
    if (req.type !== Cmd.WRITE || rest < DIRECT_PAYLOAD_MIN_BYTES || rest > DIRECT_PAYLOAD_MAX_BYTES)
      return null;
    if (!this.exp?.device.releasesWrites) return null;
    const buf = this.server.payloadBuffers.take(rest);
    if (directNextRead(this.socket, buf)) return buf;
    this.server.payloadBuffers.give(buf);
    return null;
  }

  /**
   * After a large WRITE's payload, when nothing of the next request has been
   * read yet: have the socket read the next request's header alone, so that a
   * large payload behind it is read straight into a pooled buffer too
   * (directPayload). Otherwise a server that fell behind reads whole requests
   * into slabs, fresh memory each time: at 1 MiB writes on a replicating
   * primary that was gigabytes a second of new buffers, a full garbage
   * collection every half second and the optimised code it throws away.
   * One more read of a few bytes per large write is the cost.
   */
  private readNextHeaderAlone(payloadLength: number): void {
    if (payloadLength < DIRECT_PAYLOAD_MIN_BYTES || this.queue.length > 0) return;
    if (!this.exp?.device.releasesWrites) return;
    directNextRead(this.socket, Buffer.allocUnsafe(requestHeaderBytes(this.extended)));
  }

  /** Bytes a request holds while in flight: its payload, or its read reply. */
  private costOf(req: Request, payloadLength: number): number {
    if (payloadLength > 0) return payloadLength;
    return req.type === Cmd.READ && req.length <= limits.maxPayloadBytes ? req.length : 0;
  }

  /** Bytes of payload that follow a request header. */
  private payloadLengthOf(req: Request): number {
    if (this.extended) return req.flags & CmdFlag.PAYLOAD_LEN ? req.length : 0;
    return req.type === Cmd.WRITE ? req.length : 0;
  }

  private pauseReading(): boolean {
    if (!this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    }
    return false;
  }

  private maybeResume(): void {
    if (!this.readPaused || this.writeBlocked || this.phase === 'closed') return;
    if (this.socket.writableLength >= this.server.options.maxInflightBytes) return;
    if (this.inflight >= this.server.options.maxInflightRequests) return;
    if (this.inflightBytes >= this.server.options.maxInflightBytes) return;
    if (this.disconnecting) return;
    this.readPaused = false;
    this.socket.resume();
    this.pump();
  }

  // -------------------------------------------------------------------------
  // Output

  private send(buf: Buffer): void {
    if (this.phase === 'closed') return;
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(() => this.uncork());
    }
    // A large read reply's buffer serves the next read once the socket has taken it (reply-buffers.ts).
    const done =
      buf.length >= REPLY_POOL_MIN_BYTES
        ? (err?: Error | null) => err || this.server.replyBuffers.give(buf)
        : undefined;
    if (!this.socket.write(buf, done)) {
      this.writeBlocked = true;
      this.pauseReading();
    }
  }

  /**
   * A read reply straight from the image file (file-replies.ts), sent now, if
   * the device maps the range to a file and nothing is queued on the socket
   * ahead of it. False: nothing was sent, the caller reads into a buffer.
   */
  private sendReadFromFile(req: Request, dev: BlockDevice): boolean {
    if (!fileRepliesAvailable || !dev.fileRange || this.tlsState !== 'none' || this.phase === 'closed')
      return false;
    this.uncork(); // what this turn queued so far goes first
    // Anything still queued (a reply the kernel took only part of) must go before this one's bytes.
    // Rare: reading pauses once 16 KiB wait (send()), until the queue has drained.
    if (this.socket.writableLength > 0) return false;
    const fd = socketFd(this.socket);
    if (fd < 0) return false;
    const header = Buffer.allocUnsafe(readReplyHeaderBytes(this.mode));
    writeReadReplyHeader(header, this.mode, req, req.length);
    let rest: Buffer | null | false;
    try {
      rest = sendFromFile(fd, header, dev, req.offset, req.length);
    } catch (err) {
      this.log('debug', `sending a read reply failed: ${(err as Error).message}`);
      this.destroy();
      return true;
    }
    if (rest === false) return false;
    this.exp!.stats.readsSentFromFile++;
    if (rest) this.send(rest);
    return true;
  }

  private uncork(): void {
    if (!this.corked) return;
    this.corked = false;
    this.socket.uncork();
  }

  // -------------------------------------------------------------------------
  // Negotiation

  private optionReply(option: number, type: number, data?: Buffer): void {
    this.socket.write(encodeOptionReply(option, type, data));
  }

  private optionError(option: number, type: number, message: string): void {
    this.log('debug', `option ${optName(option)} refused: ${message}`);
    this.optionReply(option, type, Buffer.from(message, 'utf8'));
  }

  private findExport(name: string): ServedExport | undefined {
    return name === '' ? this.server.defaultExport : this.server.exports.get(name);
  }

  private unknownExportMessage(name: string): string {
    return `unknown export '${name}'; this server has: ${[...this.server.exports.keys()].join(', ')}`;
  }

  private handleOption(option: number, payload: Buffer): void {
    if (this.shuttingDown) {
      this.optionError(option, Rep.ERR_SHUTDOWN, 'server is shutting down');
      return;
    }
    if (this.server.options.tls?.mode === 'require' && this.tlsState !== 'active') {
      if (option === Opt.EXPORT_NAME) {
        // No error reply exists for EXPORT_NAME: disconnect.
        this.log('warn', 'EXPORT_NAME in the clear on a server that requires TLS; disconnecting');
        this.destroy();
        return;
      }
      if (option !== Opt.STARTTLS && option !== Opt.ABORT)
        return this.optionError(option, Rep.ERR_TLS_REQD, 'this server requires TLS: send STARTTLS first');
    }
    switch (option) {
      case Opt.EXPORT_NAME: {
        const name = payload.toString('utf8');
        const exp = this.findExport(name);
        if (!exp || this.extended) {
          // The spec leaves no way to answer EXPORT_NAME with an error: disconnect.
          this.log(
            'warn',
            exp ? 'EXPORT_NAME after extended headers; disconnecting' : this.unknownExportMessage(name),
          );
          this.destroy();
          return;
        }
        this.socket.write(encodeExportNameReply(exp.device.size, this.txFlags(exp), this.noZeroes));
        this.enterTransmission(exp);
        return;
      }
      case Opt.ABORT:
        this.optionReply(option, Rep.ACK);
        this.endGracefully();
        return;
      case Opt.LIST: {
        if (payload.length !== 0) return this.optionError(option, Rep.ERR_INVALID, 'LIST takes no data');
        for (const e of this.server.exports.values())
          this.optionReply(option, Rep.SERVER, encodeServerReplyData(e.name, e.description));
        this.optionReply(option, Rep.ACK);
        return;
      }
      case Opt.INFO:
      case Opt.GO:
        return this.handleInfoOrGo(option, payload);
      case Opt.STRUCTURED_REPLY:
        if (payload.length !== 0)
          return this.optionError(option, Rep.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        if (this.extended)
          return this.optionError(option, Rep.ERR_EXT_HEADER_REQD, 'extended headers are already negotiated');
        this.structured = true;
        this.optionReply(option, Rep.ACK);
        return;
      case Opt.EXTENDED_HEADERS:
        if (payload.length !== 0)
          return this.optionError(option, Rep.ERR_INVALID, 'EXTENDED_HEADERS takes no data');
        this.extended = true;
        this.structured = true;
        this.optionReply(option, Rep.ACK);
        return;
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.handleMetaContext(option, payload);
      case Opt.STARTTLS:
        return this.startTls(option, payload);
      default:
        return this.optionError(option, Rep.ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  /**
   * STARTTLS: acknowledge in the clear, then speak TLS on the same socket.
   * Everything negotiated before it is forgotten (reply modes, metadata
   * contexts): an attacker in the middle could have chosen it (CVE-2021-3716).
   */
  private startTls(option: number, payload: Buffer): void {
    const cfg = this.server.options.tls;
    if (!cfg)
      return this.optionError(
        option,
        Rep.ERR_UNSUP,
        'TLS is not enabled on this server (it runs with --tls off)',
      );
    if (this.tlsState !== 'none') return this.optionError(option, Rep.ERR_INVALID, 'TLS is already active');
    if (payload.length !== 0) return this.optionError(option, Rep.ERR_INVALID, 'STARTTLS takes no data');
    if (this.queue.length > 0) {
      // The client must wait for our reply; bytes after STARTTLS were sent in the clear
      // and would otherwise be read as if they came through TLS (command injection).
      this.log('warn', 'data sent in the clear right after STARTTLS; disconnecting');
      this.destroy();
      return;
    }
    this.structured = false;
    this.extended = false;
    this.meta = null;
    this.mode = 'simple';
    this.tlsState = 'handshaking';
    const raw = this.raw;
    // From here the bytes on the socket belong to TLS: stop reading them as NBD.
    raw.removeAllListeners('data');
    raw.removeAllListeners('drain');
    raw.pause();
    raw.write(encodeOptionReply(option, Rep.ACK), (err) => {
      if (err || this.phase === 'closed') return;
      // The ACK has reached the kernel: what the client sends next is its TLS hello, left
      // in the paused socket for the TLS layer. A tls.Server of its own runs the handshake
      // (and judges the client's certificate) for this one socket.
      const one = tls.createServer(cfg.serverOptions);
      one.once('tlsClientError', (e) => {
        this.log('warn', `TLS handshake failed: ${e.message.split('\n')[0]}`);
        this.destroy();
      });
      one.once('secureConnection', (secure: tls.TLSSocket) => {
        if (this.phase === 'closed') return secure.destroy();
        this.socket = secure;
        this.attach(secure);
        if (cfg.verifyPeer && !secure.authorized) {
          this.log('warn', `TLS client certificate refused: ${secure.authorizationError}`);
          this.destroy();
          return;
        }
        this.tlsState = 'active';
        this.log('debug', `TLS established (${secure.getProtocol()}, ${secure.getCipher().name})`);
        this.pump();
      });
      one.emit('connection', raw);
    });
  }

  private handleInfoOrGo(option: number, payload: Buffer): void {
    let req;
    try {
      req = parseInfoRequest(payload, limits.maxStringBytes);
    } catch (err) {
      if (err instanceof OptionPayloadError) return this.optionError(option, Rep.ERR_INVALID, err.message);
      throw err;
    }
    const exp = this.findExport(req.name);
    if (!exp) return this.optionError(option, Rep.ERR_UNKNOWN, this.unknownExportMessage(req.name));
    this.optionReply(option, Rep.INFO, encodeInfoExport(exp.device.size, this.txFlags(exp)));
    for (const info of new Set(req.infos)) {
      if (info === Info.NAME) this.optionReply(option, Rep.INFO, encodeInfoString(Info.NAME, exp.name));
      else if (info === Info.DESCRIPTION && exp.description)
        this.optionReply(option, Rep.INFO, encodeInfoString(Info.DESCRIPTION, exp.description));
    }
    // Always safe to send: our minimum block size is 1, so no client is constrained by it.
    this.optionReply(option, Rep.INFO, encodeInfoBlockSize(1, 4096, limits.maxPayloadBytes));
    this.optionReply(option, Rep.ACK);
    if (option === Opt.GO) this.enterTransmission(exp);
  }

  private handleMetaContext(option: number, payload: Buffer): void {
    // SET replaces the previous selection even when it fails (spec).
    if (option === Opt.SET_META_CONTEXT) this.meta = null;
    if (!this.structured)
      return this.optionError(
        option,
        Rep.ERR_INVALID,
        'negotiate structured replies before metadata contexts',
      );
    let req;
    try {
      req = parseMetaContextRequest(payload, limits.maxStringBytes, limits.maxMetaQueries);
    } catch (err) {
      if (err instanceof OptionPayloadError) return this.optionError(option, Rep.ERR_INVALID, err.message);
      throw err;
    }
    if (!this.findExport(req.exportName))
      return this.optionError(option, Rep.ERR_UNKNOWN, this.unknownExportMessage(req.exportName));
    const listing = option === Opt.LIST_META_CONTEXT;
    // We offer one context, base:allocation. "base:" names the whole namespace.
    const matches =
      (listing && req.queries.length === 0) ||
      req.queries.some((q) => q === BASE_ALLOCATION || q === 'base:');
    if (matches)
      this.optionReply(
        option,
        Rep.META_CONTEXT,
        encodeMetaContextReplyData(listing ? 0 : BASE_ALLOCATION_ID, BASE_ALLOCATION),
      );
    if (!listing) this.meta = { exportName: req.exportName, ids: matches ? [BASE_ALLOCATION_ID] : [] };
    this.optionReply(option, Rep.ACK);
  }

  private txFlags(exp: ServedExport): number {
    const caps = exp.device.caps;
    let flags = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_CACHE;
    if (caps.multiConn) flags |= TxFlag.CAN_MULTI_CONN;
    if (this.structured) flags |= TxFlag.SEND_DF;
    if (exp.readOnly) return flags | TxFlag.READ_ONLY;
    flags |= TxFlag.SEND_FUA;
    if (caps.trim !== 'none') flags |= TxFlag.SEND_TRIM;
    if (caps.zero !== 'none') flags |= TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO;
    return flags;
  }

  private enterTransmission(exp: ServedExport): void {
    this.exp = exp;
    this.mode = this.extended ? 'extended' : this.structured ? 'structured' : 'simple';
    this.phase = 'transmission';
    this.server.negotiated(this);
    if (this.meta && this.findExport(this.meta.exportName) !== exp) this.meta = null;
    if (this.handshakeTimer) {
      clearTimeout(this.handshakeTimer);
      this.handshakeTimer = null;
    }
    this.log('debug', `serving export '${exp.name}' with ${this.mode} replies`);
  }

  // -------------------------------------------------------------------------
  // Transmission

  /** `payload`: a WRITE's bytes as the socket delivered them (views of its chunks, never assembled). */
  private dispatch(
    req: Request,
    payload: Buffer[] | null,
    payloadLength = 0,
    /** The pooled buffer part of the payload was read into: given back once the request settles. */
    payloadBuffer: Buffer | null = null,
  ): void {
    const exp = this.exp!;
    if (payloadBuffer) exp.stats.writesReceivedDirect++;
    if (req.type === Cmd.DISC) {
      this.disconnecting = true;
      this.pauseReading();
      if (this.inflight === 0) this.endGracefully();
      return;
    }
    const bytes = this.costOf(req, payloadLength);
    this.inflight++;
    this.inflightBytes += bytes;
    let work: Promise<Buffer | null>;
    try {
      if (this.shuttingDown) throw new RequestError(NbdErrno.ESHUTDOWN, 'server is shutting down');
      this.validate(req, payload ? payloadLength : null, exp);
      if (req.type === Cmd.READ) {
        const reply = this.read(req, exp);
        if (!(reply instanceof Promise)) return this.complete(reply, bytes, payloadBuffer);
        work = reply;
      } else {
        const done = this.writeNow(req, payload, payloadLength, exp);
        if (done) return this.complete(done, bytes, payloadBuffer);
        work = this.execute(req, payload, payloadLength, exp);
      }
    } catch (err) {
      work = Promise.reject(err);
    }
    work.then(
      (reply) => this.complete(reply, bytes, payloadBuffer),
      (err) => {
        exp.stats.errors++;
        const errno = err instanceof RequestError ? err.errno : nbdErrnoOf(err);
        const message = err instanceof RequestError ? err.message : toColoError(err).message;
        this.log('debug', `${cmdName(req.type)} failed with ${nbdErrnoName(errno)}: ${message}`);
        this.complete(encodeStatusReply(this.mode, req, errno, message), bytes, payloadBuffer);
      },
    );
  }

  /**
   * A request settled: `reply` null if it was sent already (a read sent from the file);
   * `payloadBuffer` (dispatch) goes back to the pool, the device being done with it.
   */
  private complete(reply: Buffer | null, bytes: number, payloadBuffer: Buffer | null): void {
    if (payloadBuffer) this.server.payloadBuffers.give(payloadBuffer);
    if (reply) this.send(reply);
    this.inflight--;
    this.inflightBytes -= bytes;
    if (this.inflight === 0 && (this.disconnecting || this.shuttingDown)) this.endGracefully();
    else this.maybeResume();
  }

  /** Client mistakes become NBD errors here; devices only see valid requests. */
  private validate(req: Request, payloadLength: number | null, exp: ServedExport): void {
    const spec = COMMANDS[req.type];
    if (spec === undefined) throw new RequestError(NbdErrno.EINVAL, `unknown command ${req.type}`);
    const allowed = spec.flags;
    let flags = req.flags;
    if (this.extended && flags & CmdFlag.PAYLOAD_LEN) {
      if (req.type !== Cmd.WRITE)
        throw new RequestError(NbdErrno.EINVAL, `${cmdName(req.type)} does not take a payload`);
      flags &= ~CmdFlag.PAYLOAD_LEN;
    } else if (this.extended && req.type === Cmd.WRITE) {
      throw new RequestError(NbdErrno.EINVAL, 'WRITE with extended headers needs the PAYLOAD_LEN flag');
    }
    // FUA is valid on every command once SEND_FUA is advertised (writable exports);
    // on commands that write nothing it has nothing to make durable.
    if (!exp.readOnly) flags &= ~CmdFlag.FUA;
    if (flags & ~allowed)
      throw new RequestError(
        NbdErrno.EINVAL,
        `flags 0x${flags.toString(16)} not valid for ${cmdName(req.type)}`,
      );
    if (flags & CmdFlag.DF && !this.structured)
      throw new RequestError(NbdErrno.EINVAL, 'DF flag without structured replies');
    if (spec.mutates && exp.readOnly)
      throw new RequestError(NbdErrno.EPERM, `export '${exp.name}' is read-only`);
    const caps = exp.device.caps;
    const size = exp.device.size;
    const length = payloadLength ?? req.length;
    const beyond = req.offset + length > size;
    // Spelt out only for an error: a string per request was a tenth of what a 4 KiB write allocated.
    const where = () => `offset ${req.offset} + length ${length} > size ${size}`;
    switch (req.type) {
      case Cmd.READ:
        if (beyond) throw new RequestError(NbdErrno.EINVAL, `read beyond the end of the export (${where()})`);
        if (length > limits.maxPayloadBytes)
          throw new RequestError(
            this.structured ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL,
            `read of ${length} bytes exceeds the maximum payload of ${limits.maxPayloadBytes}`,
          );
        return;
      case Cmd.WRITE:
      case Cmd.WRITE_ZEROES:
        if (req.type === Cmd.WRITE_ZEROES && caps.zero === 'none')
          throw new RequestError(NbdErrno.EINVAL, 'WRITE_ZEROES is not supported by this export');
        if (beyond)
          throw new RequestError(NbdErrno.ENOSPC, `write beyond the end of the export (${where()})`);
        return;
      case Cmd.TRIM:
        if (caps.trim === 'none')
          throw new RequestError(NbdErrno.EINVAL, 'TRIM is not supported by this export');
        if (beyond) throw new RequestError(NbdErrno.EINVAL, `trim beyond the end of the export (${where()})`);
        return;
      case Cmd.CACHE:
        if (beyond)
          throw new RequestError(NbdErrno.EINVAL, `cache beyond the end of the export (${where()})`);
        return;
      case Cmd.BLOCK_STATUS:
        if (!this.meta || this.meta.ids.length === 0)
          throw new RequestError(NbdErrno.EINVAL, 'BLOCK_STATUS without a negotiated metadata context');
        if (length === 0) throw new RequestError(NbdErrno.EINVAL, 'BLOCK_STATUS of length 0');
        if (beyond)
          throw new RequestError(NbdErrno.EINVAL, `block status beyond the end of the export (${where()})`);
        return;
      case Cmd.FLUSH:
        return;
    }
  }

  private async execute(
    req: Request,
    payload: Buffer[] | null,
    payloadLength: number,
    exp: ServedExport,
  ): Promise<Buffer | null> {
    const dev = exp.device;
    const stats = exp.stats;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    switch (req.type) {
      case Cmd.WRITE:
        stats.writes++;
        if (payload && payloadLength > 0) {
          stats.bytesWritten += payloadLength;
          await writePieces(dev, payload, req.offset, { fua });
        }
        return this.ack(req);
      case Cmd.FLUSH:
        stats.flushes++;
        await dev.flush();
        return this.ack(req);
      case Cmd.TRIM:
        stats.trims++;
        await dev.trim(req.offset, req.length, { fua });
        return this.ack(req);
      case Cmd.WRITE_ZEROES:
        stats.zeroes++;
        await dev.zero(req.offset, req.length, {
          fua,
          mayTrim: (req.flags & CmdFlag.NO_HOLE) === 0,
          fast: (req.flags & CmdFlag.FAST_ZERO) !== 0,
        });
        return this.ack(req);
      case Cmd.CACHE:
        stats.caches++;
        await dev.cache(req.offset, req.length);
        return this.ack(req);
      case Cmd.BLOCK_STATUS:
        stats.blockStatus++;
        return this.blockStatus(req, exp);
    }
    throw new RequestError(NbdErrno.EINVAL, `unknown command ${req.type}`);
  }

  /**
   * A WRITE the device does on this thread anyway (BlockDevice.pwritevNow: a
   * small write to a file, a memory disk), done here: its reply, or null when
   * `execute` must do it (nothing done). No promise and no async frame per
   * write (`colo-blk serve`, fio 4 KiB random writes, pinned: 1.55 -> 1.51
   * CPU-s/GiB, medians of six alternated runs, each pair in its favour). It
   * throws as `execute` rejects.
   */
  private writeNow(
    req: Request,
    payload: Buffer[] | null,
    payloadLength: number,
    exp: ServedExport,
  ): Buffer | null {
    const dev = exp.device;
    if (req.type !== Cmd.WRITE || !payload || payloadLength === 0 || !dev.pwritevNow) return null;
    const opts = req.flags & CmdFlag.FUA ? WITH_FUA : NO_FUA;
    let done = true; // a write that throws was tried, and counts as execute counts it
    try {
      done = dev.pwritevNow(payload, req.offset, opts);
    } finally {
      if (done) {
        exp.stats.writes++;
        exp.stats.bytesWritten += payloadLength;
      }
    }
    return done ? this.ack(req) : null;
  }

  /**
   * A READ's reply: sent from the file already (null), or read into a reply
   * buffer, on this thread where the device reads there anyway
   * (BlockDevice.preadNow: a small read of a file in `--io auto`, any in
   * `sync`, a memory disk), with no async frame and no promise, as writeNow
   * does writes; else a promise of it (its pread). It throws as the promise
   * rejects.
   */
  private read(req: Request, exp: ServedExport): Buffer | null | Promise<Buffer> {
    const dev = exp.device;
    exp.stats.reads++;
    exp.stats.bytesRead += req.length;
    if (req.length === 0) return encodeStatusReply(this.mode, req, 0);
    if (req.length >= FILE_REPLY_MIN_BYTES && this.sendReadFromFile(req, dev)) return null;
    const { buf, dataOffset } = allocReadReply(this.mode, req, req.length, this.server.replyBuffers.take);
    const data = buf.subarray(dataOffset);
    if (dev.preadNow?.(data, req.offset)) return buf;
    return dev.pread(data, req.offset).then(() => buf);
  }

  /**
   * The reply to a command other than READ that succeeded: a simple reply
   * unless extended headers forbid it. With structured replies the spec
   * allows one for any command but READ when it has no payload (as nbdkit
   * does), and a client reads the 16 bytes of a simple reply before it can
   * tell a 20-byte chunk from one: libnbd spent a second recv() on every
   * write's acknowledgement. Errors keep their chunk: it carries the message.
   */
  private ack(req: Request): Buffer {
    return encodeStatusReply(this.mode === 'extended' ? 'extended' : 'simple', req, 0);
  }

  private async blockStatus(req: Request, exp: ServedExport): Promise<Buffer> {
    const dev = exp.device;
    const queryLength = this.extended ? req.length : Math.min(req.length, MAX_STATUS_QUERY_COMPACT);
    const extents = dev.caps.extents
      ? await dev.extents(req.offset, queryLength)
      : [{ offset: req.offset, length: queryLength, flags: 0 }];
    const reqOne = (req.flags & CmdFlag.REQ_ONE) !== 0;
    const out: StatusExtent[] = [];
    for (const e of reqOne ? extents.slice(0, 1) : extents) {
      let flags = 0;
      if (e.flags & ExtentFlag.HOLE) flags |= StateFlag.HOLE;
      if (e.flags & ExtentFlag.ZERO) flags |= StateFlag.ZERO;
      out.push({ length: e.length, flags });
    }
    return encodeBlockStatusReply(this.mode as 'structured' | 'extended', req, BASE_ALLOCATION_ID, out);
  }
}
