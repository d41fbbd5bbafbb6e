/** `Cyberdesk`, the client: `client.instances`, `client.snapshots` and (operators) `client.keys`. */

import { type Plan, type UsageOptions, type UsageReport, plan, usage } from "./billing.js";
import { InvalidArgument } from "./errors.js";
import { Instance } from "./instance.js";
import { Keys } from "./keys.js";
import { type Snapshot, duration, protoState, snapshotFrom, started } from "./models.js";
import { type CallOptions, type CookieSession, Transport, type TransportOptions } from "./transport.js";
import { Backoff, InstanceWatch, type InstanceWatchOptions, resumable } from "./watch.js";

/** Every option of CreateInstance, in the Python SDK's terms. */
export interface CreateOptions extends CallOptions {
  /** "base" (default) or another template. */
  template?: string;
  /** Lifetime in seconds (server default 300). */
  timeout?: number;
  /** Pause instead of terminate at the deadline, where the runtime can. */
  pauseOnTimeout?: boolean;
  /** An X desktop (Xvfb), `width`x`height` (server default 1280x800 when 0). */
  desktop?: boolean;
  width?: number;
  height?: number;
  vcpus?: number;
  memoryMib?: number;
  /** The disk's size (default the template's); writes beyond it fail with ENOSPC inside. */
  diskMib?: number;
  env?: Record<string, string>;
  labels?: Record<string, string>;
  /** Outbound network access, narrowed by `allow` and cut by `deny` (CIDRs, addresses, host names, "*.example.com"). */
  internet?: boolean;
  allow?: string[];
  deny?: string[];
  /** Restore a snapshot's files. */
  snapshotId?: string;
  /** Makes a retried create idempotent. */
  requestId?: string;
}

export interface ListOptions extends CallOptions {
  /** Short state names, any case ("running", "PAUSED"). */
  states?: string[];
  labels?: Record<string, string>;
}

// How long create() keeps retrying UNAVAILABLE, as the Python SDK: long enough for a gateway or
// instance_svc restart; the request id makes a retry return the instance a lost answer created.
const CREATE_RETRY_MS = 60_000;

/** The request body of CreateInstance for these options; allow/deny without internet are refused here. */
export function createBody(options: CreateOptions) {
  const allow = options.allow ?? [];
  const deny = options.deny ?? [];
  if ((allow.length || deny.length) && !options.internet) {
    const given = allow.length && deny.length ? "allow and deny need" : allow.length ? "allow needs" : "deny needs";
    throw new InvalidArgument(
      `${given} internet: true: an instance without it has no network at all, so there is nothing to narrow`,
      "INVALID_ARGUMENT",
    );
  }
  if ((options.diskMib ?? 0) < 0) {
    throw new InvalidArgument(`diskMib must be a positive number of MiB (or 0 for the default), not ${options.diskMib}`, "INVALID_ARGUMENT");
  }
  return {
    template: options.template ?? "base",
    vcpus: options.vcpus ?? 0,
    memoryMib: options.memoryMib ?? 0,
    diskMib: options.diskMib ?? 0,
    env: options.env ?? {},
    labels: options.labels ?? {},
    desktop: { enabled: options.desktop ?? false, width: options.width ?? 0, height: options.height ?? 0 },
    network: options.internet ? ("NETWORK_MODE_INTERNET" as const) : ("NETWORK_MODE_NONE" as const),
    egress: { allow, deny },
    snapshotId: options.snapshotId ?? "",
    requestId: options.requestId ?? "",
    timeoutAction: options.pauseOnTimeout ? ("TIMEOUT_ACTION_PAUSE" as const) : ("TIMEOUT_ACTION_TERMINATE" as const),
    ...(options.timeout !== undefined ? { timeout: duration(options.timeout, "timeout") } : {}),
  };
}

/** `client.instances`: create, get, list, watch and delete instances. */
export class Instances {
  constructor(private readonly t: Transport) {}

  /**
   * Create an instance and return it once RUNNING (Unavailable with the reason if it failed to
   * start). It always sends a `requestId` (a new UUID unless given) and retries UNAVAILABLE for
   * up to 60 s with back-off: the id makes a retry return the instance an earlier attempt created.
   */
  async create(options: CreateOptions = {}): Promise<Instance> {
    const body = createBody({ ...options, requestId: options.requestId || globalThis.crypto.randomUUID() });
    const backoff = new Backoff(CREATE_RETRY_MS);
    for (;;) {
      try {
        const reply = await this.t.json("post", "/v1/instances", {
          body,
          signal: options.signal,
          timeoutMs: Math.max(this.t.timeoutMs, 120_000),
          idempotent: true, // the request id: a second create returns the first one's instance
        });
        return new Instance(this.t, started(reply.instance ?? {}));
      } catch (err) {
        const wait = resumable(err) ? backoff.next() : undefined;
        if (wait === undefined || options.signal?.aborted) throw err;
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }

  /** One instance by id (NotFound if it is not the caller's). */
  async get(instanceId: string, options: CallOptions = {}): Promise<Instance> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}", { path: { instance_id: instanceId }, signal: options.signal });
    return new Instance(this.t, reply.instance ?? {});
  }

  /** An instance by id without a call: exec, files, desktop... work at once; its state is UNKNOWN until `refresh()`. */
  handle(instanceId: string): Instance {
    return new Instance(this.t, { instanceId });
  }

