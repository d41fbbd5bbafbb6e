/**
 * `instance.files`: files in and out of an instance, and its tree. Transfers are raw HTTP bodies
 * (`PUT`/`GET /v1/instances/{id}/files/{path}`), streamed both ways: nothing is held in memory
 * but the chunk in flight, whatever the size.
 */

import { DataLoss, InvalidArgument, NotFound, Unavailable } from "./errors.js";
import { type FileInfo, type FsEvent, type UploadResult, concat, fileInfoFrom, fsEventFrom } from "./models.js";
import { type Hasher, sha256 } from "./sha256.js";
import { type CallOptions, type Transport, anySignal } from "./transport.js";

const FILE = "/v1/instances/{instance_id}/files/{path}";

/** Called with bytes done and the total when known. */
export type Progress = (done: number, total: number | undefined) => void;

/** What an upload reads: bytes, text (UTF-8), a Blob (a browser File, Node's `fs.openAsBlob`), or a stream. */
export type UploadSource = Uint8Array | string | Blob | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>;

export interface UploadOptions extends CallOptions {
  /** Replace an existing file (default true; false: AlreadyExists when it exists). */
  overwrite?: boolean;
  /** Make missing parent directories (default true). */
  createParents?: boolean;
  /** Permission bits, e.g. 0o755. */
  mode?: number;
  progress?: Progress;
  /** The size of a stream source, for progress (Blobs and bytes know theirs). */
  size?: number;
}

export interface DownloadOptions extends CallOptions {
  /** First byte to read. */
  offset?: number;
  /** Bytes to read from `offset` (0 or absent: to the end). */
  length?: number;
  progress?: Progress;
  /**
   * Also ask the gateway for the agent's sha256 first (`HEAD`) and compare it with the bytes
   * received: an end-to-end check, at the cost of the agent reading the file twice. Without it
   * the gateway still compares the bytes it relays with the agent's sha256 and cuts the body
   * short on a mismatch, which arrives here as DataLoss.
   */
  verify?: boolean;
}

/** What a download received. */
export interface DownloadResult {
  size: number;
  sha256: string;
}

function absolute(path: string): string {
  if (!path.startsWith("/")) {
    throw new InvalidArgument(`remote path ${JSON.stringify(path)} must be absolute (start with /)`, "INVALID_ARGUMENT");
  }
  return path;
}

function sizeOf(source: UploadSource, given: number | undefined): number | undefined {
  if (given !== undefined) return given;
  if (typeof source === "string") return new TextEncoder().encode(source).length;
  if (source instanceof Uint8Array) return source.length;
  if (typeof Blob !== "undefined" && source instanceof Blob) return source.size;
  return undefined;
}

async function* chunksOf(source: UploadSource): AsyncGenerator<Uint8Array> {
  if (typeof source === "string") yield new TextEncoder().encode(source);
  else if (source instanceof Uint8Array) yield source;
  else if (typeof Blob !== "undefined" && source instanceof Blob) yield* chunksOf(source.stream());
  else if (Symbol.asyncIterator in source) yield* source as AsyncIterable<Uint8Array>;
  else {
    const reader = (source as unknown as ReadableStream<Uint8Array>).getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) return;
        yield value;
      }
    } finally {
      reader.releaseLock();
    }
  }
}

// Sources hand out small pieces (a Blob's stream: 64 KiB); the body is given 1 MiB ones, as the
// gateway forwards 1 MiB messages: fewer, larger writes on the socket and fewer hash calls.
const PIECE = 1024 * 1024;

/** The chunks of `chunks` gathered into pieces of at least `size` bytes (the last may be shorter). */
async function* pieces(chunks: AsyncIterable<Uint8Array>, size = PIECE): AsyncGenerator<Uint8Array> {
  let held: Uint8Array[] = [];
  let count = 0;
  for await (const chunk of chunks) {
    if (count === 0 && chunk.length >= size) {
      yield chunk;
      continue;
    }
    held.push(chunk);
    count += chunk.length;
    if (count >= size) {
      yield concat(held);
      held = [];
      count = 0;
    }
  }
  if (count) yield concat(held);
}

