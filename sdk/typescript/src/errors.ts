/**
 * Typed errors, one class per gRPC status a caller can act on, as in the Python SDK
 * (cyberdesk/_errors.py). Every error body of the REST face is a google.rpc.Status, so the code
 * name and message here are the server's own, whatever the HTTP status was.
 */

/** gRPC status codes by number (google.rpc.Code), as the Status body carries them. */
export const CODE_NAMES = [
  "OK",
  "CANCELLED",
  "UNKNOWN",
  "INVALID_ARGUMENT",
  "DEADLINE_EXCEEDED",
  "NOT_FOUND",
  "ALREADY_EXISTS",
  "PERMISSION_DENIED",
  "RESOURCE_EXHAUSTED",
  "FAILED_PRECONDITION",
  "ABORTED",
  "OUT_OF_RANGE",
  "UNIMPLEMENTED",
  "INTERNAL",
  "UNAVAILABLE",
  "DATA_LOSS",
  "UNAUTHENTICATED",
] as const;

export type CodeName = (typeof CODE_NAMES)[number];

/** One `details` entry of a google.rpc.Status in JSON (`@type` names the message). */
export type StatusDetail = { "@type": string; [field: string]: unknown };

/** A call failed. `code` is the gRPC status code name, `message` the server's explanation. */
export class CyberdeskError extends Error {
  readonly code: CodeName;
  readonly details: StatusDetail[];
  /** The HTTP status of the response, when the failure came in one (0 otherwise). */
  readonly httpStatus: number;

  constructor(message: string, code: CodeName = "UNKNOWN", details: StatusDetail[] = [], httpStatus = 0) {
    super(code === "UNKNOWN" ? message : `${code}: ${message}`);
    this.name = new.target.name;
    // The bare server message; `Error.message` carries the code as a prefix for logs.
    this.serverMessage = message;
    this.code = code;
    this.details = details;
    this.httpStatus = httpStatus;
  }

  readonly serverMessage: string;
}

/** The client cannot be built: no API key, or an unusable endpoint or config file. */
export class ConfigurationError extends CyberdeskError {
  constructor(message: string) {
    super(message, "FAILED_PRECONDITION");
    this.message = message;
  }
}
/** The request is malformed; the message names the bad field. */
export class InvalidArgument extends CyberdeskError {}
/** The instance, snapshot, file or process does not exist (or belongs to another tenant). */
export class NotFound extends CyberdeskError {}
/** The target exists (a file uploaded without overwrite, a tag in use). */
export class AlreadyExists extends CyberdeskError {}
/** The API key is valid but may not do this. */
export class PermissionDenied extends CyberdeskError {}
/** The API key is missing, unknown or revoked. */
export class Unauthenticated extends CyberdeskError {}
/** The request is valid but the state does not allow it (a paused instance, no desktop). */
export class FailedPrecondition extends CyberdeskError {}
/** The service cannot be reached or is shutting down; retrying later may succeed. */
export class Unavailable extends CyberdeskError {}
/** The call did not finish within its deadline. */
export class DeadlineExceeded extends CyberdeskError {}
/** The call was cancelled. */
export class Cancelled extends CyberdeskError {}
/** Transferred bytes do not match their checksum, or a transfer ended short. */
export class DataLoss extends CyberdeskError {}
/** The server failed unexpectedly. */
export class InternalError extends CyberdeskError {}
/** A range or offset lies outside the file. */
export class OutOfRange extends CyberdeskError {}

/** Too many requests or a quota is used up. `retryAfter` (seconds) is set when the server knows. */
export class RateLimited extends CyberdeskError {
  readonly retryAfter: number | undefined;

  constructor(message: string, code: CodeName, details: StatusDetail[], httpStatus: number, retryAfter?: number) {
    super(message, code, details, httpStatus);
    this.retryAfter = retryAfter;
  }
}

