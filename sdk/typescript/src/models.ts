/**
 * What the SDK hands out, built from the generated JSON types: short state names, numbers for
 * int64 sizes, bytes as Uint8Array, and exec events as a discriminated union.
 */

import { InvalidArgument, Unavailable } from "./errors.js";
import type { components } from "./generated/openapi.js";

type Schemas = components["schemas"];
export type InstanceJson = Schemas["cyberdesk.v1.Instance"];
export type SnapshotJson = Schemas["cyberdesk.v1.Snapshot"];
export type FileInfoJson = Schemas["cyberdesk.v1.FileInfo"];
export type ProcessEventJson = Schemas["cyberdesk.v1.ProcessEvent"];
export type ProcessExitedJson = Schemas["cyberdesk.v1.ProcessExited"];
export type ProcessInfoJson = Schemas["cyberdesk.v1.ProcessInfo"];
export type FilesystemEventJson = Schemas["cyberdesk.v1.FilesystemEvent"];
export type WatchInstancesJson = Schemas["cyberdesk.v1.WatchInstancesResponse"];
export type ProtoSignal = Schemas["cyberdesk.v1.Signal"];
export type ProtoInstanceState = Schemas["cyberdesk.v1.InstanceState"];

export type InstanceState = "UNKNOWN" | "PENDING" | "STARTING" | "RUNNING" | "PAUSED" | "STOPPING" | "TERMINATED" | "FAILED";
export const STATES = ["PENDING", "STARTING", "RUNNING", "PAUSED", "STOPPING", "TERMINATED", "FAILED"] as const;

/** "INSTANCE_STATE_RUNNING" -> "RUNNING". */
export function shortState(state: string | undefined): InstanceState {
  const name = (state ?? "").replace(/^INSTANCE_STATE_/, "");
  return (STATES as readonly string[]).includes(name) ? (name as InstanceState) : "UNKNOWN";
}

/** The proto state of a short name, any case ("running" -> "INSTANCE_STATE_RUNNING"). */
export function protoState(name: string): ProtoInstanceState {
  const upper = name.toUpperCase().replace(/^INSTANCE_STATE_/, "");
  if (!(STATES as readonly string[]).includes(upper)) {
    throw new InvalidArgument(`unknown state ${JSON.stringify(name)}; known: ${STATES.join(", ")}`, "INVALID_ARGUMENT");
  }
  return `INSTANCE_STATE_${upper}` as ProtoInstanceState;
}

/** A created instance that could not start is an error carrying the reason, as in Python. */
export function started(data: InstanceJson): InstanceJson {
  if (data.state === "INSTANCE_STATE_FAILED") {
    throw new Unavailable(`instance ${data.instanceId} failed to start: ${data.stateMessage || "no reason given"}`, "UNAVAILABLE");
  }
  return data;
}

// --- bytes ---

type BufferLike = { from(data: string | Uint8Array, encoding?: string): Uint8Array & { toString(e: string): string } };
const NodeBuffer = (globalThis as { Buffer?: BufferLike }).Buffer;

