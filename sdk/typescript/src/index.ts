/** The Cyberdesk SDK for TypeScript: the client, its handles, models and typed errors. */

export { Cyberdesk, Instances, Snapshots, createBody } from "./client.js";
export type { InstanceUsage, Plan, Usage, UsageOptions, UsageReport } from "./billing.js";
export type { CreateOptions, CyberdeskOptions, ListOptions } from "./client.js";
export { InstanceWatch } from "./watch.js";
export type { InstanceWatchOptions } from "./watch.js";
export { DEFAULT_HTTP_ENDPOINT, configPath, loadConfigFile, parseHttpEndpoint, resolveConfig } from "./config.js";
export type { ResolvedConfig } from "./config.js";
export { Desktop } from "./desktop.js";
export type { Button, DesktopViewerLink, Direction, Screenshot } from "./desktop.js";
export * from "./errors.js";
export { Files, Watch } from "./files.js";
export type { DownloadOptions, DownloadResult, Progress, UploadOptions, UploadSource } from "./files.js";
export { Instance } from "./instance.js";
export { Keys } from "./keys.js";
export type { ApiKey, CreateKeyOptions } from "./keys.js";
export type { Command, ExecCallbacks, ExecOptions, ShellOptions, StartOptions } from "./instance.js";
export type { ExecEvent, ExecResult, Exit, FileInfo, FileType, FsEvent, InstanceEvent, InstanceJson, InstanceState, ProcessInfo, Snapshot, UploadResult } from "./models.js";
export { Ports } from "./ports.js";
export type { PreviewLink } from "./ports.js";
export { Process } from "./process.js";
export { Shell } from "./shell.js";
export type { ShellStart } from "./shell.js";
export type { CallOptions, CookieSession } from "./transport.js";
export { CSRF_HEADER } from "./transport.js";
export type { components, operations, paths } from "./generated/openapi.js";
