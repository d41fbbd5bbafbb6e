/** `Instance`: one isolated machine and everything a caller does with it. */

import { Desktop } from "./desktop.js";
import { CyberdeskError, InvalidArgument } from "./errors.js";
import { Files } from "./files.js";
import {
  type ExecEvent,
  type ExecResult,
  type InstanceJson,
  type InstanceState,
  type ProcessInfo,
  ResultCollector,
  type Snapshot,
  duration,
  eventFrom,
  execResult,
  exitFrom,
  fromBase64,
  processInfoFrom,
  shortState,
  snapshotFrom,
  toBase64,
} from "./models.js";
import { Ports } from "./ports.js";
import { Process } from "./process.js";
import { Shell } from "./shell.js";
import type { CallOptions, Transport } from "./transport.js";

/** A shell command line (run by `bash -lc`) or an argv. */
export type Command = string | string[];

export interface ExecOptions extends CallOptions {
  env?: Record<string, string>;
  cwd?: string;
  stdin?: Uint8Array | string;
  /** Seconds after which the command's whole process group is killed. */
  timeout?: number;
}

export interface ExecCallbacks {
  /** Output as it arrives; given either callback, `exec` takes the streaming path and drops nothing. */
  onStdout?: (data: Uint8Array) => void;
  onStderr?: (data: Uint8Array) => void;
}

export interface StartOptions extends ExecOptions {
  /** A name to reattach by (`connect({ tag })`). */
  tag?: string;
  /** Keep stdin open for `sendStdin` after `stdin` is written. */
  keepStdinOpen?: boolean;
}

export interface ShellOptions extends CallOptions {
  cols?: number;
  rows?: number;
  /** The program (the login shell when absent). */
  argv?: string[];
  env?: Record<string, string>;
  cwd?: string;
  tag?: string;
  /** Keep the terminal running when this client leaves; reattach with `attachShell`. */
  background?: boolean;
}

function commandFields(command: Command, options: ExecOptions): { command?: string; argv?: string[]; stdin?: string; timeout?: string } {
  const fields: { command?: string; argv?: string[]; stdin?: string; timeout?: string } = {};
  if (typeof command === "string") {
    if (!command) throw new InvalidArgument("command is empty", "INVALID_ARGUMENT");
    fields.command = command;
  } else {
    if (command.length === 0) throw new InvalidArgument("argv is empty", "INVALID_ARGUMENT");
    fields.argv = [...command];
  }
  if (options.stdin !== undefined) fields.stdin = toBase64(options.stdin);
  if (options.timeout !== undefined) fields.timeout = duration(options.timeout, "timeout");
  return fields;
}

/**
 * An isolated machine. `await using box = await client.instances.create()` deletes it when the
 * scope ends (or call `close()` / `delete()`). Attributes are the API's Instance as last read.
 */
export class Instance {
  readonly files: Files;
  readonly desktop: Desktop;
  readonly ports: Ports;

  constructor(
    private readonly t: Transport,
    /** The Instance JSON as last read (`refresh()` reads it again). */
    public data: InstanceJson,
  ) {
    this.files = new Files(t, this.id);
    this.desktop = new Desktop(t, this.id);
    this.ports = new Ports(t, this.id);
  }

  /** The instance id, e.g. "i-7f3a9c2e1b4d". */
  get id(): string {
    return this.data.instanceId ?? "";
  }

  /** PENDING, STARTING, RUNNING, PAUSED, STOPPING, TERMINATED, FAILED (UNKNOWN for an unread handle). */
  get state(): InstanceState {
    return shortState(this.data.state);
  }

  private get p() {
    return { instance_id: this.id };
  }

  private update(json: InstanceJson | undefined): this {
    if (json) this.data = json;
    return this;
  }

  // --- lifecycle ---

