/**
 * HTTP to the gateway's REST face, typed by the generated OpenAPI types: a call names a path of
 * `paths` and a method, and its path parameters, query, JSON body and JSON answer are checked
 * against the document at compile time, so a renamed proto field breaks the build, not a user.
 *
 * Three shapes of call: unary JSON (`json`), server streams as NDJSON (`ndjson`), and raw
 * responses for files (`raw`). Every one takes an AbortSignal; unary calls also get the client's
 * deadline, streams none (a long command or a big download must never be cut off).
 */

import { type ResolvedConfig, parseHttpEndpoint, resolveConfig } from "./config.js";
import { ConfigurationError, CyberdeskError, DeadlineExceeded, Unavailable, errorFromResponse, errorFromStatus } from "./errors.js";
import type { StatusDetail } from "./errors.js";
import type { paths } from "./generated/openapi.js";

export type Method = "get" | "put" | "post" | "delete";
export type Path = keyof paths;
type Op<P extends Path, M extends Method> = NonNullable<paths[P][M]>;
type Params<O> = O extends { parameters: infer X } ? X : never;
export type PathParams<O> = Params<O> extends { path: infer X } ? X : never;
export type QueryParams<O> = Params<O> extends { query?: infer X } ? NonNullable<X> : never;
export type JsonBody<O> = O extends { requestBody?: { content: { "application/json": infer B } } } ? B : never;
export type JsonReply<O> = O extends { responses: { 200: { content: { "application/json": infer R } } } } ? R : never;
/** The `result` of one NDJSON line of a server stream. */
export type StreamItem<O> = O extends {
  responses: { 200: { content: { "application/x-ndjson": { result?: infer R } } } };
}
  ? R
  : never;

/** Options every call takes. */
export interface CallOptions {
  /** Aborts the call (and, for a streamed command that is not in the background, kills it). */
  signal?: AbortSignal | undefined;
}

export interface RequestSpec<O> extends CallOptions {
  path?: PathParams<O>;
  query?: QueryParams<O>;
  body?: JsonBody<O>;
  /** Milliseconds for a unary call; 0 for none. Defaults to the client's `timeoutMs`. */
  timeoutMs?: number;
  /** Sending it twice does no harm (see `replayable`). */
  idempotent?: boolean;
}

/**
 * A browser signed in through the web console: the gateway's session cookie stands for the key
 * (sent by the browser itself, same origin only), and every request carries the session's CSRF
 * token. The key is never in the page.
 */
export interface CookieSession {
  /** From `POST /console/session` or `GET /console/session`; a getter, so a new sign-in takes effect at once. */
  csrfToken: string | (() => string);
}

/** The header that carries the session's CSRF token (gateway_svc/sessions.py). */
export const CSRF_HEADER = "x-cyberdesk-csrf";

/** Options of the client's connection (see `Cyberdesk`). */
export interface TransportOptions {
  apiKey?: string | undefined;
  session?: CookieSession | undefined;
  httpEndpoint?: string | undefined;
  timeoutMs?: number | undefined;
  fetch?: typeof fetch | undefined;
}

/** The gateway of a cookie session: the given origin, else the page's own (cookies are same-origin only). */
function sessionEndpoint(given: string | undefined): string {
  if (given) return parseHttpEndpoint(given);
  const origin = (globalThis as { location?: { origin?: string } }).location?.origin;
  if (!origin || origin === "null") throw new ConfigurationError("a cookie session needs httpEndpoint outside a page of the gateway");
  return origin;
}

/** Fills `{name}` of a path template; `path` (a file path) keeps its `/` between segments. */
function fillPath(template: string, params: Record<string, unknown> | undefined): string {
  return template.replace(/\{([^}]+)\}/g, (_, name: string) => {
    const value = params?.[name];
    if (value === undefined || value === "") throw new CyberdeskError(`${name} is required`, "INVALID_ARGUMENT");
    const text = String(value);
    if (name === "path") {
      // The route captures `path=**` without its leading slash; every segment is encoded alone so
      // that `/` stays a separator and `%2F` never appears (doc: docs/rest.md, Routes).
      return text.replace(/^\/+/, "").split("/").map(encodeURIComponent).join("/");
    }
    return encodeURIComponent(text);
  });
}

