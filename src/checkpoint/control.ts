/**
 * The control API: HTTP/JSON on a node's --control address. It is the
 * checkpoint coordinator's interface (two-phase: seal, durable, commit) and
 * the CLI's transport (status, inspect, metrics).
 *
 * Errors are JSON `{ error: { code, message } }` with an HTTP status derived
 * from the error code, so a script can tell a usage error from a failed
 * checkpoint from an unreachable peer.
 */
import { Buffer } from 'node:buffer';
import http from 'node:http';
import type net from 'node:net';
import { ColoError, toColoError, type ErrorCode } from '../errors.js';
import { listenOn } from '../util/listen.js';
import { authHeader, authorized, checkListenAllowed, TOKEN_ENV } from './control-auth.js';

export type Handler = (query: URLSearchParams, body: Record<string, unknown>) => Promise<unknown>;
/**
 * A route that takes and may return bytes (a memory checkpoint's state). The
 * body comes as the pieces the socket delivered (a large state is never
 * joined into one new buffer unless the handler does it); a Buffer, or a list
 * of them sent in order, is answered as bytes.
 */
export type RawHandler = (query: URLSearchParams, body: Buffer[]) => Promise<Buffer | Buffer[] | object>;

export interface Route {
  method: 'GET' | 'POST';
  path: string;
  handler?: Handler;
  /** Instead of `handler`: the body as bytes (up to MAX_RAW_BODY); a Buffer result is sent as bytes. */
  raw?: RawHandler;
  /** Plain-text responses (Prometheus metrics). */
  text?: boolean;
}

const statusOf: Partial<Record<ErrorCode, number>> = {
  EINVAL: 400,
  EUSAGE: 400,
  ENOENT: 404,
  ESTALE: 409, // the node's generation is over: asking again will not help
  ESPLIT: 409, // an operator must decide
  EBUSY: 503, // try again later (a resync, a checkpoint in progress)
  ECONNECT: 503,
  ESHUTDOWN: 503,
  EINTERNAL: 500,
};

const MAX_BODY = 64 * 1024;
/** Raw routes carry memory checkpoints: bounded, but large. */
const MAX_RAW_BODY = 3 * 1024 * 1024 * 1024;

/**
 * A number a route takes, from the JSON body or else the query string: `fallback` when it is not
 * given at all; anything else must be a number from `min` to `max` (a whole one where asked), or the
 * request is refused (EINVAL) with what was wrong. (`Number` alone read "?timeoutMs=" as 0 and
 * "?limit=x" as NaN.)
 */
export function numberParam<F extends number | undefined>(
  q: URLSearchParams,
  b: Record<string, unknown>,
  name: string,
  o: { min: number; max: number; integer?: boolean; fallback: F },
): number | F {
  const v = b[name] ?? q.get(name);
  if (v === undefined || v === null) return o.fallback;
  const n = typeof v === 'number' ? v : typeof v === 'string' && v.trim() !== '' ? Number(v) : NaN;
  if (!(n >= o.min && n <= o.max) || (o.integer && !Number.isInteger(n)))
    throw new ColoError(
      'EINVAL',
      `'${name}' must be ${o.integer ? 'a whole number' : 'a number'} from ${o.min} to ${o.max} (got ${JSON.stringify(v)})`,
    );
  return n;
}

/** An epoch number a route takes (optional unless the route says so). */
export const EPOCH = { min: 1, max: Number.MAX_SAFE_INTEGER, integer: true, fallback: undefined };
/** The longest wait a route takes (`timeoutMs`): a day. */
export const MAX_TIMEOUT_MS = 86_400_000;
/** `/inspect`'s query, the same on a primary and a secondary: which epoch (all if absent), how many records. */
export function inspectQuery(q: URLSearchParams): [epoch: number | undefined, limit: number] {
  return [
    numberParam(q, {}, 'epoch', EPOCH),
    numberParam(q, {}, 'limit', { min: 0, max: 1_000_000, integer: true, fallback: 10_000 }),
  ];
}

/** A request's target as a URL, or null where the URL parser refuses it. */
function parseTarget(target: string | undefined): URL | null {
  try {
    return new URL(target ?? '/', 'http://control');
  } catch {
    return null;
  }
}

export class ControlServer {
  private readonly server: http.Server;
  private readonly routes = new Map<string, Route>();

  constructor(routes: Route[] = []) {
    this.add(routes);
    this.server = http.createServer((req, res) => void this.handle(req, res));
    this.server.keepAliveTimeout = 5000;
  }

  add(routes: Route[]): void {
    for (const r of routes) this.routes.set(`${r.method} ${r.path}`, r);
  }

  async listen(port: number, host: string): Promise<net.AddressInfo> {
    checkListenAllowed(host, port);
    return listenOn(this.server, port, host);
  }

