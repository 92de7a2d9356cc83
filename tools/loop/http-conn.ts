/**
 * A minimal HTTP/1.1 client on one raw TCP connection, for tests that must
 * know exactly which bytes arrived on which connection (and whether that
 * connection was ever reset): one request at a time, Content-Length bodies.
 */
import net from 'node:net';

export interface HttpResponse {
  status: number;
  headers: Record<string, string>;
  body: Buffer;
  /** The response exactly as it arrived. */
  raw: Buffer;
}

export class HttpConn {
  readonly socket: net.Socket;
  private buf = Buffer.alloc(0);
  private waiter: (() => void) | null = null;
  closed = false;
  error: Error | null = null;
  /** Every byte received on this connection. */
  received = 0;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.on('data', (d: Buffer) => {
      this.received += d.length;
      this.buf = Buffer.concat([this.buf, d]);
      this.waiter?.();
    });
    socket.on('error', (e) => (this.error = e));
    // The server closed its side: so do we (a normal client), once what we sent is out.
    socket.on('end', () => socket.end());
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
  }

  static connect(port: number, host = '127.0.0.1'): Promise<HttpConn> {
    return new Promise((resolve, reject) => {
      const s = net.connect({ port, host, noDelay: true, allowHalfOpen: true });
      s.once('connect', () => resolve(new HttpConn(s)));
      s.once('error', reject);
    });
  }

  send(method: string, path: string, body?: Buffer | string): void {
    const b = body === undefined ? Buffer.alloc(0) : Buffer.from(body);
    this.socket.write(
      `${method} ${path} HTTP/1.1\r\nHost: test\r\n${body !== undefined ? `Content-Length: ${b.length}\r\n` : ''}\r\n`,
    );
    if (b.length) this.socket.write(b);
  }

  /** The next whole response (rejects if the connection closes first or after `timeoutMs`). */
  async response(timeoutMs = 10_000): Promise<HttpResponse> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const r = this.parse();
      if (r) return r;
      if (this.closed)
        throw new Error(
          `connection closed${this.error ? ` (${this.error.message})` : ''} before a whole response`,
        );
      const left = deadline - Date.now();
      if (left <= 0)
        throw new Error(`no whole response in ${timeoutMs} ms (${this.buf.length} bytes buffered)`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = null;
          resolve();
        };
      });
    }
  }

  async request(
    method: string,
    path: string,
    body?: Buffer | string,
    timeoutMs?: number,
  ): Promise<HttpResponse> {
    this.send(method, path, body);
    return this.response(timeoutMs);
  }

  /** Bytes received but not yet parsed as a response. */
  get pending(): number {
    return this.buf.length;
  }

  private parse(): HttpResponse | null {
    const end = this.buf.indexOf('\r\n\r\n');
    if (end < 0) return null;
    const head = this.buf.subarray(0, end).toString('latin1').split('\r\n');
    const status = Number(head[0].split(' ')[1]);
    const headers: Record<string, string> = {};
    for (const l of head.slice(1)) {
      const i = l.indexOf(':');
      headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    const len = Number(headers['content-length'] ?? 0);
    if (this.buf.length < end + 4 + len) return null;
    const raw = this.buf.subarray(0, end + 4 + len);
    const body = raw.subarray(end + 4);
    this.buf = this.buf.subarray(end + 4 + len);
    return { status, headers, body: Buffer.from(body), raw: Buffer.from(raw) };
  }

  close(): void {
    this.socket.destroy();
  }
}