/** Query parameters in the REST face's mapping: repeated by repetition, maps as `name[key]`. */
export function encodeQuery(query: Record<string, unknown> | undefined): string {
  const out = new URLSearchParams();
  for (const [name, value] of Object.entries(query ?? {})) {
    if (value === undefined || value === null || value === "") continue;
    if (Array.isArray(value)) for (const item of value) out.append(name, String(item));
    else if (typeof value === "object") {
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) out.append(`${name}[${k}]`, String(v));
    } else out.append(name, String(value));
  }
  const text = out.toString();
  return text ? `?${text}` : "";
}

/** One signal that fires when any of the given ones does (undefined ones are skipped). */
export function anySignal(...signals: (AbortSignal | undefined)[]): AbortSignal | undefined {
  const given = signals.filter((s): s is AbortSignal => s !== undefined);
  if (given.length <= 1) return given[0];
  return AbortSignal.any(given);
}

/** Errors of `fetch` itself (no HTTP answer): refused connection, reset, DNS. */
function networkError(err: unknown, url: string): unknown {
  if (err instanceof CyberdeskError) return err;
  const name = (err as { name?: string }).name;
  if (name === "AbortError") return err; // the caller's abort: rethrown as is
  if (name === "TimeoutError") return new DeadlineExceeded(`no answer from ${url} within the client's timeout`, "DEADLINE_EXCEEDED");
  const cause = (err as { cause?: { code?: string; message?: string } }).cause;
  const why = cause?.code ?? cause?.message ?? (err as Error).message;
  return new Unavailable(`the Cyberdesk endpoint cannot be reached (${url}: ${why})`, "UNAVAILABLE");
}

/**
 * The caller's own abort wins over whatever the aborted fetch reported: the signal's reason is
 * thrown (an AbortError, or the TimeoutError of `AbortSignal.timeout`), as fetch itself does.
 * Only the client's own deadline becomes DeadlineExceeded.
 */
export function callerAbort(err: unknown, signal: AbortSignal | undefined): unknown {
  return signal?.aborted ? signal.reason : err;
}

/**
 * Whether a failed request may be sent again: a method without side effects (or a request the
 * SDK makes idempotent, `idempotent: true`: CreateInstance carries a request id) and a body
 * that can be sent twice (none, or text; never a stream).
 */
function replayable(init: RequestInit, idempotent: boolean | undefined): boolean {
  const method = (init.method ?? "GET").toUpperCase();
  const safe = method === "GET" || method === "HEAD" || method === "DELETE" || idempotent === true;
  return safe && (init.body === undefined || init.body === null || typeof init.body === "string");
}

/**
 * The keep-alive race: undici drops an idle pooled connection after 4 s, the gateway's uvicorn
 * after 5 s; on a loaded machine the client's timer can fire late, and a request then goes out on
 * a socket the server has just closed ("other side closed", measured here at load 15). Such a
 * request never reached the server's application, but the SDK only replays it when doing so
 * twice would be harmless anyway (`replayable`).
 */
function closedIdle(err: unknown): boolean {
  const code = (err as { cause?: { code?: string } }).cause?.code;
  return code === "UND_ERR_SOCKET" || code === "ECONNRESET";
}

export class Transport {
  readonly timeoutMs: number;
  private readonly options: TransportOptions;
  private config: Promise<ResolvedConfig> | undefined;
  private readonly fetchImpl: typeof fetch;

