/**
 * A minimal HTTP/1.1 for the guest: an incremental request parser and a
 * response encoder. The guest does not use node:http because the COLO loop
 * needs what node:http hides: where in a connection's byte stream each
 * request starts and ends (a checkpoint moves a connection's position from
 * the primary's guest to the secondary's), and responses whose bytes depend
 * on nothing but the guest's state (no Date header).
 *
 * Supported: request line, headers, a body by Content-Length, keep-alive
 * (the default), `Connection: close`, pipelining. Not supported (answered 400
 * or 411 and the connection closed): chunked request bodies, HTTP/0.9,
 * header blocks over 16 KiB, bodies over the guest's maximum.
 */
import { Buffer } from 'node:buffer';

export interface HttpRequest {
  method: string;
  path: string;
  headers: Map<string, string>;
  body: Buffer;
  /** The client asked for the connection to close after this response. */
  close: boolean;
  /** Bytes of the connection's stream this request occupied. */
  bytes: number;
}

export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const MAX_HEAD = 16 * 1024;
const CRLFCRLF = Buffer.from('\r\n\r\n');

/**
 * Parse one request from the front of `buf`: the request, or null if more
 * bytes are needed; HttpError for input that can never become a request.
 */
export function parseRequest(buf: Buffer, maxBody: number): HttpRequest | null {
  const end = buf.indexOf(CRLFCRLF);
  if (end < 0) {
    if (buf.length > MAX_HEAD) throw new HttpError(431, 'request header block too large');
    return null;
  }
  if (end > MAX_HEAD) throw new HttpError(431, 'request header block too large');
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const m = /^([A-Z]+) (\S+) HTTP\/1\.([01])$/.exec(lines[0]);
  if (!m) throw new HttpError(400, `bad request line '${lines[0].slice(0, 80)}'`);
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const i = line.indexOf(':');
    if (i <= 0) throw new HttpError(400, `bad header line '${line.slice(0, 80)}'`);
    headers.set(line.slice(0, i).trim().toLowerCase(), line.slice(i + 1).trim());
  }
  if (headers.has('transfer-encoding')) throw new HttpError(411, 'chunked request bodies are not supported');
  const cl = headers.get('content-length');
  const length = cl === undefined ? 0 : Number(cl);
  if (!Number.isSafeInteger(length) || length < 0) throw new HttpError(400, `bad Content-Length '${cl}'`);
  if (length > maxBody) throw new HttpError(413, `a body of ${length} bytes is over the limit of ${maxBody}`);
  const total = end + 4 + length;
  if (buf.length < total) return null;
  const conn = (headers.get('connection') ?? '').toLowerCase();
  return {
    method: m[1],
    path: m[2],
    headers,
    body: Buffer.from(buf.subarray(end + 4, total)),
    close: m[3] === '0' ? conn !== 'keep-alive' : conn === 'close',
    bytes: total,
  };
}

const REASONS: Record<number, string> = {
  200: 'OK',
  400: 'Bad Request',
  404: 'Not Found',
  405: 'Method Not Allowed',
  411: 'Length Required',
  413: 'Content Too Large',
  431: 'Request Header Fields Too Large',
  500: 'Internal Server Error',
  503: 'Service Unavailable',
  507: 'Insufficient Storage',
};

/** A complete response: status line, Content-Type and Content-Length, no Date (it is not the guest's state). */
export function encodeResponse(
  status: number,
  body: Buffer | string,
  close = false,
  type = 'application/json',
): Buffer {
  const data = typeof body === 'string' ? Buffer.from(body) : body;
  const head =
    `HTTP/1.1 ${status} ${REASONS[status] ?? 'Status'}\r\n` +
    `Content-Type: ${type}\r\nContent-Length: ${data.length}\r\n` +
    (close ? 'Connection: close\r\n' : '') +
    '\r\n';
  return Buffer.concat([Buffer.from(head, 'latin1'), data]);
}
