/** `instance.desktop`: screenshots, mouse and keyboard of an instance created with `desktop: true`. */

import { InvalidArgument } from "./errors.js";
import type { components } from "./generated/openapi.js";
import { duration, fromBase64 } from "./models.js";
import type { CallOptions, Transport } from "./transport.js";

type Schemas = components["schemas"];
export type Button = "left" | "middle" | "right";
export type Direction = "up" | "down" | "left" | "right";

/** A captured screen: the encoded image (PNG unless JPEG was asked for) and its size. */
export interface Screenshot {
  image: Uint8Array;
  format: "png" | "jpeg";
  width: number;
  height: number;
}

/**
 * A link to the live desktop: `url` is the viewer page (the token in its fragment, so it reaches
 * no server log), `streamUrl` the stream's WebSocket (RFB; offer the subprotocols `binary` and
 * `cyberdesk.viewer.<token>`). A `viewOnly` link's input is dropped by the gateway.
 */
export interface DesktopViewerLink {
  url: string;
  streamUrl: string;
  token: string;
  expireTime: string | undefined;
  viewOnly: boolean;
}

function button(name: Button): Schemas["cyberdesk.v1.MouseButton"] {
  if (!["left", "middle", "right"].includes(name)) {
    throw new InvalidArgument(`unknown mouse button ${JSON.stringify(name)}; use left, middle or right`, "INVALID_ARGUMENT");
  }
  return `MOUSE_BUTTON_${name.toUpperCase()}` as Schemas["cyberdesk.v1.MouseButton"];
}

function point(x: number | undefined, y: number | undefined): Schemas["cyberdesk.v1.Point"] | undefined {
  return x === undefined && y === undefined ? undefined : { x: x ?? 0, y: y ?? 0 };
}

/** The desktop of one instance (without one, calls fail with FailedPrecondition). */
export class Desktop {
  constructor(
    private readonly t: Transport,
    private readonly instanceId: string,
  ) {}

  private get p() {
    return { instance_id: this.instanceId };
  }

  /** Capture the screen (or `region`), optionally scaled by 0 < scale <= 1. */
  async screenshot(
    options: CallOptions & {
      format?: "png" | "jpeg";
      quality?: number;
      region?: { x: number; y: number; width: number; height: number };
      scale?: number;
    } = {},
  ): Promise<Screenshot> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}/desktop:screenshot", {
      path: this.p,
      body: {
        format: options.format === "jpeg" ? "IMAGE_FORMAT_JPEG" : "IMAGE_FORMAT_PNG",
        quality: options.quality ?? 0,
        ...(options.region ? { region: options.region } : {}),
        scale: options.scale ?? 0,
      },
      signal: options.signal,
    });
    return {
      image: fromBase64(reply.image),
      format: reply.format === "IMAGE_FORMAT_JPEG" ? "jpeg" : "png",
      width: reply.width ?? 0,
      height: reply.height ?? 0,
    };
  }

  /** Move the pointer to (x, y). */
  async move(x: number, y: number, options: CallOptions = {}): Promise<void> {
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:moveMouse", {
      path: this.p,
      body: { position: { x, y } },
      signal: options.signal,
    });
  }

  /** Click (count 2: double click), at (x, y) when given, else where the pointer is. */
  async click(options: CallOptions & { x?: number; y?: number; button?: Button; count?: number } = {}): Promise<void> {
    const position = point(options.x, options.y);
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:click", {
      path: this.p,
      body: { button: button(options.button ?? "left"), count: options.count ?? 1, ...(position ? { position } : {}) },
      signal: options.signal,
    });
  }

  /** Press a button and hold it (at (x, y) when given). */
  async mouseDown(options: CallOptions & { x?: number; y?: number; button?: Button } = {}): Promise<void> {
    const position = point(options.x, options.y);
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:mouseDown", {
      path: this.p,
      body: { button: button(options.button ?? "left"), ...(position ? { position } : {}) },
      signal: options.signal,
    });
  }

  /** Release a held button (at (x, y) when given). */
  async mouseUp(options: CallOptions & { x?: number; y?: number; button?: Button } = {}): Promise<void> {
    const position = point(options.x, options.y);
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:mouseUp", {
      path: this.p,
      body: { button: button(options.button ?? "left"), ...(position ? { position } : {}) },
      signal: options.signal,
    });
  }

  /** Drag from start to end with a button held. */
  async drag(start: [number, number], end: [number, number], options: CallOptions & { button?: Button } = {}): Promise<void> {
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:drag", {
      path: this.p,
      body: { start: { x: start[0], y: start[1] }, end: { x: end[0], y: end[1] }, button: button(options.button ?? "left") },
      signal: options.signal,
    });
  }

  /** Scroll `amount` wheel steps, at (x, y) when given. */
  async scroll(direction: Direction = "down", amount = 1, options: CallOptions & { x?: number; y?: number } = {}): Promise<void> {
    if (!["up", "down", "left", "right"].includes(direction)) {
      throw new InvalidArgument(`unknown scroll direction ${JSON.stringify(direction)}; use up, down, left or right`, "INVALID_ARGUMENT");
    }
    const position = point(options.x, options.y);
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:scroll", {
      path: this.p,
      body: {
        direction: `SCROLL_DIRECTION_${direction.toUpperCase()}` as Schemas["cyberdesk.v1.ScrollDirection"],
        amount,
        ...(position ? { position } : {}),
      },
      signal: options.signal,
    });
  }

  /** Type Unicode text into the focused window. */
  async type(text: string, options: CallOptions & { delayMs?: number } = {}): Promise<void> {
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:type", {
      path: this.p,
      body: { text, delayMs: options.delayMs ?? 0 },
      signal: options.signal,
    });
  }

  /** Press key combinations in order, e.g. `press(["ctrl+l", "Return"])`. */
  async press(keys: string[], options: CallOptions = {}): Promise<void> {
    await this.t.json("post", "/v1/instances/{instance_id}/desktop:pressKeys", { path: this.p, body: { keys }, signal: options.signal });
  }

  /** The pointer position. */
  async cursor(options: CallOptions = {}): Promise<{ x: number; y: number }> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}/desktop/cursor", { path: this.p, signal: options.signal });
    return { x: reply.position?.x ?? 0, y: reply.position?.y ?? 0 };
  }

  /**
   * Mint a link to watch (and, unless `viewOnly`, drive) the desktop live in a browser, valid for
   * `ttl` seconds (default 3600): anyone holding it gets in until it expires.
   */
  async viewerLink(options: CallOptions & { viewOnly?: boolean; ttl?: number } = {}): Promise<DesktopViewerLink> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}/desktopViewerUrls", {
      path: this.p,
      body: { viewOnly: options.viewOnly ?? false, ttl: duration(options.ttl ?? 3600, "ttl") },
      signal: options.signal,
    });
    return {
      url: reply.url ?? "",
      streamUrl: reply.streamUrl ?? "",
      token: reply.token ?? "",
      expireTime: reply.expireTime,
      viewOnly: reply.viewOnly ?? false,
    };
  }

  /** The viewer page's URL of a new link (see `viewerLink`), as the Python SDK's `stream_url()`. */
  async streamUrl(options: CallOptions & { viewOnly?: boolean; ttl?: number } = {}): Promise<string> {
    return (await this.viewerLink(options)).url;
  }

  /** The screen size. */
  async size(options: CallOptions = {}): Promise<{ width: number; height: number }> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}/desktop", { path: this.p, signal: options.signal });
    return { width: reply.width ?? 0, height: reply.height ?? 0 };
  }
}