/** A request body that hashes and counts what fetch pulls from it. */
function hashingBody(source: UploadSource, hasher: Hasher, total: number | undefined, progress?: Progress): ReadableStream<Uint8Array> {
  const chunks = pieces(chunksOf(source));
  let done = 0;
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      const next = await chunks.next();
      if (next.done) {
        if (done === 0) progress?.(0, total);
        controller.close();
        return;
      }
      hasher.update(next.value);
      done += next.value.length;
      controller.enqueue(next.value);
      progress?.(done, total);
    },
    async cancel() {
      await chunks.return(undefined);
    },
  });
}

function isNode(): boolean {
  return Boolean((globalThis as { process?: { versions?: { node?: string } } }).process?.versions?.node);
}

/** The files of one instance. Remote paths are absolute paths inside the instance. */
export class Files {
  constructor(
    private readonly t: Transport,
    private readonly instanceId: string,
  ) {}

  /**
   * Upload bytes, text, a Blob or a stream to `path`. The file appears under its name only once
   * complete, and its sha256 is compared with the bytes sent (DataLoss on a mismatch).
   */
  async upload(path: string, source: UploadSource, options: UploadOptions = {}): Promise<UploadResult> {
    const query = {
      "header.overwrite": options.overwrite ?? true,
      "header.createParents": options.createParents ?? true,
      "header.mode": options.mode,
    };
    const url = await this.t.url(FILE, { instance_id: this.instanceId, path: absolute(path) }, query);
    const hasher = await sha256();
    const total = sizeOf(source, options.size);
    let body: BodyInit;
    let duplex: { duplex?: "half" } = {};
    if (isNode()) {
      // Node's fetch streams a ReadableStream body with `duplex: "half"` (chunked when the size
      // is not known), so hashing and progress see every chunk as it is sent.
      body = hashingBody(source, hasher, total, options.progress);
      duplex = { duplex: "half" };
    } else {
      // Browsers refuse streamed request bodies over HTTP/1.1: a Blob is sent as it is (the
      // browser reads it from disk itself) and hashed by reading it once more.
      const blob = source instanceof Blob ? source : new Blob([concat(await collect(source)) as BlobPart]);
      for await (const chunk of chunksOf(blob)) hasher.update(chunk);
      body = blob;
    }
    const response = await this.t.fetch(url, {
      method: "PUT",
      body,
      headers: { "content-type": "application/octet-stream" },
      signal: options.signal ?? null,
      ...duplex,
    }, options.signal);
    const reply = (await response.json()) as { path?: string; size?: string; sha256?: string };
    const sent = hasher.hex();
    if (!isNode()) options.progress?.(total ?? 0, total);
    if (reply.sha256 && reply.sha256 !== sent) {
      throw new DataLoss(`upload of ${path}: the instance stored sha256 ${reply.sha256}, sent ${sent}`, "DATA_LOSS");
    }
    return { path: reply.path ?? path, size: Number(reply.size ?? 0), sha256: reply.sha256 ?? sent };
  }

  /** Write bytes (or UTF-8 text) to `path`, replacing it. */
  write(path: string, data: Uint8Array | string, options: Omit<UploadOptions, "overwrite"> = {}): Promise<UploadResult> {
    return this.upload(path, data, { ...options, overwrite: true });
  }

  /** The agent's sha256 and size of a file (or of a range of it), without its bytes (`HEAD`). */
  async digest(path: string, options: Omit<DownloadOptions, "verify" | "progress"> = {}): Promise<DownloadResult> {
    const url = await this.t.url(FILE, { instance_id: this.instanceId, path: absolute(path) });
    const response = await this.t.fetch(url, { method: "HEAD", headers: rangeHeader(options), signal: options.signal ?? null }, options.signal);
    return { size: Number(response.headers.get("content-length") ?? 0), sha256: response.headers.get("x-cyberdesk-sha256") ?? "" };
  }