  /** One exchange. Nothing a client sends may end the process: whatever escapes ends this exchange only. */
  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      await this.serve(req, res);
    } catch {
      res.destroy();
    }
  }

  private async serve(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    try {
      // A target the URL parser refuses ("//", "//[") is answered like any bad request, after the
      // token check (as a path no route has).
      const url = parseTarget(req.url);
      if (!authorized(req.headers.authorization, req.method ?? '', url?.pathname ?? '')) {
        // Before anything else: an unauthenticated caller learns nothing, not even the routes.
        req.resume();
        res.writeHead(401, { 'content-type': 'application/json', 'www-authenticate': 'Bearer' });
        res.end(
          JSON.stringify({
            error: {
              code: 'EPERM',
              message:
                'the control API needs its bearer token: give --token-file FILE (the file the node was started ' +
                `with; or set ${TOKEN_ENV})`,
            },
          }),
        );
        return;
      }
      if (!url)
        throw new ColoError(
          'EINVAL',
          `request target ${JSON.stringify((req.url ?? '').slice(0, 200))} is not a path`,
        );
      const route = this.routes.get(`${req.method} ${url.pathname}`);
      if (!route) {
        const known = [...this.routes.keys()].join(', ');
        throw new ColoError('ENOENT', `no route ${req.method} ${url.pathname}; known: ${known}`);
      }
      let body: Record<string, unknown> = {};
      if (req.method === 'POST') {
        const chunks: Buffer[] = [];
        let size = 0;
        const max = route.raw ? MAX_RAW_BODY : MAX_BODY;
        for await (const c of req) {
          size += (c as Buffer).length;
          if (size > max) throw new ColoError('EINVAL', `request body over ${max} bytes`);
          chunks.push(c as Buffer);
        }
        if (route.raw) {
          const result = await route.raw(url.searchParams, chunks);
          if (Buffer.isBuffer(result) || Array.isArray(result)) {
            const parts = Buffer.isBuffer(result) ? [result] : (result as Buffer[]);
            res.writeHead(200, {
              'content-type': 'application/octet-stream',
              'content-length': parts.reduce((n, b) => n + b.length, 0),
            });
            res.cork();
            for (const b of parts) res.write(b);
            res.end();
          } else {
            res.writeHead(200, { 'content-type': 'application/json' });
            res.end(JSON.stringify(result));
          }
          return;
        }
        const text = Buffer.concat(chunks).toString('utf8');
        if (text.trim()) {
          let parsed: unknown;
          try {
            parsed = JSON.parse(text);
          } catch {
            throw new ColoError('EINVAL', 'request body is not JSON');
          }
          if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed))
            throw new ColoError('EINVAL', `request body must be a JSON object (got ${text.slice(0, 40)})`);
          body = parsed as Record<string, unknown>;
        }
      }
      if (!route.handler)
        throw new ColoError('EINVAL', `${req.method} ${url.pathname} takes a POST with a body`);
      const result = await route.handler(url.searchParams, body);
      if (route.text) {
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
        res.end(String(result));
      } else {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(result));
      }
    } catch (err) {
      // An answer already under way cannot become an error: the connection ends instead.
      if (res.headersSent) return void res.destroy();
      const e = toColoError(err);
      res.writeHead(statusOf[e.code] ?? 500, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: e.code, message: e.message } }));
    }
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

/** Call a control endpoint; errors come back as ColoErrors with the server's code. */
export async function controlCall<T = Record<string, unknown>>(
  address: { host: string; port: number },
  method: 'GET' | 'POST',
  path: string,
  body?: object,
  timeoutMs = 30_000,
): Promise<T> {
  const payload = body ? JSON.stringify(body) : undefined;
  return new Promise<T>((resolve, reject) => {
    const req = http.request(
      {
        host: address.host,
        port: address.port,
        method,
        path,
        headers: payload
          ? {
              ...authHeader(),
              'content-type': 'application/json',
              'content-length': Buffer.byteLength(payload),
            }
          : authHeader(),
        timeout: timeoutMs,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          const json = (() => {
            try {
              return JSON.parse(text);
            } catch {
              return undefined;
            }
          })();
          if ((res.statusCode ?? 500) >= 400) {
            const e = json?.error;
            reject(new ColoError(e?.code ?? 'EIO', e?.message ?? `HTTP ${res.statusCode}: ${text}`));
          } else resolve((json ?? text) as T);
        });
      },
    );
    req.on('timeout', () =>
      req.destroy(new Error(`no answer from ${address.host}:${address.port} in ${timeoutMs} ms`)),
    );
    req.on('error', (err) =>
      reject(
        new ColoError(
          'ECONNECT',
          `cannot reach the control API at ${address.host}:${address.port}: ${err.message} (is the node running?)`,
        ),
      ),
    );
    req.end(payload);
  });
}

/** Call a raw route: bytes in (one buffer, or several sent in order without joining them), bytes out. */
export async function controlRaw(
  address: { host: string; port: number },
  path: string,
  body: Buffer | Buffer[] = Buffer.alloc(0),
  timeoutMs = 30_000,
): Promise<Buffer> {
  return new Promise<Buffer>((resolve, reject) => {
    const req = http.request(
      {
        host: address.host,
        port: address.port,
        method: 'POST',
        path,
        headers: {
          ...authHeader(),
          'content-type': 'application/octet-stream',
          'content-length': Array.isArray(body) ? body.reduce((n, b) => n + b.length, 0) : body.length,
        },
        timeout: timeoutMs,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const data = Buffer.concat(chunks);
          if ((res.statusCode ?? 500) >= 400) {
            let e: { code?: ErrorCode; message?: string } | undefined;
            try {
              e = (JSON.parse(data.toString('utf8')) as { error?: typeof e }).error;
            } catch {
              // not JSON
            }
            reject(new ColoError(e?.code ?? 'EIO', e?.message ?? `HTTP ${res.statusCode}`));
          } else resolve(data);
        });
      },
    );
    req.on('timeout', () =>
      req.destroy(new Error(`no answer from ${address.host}:${address.port} in ${timeoutMs} ms`)),
    );
    req.on('error', (err) =>
      reject(new ColoError('ECONNECT', `cannot reach ${address.host}:${address.port}: ${err.message}`)),
    );
    if (Array.isArray(body)) {
      req.cork();
      for (const b of body) req.write(b);
      req.end();
    } else req.end(body);
  });
}
