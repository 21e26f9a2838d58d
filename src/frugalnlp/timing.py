"""Measuring wall clock side by side: every configuration timed in one process, interleaved, so that a noisy
neighbour slows them all alike. `frugalnlp.bench`, the serving load test and PAPA's benchmark time with it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(configs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each configuration, interleaved across repeats, after one warm-up pass each."""
    for run in configs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(repeats):
        names = list(configs)
        names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in names:
            start = time.perf_counter()
            configs[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}