  /**
   * The bytes of a file as they arrive (a range with `offset`/`length`). The iterator's return
   * value is the size and sha256 of what was received; a body cut short is DataLoss.
   */
  async *stream(path: string, options: DownloadOptions = {}): AsyncGenerator<Uint8Array, DownloadResult, undefined> {
    const expected = options.verify ? await this.digest(path, options) : undefined;
    const url = await this.t.url(FILE, { instance_id: this.instanceId, path: absolute(path) });
    const own = new AbortController();
    const response = await this.t.fetch(url, {
      method: "GET",
      headers: rangeHeader(options),
      signal: anySignal(options.signal, own.signal) ?? null,
    }, options.signal);
    const total = response.headers.has("content-length") ? Number(response.headers.get("content-length")) : undefined;
    const hasher = await sha256();
    let done = 0;
    const reader = response.body!.getReader();
    try {
      for (;;) {
        let next: ReadableStreamReadResult<Uint8Array>;
        try {
          next = await reader.read();
        } catch (err) {
          if (options.signal?.aborted) throw options.signal.reason;
          throw new DataLoss(`download of ${path} ended after ${done} of ${total ?? "?"} bytes (${(err as Error).message})`, "DATA_LOSS");
        }
        if (next.done) break;
        hasher.update(next.value);
        done += next.value.length;
        options.progress?.(done, total);
        yield next.value;
      }
    } finally {
      reader.releaseLock();
      own.abort();
    }
    if (total !== undefined && done !== total) {
      throw new DataLoss(`download of ${path} ended after ${done} of ${total} bytes`, "DATA_LOSS");
    }
    const sha = hasher.hex();
    if (expected && expected.sha256 !== sha) {
      throw new DataLoss(`download of ${path}: sha256 ${sha} differs from the instance's ${expected.sha256}`, "DATA_LOSS");
    }
    return { size: done, sha256: sha };
  }

  /** Download into a WritableStream (or a Node file path: written beside it, renamed when complete). */
  async download(path: string, destination: WritableStream<Uint8Array> | string, options: DownloadOptions = {}): Promise<DownloadResult> {
    if (typeof destination === "string") return this.downloadFile(path, destination, options);
    const writer = destination.getWriter();
    try {
      const result = await drain(this.stream(path, options), (chunk) => writer.write(chunk));
      await writer.close();
      return result;
    } catch (err) {
      await writer.abort(err).catch(() => undefined);
      throw err;
    }
  }

  /** Node: upload a local file, streamed from disk. */
  async uploadFile(localPath: string, path: string, options: UploadOptions = {}): Promise<UploadResult> {
    const fs = await import("node:fs");
    const blob = await fs.openAsBlob(localPath);
    return this.upload(path, blob as Blob, options);
  }

  /** Node: download to a local file, written to `.<name>.partial` beside it and renamed once complete and checked. */
  async downloadFile(path: string, localPath: string, options: DownloadOptions = {}): Promise<DownloadResult> {
    const fsp = await import("node:fs/promises");
    const nodePath = await import("node:path");
    const partial = nodePath.join(nodePath.dirname(localPath), `.${nodePath.basename(localPath)}.partial`);
    const out = await fsp.open(partial, "w");
    try {
      // Written in 1 MiB pieces: a write per 64 KiB network read would cost more than the read.
      let held: Uint8Array[] = [];
      let count = 0;
      const result = await drain(this.stream(path, options), async (chunk) => {
        held.push(chunk);
        count += chunk.length;
        if (count >= PIECE) {
          await out.write(concat(held));
          held = [];
          count = 0;
        }
      });
      if (count) await out.write(concat(held));
      await out.close();
      await fsp.rename(partial, localPath);
      return result;
    } finally {
      await out.close().catch(() => undefined);
      await fsp.rm(partial, { force: true });
    }
  }

  /** The whole content of a file. */
  async read(path: string, options: CallOptions = {}): Promise<Uint8Array> {
    const chunks: Uint8Array[] = [];
    await drain(this.stream(path, options), (chunk) => void chunks.push(chunk));
    return concat(chunks);
  }

  /** The content of a UTF-8 text file. */
  async readText(path: string, options: CallOptions = {}): Promise<string> {
    return new TextDecoder().decode(await this.read(path, options));
  }

