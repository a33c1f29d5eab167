"""What every benchmark shares: timing by median of repeats, and the `--json` output contract.

Each benchmark prints human-readable lines, and with `--json` one JSON object as its last line.
Figures are ratios against a baseline measured in the same run, never against a stored number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", action="store_true", help="print one JSON object as last line")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def median_seconds(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 2
) -> dict[str, float]:
    """Median wall time of each `fn()`, timed round-robin (one run of each per round): a change
    in machine load during the measurement shifts every contender alike, not whichever was being
    timed then, so their ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def emit(result: dict[str, Any], *, as_json: bool) -> None:
    """Print the result: readable lines always, and the JSON object last when asked."""
    for key, value in result.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if as_json:
        print(json.dumps(result, sort_keys=True))
