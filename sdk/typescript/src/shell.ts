/**
 * `instance.shell()`: an interactive terminal over the gateway's WebSocket face
 * (`GET /v1/instances/{id}/pty`, docs/rest.md "Interactive shells"). Binary frames are terminal
 * bytes both ways; text frames are the JSON control frames of gateway_svc/rest/control_frames.py.
 *
 * The WebSocket: a browser's own, with the key as the `cyberdesk.key.<key>` subprotocol (a
 * browser cannot set headers on it). In Node, the `ws` package, because Node 20 has no global
 * WebSocket (it arrived in 22) and because `ws` reports a refused handshake's HTTP status and
 * Status body, which the WHATWG API hides (a browser only sees close 1006); there the key travels
 * in the `authorization` header, as on every other call.
 */

import { CyberdeskError, DeadlineExceeded, Unavailable, errorFromStatus } from "./errors.js";
import type { StatusDetail } from "./errors.js";
import { type Exit, type ProcessExitedJson, exitFrom, protoSignal } from "./models.js";
import type { CallOptions, Transport } from "./transport.js";

/** The part of the WebSocket API used here, met by the browser's and by `ws`'s. */
interface Socket {
  binaryType: string;
  readonly readyState: number;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open" | "message" | "close" | "error", listener: (event: never) => void): void;
}

const OPEN = 1;
/** How long `close` waits for the gateway to close a detached session before closing it itself. */
const DETACH_GRACE_MS = 5_000;

/** The first frame: a new terminal, or an existing one by pid or tag. */
export type ShellStart =
  | { type: "open"; cols: number; rows: number; argv?: string[]; env?: Record<string, string>; cwd?: string; tag?: string; background?: boolean }
  | { type: "attach"; pid: number }
  | { type: "attach"; tag: string };

