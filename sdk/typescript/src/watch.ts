/**
 * `client.instances.watch()`: every lifecycle change, once and in order, across disconnects,
 * as the Python SDK's (cyberdesk/_async/watch.py, policy in cyberdesk/_watch.py).
 *
 * The watch is in place when the response headers arrive; they carry `cyberdesk-watch-cursor`,
 * the position it starts after. Every change carries its own `cursor`. When the watch ends with
 * UNAVAILABLE (the event store, instance_svc or the gateway restarting, a dropped connection) it
 * is opened again with back-off from the last cursor, and the server replays what was missed.
 */

import { CyberdeskError, Unavailable, errorFromStatus } from "./errors.js";
import type { StatusDetail } from "./errors.js";
import { type InstanceEvent, instanceEventFrom, type WatchInstancesJson } from "./models.js";
import { type Transport, anySignal, lines } from "./transport.js";

export const WATCH_CURSOR_HEADER = "cyberdesk-watch-cursor";

/** Exponential back-off with jitter (+-20 %), bounded in total time since the last success. */
export class Backoff {
  private delay = 0;
  private failingFor = 0;

  constructor(
    readonly giveUpAfterMs = 300_000,
    readonly firstMs = 200,
    readonly capMs = 5_000,
  ) {}

  /** The wait before the next attempt, or undefined once `giveUpAfterMs` is spent. */
  next(): number | undefined {
    this.delay = this.delay === 0 ? this.firstMs : Math.min(this.delay * 2, this.capMs);
    const wait = this.delay * (0.8 + 0.4 * Math.random());
    if (this.failingFor + wait > this.giveUpAfterMs) return undefined;
    this.failingFor += wait;
    return wait;
  }

  reset(): void {
    this.delay = 0;
    this.failingFor = 0;
  }
}

/** Only UNAVAILABLE is transient; anything else (a revoked key, OUT_OF_RANGE) would fail again. */
export function resumable(err: unknown): boolean {
  return err instanceof CyberdeskError && err.code === "UNAVAILABLE";
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}

export interface InstanceWatchOptions {
  instanceId?: string;
  /** Resume after this change (an `InstanceEvent.cursor` of an earlier watch). */
  cursor?: string;
  /** Give up (Unavailable) after this long without a successful reconnect (default 300 000). */
  giveUpAfterMs?: number;
  signal?: AbortSignal;
}

/** The caller's lifecycle changes, iterated as they happen; `close()` (or the signal) ends it. */
export class InstanceWatch implements AsyncIterable<InstanceEvent> {
  /** The last change delivered, or where the watch started. */
  cursor: string;
  /** How many times the watch was opened again. */
  reconnects = 0;
  private readonly own = new AbortController();
  private readonly signal: AbortSignal;
  private readonly backoff: Backoff;
  private response: Promise<Response> | undefined;

  constructor(
    private readonly t: Transport,
    private readonly options: InstanceWatchOptions,
  ) {
    this.cursor = options.cursor ?? "";
    this.signal = anySignal(options.signal, this.own.signal)!;
    this.backoff = new Backoff(options.giveUpAfterMs);
  }

  /**
   * @internal Send the request. The response (its headers, with the start cursor) comes once the
   * server's watch is in place; `ready()` waits for it, the iteration awaits it too.
   */
  open(): void {
    const query = { instanceId: this.options.instanceId ?? "", cursor: this.cursor };
    this.response = this.t
      .url("/v1/instances:watch", undefined, query)
      .then((url) => this.t.fetch(url, { headers: { accept: "application/x-ndjson" }, signal: this.signal }, this.options.signal))
      .then((response) => {
        this.cursor = response.headers.get(WATCH_CURSOR_HEADER) || this.cursor;
        return response;
      });
    // Awaited by the iteration; never an unhandled rejection when nobody iterates.
    this.response.catch(() => undefined);
  }

  /** @internal Resolves once the server's watch is in place (every later change will be seen); rejects as the request did. */
  async ready(): Promise<void> {
    await this.response;
  }

  /** Open again after a resumable end, with back-off; rethrows `error` once it gives up. */
  private async reopen(error: unknown): Promise<void> {
    const wait = this.backoff.next();
    if (wait === undefined) throw error;
    await sleep(wait, this.signal);
    if (this.signal.aborted) return;
    this.reconnects++;
    this.open();
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<InstanceEvent, void, undefined> {
    while (!this.signal.aborted) {
      let error: unknown;
      try {
        for await (const line of this.lines()) {
          const item = JSON.parse(line) as { result?: WatchInstancesJson; error?: { code: number; message: string; details?: StatusDetail[] } };
          if (item.error) throw errorFromStatus(item.error.code, item.error.message, item.error.details ?? []);
          if (!item.result) continue;
          const event = instanceEventFrom(item.result);
          this.cursor = event.cursor || this.cursor;
          this.backoff.reset();
          yield event;
        }
        // The server never ends a watch by itself: treat it as a dropped connection.
        error = new Unavailable("the watch ended", "UNAVAILABLE");
      } catch (err) {
        if (this.signal.aborted) break;
        // A connection dropped mid-body is a TypeError from fetch ("terminated"): transient too.
        error = err instanceof CyberdeskError ? err : new Unavailable(`the watch broke off: ${(err as Error).message}`, "UNAVAILABLE");
        if (!resumable(error)) throw error;
      }
      await this.reopen(error);
    }
    if (this.options.signal?.aborted) throw this.options.signal.reason;
  }

  private async *lines(): AsyncGenerator<string> {
    const response = await this.response;
    if (response) yield* lines(response, response.url);
  }

  /** End the watch; an iteration in progress ends quietly. */
  async close(): Promise<void> {
    this.own.abort();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
