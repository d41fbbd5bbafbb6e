/**
 * Where the client finds its HTTP endpoint and API key, in the order of the Python SDK
 * (cyberdesk/_config.py): the explicit option, the environment (`CYBERDESK_API_KEY`,
 * `CYBERDESK_HTTP_ENDPOINT`), the CLI config file (`$CYBERDESK_CONFIG`, else
 * `$XDG_CONFIG_HOME/cyberdesk/config.json`, else `~/.config/cyberdesk/config.json`), the local
 * default. Environment and file exist only in Node; a browser passes both options.
 */

import { ConfigurationError } from "./errors.js";

export const DEFAULT_HTTP_ENDPOINT = "http://127.0.0.1:8080";

/** What a client connects with. */
export interface ResolvedConfig {
  /** The gateway's HTTP origin (scheme, host, port), without a trailing slash. */
  httpEndpoint: string;
  apiKey: string;
}

type Env = Record<string, string | undefined>;

/** `process.env` in Node, nothing elsewhere (a browser has no environment). */
function nodeEnv(): Env | undefined {
  const proc = (globalThis as { process?: { env?: Env; versions?: { node?: string } } }).process;
  return proc?.versions?.node ? proc.env : undefined;
}

/** The config file's path in Node (it need not exist); undefined in a browser. */
export async function configPath(env: Env | undefined = nodeEnv()): Promise<string | undefined> {
  if (!env) return undefined;
  const explicit = env["CYBERDESK_CONFIG"];
  const os = await import("node:os");
  const path = await import("node:path");
  if (explicit) return explicit.startsWith("~/") ? path.join(os.homedir(), explicit.slice(2)) : explicit;
  const base = env["XDG_CONFIG_HOME"] || path.join(os.homedir(), ".config");
  return path.join(base, "cyberdesk", "config.json");
}

/** The config file's settings; empty when it does not exist (or outside Node). */
export async function loadConfigFile(file?: string): Promise<Record<string, string>> {
  const where = file ?? (await configPath());
  if (!where) return {};
  const fs = await import("node:fs/promises");
  let raw: string;
  try {
    raw = await fs.readFile(where, "utf8");
  } catch (err) {
    if ((err as { code?: string }).code === "ENOENT") return {};
    throw new ConfigurationError(`cannot read ${where}: ${(err as Error).message}`);
  }
  let data: unknown;
  try {
    data = raw.trim() ? JSON.parse(raw) : {};
  } catch (err) {
    throw new ConfigurationError(`${where} is not valid JSON (${(err as Error).message}); fix or delete it`);
  }
  if (typeof data !== "object" || data === null || Array.isArray(data)) {
    throw new ConfigurationError(`${where} must hold a JSON object`);
  }
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(data)) if (v !== null && v !== undefined) out[k] = String(v);
  return out;
}

/** An HTTP origin from `http(s)://host:port` or a bare `host:port` (taken as http). */
export function parseHttpEndpoint(raw: string): string {
  let value = raw.trim().replace(/\/+$/, "");
  if (!/^https?:\/\//.test(value)) value = `http://${value}`;
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new ConfigurationError(`HTTP endpoint ${JSON.stringify(raw)} is not a URL (e.g. http://127.0.0.1:8080)`);
  }
  if (url.pathname !== "/" || url.search || url.hash) {
    throw new ConfigurationError(`HTTP endpoint ${JSON.stringify(raw)} must be an origin, without a path`);
  }
  return url.origin;
}

/** Endpoint and key by the resolution order; ConfigurationError when no key is found. */
export async function resolveConfig(apiKey?: string, httpEndpoint?: string): Promise<ResolvedConfig> {
  const env = nodeEnv();
  let file: Record<string, string> | undefined;
  const fromFile = async (name: string): Promise<string | undefined> => {
    file ??= await loadConfigFile();
    return file[name] || undefined;
  };
  const key = apiKey || env?.["CYBERDESK_API_KEY"] || (await fromFile("api_key"));
  if (!key) {
    const where = await configPath(env);
    throw new ConfigurationError(
      where
        ? `no API key: pass apiKey, set CYBERDESK_API_KEY, or run \`cyberdesk up\` (it writes one to ${where})`
        : "no API key: pass apiKey (a browser has no environment or config file)",
    );
  }
  const endpoint =
    httpEndpoint || env?.["CYBERDESK_HTTP_ENDPOINT"] || (await fromFile("http_endpoint")) || DEFAULT_HTTP_ENDPOINT;
  return { apiKey: key, httpEndpoint: parseHttpEndpoint(endpoint) };
}
