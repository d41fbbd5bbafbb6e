/** `Process`: a command running in an instance, found by pid or by tag. */

import { InvalidArgument } from "./errors.js";
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

  /**
   * Write a stream of chunks to stdin, in order, in one request (NDJSON lines of the REST face's
   * `:streamInput`); resolves with the bytes written in total once the stream is exhausted.
   * Stdin stays open (`closeStdin`). Node only: browsers refuse streamed request bodies over
   * HTTP/1.1. The process must be known by pid (the route has no tag form).
   */
  async streamStdin(chunks: AsyncIterable<Uint8Array | string>, options: CallOptions = {}): Promise<number> {
    if (!this.pid) throw new InvalidArgument("streamStdin needs the process's pid (connect({ pid }))", "INVALID_ARGUMENT");
    const url = await this.t.url("/v1/instances/{instance_id}/processes/{pid}:streamInput", { instance_id: this.instanceId, pid: this.pid });
    const source = chunks[Symbol.asyncIterator]();
    const encoder = new TextEncoder();
    // One line per chunk, pulled as fetch sends: the gateway writes each upstream (and waits for
    // its flow control) before it reads the next line, so a fast source never floods it.
    const body = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const next = await source.next();
        if (next.done) controller.close();
        else controller.enqueue(encoder.encode(JSON.stringify({ data: toBase64(next.value) }) + "\n"));
      },
      async cancel() {
        await source.return?.();
      },
    });
    const response = await this.t.fetch(
      url,
      { method: "POST", body, headers: { "content-type": "application/x-ndjson" }, signal: options.signal ?? null, duplex: "half" },
      options.signal,
    );
    const reply = (await response.json()) as { bytesWritten?: string };
    return Number(reply.bytesWritten ?? 0);
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
