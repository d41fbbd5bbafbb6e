/**
 * What every test file shares: the stack the pytest driver started
 * (tests/sdk_typescript/test_typescript_sdk.py) is named by the environment.
 */

import { Cyberdesk } from "../src/index.js";

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through tests/sdk_typescript (make test)`);
  return value;
}

/** The development tenant's key and the gateway's HTTP origin, as `cyberdesk up` wrote them. */
export const ENDPOINT = required("CYBERDESK_HTTP_ENDPOINT");
export const KEY = required("CYBERDESK_API_KEY");
/** A key of another tenant. */
export const OTHER_KEY = required("CYBERDESK_TEST_OTHER_KEY");
/** A key of the development tenant allowed 1 request a minute. */
export const LIMITED_KEY = required("CYBERDESK_TEST_LIMITED_KEY");
/** The CLI config file `cyberdesk up` wrote. */
export const CONFIG_FILE = required("CYBERDESK_TEST_CONFIG");

export function client(): Cyberdesk {
  return new Cyberdesk({ apiKey: KEY, httpEndpoint: ENDPOINT });
}

export const text = (data: Uint8Array): string => new TextDecoder().decode(data);

/** Polls `check` until it returns a value (not undefined), for at most `attempts` tries `pauseMs` apart. */
export async function eventually<T>(check: () => Promise<T | undefined>, what: string, attempts = 100, pauseMs = 100): Promise<T> {
  for (let i = 0; i < attempts; i++) {
    const value = await check();
    if (value !== undefined) return value;
    await new Promise((r) => setTimeout(r, pauseMs));
  }
  throw new Error(`${what}: not seen after ${attempts} tries`);
}