  /** One page of the caller's instances, newest first; pass `nextPageToken` back for the next. */
  async listPage(
    options: ListOptions & { pageSize?: number; pageToken?: string } = {},
  ): Promise<{ instances: Instance[]; nextPageToken: string }> {
    const reply = await this.t.json("get", "/v1/instances", {
      query: {
        pageSize: options.pageSize ?? 200,
        pageToken: options.pageToken ?? "",
        states: (options.states ?? []).map(protoState),
        labels: options.labels ?? {},
      },
      signal: options.signal,
    });
    return { instances: (reply.instances ?? []).map((i) => new Instance(this.t, i)), nextPageToken: reply.nextPageToken ?? "" };
  }

  /** The caller's instances, newest first (every page), filtered by states and labels. */
  async list(options: ListOptions & { pageSize?: number } = {}): Promise<Instance[]> {
    const result: Instance[] = [];
    let pageToken = "";
    do {
      const page = await this.listPage({ ...options, pageToken });
      result.push(...page.instances);
      pageToken = page.nextPageToken;
    } while (pageToken);
    return result;
  }

  /** Terminate an instance. */
  async delete(instanceId: string, options: CallOptions = {}): Promise<void> {
    await this.t.json("delete", "/v1/instances/{instance_id}", { path: { instance_id: instanceId }, signal: options.signal });
  }

  /**
   * Watch the lifecycle changes of the caller's instances (of one with `instanceId`), as an
   * async iterable. It reconnects by itself on UNAVAILABLE and resumes from its last cursor
   * (every change once, in order); a cursor older than the server's retention is OutOfRange.
   * Over REST the response starts with the first change, so the SDK cannot tell when the
   * server's watch is in place: to see every change after a point, pass the `cursor` of an
   * event seen before it.
   */
  async watch(options: InstanceWatchOptions = {}): Promise<InstanceWatch> {
    const watch = new InstanceWatch(this.t, options);
    watch.open();
    await watch.ready(); // in place: a change made after this returns is delivered
    return watch;
  }
}

/** `client.snapshots`: list, get and delete snapshots (take one with `instance.snapshot()`). */
export class Snapshots {
  constructor(private readonly t: Transport) {}

  async get(snapshotId: string, options: CallOptions = {}): Promise<Snapshot> {
    const reply = await this.t.json("get", "/v1/snapshots/{snapshot_id}", { path: { snapshot_id: snapshotId }, signal: options.signal });
    return snapshotFrom(reply.snapshot);
  }

  /** The caller's snapshots (of one instance when given), newest first, every page. */
  async list(options: CallOptions & { instanceId?: string } = {}): Promise<Snapshot[]> {
    const result: Snapshot[] = [];
    let pageToken = "";
    do {
      const reply = await this.t.json("get", "/v1/snapshots", {
        query: { instanceId: options.instanceId ?? "", pageSize: 200, pageToken },
        signal: options.signal,
      });
      result.push(...(reply.snapshots ?? []).map(snapshotFrom));
      pageToken = reply.nextPageToken ?? "";
    } while (pageToken);
    return result;
  }

  async delete(snapshotId: string, options: CallOptions = {}): Promise<void> {
    await this.t.json("delete", "/v1/snapshots/{snapshot_id}", { path: { snapshot_id: snapshotId }, signal: options.signal });
  }
}

export interface CyberdeskOptions {
  /** Falls back to CYBERDESK_API_KEY, then the CLI config file (Node only). */
  apiKey?: string;
  /**
   * Signed in by the web console's session cookie instead of a key (a page served by the
   * gateway): requests go with the browser's cookie and this CSRF token; `httpEndpoint`
   * defaults to the page's origin. See docs/console.md.
   */
  session?: CookieSession;
  /** The gateway's HTTP origin; falls back to CYBERDESK_HTTP_ENDPOINT, the config file, http://127.0.0.1:8080. */
  httpEndpoint?: string;
  /** Bound of every unary call in ms (default 60 000); exec and streams have none. */
  timeoutMs?: number;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

/**
 * The Cyberdesk client over the gateway's REST face. Nothing is read or connected until the
 * first call; the key and endpoint are resolved then (`config()` resolves them at once).
 */
export class Cyberdesk {
  readonly instances: Instances;
  readonly snapshots: Snapshots;
  /** API-key management; needs a key with the admin scope. */
  readonly keys: Keys;
  private readonly t: Transport;

  constructor(options: CyberdeskOptions = {}) {
    const transport: TransportOptions = options;
    this.t = new Transport(transport);
    this.instances = new Instances(this.t);
    this.snapshots = new Snapshots(this.t);
    this.keys = new Keys(this.t);
  }

  /** The tenant's metered usage, this month unless `since`/`until` say otherwise, in total and by instance. */
  async usage(options: UsageOptions = {}): Promise<UsageReport> {
    return usage(this.t, options);
  }

  /** The tenant's plan: its limits and how much of each is used now. */
  async plan(options: CallOptions = {}): Promise<Plan> {
    return plan(this.t, options);
  }

  /** The endpoint and key this client uses (ConfigurationError when there is no key). */
  async config(): Promise<{ httpEndpoint: string; apiKey: string }> {
    return { ...(await this.t.resolved()) };
  }

  /** Nothing to release (fetch pools its own connections); kept so that `await using` reads the same as in Python. */
  async close(): Promise<void> {}

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
