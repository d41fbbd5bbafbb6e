"""`python -m gateway_svc keys create|list|revoke`: the local key store, straight from the shell.

This is how the first (admin) key comes to exist: it writes to the SQLite store directly, so it
needs access to the state directory, not a running gateway. The secret is printed once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cyberdesk_common.config import ConfigError, env_str, state_dir
from gateway_svc.auth import SCOPE_ADMIN, SCOPE_INSTANCES
from gateway_svc.keystore import KeyStore, store_path
from gateway_svc.ratelimit import parse_limit


def main(argv: list[str]) -> int:
    """Run one key command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m gateway_svc keys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print its secret once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="also grant the admin scope (key management)")
    create.add_argument("--rate-limit", help="e.g. 100/1s (default: CYBERDESK_RATE_LIMIT)")
    listing = sub.add_parser("list", help="list a tenant's keys")
    listing.add_argument("--tenant", required=True)
    revoke = sub.add_parser("revoke", help="revoke a key")
    revoke.add_argument("--key-id", required=True)
    args = parser.parse_args(argv)
    if env_str("UNKEY_ROOT_KEY", ""):
        print("CYBERDESK_UNKEY_ROOT_KEY is set: keys live in Unkey, not in the local store", file=sys.stderr)
        return 2
    try:
        store = KeyStore(store_path(Path(state_dir())))
    except (ConfigError, OSError) as err:
        print(f"cannot open the key store: {err}", file=sys.stderr)
        return 2
    try:
        if args.command == "create":
            scopes = [SCOPE_INSTANCES, SCOPE_ADMIN] if args.admin else [SCOPE_INSTANCES]
            try:
                limit = parse_limit(args.rate_limit) if args.rate_limit else None
            except ValueError as err:
                print(str(err), file=sys.stderr)
                return 2
            key, secret = store.create(args.tenant, args.name, scopes, limit)
            print(f"key_id  {key.key_id}\ntenant  {key.tenant_id}\nscopes  {','.join(key.scopes)}")
            print(f"secret  {secret}\n(shown once; only its sha256 is stored)")
        elif args.command == "list":
            keys, _ = store.list(args.tenant, 1000, None)
            for key in keys:
                state = "revoked" if key.HasField("revoke_time") else "active"
                print(f"{key.key_id}\t{key.prefix}…\t{state}\t{','.join(key.scopes)}\t{key.name}")
        else:
            revoked = store.revoke(args.key_id)
            if revoked is None:
                print(f"no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {revoked.key_id}")
    finally:
        store.close()
    return 0
