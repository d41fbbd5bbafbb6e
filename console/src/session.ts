/**
 * The console's sign-in: the API key goes to `POST /console/session` once, and the gateway
 * answers with an HttpOnly cookie (which no script can read) and a CSRF token. The key is
 * dropped at once; the CSRF token lives in this module's memory only (a reload asks
 * `GET /console/session` for it again). Nothing is written to localStorage or sessionStorage.
 *
 * Every API call then goes through the TypeScript SDK in its cookie-session mode, the same
 * client users' code runs.
 */

import { CSRF_HEADER, Cyberdesk, errorFromResponse, errorFromStatus } from "@cyberdesk/sdk";

export interface SessionInfo {
  keyId: string;
  tenantId: string;
  scopes: string[];
  csrfToken: string;
  expireTime: string;
}

let current: SessionInfo | undefined;

/** The SDK client of this page: signed in by the cookie, sending the CSRF token. */
export const client = new Cyberdesk({ session: { csrfToken: () => current?.csrfToken ?? "" } });

export function session(): SessionInfo | undefined {
  return current;
}

export function isAdmin(): boolean {
  return current?.scopes.includes("admin") ?? false;
}

async function call(method: string, body?: unknown): Promise<SessionInfo | undefined> {
  const headers: Record<string, string> = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (current) headers[CSRF_HEADER] = current.csrfToken;
  const init: RequestInit = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response: Response;
  try {
    response = await fetch("/console/session", init);
  } catch {
    throw errorFromStatus(14, "the gateway cannot be reached; check that it is running");
  }
  const data = (await response.json().catch(() => ({}))) as Partial<SessionInfo> & { code?: number; message?: string };
  if (!response.ok) throw errorFromStatus(data.code ?? 2, data.message ?? `HTTP ${response.status}`, [], response.status);
  return data.keyId ? (data as SessionInfo) : undefined;
}

/** Sign in with an API key (the key is not kept). */
export async function signIn(apiKey: string): Promise<SessionInfo> {
  current = await call("POST", { apiKey });
  if (!current) throw errorFromStatus(2, "the gateway did not start a session");
  return current;
}

/** The session of the cookie, if any (after a reload); undefined when not signed in. */
export async function resume(): Promise<SessionInfo | undefined> {
  try {
    current = await call("GET");
  } catch (err) {
    current = undefined;
    if ((err as { code?: string }).code === "UNAUTHENTICATED") return undefined;
    throw err;
  }
  return current;
}

/** Sign out: the gateway deletes the session and the cookie. */
export async function signOut(): Promise<void> {
  try {
    await call("DELETE");
  } finally {
    current = undefined;
  }
}

/** Forget the session locally (the gateway said it ended). */
export function forget(): void {
  current = undefined;
}

/**
 * A request to the gateway with the session (cookie and CSRF token), for routes the page calls
 * without an SDK method (the API reference's "try it", the desktop viewer link). A non-2xx
 * answer is thrown as the SDK's typed error unless `raw` is set.
 */
export async function apiFetch(path: string, init: RequestInit = {}, raw = false): Promise<Response> {
  const headers = new Headers(init.headers);
  if (current) headers.set(CSRF_HEADER, current.csrfToken);
  let response: Response;
  try {
    response = await fetch(path, { ...init, headers, credentials: "same-origin" });
  } catch {
    throw errorFromStatus(14, "the gateway cannot be reached; check that it is running");
  }
  if (!response.ok && !raw) throw await errorFromResponse(response);
  return response;
}