const BY_CODE: Partial<Record<CodeName, typeof CyberdeskError>> = {
  INVALID_ARGUMENT: InvalidArgument,
  NOT_FOUND: NotFound,
  ALREADY_EXISTS: AlreadyExists,
  PERMISSION_DENIED: PermissionDenied,
  UNAUTHENTICATED: Unauthenticated,
  FAILED_PRECONDITION: FailedPrecondition,
  UNAVAILABLE: Unavailable,
  DEADLINE_EXCEEDED: DeadlineExceeded,
  CANCELLED: Cancelled,
  DATA_LOSS: DataLoss,
  INTERNAL: InternalError,
  OUT_OF_RANGE: OutOfRange,
};

const RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo";

/** The code name of a google.rpc.Code number (UNKNOWN for one this SDK does not know). */
export function codeName(code: number): CodeName {
  return CODE_NAMES[code] ?? "UNKNOWN";
}

/** Seconds of a proto Duration in JSON ("1.200s"). */
function seconds(value: unknown): number | undefined {
  if (typeof value !== "string" || !value.endsWith("s")) return undefined;
  const n = Number(value.slice(0, -1));
  return Number.isFinite(n) ? n : undefined;
}

/**
 * The typed error of a google.rpc.Status. `retryAfterHeader` is the HTTP `Retry-After` (whole
 * seconds, rounded up by the gateway): used only when no RetryInfo detail is more precise.
 */
export function errorFromStatus(
  code: number,
  message: string,
  details: StatusDetail[] = [],
  httpStatus = 0,
  retryAfterHeader?: string | null,
): CyberdeskError {
  const name = codeName(code);
  if (name === "UNAVAILABLE" && !message) message = "the Cyberdesk endpoint cannot be reached";
  if (name === "RESOURCE_EXHAUSTED") {
    const info = details.find((d) => d["@type"] === RETRY_INFO);
    let retryAfter = seconds(info?.["retryDelay"]);
    if (retryAfter === undefined && retryAfterHeader) {
      const n = Number(retryAfterHeader);
      if (Number.isFinite(n)) retryAfter = n;
    }
    return new RateLimited(message, name, details, httpStatus, retryAfter);
  }
  const cls = BY_CODE[name] ?? CyberdeskError;
  return new cls(message, name, details, httpStatus);
}

/** HTTP status -> gRPC code, for a response whose body is not a Status (a proxy's 502 page). */
const HTTP_CODES: Record<number, CodeName> = {
  400: "INVALID_ARGUMENT",
  401: "UNAUTHENTICATED",
  403: "PERMISSION_DENIED",
  404: "NOT_FOUND",
  409: "ALREADY_EXISTS",
  416: "OUT_OF_RANGE",
  429: "RESOURCE_EXHAUSTED",
  499: "CANCELLED",
  501: "UNIMPLEMENTED",
  502: "UNAVAILABLE",
  503: "UNAVAILABLE",
  504: "DEADLINE_EXCEEDED",
};

/** The typed error of a failed HTTP response (its Status body, or its status when it has none). */
export async function errorFromResponse(response: Response): Promise<CyberdeskError> {
  const text = await response.text().catch(() => "");
  const retryAfter = response.headers.get("retry-after");
  try {
    const body = JSON.parse(text) as { code?: unknown; message?: unknown; details?: unknown };
    if (typeof body.code === "number" && typeof body.message === "string") {
      const details = Array.isArray(body.details) ? (body.details as StatusDetail[]) : [];
      return errorFromStatus(body.code, body.message, details, response.status, retryAfter);
    }
  } catch {
    // Not a Status: fall through to the HTTP status.
  }
  const name = HTTP_CODES[response.status] ?? (response.status >= 500 ? "INTERNAL" : "UNKNOWN");
  const code = CODE_NAMES.indexOf(name);
  const message = `HTTP ${response.status}${text ? `: ${text.slice(0, 200)}` : ""}`;
  return errorFromStatus(code, message, [], response.status, retryAfter);
}
