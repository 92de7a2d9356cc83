/**
 * Read replies sent straight from the image file: the reply header with
 * send(2), then the data with sendfile(2) from the file to the socket.
 *
 * Why: a read reply otherwise costs two copies on the server, the image's
 * pages into a reply buffer (pread) and the buffer into the socket. Over TCP
 * sendfile passes the page-cache pages to the socket by reference, so the
 * server copies nothing; only the client's receive copies the bytes.
 *
 * When: the device maps the range to an open file as is (`fileRange`: a file
 * device, or a replicating primary's local file; never an overlay), the
 * connection is plain TCP (not TLS), the native helper is built, and nothing
 * is queued on the socket (the reply's bytes must follow what was queued
 * before them, and libuv's queue is out of reach). Otherwise the reply takes
 * the buffer path. The check and the send run in one synchronous step, so the
 * file cannot be closed or switched in between.
 *
 * A partial send (the socket's buffer is full): the rest of the reply is read
 * from the same file into a buffer and queued on the socket at once, before
 * any other reply can be written.
 *
 * What the client sees: the bytes the file holds when the kernel hands the
 * pages to the client, which may be later than the send; a write that lands
 * in between was, for the client, concurrent with its read (the read had not
 * completed), and NBD orders no overlapping requests in flight.
 */
import { Buffer } from 'node:buffer';
import process from 'node:process';
import fs from 'node:fs';
import type net from 'node:net';
import type { BlockDevice } from '../block/device.js';
import { native } from '../block/native.js';

/**
 * Smaller reads take the buffer path, where the replies of one event-loop turn leave in one writev:
 * measured with fio random reads on the two shared cores, the file path was slower at 16 KiB
 * (1.5 against 1.8 GB/s), even at 64 KiB, and far faster from 128 KiB (5.0 against 3.5 GB/s; 256 KiB:
 * 6.1 against 3.3).
 */
export const FILE_REPLY_MIN_BYTES = 128 * 1024;

/** Whether this process can send replies from files at all (COLO_BLK_NO_FILE_REPLIES=1 turns it off). */
export const fileRepliesAvailable =
  typeof native?.sendFileReply === 'function' && !process.env.COLO_BLK_NO_FILE_REPLIES;

/** Replies the socket took only part of, process-wide (tests; the export's stats count those sent from files). */
export const fileReplyStats = { partial: 0 };

/** The file descriptor of a plain TCP socket, or -1. */
export function socketFd(socket: net.Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}

/**
 * Send a read reply (`header`, then [offset, offset+length) of the device)
 * from the file the range maps to. Returns false if it maps to none (nothing
 * was sent: the caller takes the buffer path), null if all of it went, or the
 * rest of the reply when the socket took only part: the caller must queue it
 * before anything else. Throws if the socket failed before any byte went.
 */
export function sendFromFile(
  sockFd: number,
  header: Buffer,
  dev: BlockDevice,
  offset: number,
  length: number,
): Buffer | null | false {
  const range = dev.fileRange?.(offset, length) ?? null;
  if (!range) return false;
  const sent = native!.sendFileReply!(sockFd, header, range.fd, range.offset, length);
  if (sent === header.length + length) return null;
  fileReplyStats.partial++;
  return rest(header, length, range, sent);
}

/** The reply's bytes from `sent` on: the header's tail, then the file's data (zeroes past its end). */
function rest(header: Buffer, length: number, range: { fd: number; offset: number }, sent: number): Buffer {
  const out = Buffer.allocUnsafe(header.length + length - sent);
  let at = 0;
  if (sent < header.length) at = header.copy(out, 0, sent);
  let dataFrom = Math.max(0, sent - header.length);
  while (at < out.length) {
    const n = fs.readSync(range.fd, out, at, out.length - at, range.offset + dataFrom);
    if (n === 0) {
      out.fill(0, at);
      break;
    }
    at += n;
    dataFrom += n;
  }
  return out;
}