  /** Read the instance again. */
  async refresh(options: CallOptions = {}): Promise<this> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}", { path: this.p, signal: options.signal });
    return this.update(reply.instance);
  }

  /** Move the deadline to now + `seconds`. */
  async setTimeout(seconds: number, options: CallOptions = {}): Promise<this> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}:setTimeout", {
      path: this.p,
      body: { timeout: duration(seconds, "timeout") },
      signal: options.signal,
    });
    return this.update(reply.instance);
  }

  /** Freeze every process (FailedPrecondition where the runtime cannot). */
  async pause(options: CallOptions = {}): Promise<this> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}:pause", { path: this.p, body: {}, signal: options.signal });
    return this.update(reply.instance);
  }

  /** Thaw a paused instance. */
  async resume(options: CallOptions = {}): Promise<this> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}:resume", { path: this.p, body: {}, signal: options.signal });
    return this.update(reply.instance);
  }

  /** Save the instance's files as a snapshot; `instances.create({ snapshotId })` restores it. */
  async snapshot(name = "", options: CallOptions = {}): Promise<Snapshot> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}/snapshots", {
      path: this.p,
      body: { displayName: name },
      signal: options.signal,
      timeoutMs: 600_000,
    });
    return snapshotFrom(reply.snapshot);
  }

  /** Terminate the instance (deleting a terminated instance succeeds). */
  async delete(options: CallOptions = {}): Promise<void> {
    const reply = await this.t.json("delete", "/v1/instances/{instance_id}", { path: this.p, signal: options.signal });
    this.update(reply.instance);
  }

  /** Same as `delete()`: the end of an instance that belongs to a scope. */
  close(): Promise<void> {
    return this.delete();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.delete();
  }

  // --- processes ---

  /**
   * Run a command and yield its events as they happen: started, stdout/stderr..., exited.
   * Leaving the iteration early (break, an exception, the signal) kills the command, as in the
   * Python SDK: the request ends, which cancels the call upstream. Nothing of the output is
   * dropped (the agent paces the command to the reader).
   */
  async *execStream(command: Command, options: ExecOptions & { tag?: string } = {}): AsyncGenerator<ExecEvent, void, undefined> {
    const stream = this.t.ndjson("post", "/v1/instances/{instance_id}/processes", {
      path: this.p,
      body: { ...commandFields(command, options), env: options.env ?? {}, cwd: options.cwd ?? "", tag: options.tag ?? "" },
      signal: options.signal,
    });
    for await (const item of stream) {
      const event = eventFrom(item.event);
      if (event) yield event;
    }
  }

  /**
   * Run a command to its end: exit code and output. A non-zero exit is a result (check `ok`).
   * The call has no deadline; `timeout` kills the command, aborting the signal kills it at once.
   *
   * Without callbacks or a signal this is one RunProcess call, whose output is capped at 15 MiB
   * (stdout and stderr together; `truncated` says so). With `onStdout`/`onStderr` it takes the
   * streaming path and drops nothing. With a `signal` it takes the streaming path too: the REST
   * face cancels a call upstream when the client leaves a streamed response, not a unary one, so
   * only there does an abort kill the command (measured: an aborted RunProcess ran on).
   */
  async exec(command: Command, options: ExecOptions & ExecCallbacks = {}): Promise<ExecResult> {
    if (!options.onStdout && !options.onStderr && !options.signal) {
      const reply = await this.t.json("post", "/v1/instances/{instance_id}/processes:run", {
        path: this.p,
        body: { ...commandFields(command, options), env: options.env ?? {}, cwd: options.cwd ?? "" },
        signal: options.signal,
        timeoutMs: 0,
      });
      return execResult(reply.pid ?? 0, exitFrom(reply.exited), fromBase64(reply.stdout), fromBase64(reply.stderr), reply.truncated ?? false);
    }
    const collector = new ResultCollector();
    for await (const event of this.execStream(command, options)) {
      collector.add(event);
      if (event.type === "stdout") options.onStdout?.(event.data);
      else if (event.type === "stderr") options.onStderr?.(event.data);
    }
    return collector.result();
  }

  /** Start a command in the background and return once it runs; reattach later with `connect`. */
  async start(command: Command, options: StartOptions = {}): Promise<Process> {
    const stream = this.t.ndjson("post", "/v1/instances/{instance_id}/processes", {
      path: this.p,
      body: {
        ...commandFields(command, options),
        env: options.env ?? {},
        cwd: options.cwd ?? "",
        tag: options.tag ?? "",
        keepStdinOpen: options.keepStdinOpen ?? false,
        background: true,
      },
      signal: options.signal,
    });
    // Background: ending this stream (the `for` below returns) leaves the process running.
    for await (const item of stream) {
      const event = eventFrom(item.event);
      if (event?.type === "started") return new Process(this.t, this.id, event.pid, event.tag);
      if (event?.type === "exited") break;
    }
    throw new CyberdeskError(`the process ended before it was reported as started (${JSON.stringify(command)})`);
  }

  /** A handle on a running (or recently exited) process, by pid or by tag. */
  connect(selector: { pid: number } | { tag: string }): Process {
    if ("pid" in selector && selector.pid) return new Process(this.t, this.id, selector.pid, "");
    if ("tag" in selector && selector.tag) return new Process(this.t, this.id, 0, selector.tag);
    throw new InvalidArgument("name the process by exactly one of pid or tag", "INVALID_ARGUMENT");
  }

  /** Running processes and those that exited in the last minute. */
  async processes(options: CallOptions = {}): Promise<ProcessInfo[]> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}/processes", { path: this.p, signal: options.signal });
    return (reply.processes ?? []).map(processInfoFrom);
  }

  /** Open an interactive terminal (the login shell unless `argv` is given). */
  shell(options: ShellOptions = {}): Promise<Shell> {
    const start = {
      type: "open" as const,
      cols: options.cols ?? 80,
      rows: options.rows ?? 24,
      ...(options.argv ? { argv: options.argv } : {}),
      ...(options.env ? { env: options.env } : {}),
      ...(options.cwd ? { cwd: options.cwd } : {}),
      ...(options.tag ? { tag: options.tag } : {}),
      ...(options.background ? { background: true } : {}),
    };
    return Shell.open(this.t, this.id, start, options);
  }

  /** Reattach to a terminal opened with `background: true`, by pid or tag. */
  attachShell(selector: { pid: number } | { tag: string }, options: CallOptions = {}): Promise<Shell> {
    return Shell.open(this.t, this.id, { type: "attach", ...selector }, options);
  }
}
