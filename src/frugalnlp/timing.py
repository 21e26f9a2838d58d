"""Measuring wall clock side by side: every configuration timed in one process, interleaved, so that a noisy
neighbour slows them all alike, and the machine it was timed on (`machine`: CPU features decide what int8 and
bf16 can gain). `frugalnlp.bench`, the serving load test and PAPA's benchmark time with it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# /proc/cpuinfo flags that decide which kernels run: int8 dot products (VNNI), bf16 and AMX tiles
CPU_FEATURES = {"avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni",
                "avx512_bf16": "avx512_bf16", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8"}


def cpu_features(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of `CPU_FEATURES` this CPU has (from /proc/cpuinfo's flags; all False where it cannot be read)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    return {name: flag in flags for name, flag in CPU_FEATURES.items()}


def machine() -> dict:
    """What a benchmark ran on: CPU model, cores, features (`cpu_features`), torch's threads and the runtimes'
    versions; recorded in every benchmark's JSON and printed above its table."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    versions = {}
    for package in ("torch", "onnxruntime", "transformers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_features": cpu_features(), "versions": versions}


def describe_machine(record: dict | None) -> str:
    """One line for a table's header: ``AMD EPYC, 2 CPUs; avx2, avx512_vnni, ... (no amx_int8, ...)``."""
    if not record:
        return "machine not recorded"
    features = record["cpu_features"]
    have = [name for name, present in features.items() if present]
    lack = [name for name, present in features.items() if not present]
    return (f"{record['cpu']}, {record['cpus']} CPUs; " + (", ".join(have) or "none of the tracked features")
            + (f" (no {', '.join(lack)})" if lack else ""))


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


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