  /** Entries of a directory (`depth` levels deep), sorted by path. */
  async list(path: string, options: CallOptions & { depth?: number } = {}): Promise<FileInfo[]> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}/fs:list", {
      path: { instance_id: this.instanceId },
      query: { path: absolute(path), depth: options.depth ?? 1 },
      signal: options.signal,
    });
    return (reply.entries ?? []).map(fileInfoFrom);
  }

  /** Metadata of a path (symlinks are not followed). */
  async stat(path: string, options: CallOptions = {}): Promise<FileInfo> {
    const reply = await this.t.json("get", "/v1/instances/{instance_id}/fs:stat", {
      path: { instance_id: this.instanceId },
      query: { path: absolute(path) },
      signal: options.signal,
    });
    return fileInfoFrom(reply.info);
  }

  /** Whether the path exists. */
  async exists(path: string, options: CallOptions = {}): Promise<boolean> {
    try {
      await this.stat(path, options);
      return true;
    } catch (err) {
      if (err instanceof NotFound) return false;
      throw err;
    }
  }

  /** Make a directory (with its parents, succeeding if it exists, unless `parents: false`). */
  async mkdir(path: string, options: CallOptions & { parents?: boolean; mode?: number } = {}): Promise<FileInfo> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}/fs:makeDirectory", {
      path: { instance_id: this.instanceId },
      body: { path: absolute(path), parents: options.parents ?? true, mode: options.mode ?? 0 },
      signal: options.signal,
    });
    return fileInfoFrom(reply.info);
  }

  /** Move or rename a file or directory. */
  async move(source: string, destination: string, options: CallOptions & { overwrite?: boolean } = {}): Promise<FileInfo> {
    const reply = await this.t.json("post", "/v1/instances/{instance_id}/fs:move", {
      path: { instance_id: this.instanceId },
      body: { source: absolute(source), destination: absolute(destination), overwrite: options.overwrite ?? false },
      signal: options.signal,
    });
    return fileInfoFrom(reply.info);
  }

  /** Remove a file, or a directory (`recursive` when it is not empty). */
  async remove(path: string, options: CallOptions & { recursive?: boolean } = {}): Promise<void> {
    await this.t.json("post", "/v1/instances/{instance_id}/fs:remove", {
      path: { instance_id: this.instanceId },
      body: { path: absolute(path), recursive: options.recursive ?? false },
      signal: options.signal,
    });
  }

  /**
   * Watch a directory. Resolves once the watch is in place, so every later change is reported;
   * iterate the result for changes, `close()` it (or `await using`) to stop.
   */
  async watch(path: string, options: CallOptions & { recursive?: boolean } = {}): Promise<Watch> {
    const own = new AbortController();
    const stream = this.t.ndjson("get", "/v1/instances/{instance_id}/fs:watch", {
      path: { instance_id: this.instanceId },
      query: { path: absolute(path), recursive: options.recursive ?? false },
      signal: anySignal(options.signal, own.signal),
    });
    for (;;) {
      const next = await stream.next();
      if (next.done) throw new Unavailable(`the watch of ${path} ended before it started`, "UNAVAILABLE");
      if (next.value.started) return new Watch(stream, own);
    }
  }
}

/** The changes below a watched directory, iterated as they happen. */
export class Watch implements AsyncIterable<FsEvent> {
  constructor(
    private readonly stream: AsyncGenerator<{ started?: unknown; change?: Parameters<typeof fsEventFrom>[0] }, void, undefined>,
    private readonly own: AbortController,
  ) {}

  async *[Symbol.asyncIterator](): AsyncGenerator<FsEvent> {
    try {
      for await (const item of this.stream) if (item.change) yield fsEventFrom(item.change);
    } catch (err) {
      // close() aborts the request: the iteration in progress then ends quietly.
      if (!this.own.signal.aborted) throw err;
    }
  }

  /** Stop watching. */
  async close(): Promise<void> {
    this.own.abort();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

function rangeHeader(options: { offset?: number; length?: number }): Record<string, string> {
  const offset = options.offset ?? 0;
  const length = options.length ?? 0;
  if (!offset && !length) return {};
  return { range: length ? `bytes=${offset}-${offset + length - 1}` : `bytes=${offset}-` };
}

async function collect(source: UploadSource): Promise<Uint8Array[]> {
  const out: Uint8Array[] = [];
  for await (const chunk of chunksOf(source)) out.push(chunk);
  return out;
}

/** Runs a download generator to its end, handing each chunk to `sink`; its DownloadResult. */
async function drain(
  gen: AsyncGenerator<Uint8Array, DownloadResult, undefined>,
  sink: (chunk: Uint8Array) => unknown,
): Promise<DownloadResult> {
  for (;;) {
    const next = await gen.next();
    if (next.done) return next.value;
    await sink(next.value);
  }
}