  constructor(options: TransportOptions = {}) {
    this.options = options;
    this.timeoutMs = options.timeoutMs ?? 60_000;
    this.fetchImpl = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** Endpoint and key, resolved once (the environment and config file are read at the first call). */
  resolved(): Promise<ResolvedConfig> {
    this.config ??= this.options.session
      ? Promise.resolve({ apiKey: "", httpEndpoint: sessionEndpoint(this.options.httpEndpoint) })
      : resolveConfig(this.options.apiKey, this.options.httpEndpoint);
    return this.config;
  }

  /** Whether this client is signed in by the console's cookie rather than a key. */
  get cookieSession(): boolean {
    return this.options.session !== undefined;
  }

  async url(template: string, params?: Record<string, unknown>, query?: Record<string, unknown>): Promise<string> {
    const { httpEndpoint } = await this.resolved();
    return httpEndpoint + fillPath(template, params) + encodeQuery(query);
  }

  /** A request with the key; a non-2xx answer becomes its typed error. */
  async fetch(url: string, init: RequestInit & { duplex?: "half"; idempotent?: boolean }, caller?: AbortSignal): Promise<Response> {
    const { apiKey } = await this.resolved();
    const { idempotent, ...request } = init;
    const headers = new Headers(request.headers);
    const session = this.options.session;
    if (session) {
      headers.set(CSRF_HEADER, typeof session.csrfToken === "function" ? session.csrfToken() : session.csrfToken);
      request.credentials = "same-origin";
    } else {
      headers.set("authorization", `Bearer ${apiKey}`);
    }
    let response: Response;
    try {
      response = await this.fetchImpl(url, { ...request, headers });
    } catch (err) {
      if (!(replayable(request, idempotent) && closedIdle(err)) || init.signal?.aborted) throw callerAbort(networkError(err, url), caller);
      // Once: a pooled connection the server closed while idle (see closedIdle).
      try {
        response = await this.fetchImpl(url, { ...request, headers });
      } catch (again) {
        throw callerAbort(networkError(again, url), caller);
      }
    }
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  private deadline(timeoutMs: number | undefined): AbortSignal | undefined {
    const ms = timeoutMs ?? this.timeoutMs;
    return ms > 0 ? AbortSignal.timeout(ms) : undefined;
  }

  /** A unary JSON call. */
  async json<P extends Path, M extends Method>(
    method: M,
    template: P,
    spec: RequestSpec<Op<P, M>> = {},
  ): Promise<JsonReply<Op<P, M>>> {
    const url = await this.url(template, spec.path as Record<string, unknown>, spec.query as Record<string, unknown>);
    const hasBody = method === "post" || method === "put";
    const init: RequestInit & { idempotent?: boolean } = {
      method: method.toUpperCase(),
      signal: anySignal(spec.signal, this.deadline(spec.timeoutMs)) ?? null,
      idempotent: spec.idempotent ?? false,
    };
    if (hasBody) {
      init.body = JSON.stringify(spec.body ?? {});
      init.headers = { "content-type": "application/json" };
    }
    try {
      const response = await this.fetch(url, init);
      try {
        return (await response.json()) as JsonReply<Op<P, M>>;
      } catch (err) {
        throw networkError(err, url);
      }
    } catch (err) {
      throw callerAbort(err, spec.signal);
    }
  }

  /**
   * A server stream: the `result` of each NDJSON line as it arrives. Leaving the iteration early
   * (break, return, a throw) aborts the request, which cancels the call upstream.
   */
  async *ndjson<P extends Path, M extends Method>(
    method: M,
    template: P,
    spec: RequestSpec<Op<P, M>> = {},
  ): AsyncGenerator<StreamItem<Op<P, M>>, void, undefined> {
    const url = await this.url(template, spec.path as Record<string, unknown>, spec.query as Record<string, unknown>);
    const own = new AbortController();
    const init: RequestInit = {
      method: method.toUpperCase(),
      signal: anySignal(spec.signal, own.signal) ?? null,
      headers: { accept: "application/x-ndjson" },
    };
    if (method === "post") {
      init.body = JSON.stringify(spec.body ?? {});
      init.headers = { accept: "application/x-ndjson", "content-type": "application/json" };
    }
    let response: Response;
    try {
      response = await this.fetch(url, init);
    } catch (err) {
      throw callerAbort(err, spec.signal);
    }
    try {
      for await (const line of lines(response, url)) {
        const item = JSON.parse(line) as { result?: unknown; error?: { code: number; message: string; details?: StatusDetail[] } };
        if (item.error) throw errorFromStatus(item.error.code, item.error.message, item.error.details ?? [], response.status);
        if (item.result !== undefined) yield item.result as StreamItem<Op<P, M>>;
      }
    } catch (err) {
      throw callerAbort(err, spec.signal);
    } finally {
      own.abort();
    }
  }
}

/** The lines of a response body (UTF-8, `\n`-separated, blank ones skipped): NDJSON items. */
export async function* lines(response: Response, url: string): AsyncGenerator<string> {
  if (!response.body) return;
  const decoder = new TextDecoder();
  let buffered = "";
  const reader = response.body.getReader();
  try {
    for (;;) {
      let chunk: ReadableStreamReadResult<Uint8Array>;
      try {
        chunk = await reader.read();
      } catch (err) {
        throw networkError(err, url);
      }
      if (chunk.done) break;
      buffered += decoder.decode(chunk.value, { stream: true });
      let newline: number;
      while ((newline = buffered.indexOf("\n")) >= 0) {
        const line = buffered.slice(0, newline).trim();
        buffered = buffered.slice(newline + 1);
        if (line) yield line;
      }
    }
    buffered += decoder.decode();
    if (buffered.trim()) yield buffered.trim();
  } finally {
    reader.releaseLock();
  }
}
