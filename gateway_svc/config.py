"""gateway_svc settings, read once from the environment (CYBERDESK_<NAME>)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cyberdesk_common.config import (
    ConfigError,
    env_float,
    env_int,
    env_str,
    internal_token,
    platform_redis_url,
    state_dir,
)
from gateway_svc.ratelimit import Limit, parse_limit
from gateway_svc.rest.cors import CorsPolicy


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs to serve: where it listens, whom it trusts, where it forwards."""

    addr: str
    http_addr: str  # the REST face (HTTP/JSON and WebSocket), host:port
    tls_cert: bytes | None
    tls_key: bytes | None
    instance_target: str
    internal_token: str
    redis_url: str
    state_dir: Path
    default_limit: Limit
    auth_cache_seconds: float
    auth_cache_size: int
    route_cache_seconds: float
    unkey_root_key: str
    unkey_api_id: str
    unkey_server_url: str
    unkey_keyspace: str
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # billing_svc, which answers cyberdesk.v1.BillingService (usage, plan).
    billing_target: str = "127.0.0.1:50071"
    # Previews of ports inside instances (gateway_svc/rest/preview.py): hosts `<port>-<instance>.<domain>`,
    # the origin the path form and minted URLs use, and the HMAC secret shared by every replica ("": a
    # secret generated into the state directory).
    preview_domain: str = "localhost"
    public_http_url: str = "http://127.0.0.1:8080"
    preview_secret: str = ""
    # Browser origins allowed to call the REST face (gateway_svc/rest/cors.py); default none.
    cors: CorsPolicy = field(default_factory=CorsPolicy)
    # Live desktop viewers of one instance at once, per gateway (gateway_svc/rest/desktop_stream.py).
    desktop_max_viewers: int = 64

    @classmethod
    def from_env(cls) -> GatewayConfig:
        """Read and check the configuration; a bad value raises ConfigError naming the variable."""
        cert_file, key_file = env_str("GATEWAY_TLS_CERT", ""), env_str("GATEWAY_TLS_KEY", "")
        if bool(cert_file) != bool(key_file):
            raise ConfigError("set both CYBERDESK_GATEWAY_TLS_CERT and CYBERDESK_GATEWAY_TLS_KEY, or neither")
        base = state_dir()
        root_key, api_id = env_str("UNKEY_ROOT_KEY", ""), env_str("UNKEY_API_ID", "")
        if bool(root_key) != bool(api_id):
            raise ConfigError("set both CYBERDESK_UNKEY_ROOT_KEY and CYBERDESK_UNKEY_API_ID to use Unkey, or neither")
        try:
            limit = parse_limit(env_str("RATE_LIMIT", "100/1s"))
        except ValueError as err:
            raise ConfigError(f"CYBERDESK_RATE_LIMIT: {err}") from None
        try:
            cors = CorsPolicy.parse(env_str("CORS_ORIGINS", ""))
        except ValueError as err:
            raise ConfigError(f"CYBERDESK_CORS_ORIGINS: {err}") from None
        return cls(
            addr=env_str("GATEWAY_ADDR", "127.0.0.1:50051"),
            http_addr=_host_port("GATEWAY_HTTP_ADDR", env_str("GATEWAY_HTTP_ADDR", "127.0.0.1:8080")),
            tls_cert=Path(cert_file).read_bytes() if cert_file else None,
            tls_key=Path(key_file).read_bytes() if key_file else None,
            instance_target=env_str("INSTANCE_ADDR", "127.0.0.1:50061"),
            billing_target=env_str("BILLING_ADDR", "127.0.0.1:50071"),
            internal_token=internal_token(base),
            # `cyberdesk up` hands every service REDIS_URL; CYBERDESK_REDIS_URL wins when both are set.
            redis_url=platform_redis_url(base),
            state_dir=base,
            default_limit=limit,
            auth_cache_seconds=env_float("AUTH_CACHE_SECONDS", 5.0),
            auth_cache_size=env_int("AUTH_CACHE_SIZE", 10_000, minimum=1),
            route_cache_seconds=env_float("ROUTE_CACHE_SECONDS", 5.0),
            unkey_root_key=root_key,
            unkey_api_id=api_id,
            unkey_server_url=env_str("UNKEY_SERVER_URL", ""),
            unkey_keyspace=env_str("UNKEY_KEYSPACE", ""),
            tls_cert_file=cert_file,
            tls_key_file=key_file,
            preview_domain=env_str("PREVIEW_DOMAIN", "localhost").strip(".").lower(),
            public_http_url=env_str(
                "GATEWAY_PUBLIC_URL",
                f"{'https' if cert_file else 'http'}://{env_str('GATEWAY_HTTP_ADDR', '127.0.0.1:8080')}",
            ).rstrip("/"),
            preview_secret=env_str("PREVIEW_SECRET", ""),
            cors=cors,
            desktop_max_viewers=env_int("DESKTOP_MAX_VIEWERS", 64, minimum=1),
        )


def _host_port(name: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"CYBERDESK_{name} must be host:port (e.g. 127.0.0.1:8080), got {value!r}")
    return value
