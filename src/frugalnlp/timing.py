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
    """A runner's measured cost on one runtime, batched as it runs: ``call_seconds[e][k]`` is one call of segment
    ``e`` (its layers, its head, the exit step and shrinking the batch; a cascade: member ``e``'s whole forward)
    on ``rows[k]`` rows of a batch, ``tokens[k]`` the mean padded length of those timed calls, and ``plain`` the
    model at threshold 1 per text at ``batch_size``. A segment's cost between two measured row counts is linear.
    What ``--cost time`` chooses operating points by.

    Rows that go on past an exit run in thinner batches, which cost more per row (and a call costs something
    however few rows it has): a time per text measured on full batches would miss both. And the texts that go on
    are longer than most (harder), so a call is charged in proportion to its padded length (``tokens``)."""

    rows: list[int]
    call_seconds: list[list[float]]
    plain: float
    batch_size: int
    runtime: str
    tokens: list[float] | None = None  # None (recorded before lengths counted): every call of a size costs alike

    def share(self, exit_index: np.ndarray, layers_to_exit: Sequence[int], lengths: np.ndarray | None = None) -> float:
        """The measured time of a split's texts leaving at ``exit_index`` ([n], in the split's own order, which is
        cut into batches of ``batch_size`` as served) over the plain model's on them. ``layers_to_exit``: layers
        run by a text leaving at each exit (a segment that adds no layer, a skipped cascade member, costs nothing).
        ``lengths`` ([n] tokens): each call costs its time at that many rows scaled by its padded length (the
        longest of its rows) over the timed calls' (``tokens``)."""
        exit_index = np.asarray(exit_index)
        runs = np.diff([0, *layers_to_exit]) > 0
        starts = np.arange(0, len(exit_index), self.batch_size)
        seconds = 0.0
        for e in np.flatnonzero(runs):
            going = exit_index >= e
            reached = np.add.reduceat(going.astype(np.int64), starts)  # rows running segment e, per batch
            calls = np.interp(reached, [0, *self.rows], [0.0, *self.call_seconds[e]])
            if lengths is not None and self.tokens is not None:
                padded = np.maximum.reduceat(np.where(going, np.asarray(lengths), 0), starts)
                timed = np.interp(reached, self.rows, self.tokens)
                calls = calls * np.where(reached > 0, padded / timed, 0.0)
            seconds += calls.sum()
        return float(seconds / (len(exit_index) * self.plain))

    def to_dict(self) -> dict:
        return asdict(self)


def row_counts(batch_size: int) -> list[int]:
    """The batch sizes a segment is timed at: powers of two below ``batch_size``, and ``batch_size``."""
    return [*(2 ** k for k in range(batch_size.bit_length()) if 2 ** k < batch_size), batch_size]


def time_segments(model: SegmentRunner, batches: list[dict], repeats: int = 3, runtime: str = "") -> SegmentTimes:
    """Time each segment of ``model`` on the first ``n`` rows of each of ``batches`` (tokenised, each {input_ids,
    attention_mask[, token_type_ids]}, of one size) for every ``n`` of `row_counts`, and the model at threshold 1
    on the whole batches; medians of ``repeats`` interleaved passes after a warm-up."""
    import torch

    from frugalnlp.backbones.base import used_length
    from frugalnlp.early_exit.policies import ConfidencePolicy
    from frugalnlp.early_exit.runner import Departures

    batch_size = len(batches[0]["input_ids"])
    rows = row_counts(batch_size)
    never = ConfidencePolicy(1.0)  # nobody leaves before the last exit: every row runs every segment

    def cut(batch: dict, n: int) -> dict:
        length = used_length(batch["attention_mask"][:n])  # as `keep_rows` cuts a batch to its rows' columns
        return {k: v[:n, :length] for k, v in batch.items() if v is not None}

    cuts = {n: [cut(b, n) for b in batches if len(b["input_ids"]) >= n] for n in rows}
    tokens = [statistics.mean(c["attention_mask"].shape[1] for c in cuts[n]) for n in rows]

    def segments(n: int) -> list[float]:
        spent = [0.0] * model.num_exits
        for b in cuts[n]:
            departures = Departures(never, n, model.temperatures)
            state = model.start(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            everyone = np.arange(n)
            for e in range(model.num_exits):
                start = time.perf_counter()
                state, logits = model.advance(e, state)
                departures.decide(e, logits)
                if e < model.num_exits - 1:
                    state = model.keep_rows(state, everyone)
                spent[e] += time.perf_counter() - start
        return [s / len(cuts[n]) for s in spent]

    def plain_pass() -> float:
        start = time.perf_counter()
        for b in batches:
            model.predict(**b, policy=never)
        return time.perf_counter() - start

    texts = sum(len(b["input_ids"]) for b in batches)
    with torch.inference_mode(), model.inference_context():  # as `adaptive_predict` runs segments
        for n in rows:  # warm-up
            segments(n)
        plain_pass()
        samples: dict[int, list[list[float]]] = {n: [] for n in rows}
        plains = []
        for _ in range(repeats):
            for n in rows:
                samples[n].append(segments(n))
            plains.append(plain_pass())
    call_seconds = [[statistics.median(s[e] for s in samples[n]) for n in rows] for e in range(model.num_exits)]
    return SegmentTimes(rows, call_seconds, statistics.median(plains) / texts, batch_size, runtime, tokens)


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
