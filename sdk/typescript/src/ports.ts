/** `instance.ports`: links to services listening on TCP ports inside the instance (previews). */

import { duration } from "./models.js";
import type { CallOptions, Transport } from "./transport.js";

/** A minted preview link: both URL forms, the token and when it expires. */
export interface PreviewLink {
  /** Host form, `http://P-<instance>.<preview domain>:<port>/`. */
  url: string;
  /** Path form, `<gateway>/v1/instances/<instance>/ports/P/`. */
  pathUrl: string;
  /** For the `x-cyberdesk-preview-token` header (a public link carries it in its URLs as well). */
  token: string;
  expireTime: string | undefined;
  public: boolean;
}

/** The gateway relays HTTP and WebSocket to a port inside the instance. */
export class Ports {
  constructor(
    private readonly t: Transport,
    private readonly instanceId: string,
  ) {}

  /** Mint a token for `port` valid for `ttl` seconds (default 3600); `public`: the URLs carry it. */
  async link(port: number, options: CallOptions & { public?: boolean; ttl?: number } = {}): Promise<PreviewLink> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}/previewUrls", {
      path: { instance_id: this.instanceId },
      body: { port, ttl: duration(options.ttl ?? 3600, "ttl"), public: options.public ?? false },
      signal: options.signal,
    });
    return {
      url: reply.url ?? "",
      pathUrl: reply.pathUrl ?? "",
      token: reply.token ?? "",
      expireTime: reply.expireTime,
      public: options.public ?? false,
    };
  }

  /**
   * The preview URL of `port` (host form; `pathForm: true` for the path form). Unsigned, it needs
   * the API key; `signed: true` returns one that lets anyone holding it in for `ttl` seconds.
   */
  async url(port: number, options: CallOptions & { signed?: boolean; ttl?: number; pathForm?: boolean } = {}): Promise<string> {
    const link = await this.link(port, { public: options.signed ?? false, ttl: options.ttl ?? 3600, signal: options.signal });
    return options.pathForm ? link.pathUrl : link.url;
  }
}
