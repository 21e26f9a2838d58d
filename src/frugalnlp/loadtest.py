"""Load test of `frugalnlp serve`: real servers in subprocesses, driven by concurrent httpx clients.

Each configuration (threshold 1 and the thresholds whose ideal speedup is each target, times each
batching mode) gets its own server, started one after the other so that no two share the CPU, in
``repeats`` rounds that rotate the order (this machine is shared: medians over rounds are reported).
Against each: a closed loop of ``clients`` clients sending back to back (saturated throughput,
texts/s, and its latency), then open-loop Poisson arrivals at offered loads set as shares of the
first configuration's saturated throughput (the same absolute loads for every configuration),
with latency measured from each request's scheduled send time, so a slow server cannot hide its
queueing by slowing the client down.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from frugalnlp.defaults import DEMO_MAX_LENGTH
from frugalnlp.encoding import encode_split
from frugalnlp.errors import FrugalError
from frugalnlp.evaluation import collect_exit_logits, speed_accuracy_curve
from frugalnlp.methods import early_exit_methods
from frugalnlp.run import RunSpec, load_run, load_run_config
from frugalnlp.tasks import load_task
from frugalnlp.training import train_run


@dataclass
class LoadSettings:
    targets: tuple[float, ...] = (2.0, 3.0)  # ideal speedups (layers) the thresholds aim at
    batchings: tuple[str, ...] = ("request", "segment")
    clients: int = 32  # closed-loop clients for the saturated measurement
    texts_per_request: int = 4
    seconds: float = 10.0  # per measurement
    loads: tuple[float, ...] = (0.3, 0.7)  # offered loads: shares of the threshold-1 server's saturated throughput
    max_batch: int = 64
    max_wait_ms: float = 5.0
    length_bucket: int = 16
    repeats: int = 3  # rounds over every configuration; medians are reported
    examples: int = 1024  # MR test sentences, cycled
    task: str = "mr"
    max_length: int = DEMO_MAX_LENGTH  # the published runs' length
    train_size: int = 320  # of the small run trained when none is given


QUICK_LOAD = LoadSettings(targets=(2.0,), clients=8, seconds=2.0, loads=(0.5,), repeats=1, examples=128,
                          train_size=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`frugalnlp serve RUN ARGS` on a free port; ready once /healthz answers."""

    def __init__(self, run: str | os.PathLike, *args: str, timeout: float = 180.0, threads: int | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen([sys.executable, "-m", "frugalnlp.cli", "serve", str(run), "--port", str(self.port),
                                         *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FrugalError(f"the server exited: {self.process.stderr.read().strip()[-500:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise FrugalError(f"the server did not answer /healthz within {timeout:.0f} s")

    def stop(self) -> int:
        """SIGTERM (in-flight requests finish), then the exit status (killed after 30 s)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _summary(latencies: list[float], texts: int, seconds: float) -> dict:
    ms = np.array(latencies) * 1e3
    return {"texts_per_second": texts / seconds, "requests": len(latencies),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


async def closed_loop(url: str, requests: list[list[str]], clients: int, seconds: float) -> dict:
    """``clients`` clients each sending its next request as soon as the last is answered."""
    latencies: list[float] = []
    texts = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        end = start + seconds

        async def one_client(k: int) -> None:
            nonlocal texts
            i = k
            while time.perf_counter() < end:
                sent = time.perf_counter()
                response = await client.post("/predict", json={"texts": requests[i % len(requests)]})
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)
                texts += len(requests[i % len(requests)])
                i += clients

        await asyncio.gather(*(one_client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    return _summary(latencies, texts, elapsed)


async def open_loop(url: str, requests: list[list[str]], rate: float, seconds: float, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` requests/s for ``seconds``; latency counts from the scheduled send."""
    rng = random.Random(seed)
    schedule, at = [], 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        schedule.append(at)
    latencies: list[float] = []
    texts = 0
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int, at: float) -> None:
            nonlocal texts
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            response = await client.post("/predict", json={"texts": requests[i % len(requests)]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - (start + at))
            texts += len(requests[i % len(requests)])

        await asyncio.gather(*(one(i, at) for i, at in enumerate(schedule)))
        elapsed = time.perf_counter() - start
    summary = _summary(latencies, texts, elapsed)
    summary["offered_texts_per_second"] = rate * len(requests[0])
    return summary


def _thresholds(run: str, settings: LoadSettings, texts_split) -> dict[float, dict]:
    """Threshold 1 and, per target, the threshold whose ideal speedup on the sent texts is nearest it."""
    trained = load_run(run)
    data = encode_split(texts_split, trained.tokenizer, settings.max_length)
    curve = speed_accuracy_curve(trained.model, collect_exit_logits(trained.model, data, trained.tokenizer),
                                 texts_split.labels, data.lengths(), np.linspace(0.0, 1.0, 201).tolist())
    points = {1.0: min(curve, key=lambda p: -p["threshold"])}
    for target in settings.targets:
        point = min(curve, key=lambda p: abs(p["speedup_layers"] - target))
        points.setdefault(point["threshold"], point)
    return {t: {"threshold": t, "ideal_speedup": p["speedup_layers"], "accuracy": p["accuracy"]}
            for t, p in sorted(points.items(), key=lambda kv: -kv[0])}


def run_serve_bench(run: str | None = None, quick: bool = False, settings: LoadSettings | None = None,
                    progress: Callable[[str], None] = print) -> dict:
    """Load-test a joint/sweet run (default: train a small one) behind `frugalnlp serve`; JSON-ready results."""
    settings = settings or (QUICK_LOAD if quick else LoadSettings())
    if run is not None and load_run_config(run)["spec"]["method"] not in early_exit_methods():
        raise FrugalError(f"--run {run} is not a {' or '.join(early_exit_methods())} run")
    with tempfile.TemporaryDirectory(prefix="frugalnlp-loadtest-") as tmp:
        if run is None:
            progress("training a small joint run to serve (pass --run to use yours)")
            run = str(train_run(RunSpec(output=str(Path(tmp) / "joint"), task=settings.task, method="joint",
                                        train_size=settings.train_size, epochs=1, max_length=settings.max_length)))
        split = load_task(settings.task).test
        split = split.take(range(min(settings.examples, len(split))))
        n = settings.texts_per_request
        requests = [split.texts[i:i + n] for i in range(0, len(split.texts) - n + 1, n)]
        thresholds = _thresholds(run, settings, split)
        configs = [(point, batching) for point in thresholds.values() for batching in settings.batchings]
        results = {"settings": asdict(settings), "run": run, "cpus": os.cpu_count(), "configs": []}
        samples: list[list[dict]] = [[] for _ in configs]
        rates: list[float] | None = None
        for r in range(settings.repeats):
            # Rounds rotate who goes first; threshold 1 with the first batching opens round 0 and sets the loads.
            for k in [(k + r) % len(configs) for k in range(len(configs))]:
                point, batching = configs[k]
                name = f"round {r + 1}/{settings.repeats}, threshold {point['threshold']:g}, {batching} batching"
                progress(f"{name}: saturated ({settings.clients} clients)")
                with ServerProcess(run, "--threshold", str(point["threshold"]), "--batching", batching,
                                   "--max-batch", str(settings.max_batch), "--max-wait-ms",
                                   str(settings.max_wait_ms), "--length-bucket", str(settings.length_bucket),
                                   "--max-texts", str(n)) as server:
                    asyncio.run(closed_loop(server.url, requests, settings.clients, min(1.0, settings.seconds)))
                    saturated = asyncio.run(closed_loop(server.url, requests, settings.clients, settings.seconds))
                    if rates is None:
                        rates = [share * saturated["texts_per_second"] for share in settings.loads]
                    loads = []
                    for rate in rates:
                        progress(f"{name}: offered {rate:.0f} texts/s")
                        loads.append(asyncio.run(open_loop(server.url, requests, rate / n, settings.seconds, seed=r)))
                samples[k].append({"saturated": saturated, "loads": loads})
        for (point, batching), runs in zip(configs, samples):
            results["configs"].append({**point, "batching": batching,
                                       "saturated": _median_of([s["saturated"] for s in runs]),
                                       "loads": [_median_of([s["loads"][i] for s in runs]) for i in range(len(rates))],
                                       "rounds": runs})
    _compare(results)
    return results


def _median_of(summaries: list[dict]) -> dict:
    """Field by field median of several rounds' summaries."""
    return {key: float(np.median([s[key] for s in summaries])) for key in summaries[0]}


def _compare(results: dict) -> None:
    """Each configuration against the threshold-1 server with the same batching: throughput and p99 ratios."""
    base = {c["batching"]: c for c in results["configs"] if c["threshold"] == 1.0}
    for c in results["configs"]:
        b = base[c["batching"]]
        c["throughput_vs_threshold_1"] = c["saturated"]["texts_per_second"] / b["saturated"]["texts_per_second"]
        c["p99_vs_threshold_1"] = [load["p99_ms"] / ref["p99_ms"] for load, ref in zip(c["loads"], b["loads"])]


def format_serve_bench(results: dict) -> str:
    s = results["settings"]
    lines = [f"{s['task']} test sentences, {s['texts_per_request']} per request; saturated: {s['clients']} "
             f"closed-loop clients; offered loads: Poisson arrivals; {s['seconds']:g} s each, medians of "
             f"{s.get('repeats', 1)} rounds; max batch "
             f"{s['max_batch']}, max wait {s['max_wait_ms']:g} ms, length bucket {s.get('length_bucket', 16)}; {results['cpus']} CPUs shared by client and server",
             "", "| threshold | ideal speedup | batching | saturated texts/s | vs threshold 1 | p50 ms | p99 ms | "
             + " | ".join(f"at {load['offered_texts_per_second']:.0f}/s: p50 / p99 ms (vs thr. 1)"
                          for load in results["configs"][0]["loads"]) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(results["configs"][0]["loads"])]
    for c in results["configs"]:
        sat = c["saturated"]
        cells = [f"{load['p50_ms']:.0f} / {load['p99_ms']:.0f} ({ratio:.2f})"
                 for load, ratio in zip(c["loads"], c["p99_vs_threshold_1"])]
        lines.append(f"| {c['threshold']:g} | {c['ideal_speedup']:.2f} | {c['batching']} | "
                     f"{sat['texts_per_second']:.0f} | {c['throughput_vs_threshold_1']:.2f}x | {sat['p50_ms']:.0f} | "
                     f"{sat['p99_ms']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