function isNode(): boolean {
  return Boolean((globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node);
}

async function connectSocket(url: string, key: string): Promise<Socket> {
  if (isNode()) {
    const { WebSocket } = await import("ws");
    const socket = new WebSocket(url, ["cyberdesk.v1"], key ? { headers: { authorization: `Bearer ${key}` } } : {});
    socket.on("unexpected-response", (_request, response) => {
      // A refused handshake is an ordinary HTTP answer with a Status body: surface it as the
      // typed error it is (Unauthenticated, NotFound...), not as a bare closed socket.
      const chunks: Buffer[] = [];
      response.on("data", (c: Buffer) => chunks.push(c));
      response.on("end", () => {
        let error: CyberdeskError;
        try {
          const body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as { code: number; message: string; details?: StatusDetail[] };
          error = errorFromStatus(body.code, body.message, body.details ?? [], response.statusCode ?? 0);
        } catch {
          error = new Unavailable(`the terminal's handshake was refused with HTTP ${response.statusCode}`, "UNAVAILABLE");
        }
        socket.emit("refused", error);
        socket.terminate();
      });
    });
    return socket as unknown as Socket;
  }
  const Native = (globalThis as { WebSocket?: new (url: string, protocols: string[]) => Socket }).WebSocket;
  if (!Native) throw new Unavailable("this runtime has no WebSocket", "UNAVAILABLE");
  // No key: a console's cookie session, which the browser sends with the handshake itself.
  return new Native(url, key ? ["cyberdesk.v1", `cyberdesk.key.${key}`] : ["cyberdesk.v1"]);
}

/**
 * A terminal in an instance: `send` keystrokes, read output (`recv`, or iterate), `resize`,
 * `signal`, `wait` for its exit, `close` to leave it (it ends unless opened with `background`).
 *
 * Output is queued as it arrives until read; whoever reads takes from the queue, so `wait`
 * never loses output that `recv` has not handed out yet.
 */
export class Shell implements AsyncIterable<Uint8Array> {
  pid = 0;
  tag = "";
  /** How the terminal's program ended, once it has. */
  exited: Exit | undefined;
  /** Why the session failed, if it did (also thrown by `recv`). */
  error: CyberdeskError | undefined;
  private readonly pending: Uint8Array[] = [];
  private ended = false;
  private closed = false;
  private waiters: (() => void)[] = [];

  private constructor(private readonly socket: Socket) {}

  /** @internal Opens the socket, sends the first frame and waits for `started`. */
  static async open(t: Transport, instanceId: string, start: ShellStart, options: CallOptions = {}): Promise<Shell> {
    const { apiKey } = await t.resolved();
    const httpUrl = await t.url("/v1/instances/{instance_id}/pty", { instance_id: instanceId });
    const socket = await connectSocket(httpUrl.replace(/^http/, "ws"), apiKey);
    socket.binaryType = "arraybuffer";
    const shell = new Shell(socket);
    shell.listen(start);
    const onAbort = (): void => void shell.close();
    options.signal?.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(() => shell.fail(new DeadlineExceeded(`the terminal did not open within ${t.timeoutMs} ms`, "DEADLINE_EXCEEDED")), t.timeoutMs);
    try {
      while (!shell.pid && !shell.ended) await shell.next();
    } finally {
      clearTimeout(timer);
      options.signal?.removeEventListener("abort", onAbort);
    }
    options.signal?.throwIfAborted();
    if (shell.error) throw shell.error;
    if (!shell.pid) throw new Unavailable("the terminal ended before it started", "UNAVAILABLE");
    return shell;
  }

  private listen(start: ShellStart): void {
    const s = this.socket;
    s.addEventListener("open", () => s.send(JSON.stringify(start)));
    s.addEventListener("message", (event: { data: ArrayBuffer | string }) => {
      if (typeof event.data !== "string") {
        this.pending.push(new Uint8Array(event.data));
      } else {
        const frame = JSON.parse(event.data) as { type: string; pid?: number; tag?: string; code?: number; message?: string; details?: StatusDetail[] };
        if (frame.type === "started") {
          this.pid = frame.pid ?? 0;
          this.tag = frame.tag ?? "";
        } else if (frame.type === "exit") {
          this.exited = exitFrom(frame as ProcessExitedJson);
        } else if (frame.type === "error") {
          this.error ??= errorFromStatus(frame.code ?? 2, frame.message ?? "", frame.details ?? []);
        }
      }
      this.notify();
    });
    s.addEventListener("close", (event: { code: number; reason: string }) => {
      // 4000 + a gRPC code: the call failed (its `error` frame came first, when the server could send one).
      if (!this.error && event.code >= 4000 && event.code < 4100 && !this.closed) {
        this.error = errorFromStatus(event.code - 4000, event.reason || "the terminal failed");
      }
      if (!this.error && !this.exited && !this.closed && event.code !== 1000) {
        this.error = new Unavailable(`the terminal's connection closed (${event.code}${event.reason ? ` ${event.reason}` : ""})`, "UNAVAILABLE");
      }
      this.ended = true;
      this.notify();
    });
    (s as unknown as { on?: (e: string, f: (err: CyberdeskError) => void) => void }).on?.("refused", (err) => this.fail(err));
    s.addEventListener("error", () => this.notify());
  }

  private fail(err: CyberdeskError): void {
    this.error ??= err;
    this.ended = true;
    try {
      this.socket.close();
    } catch {
      // already closing
    }
    this.notify();
  }

  private notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /** Resolves at the next frame, close or failure. */
  private next(): Promise<void> {
    return new Promise((resolve) => {
      this.waiters.push(resolve);
    });
  }

  /** The exit code once the terminal's program has ended. */
  get exitCode(): number | undefined {
    return this.exited?.exitCode;
  }

  private sendFrame(data: string | Uint8Array): void {
    if (this.socket.readyState !== OPEN) throw new Unavailable("the terminal is closed", "UNAVAILABLE");
    this.socket.send(data);
  }

  /** Send keystrokes (text is UTF-8 encoded). */
  send(data: Uint8Array | string): void {
    this.sendFrame(typeof data === "string" ? new TextEncoder().encode(data) : data);
  }

  /** Tell the terminal its new size. */
  resize(cols: number, rows: number): void {
    this.sendFrame(JSON.stringify({ type: "resize", cols, rows }));
  }

  /** Send a signal ("INT", "TERM"... or its number) to the terminal's foreground process group. */
  signal(sig: string | number): void {
    this.sendFrame(JSON.stringify({ type: "signal", signal: protoSignal(sig) }));
  }

  /** The next output bytes; an empty array once the terminal has ended (its error, if it failed). */
  async recv(): Promise<Uint8Array> {
    while (this.pending.length === 0) {
      if (this.ended) {
        if (this.error && !this.closed) throw this.error;
        return new Uint8Array(0);
      }
      await this.next();
    }
    return this.pending.shift()!;
  }

  async *[Symbol.asyncIterator](): AsyncGenerator<Uint8Array> {
    for (;;) {
      const chunk = await this.recv();
      if (chunk.length === 0) return;
      yield chunk;
    }
  }

  /** Wait until the terminal ends; its exit (undefined if the session broke off). Output is kept for `recv`. */
  async wait(): Promise<Exit | undefined> {
    while (!this.ended) await this.next();
    return this.exited;
  }

  /**
   * Leave the terminal (it ends unless opened with `background: true`). Keystrokes sent before
   * still reach it: the session detaches and the gateway closes the socket once the agent has
   * applied them (at most DETACH_GRACE_MS later, the socket is closed from here).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.socket.readyState === OPEN && !this.ended) {
      this.socket.send(JSON.stringify({ type: "detach" }));
      const timer = setTimeout(() => this.socket.close(1000), DETACH_GRACE_MS);
      while (!this.ended) await this.next();
      clearTimeout(timer);
    } else if (this.socket.readyState <= OPEN) {
      this.socket.close(1000);
    }
    this.notify();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
