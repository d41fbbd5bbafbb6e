/** `Process`: a command running in an instance, found by pid or by tag. */

import { type ExecEvent, type ExecResult, ResultCollector, eventFrom, protoSignal, toBase64 } from "./models.js";
import type { CallOptions, Transport } from "./transport.js";

/** A running (or recently exited) process. Made by `instance.start()` or `instance.connect()`. */
export class Process {
  constructor(
    private readonly t: Transport,
    readonly instanceId: string,
    /** 0 when the process is known by its tag only. */
    readonly pid: number,
    readonly tag: string = "",
  ) {}

  /**
   * Reattach: the buffered output (unless `skipReplay`), then live events until it exits.
   * Leaving the iteration early never stops the process.
   */
  async *events(options: CallOptions & { skipReplay?: boolean } = {}): AsyncGenerator<ExecEvent, void, undefined> {
    const body = { skipReplay: options.skipReplay ?? false };
    const stream = this.pid
      ? this.t.ndjson("post", "/v1/instances/{instance_id}/processes/{pid}:connect", {
          path: { instance_id: this.instanceId, pid: this.pid },
          body,
          signal: options.signal,
        })
      : this.t.ndjson("post", "/v1/instances/{instance_id}/processes/tags/{tag}:connect", {
          path: { instance_id: this.instanceId, tag: this.tag },
          body,
          signal: options.signal,
        });
    for await (const item of stream) {
      const event = eventFrom(item.event);
      if (event) yield event;
    }
  }

  /** Wait for the process to exit and collect its (buffered and later) output. */
  async wait(options: CallOptions = {}): Promise<ExecResult> {
    const collector = new ResultCollector();
    for await (const event of this.events(options)) collector.add(event);
    if (!collector.pid) collector.pid = this.pid;
    return collector.result();
  }

  /** Write to the process's stdin (started with `keepStdinOpen: true`). */
  async sendStdin(data: Uint8Array | string, options: CallOptions = {}): Promise<void> {
    const body = { data: toBase64(data) };
    if (this.pid) {
      await this.t.json("post", "/v1/instances/{instance_id}/processes/{pid}:sendInput", {
        path: { instance_id: this.instanceId, pid: this.pid },
        body,
        signal: options.signal,
      });
    } else {
      await this.t.json("post", "/v1/instances/{instance_id}/processes/tags/{tag}:sendInput", {
        path: { instance_id: this.instanceId, tag: this.tag },
        body,
        signal: options.signal,
      });
    }
  }

  /** Close the process's stdin so that it reads end-of-file. */
  async closeStdin(options: CallOptions = {}): Promise<void> {
    if (this.pid) {
      await this.t.json("post", "/v1/instances/{instance_id}/processes/{pid}:closeStdin", {
        path: { instance_id: this.instanceId, pid: this.pid },
        body: {},
        signal: options.signal,
      });
    } else {
      await this.t.json("post", "/v1/instances/{instance_id}/processes/tags/{tag}:closeStdin", {
        path: { instance_id: this.instanceId, tag: this.tag },
        body: {},
        signal: options.signal,
      });
    }
  }

  /** Send a signal ("TERM", "INT", "KILL"... or its number) to the process group. */
  async signal(sig: string | number, options: CallOptions = {}): Promise<void> {
    const body = { signal: protoSignal(sig) };
    if (this.pid) {
      await this.t.json("post", "/v1/instances/{instance_id}/processes/{pid}:signal", {
        path: { instance_id: this.instanceId, pid: this.pid },
        body,
        signal: options.signal,
      });
    } else {
      await this.t.json("post", "/v1/instances/{instance_id}/processes/tags/{tag}:signal", {
        path: { instance_id: this.instanceId, tag: this.tag },
        body,
        signal: options.signal,
      });
    }
  }

  /** SIGKILL the process group. */
  kill(options: CallOptions = {}): Promise<void> {
    return this.signal("KILL", options);
  }
}
