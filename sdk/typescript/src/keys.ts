/**
 * `client.keys`: API-key management over `/v1/keys` (AuthService, served by the gateway itself).
 * Every call needs a key with the `admin` scope (an operator's key, e.g. the development key
 * `cyberdesk up` makes); any other key gets `PermissionDenied`. As in the Python SDK
 * (cyberdesk/_async/keys.py): `create(tenant, name, { admin })`, `list(tenant)`, `revoke(keyId)`.
 */

import { InvalidArgument } from "./errors.js";
import type { components } from "./generated/openapi.js";
import { duration } from "./models.js";
import type { CallOptions, Transport } from "./transport.js";

type ApiKeyJson = components["schemas"]["cyberdesk.internal.v1.ApiKey"];

/** An API key's record (never its secret). Times are RFC 3339 strings, as on `Snapshot`. */
export interface ApiKey {
  keyId: string;
  tenantId: string;
  name: string;
  /** The first characters of the secret, to recognise it by. */
  prefix: string;
  /** "instances", "admin". */
  scopes: string[];
  /** The key's own request budget; undefined: the gateway's default. */
  rateLimit: { limit: number; windowSeconds: number } | undefined;
  createTime: string | undefined;
  /** Set once revoked: gateways refuse the key within their auth cache bound (5 s by default). */
  revokeTime: string | undefined;
  /** The JSON the gateway sent. */
  data: ApiKeyJson;
}

export interface CreateKeyOptions extends CallOptions {
  /** Also grant the `admin` scope (key management). */
  admin?: boolean;
  /** At most `limit` requests per `windowSeconds`; the gateway's default when not given. */
  rateLimit?: { limit: number; windowSeconds: number };
}

function seconds(text: string | undefined): number {
  return text ? Number(text.replace(/s$/, "")) : 0;
}

/** The SDK's ApiKey of the JSON one. */
export function apiKeyFrom(data: ApiKeyJson | undefined): ApiKey {
  const d = data ?? {};
  const limit = d.rateLimit?.limit ?? 0;
  return {
    keyId: d.keyId ?? "",
    tenantId: d.tenantId ?? "",
    name: d.name ?? "",
    prefix: d.prefix ?? "",
    scopes: d.scopes ?? [],
    rateLimit: limit > 0 ? { limit, windowSeconds: seconds(d.rateLimit?.window) } : undefined,
    createTime: d.createTime,
    revokeTime: d.revokeTime,
    data: d,
  };
}

/** `client.keys`: create, list and revoke API keys (admin scope needed). */
export class Keys {
  constructor(private readonly t: Transport) {}

  /** Create a key for `tenant`; the secret is in this answer only (the gateway keeps its hash). */
  async create(tenant: string, name: string, options: CreateKeyOptions = {}): Promise<{ key: ApiKey; secret: string }> {
    const rate = options.rateLimit;
    if (rate && !(Number.isInteger(rate.limit) && rate.limit > 0 && rate.windowSeconds > 0)) {
      throw new InvalidArgument(`rateLimit needs a positive whole limit and windowSeconds, not ${JSON.stringify(rate)}`, "INVALID_ARGUMENT");
    }
    const reply = await this.t.json("post", "/v1/keys", {
      body: {
        tenantId: tenant,
        name,
        scopes: options.admin ? ["instances", "admin"] : ["instances"],
        ...(rate ? { rateLimit: { limit: rate.limit, window: duration(rate.windowSeconds, "rateLimit.windowSeconds") } } : {}),
      },
      signal: options.signal,
    });
    return { key: apiKeyFrom(reply.apiKey), secret: reply.secret ?? "" };
  }

  /** A tenant's keys, newest first, revoked ones included (every page). */
  async list(tenant: string, options: CallOptions = {}): Promise<ApiKey[]> {
    const result: ApiKey[] = [];
    let pageToken = "";
    do {
      const reply = await this.t.json("get", "/v1/keys", { query: { tenantId: tenant, pageSize: 200, pageToken }, signal: options.signal });
      result.push(...(reply.apiKeys ?? []).map(apiKeyFrom));
      pageToken = reply.nextPageToken ?? "";
    } while (pageToken);
    return result;
  }

  /** Revoke a key (NotFound if there is none); returns its record with `revokeTime` set. */
  async revoke(keyId: string, options: CallOptions = {}): Promise<ApiKey> {
    const reply = await this.t.json("delete", "/v1/keys/{key_id}", { path: { key_id: keyId }, signal: options.signal });
    return apiKeyFrom(reply.apiKey);
  }
}
