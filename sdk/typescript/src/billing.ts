/**
 * `client.usage()` and `client.plan()`: the tenant's metered usage and its plan, over `GET
 * /v1/usage` and `GET /v1/plan` (BillingService, answered by billing_svc). As in the Python SDK
 * (cyberdesk/_async/client.py): usage in total and by instance (every page), the plan's limits
 * with what is used of each. Counts are JSON strings on the wire (int64); here they are numbers
 * (whole seconds stay exact below 2^53).
 */

import type { components } from "./generated/openapi.js";
import type { CallOptions, Transport } from "./transport.js";

type Schemas = components["schemas"];
type UsageJson = Schemas["cyberdesk.v1.Usage"];

/** Metered quantities; compute is billed while RUNNING, a PAUSED instance pays for its disk only. */
export interface Usage {
  instanceSeconds: number;
  vcpuSeconds: number;
  memoryMibSeconds: number;
  memoryGibSeconds: number;
  desktopSeconds: number;
  pausedSeconds: number;
  diskMibSeconds: number;
  diskGibSeconds: number;
  pausedDiskMibSeconds: number;
}

/** One instance's usage in the period; `open`: still accruing (counted up to `asOf`). */
export interface InstanceUsage {
  instanceId: string;
  template: string;
  vcpus: number;
  memoryMib: number;
  diskMib: number;
  desktop: boolean;
  state: string;
  open: boolean;
  usage: Usage;
}

/** The tenant's usage in [startTime, endTime) (RFC 3339 strings). */
export interface UsageReport {
  startTime: string | undefined;
  endTime: string | undefined;
  asOf: string | undefined;
  total: Usage;
  instances: InstanceUsage[];
}

export interface UsageOptions extends CallOptions {
  /** From (default: the start of this month, UTC). */
  since?: Date;
  /** Until (default: now). */
  until?: Date;
  /** Only this instance (NotFound when the tenant never had it). */
  instanceId?: string;
}

/** The tenant's plan: its limits and how much of each is used now (`used`). */
export interface Plan {
  name: string;
  maxInstances: number;
  maxVcpus: number;
  maxMemoryMib: number;
  maxDiskMib: number;
  /** 0: unlimited. */
  monthlyInstanceSeconds: number;
  maxTimeoutSeconds: number;
  desktopsAllowed: boolean;
  /** What happens to running instances once the monthly allowance is used up (after the grace). */
  creditPolicy: string;
  creditGraceSeconds: number;
  used: {
    instances: number;
    vcpus: number;
    memoryMib: number;
    diskMib: number;
    desktops: number;
    monthlyInstanceSeconds: number;
    creditsExhaustedTime: string | undefined;
  };
  periodStartTime: string | undefined;
}

const n = (value: string | number | undefined): number => Number(value ?? 0);
const secondsOf = (text: string | undefined): number => (text ? Number(text.replace(/s$/, "")) : 0);

function usageFrom(u: UsageJson | undefined): Usage {
  const d = u ?? {};
  return {
    instanceSeconds: n(d.instanceSeconds),
    vcpuSeconds: n(d.vcpuSeconds),
    memoryMibSeconds: n(d.memoryMibSeconds),
    memoryGibSeconds: n(d.memoryGibSeconds),
    desktopSeconds: n(d.desktopSeconds),
    pausedSeconds: n(d.pausedSeconds),
    diskMibSeconds: n(d.diskMibSeconds),
    diskGibSeconds: n(d.diskGibSeconds),
    pausedDiskMibSeconds: n(d.pausedDiskMibSeconds),
  };
}

/** GetUsage, every page. */
export async function usage(t: Transport, options: UsageOptions = {}): Promise<UsageReport> {
  const instances: InstanceUsage[] = [];
  let pageToken = "";
  let first: Schemas["cyberdesk.v1.GetUsageResponse"] | undefined;
  do {
    const reply = await t.json("get", "/v1/usage", {
      query: {
        startTime: options.since?.toISOString(),
        endTime: options.until?.toISOString(),
        instanceId: options.instanceId,
        pageSize: 1000,
        pageToken,
      },
      signal: options.signal,
    });
    first ??= reply;
    for (const i of reply.instances ?? []) {
      instances.push({
        instanceId: i.instanceId ?? "",
        template: i.template ?? "",
        vcpus: i.vcpus ?? 0,
        memoryMib: i.memoryMib ?? 0,
        diskMib: i.diskMib ?? 0,
        desktop: i.desktop ?? false,
        state: String(i.state ?? "UNKNOWN").replace(/^INSTANCE_STATE_/, ""),
        open: i.open ?? false,
        usage: usageFrom(i.usage),
      });
    }
    pageToken = reply.nextPageToken ?? "";
  } while (pageToken);
  return { startTime: first?.startTime, endTime: first?.endTime, asOf: first?.asOf, total: usageFrom(first?.total), instances };
}

/** GetPlan. */
export async function plan(t: Transport, options: CallOptions = {}): Promise<Plan> {
  const reply = await t.json("get", "/v1/plan", { signal: options.signal });
  const p = reply.plan ?? {};
  const u = reply.used ?? {};
  return {
    name: p.name ?? "",
    maxInstances: p.maxInstances ?? 0,
    maxVcpus: p.maxVcpus ?? 0,
    maxMemoryMib: p.maxMemoryMib ?? 0,
    maxDiskMib: p.maxDiskMib ?? 0,
    monthlyInstanceSeconds: n(p.monthlyInstanceSeconds),
    maxTimeoutSeconds: secondsOf(p.maxTimeout),
    desktopsAllowed: p.desktopsAllowed ?? false,
    creditPolicy: String(p.creditPolicy ?? "CREDIT_POLICY_PAUSE").replace(/^CREDIT_POLICY_/, "").toLowerCase().replace("unspecified", "pause"),
    creditGraceSeconds: secondsOf(p.creditGrace),
    used: {
      instances: u.instances ?? 0,
      vcpus: u.vcpus ?? 0,
      memoryMib: u.memoryMib ?? 0,
      diskMib: u.diskMib ?? 0,
      desktops: u.desktops ?? 0,
      monthlyInstanceSeconds: n(u.monthlyInstanceSeconds),
      creditsExhaustedTime: u.creditsExhaustedTime,
    },
    periodStartTime: reply.periodStartTime,
  };
}
