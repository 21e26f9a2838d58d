"""Measuring wall clock side by side: every configuration timed in one process, interleaved, so that a noisy
neighbour slows them all alike, and the machine it was timed on (`machine`: CPU features decide what int8 and
bf16 can gain). `frugalnlp.bench`, the serving load test and PAPA's benchmark time with it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from frugalnlp.early_exit.runner import SegmentRunner

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


@dataclass
class SegmentTimes:
    """A runner's measured cost on one runtime at one batch size: ``seconds`` per text of each segment (its
    layers and its head, [exits]; a cascade: each member's whole forward) and ``plain``, per text of the model
    at threshold 1 (every layer, no early head). What ``--cost time`` chooses operating points by."""

    seconds: list[float]
    plain: float
    batch_size: int
    runtime: str

    def to_exit(self, layers_to_exit: Sequence[int]) -> np.ndarray:
        """[exits]: seconds a text has spent when it leaves at each exit, given the layers it has run by then
        (a segment that adds no layer, a skipped cascade member, costs nothing)."""
        runs = np.diff([0, *layers_to_exit]) > 0
        return np.cumsum(np.where(runs, self.seconds, 0.0))

    def to_dict(self) -> dict:
        return asdict(self)


def time_segments(model: SegmentRunner, batches: list[dict], repeats: int = 3, runtime: str = "") -> SegmentTimes:
    """Time each segment of ``model`` (every text through every segment, heads included) and the model at threshold
    1 over ``batches`` (tokenised, each {input_ids, attention_mask[, token_type_ids]}); medians of ``repeats``
    interleaved passes after a warm-up, per text."""
    import torch

    from frugalnlp.early_exit.policies import ConfidencePolicy

    texts = sum(len(b["input_ids"]) for b in batches)
    never = ConfidencePolicy(1.0)

    def segments() -> list[float]:
        spent = [0.0] * model.num_exits
        for b in batches:
            state = model.start(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            for e in range(model.num_exits):
                start = time.perf_counter()
                state, _ = model.advance(e, state)
                spent[e] += time.perf_counter() - start
        return spent

    def plain_pass() -> float:
        start = time.perf_counter()
        for b in batches:
            model.predict(**b, policy=never)
        return time.perf_counter() - start

    with torch.inference_mode():
        segments(), plain_pass()  # warm-up
        samples, plains = [], []
        for _ in range(repeats):
            samples.append(segments())
            plains.append(plain_pass())
    plain = statistics.median(plains)
    seconds = [statistics.median(s[e] for s in samples) / texts for e in range(model.num_exits)]
    return SegmentTimes(seconds, plain / texts, len(batches[0]["input_ids"]), runtime)


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
