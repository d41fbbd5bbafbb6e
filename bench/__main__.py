"""Run benchmarks: `python -m bench` (all) or `python -m bench agent_exec agent_files`.

A benchmark is a module `bench/<name>.py` (not starting with `_`, not a baseline server) that has a
`main()` function; they run one after the other, never in parallel.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

_NOT_BENCHMARKS = ("baseline_",)


def discover() -> list[str]:
    """Names of the benchmark modules, sorted."""
    here = Path(__file__).resolve().parent
    names = []
    for info in pkgutil.iter_modules([str(here)]):
        if info.name.startswith("_") or info.name.startswith(_NOT_BENCHMARKS):
            continue
        module = importlib.import_module(f"bench.{info.name}")
        if callable(getattr(module, "main", None)):
            names.append(info.name)
    return sorted(names)


def run(argv: list[str]) -> int:
    """Run the benchmarks named in `argv` (all when empty); returns an exit code."""
    available = discover()
    wanted = argv or available
    unknown = [name for name in wanted if name not in available]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    for name in wanted:
        print(f"== {name}", flush=True)
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
