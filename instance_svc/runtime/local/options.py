"""The knobs of the local runtime; the defaults fit a developer machine."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LocalOptions:
    """Knobs of the local runtime; the defaults fit a developer machine."""

    sandbox_uid: int = 100_000  # host uid of every sandbox's processes (uid 1000 inside)
    sandbox_gid: int = 100_000
    ready_timeout: float = 15.0  # one agent's boot, from its start to answering health checks
    # Agents booting at once (runtime.py says why there is a bound); the rest wait their turn.
    parallel_boots: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    pids_max: int = 1024
    use_cgroups: bool = True
    python: Path = field(
        default_factory=lambda: Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    )
    python_prefix: Path = field(default_factory=lambda: Path(sys.base_prefix))
    site_packages: Path | None = None
    packages: tuple[Path, ...] = ()
    stage_dir: str = "/mnt"
    # CIDRs of private ranges INTERNET sandboxes may reach (CYBERDESK_EGRESS_ALLOW_RANGES, network.py).
    egress_allow_ranges: tuple[str, ...] = ()
    # Where dns_guard.py sends the queries of sandboxes whose egress names hosts
    # (CYBERDESK_EGRESS_DNS_UPSTREAM; default slirp4netns's resolver, i.e. the host's).
    egress_dns_upstream: str = "10.0.2.3"