/** Bytes of a proto `bytes` field in JSON (standard base64). */
export function fromBase64(text: string | undefined): Uint8Array {
  if (!text) return new Uint8Array(0);
  if (NodeBuffer) {
    const b = NodeBuffer.from(text, "base64");
    return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  }
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

/** A proto `bytes` field in JSON; text is UTF-8 encoded first. */
export function toBase64(data: Uint8Array | string): string {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  if (NodeBuffer) return NodeBuffer.from(bytes).toString("base64");
  let raw = "";
  for (let i = 0; i < bytes.length; i += 0x8000) raw += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(raw);
}

export function concat(chunks: Uint8Array[]): Uint8Array {
  const total = chunks.reduce((n, c) => n + c.length, 0);
  const out = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

const utf8 = new TextDecoder();

/** A proto Duration in JSON from seconds; a negative or non-finite value is refused locally. */
export function duration(seconds: number, what: string): string {
  if (!(seconds >= 0) || !Number.isFinite(seconds)) {
    throw new InvalidArgument(`${what} must be a non-negative number of seconds, not ${seconds}`, "INVALID_ARGUMENT");
  }
  return `${Number(seconds.toFixed(9))}s`;
}

// --- signals ---

const SIGNALS: Record<string, number> = { HUP: 1, INT: 2, QUIT: 3, KILL: 9, USR1: 10, USR2: 12, TERM: 15, CONT: 18, STOP: 19, TSTP: 20 };

/** A signal name ("TERM", "SIGTERM", "sigterm") or number as the proto's enum name. */
export function protoSignal(sig: string | number): ProtoSignal {
  if (typeof sig === "number") {
    const name = Object.keys(SIGNALS).find((k) => SIGNALS[k] === sig);
    if (!name) throw new InvalidArgument(`signal ${sig} is not one of ${Object.values(SIGNALS).join(", ")}`, "INVALID_ARGUMENT");
    return `SIGNAL_SIG${name}` as ProtoSignal;
  }
  const name = sig.toUpperCase().replace(/^SIGNAL_/, "").replace(/^SIG/, "");
  if (!(name in SIGNALS)) {
    throw new InvalidArgument(`unknown signal ${JSON.stringify(sig)}; known: ${Object.keys(SIGNALS).join(", ")}`, "INVALID_ARGUMENT");
  }
  return `SIGNAL_SIG${name}` as ProtoSignal;
}

// --- processes ---

/** How a process ended. */
export interface Exit {
  exitCode: number;
  /** The signal that killed it (0 if none). */
  signal: number;
  timedOut: boolean;
  outOfMemory: boolean;
  error: string;
}

export function exitFrom(json: ProcessExitedJson | undefined): Exit {
  return {
    exitCode: json?.exitCode ?? 0,
    signal: json?.signal ?? 0,
    timedOut: json?.timedOut ?? false,
    outOfMemory: json?.outOfMemory ?? false,
    error: json?.error ?? "",
  };
}

/** One event of a running command, in order: started, stdout/stderr..., exited. */
export type ExecEvent =
  | { type: "started"; pid: number; tag: string }
  | { type: "stdout"; data: Uint8Array }
  | { type: "stderr"; data: Uint8Array }
  | ({ type: "exited" } & Exit);

/** The SDK event of a ProcessEvent (undefined for a keepalive). */
export function eventFrom(json: ProcessEventJson | undefined): ExecEvent | undefined {
  if (!json) return undefined;
  if (json.started) return { type: "started", pid: json.started.pid ?? 0, tag: json.started.tag ?? "" };
  if (json.stdout !== undefined) return { type: "stdout", data: fromBase64(json.stdout) };
  if (json.stderr !== undefined) return { type: "stderr", data: fromBase64(json.stderr) };
  if (json.exited) return { type: "exited", ...exitFrom(json.exited) };
  return undefined;
}

/** A finished command: its exit and its output. A non-zero exit code is a result, not an error. */
export interface ExecResult extends Exit {
  pid: number;
  stdout: Uint8Array;
  stderr: Uint8Array;
  /** Output beyond the one-call cap (15 MiB) was dropped by the agent (`exec` without `onStdout`). */
  truncated: boolean;
  readonly stdoutText: string;
  readonly stderrText: string;
  /** exit code 0, no signal, no timeout. */
  readonly ok: boolean;
}

export function execResult(pid: number, exit: Exit, stdout: Uint8Array, stderr: Uint8Array, truncated: boolean): ExecResult {
  return {
    pid,
    ...exit,
    stdout,
    stderr,
    truncated,
    get stdoutText() {
      return utf8.decode(this.stdout);
    },
    get stderrText() {
      return utf8.decode(this.stderr);
    },
    get ok() {
      return this.exitCode === 0 && this.signal === 0 && !this.timedOut;
    },
  };
}

/** Collects the events of a stream into an ExecResult. */
export class ResultCollector {
  pid = 0;
  private out: Uint8Array[] = [];
  private err: Uint8Array[] = [];
  private exit: Exit | undefined;

  add(event: ExecEvent): void {
    if (event.type === "started") this.pid = event.pid;
    else if (event.type === "stdout") this.out.push(event.data);
    else if (event.type === "stderr") this.err.push(event.data);
    else this.exit = event;
  }

  result(): ExecResult {
    if (!this.exit) throw new Unavailable("the process stream ended before the process exited", "UNAVAILABLE");
    const { exitCode, signal, timedOut, outOfMemory, error } = this.exit;
    return execResult(this.pid, { exitCode, signal, timedOut, outOfMemory, error }, concat(this.out), concat(this.err), false);
  }
}

/** A running or recently exited process, as ListProcesses reports it. */
export interface ProcessInfo {
  pid: number;
  tag: string;
  argv: string[];
  cwd: string;
  pty: boolean;
  background: boolean;
  startTime: string | undefined;
  /** Set once it has exited. */
  exited: Exit | undefined;
}

export function processInfoFrom(json: ProcessInfoJson): ProcessInfo {
  return {
    pid: json.pid ?? 0,
    tag: json.tag ?? "",
    argv: json.argv ?? [],
    cwd: json.cwd ?? "",
    pty: json.pty ?? false,
    background: json.background ?? false,
    startTime: json.startTime,
    exited: json.exited ? exitFrom(json.exited) : undefined,
  };
}

// --- files ---

export type FileType = "file" | "directory" | "symlink" | "other" | "unknown";

/** Metadata of a path in an instance. */
export interface FileInfo {
  path: string;
  name: string;
  type: FileType;
  size: number;
  mode: number;
  modifyTime: string | undefined;
  symlinkTarget: string;
}

export function fileInfoFrom(json: FileInfoJson | undefined): FileInfo {
  const type = (json?.type ?? "").replace(/^FILE_TYPE_/, "").toLowerCase();
  return {
    path: json?.path ?? "",
    name: json?.name ?? "",
    type: (["file", "directory", "symlink", "other"].includes(type) ? type : "unknown") as FileType,
    size: Number(json?.size ?? 0),
    mode: json?.mode ?? 0,
    modifyTime: json?.modifyTime,
    symlinkTarget: json?.symlinkTarget ?? "",
  };
}

/** A change below a watched directory. */
export interface FsEvent {
  type: "create" | "modify" | "remove" | "rename" | "chmod" | "unknown";
  path: string;
  oldPath: string;
  isDirectory: boolean;
  eventTime: string | undefined;
}

export function fsEventFrom(json: FilesystemEventJson): FsEvent {
  const type = (json.type ?? "").replace(/^FILESYSTEM_EVENT_TYPE_/, "").toLowerCase();
  return {
    type: (["create", "modify", "remove", "rename", "chmod"].includes(type) ? type : "unknown") as FsEvent["type"],
    path: json.path ?? "",
    oldPath: json.oldPath ?? "",
    isDirectory: json.isDirectory ?? false,
    eventTime: json.eventTime,
  };
}

/** What an upload stored. */
export interface UploadResult {
  path: string;
  size: number;
  sha256: string;
}

/** A snapshot of an instance's files. */
export interface Snapshot {
  id: string;
  instanceId: string;
  createTime: string | undefined;
  sizeBytes: number;
  includesMemory: boolean;
  template: string;
  displayName: string;
}

export function snapshotFrom(json: SnapshotJson | undefined): Snapshot {
  return {
    id: json?.snapshotId ?? "",
    instanceId: json?.instanceId ?? "",
    createTime: json?.createTime,
    sizeBytes: Number(json?.sizeBytes ?? 0),
    includesMemory: json?.includesMemory ?? false,
    template: json?.template ?? "",
    displayName: json?.displayName ?? "",
  };
}

/** A change of an instance's state (`client.instances.watch`). */
export interface InstanceEvent {
  eventId: string;
  /** Pass as `cursor` to a later watch to resume after this change. */
  cursor: string;
  instance: InstanceJson;
  state: InstanceState;
  previousState: InstanceState;
  eventTime: string | undefined;
  /** Everything the server sent (newer fields, such as a resume cursor, appear here first). */
  raw: WatchInstancesJson;
}

export function instanceEventFrom(json: WatchInstancesJson): InstanceEvent {
  return {
    eventId: json.eventId ?? "",
    cursor: json.cursor || json.eventId || "",
    instance: json.instance ?? {},
    state: shortState(json.instance?.state),
    previousState: shortState(json.previousState),
    eventTime: json.eventTime,
    raw: json,
  };
}
