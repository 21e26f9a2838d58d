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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx
import numpy as np

from frugalnlp.curves import collect_exit_logits, speed_accuracy_curve
from frugalnlp.defaults import DEMO_MAX_LENGTH
from frugalnlp.encoding import encode_split
from frugalnlp.errors import FrugalError
from frugalnlp.methods import early_exit_methods
from frugalnlp.run import RunSpec, load_run, load_run_config
from frugalnlp.tasks import load_task
from frugalnlp.timing import describe_machine, machine, median_times
from frugalnlp.training import train_run


@dataclass
class LoadSettings:
    targets: tuple[float, ...] = (2.0, 3.0)  # ideal speedups (layers) the thresholds aim at
    batchings: tuple[str, ...] = ("request", "segment")
    text_sets: tuple[str, ...] = ("full",)  # full: MR test sentences; short: their first `short_words` words
    short_words: int = 10
    max_tokens: tuple[int | None, ...] = (None,)  # servers' --max-tokens (None: --length-bucket rows)
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


def _summary(latencies: list[float], texts: int, seconds: float, client_cpu: float) -> dict:
    """``client_cpu``: CPU seconds the load client itself spent (its share of the cores it shares with the server)."""
    ms = np.array(latencies) * 1e3
    return {"texts_per_second": texts / seconds, "requests": len(latencies),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "client_cpu_cores": client_cpu / seconds}


async def closed_loop(url: str, requests: list[list[str]], clients: int, seconds: float) -> dict:
    """``clients`` clients each sending its next request as soon as the last is answered."""
    latencies: list[float] = []
    texts = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        start, cpu = time.perf_counter(), time.process_time()
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
    return _summary(latencies, texts, elapsed, time.process_time() - cpu)


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
        start, cpu = time.perf_counter(), time.process_time()

        async def one(i: int, at: float) -> None:
            nonlocal texts
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            response = await client.post("/predict", json={"texts": requests[i % len(requests)]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - (start + at))
            texts += len(requests[i % len(requests)])

        await asyncio.gather(*(one(i, at) for i, at in enumerate(schedule)))
        elapsed = time.perf_counter() - start
    summary = _summary(latencies, texts, elapsed, time.process_time() - cpu)
    summary["offered_texts_per_second"] = rate * len(requests[0])
    return summary


def _thresholds(run: str, settings: LoadSettings, texts_split) -> dict[float, dict]:
    """Threshold 1 and, per target, the threshold whose ideal speedup on the sent texts is nearest it."""
    trained = load_run(run)
    data = encode_split(texts_split, trained.tokenizer, settings.max_length)
    curve = speed_accuracy_curve(trained.model, collect_exit_logits(trained.model, data, trained.tokenizer),
                                 texts_split.labels, data.lengths(), np.linspace(0.0, 1.0, 201).tolist())
    points = {1.0: min(curve, key=lambda p: -p.threshold)}
    for target in settings.targets:
        point = min(curve, key=lambda p: abs(p.speedup_layers - target))
        points.setdefault(point.threshold, point)
    return {t: {"threshold": t, "ideal_speedup": p.speedup_layers, "accuracy": p.accuracy}
            for t, p in sorted(points.items(), key=lambda kv: -kv[0])}


def text_set(split, name: str, settings: LoadSettings):
    """The texts a load test sends: the split's sentences (``full``) or their first ``short_words`` words."""
    if name == "full":
        return split
    if name != "short":
        raise FrugalError(f"unknown text set '{name}'; choose full or short")
    return replace(split, texts=[" ".join(t.split()[:settings.short_words]) for t in split.texts])


def in_process_speeds(run: str, texts: list[str], thresholds: list[float], batch_size: int, repeats: int = 2) -> dict:
    """`Predictor` texts/s (tokenisation included) at each threshold on ``texts``: the server's ceiling."""
    from frugalnlp.predict import Predictor

    predictors = {t: Predictor(run, threshold=t, batch_size=batch_size) for t in thresholds}
    times = median_times({t: (lambda p=p: p(texts)) for t, p in predictors.items()}, repeats)
    return {str(t): len(texts) / seconds for t, seconds in times.items()}


def run_serve_bench(run: str | None = None, quick: bool = False, settings: LoadSettings | None = None,
                    progress: Callable[[str], None] = print) -> dict:
    """Load-test a joint/sweet run (default: train a small one) behind `frugalnlp serve`; JSON-ready results.

    One server per (text set, threshold, batching, --max-tokens); each is compared with the threshold-1
    server of the same text set, batching and packing, and with `Predictor`'s in-process ratio on the same texts.
    """
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
        results = {"settings": asdict(settings), "run": run, "cpus": os.cpu_count(), "machine": machine(), "configs": [],
                   "in_process": {}}
        configs, requests = [], {}
        for name in settings.text_sets:
            texts = text_set(split, name, settings)
            requests[name] = [texts.texts[i:i + n] for i in range(0, len(texts.texts) - n + 1, n)]
            thresholds = _thresholds(run, settings, texts)
            progress(f"{name} texts: in-process Predictor speeds")
            results["in_process"][name] = in_process_speeds(run, texts.texts, list(thresholds), settings.max_batch,
                                                            settings.repeats)
            configs += [({**point, "texts": name}, batching, max_tokens) for point in thresholds.values()
                        for batching in settings.batchings for max_tokens in settings.max_tokens]
        samples: list[list[dict]] = [[] for _ in configs]
        rates: dict[str, list[float]] = {}
        for r in range(settings.repeats):
            # Rounds rotate who goes first; a text set's first threshold-1 server in round 0 sets its loads.
            for k in [(k + r) % len(configs) for k in range(len(configs))] if r else range(len(configs)):
                point, batching, max_tokens = configs[k]
                packing = ["--length-bucket", str(settings.length_bucket)] if max_tokens is None else \
                    ["--max-tokens", str(max_tokens)]
                name = (f"round {r + 1}/{settings.repeats}, {point['texts']} texts, threshold {point['threshold']:g}, "
                        f"{batching} batching, {' '.join(packing)}")
                progress(f"{name}: saturated ({settings.clients} clients)")
                sent = requests[point["texts"]]
                with ServerProcess(run, "--threshold", str(point["threshold"]), "--batching", batching,
                                   "--max-batch", str(settings.max_batch), "--max-wait-ms",
                                   str(settings.max_wait_ms), *packing, "--max-texts", str(n)) as server:
                    asyncio.run(closed_loop(server.url, sent, settings.clients, min(1.0, settings.seconds)))
                    saturated = asyncio.run(closed_loop(server.url, sent, settings.clients, settings.seconds))
                    if point["texts"] not in rates:
                        rates[point["texts"]] = [share * saturated["texts_per_second"] for share in settings.loads]
                    loads = []
                    for rate in rates[point["texts"]]:
                        progress(f"{name}: offered {rate:.0f} texts/s")
                        loads.append(asyncio.run(open_loop(server.url, sent, rate / n, settings.seconds, seed=r)))
                samples[k].append({"saturated": saturated, "loads": loads})
        for (point, batching, max_tokens), runs in zip(configs, samples):
            results["configs"].append({**point, "batching": batching, "max_tokens": max_tokens,
                                       "saturated": _median_of([s["saturated"] for s in runs]),
                                       "loads": [_median_of([s["loads"][i] for s in runs])
                                                 for i in range(len(settings.loads))],
                                       "rounds": runs})
    _compare(results)
    return results


def _median_of(summaries: list[dict]) -> dict:
    """Field by field median of several rounds' summaries."""
    return {key: float(np.median([s[key] for s in summaries])) for key in summaries[0]}


def _compare(results: dict) -> None:
    """Each configuration against the threshold-1 server with the same texts, batching and packing (throughput
    and p99 ratios), and its throughput ratio against `Predictor`'s in-process one on the same texts."""
    def key(c: dict) -> tuple:
        return c.get("texts", "full"), c["batching"], c.get("max_tokens")

    base = {key(c): c for c in results["configs"] if c["threshold"] == 1.0}
    for c in results["configs"]:
        b = base[key(c)]
        c["throughput_vs_threshold_1"] = c["saturated"]["texts_per_second"] / b["saturated"]["texts_per_second"]
        c["p99_vs_threshold_1"] = [load["p99_ms"] / ref["p99_ms"] for load, ref in zip(c["loads"], b["loads"])]
        speeds = results.get("in_process", {}).get(c.get("texts", "full"))
        if speeds:
            c["in_process_vs_threshold_1"] = speeds[str(c["threshold"])] / speeds["1.0"]
            c["share_of_in_process_ratio"] = c["throughput_vs_threshold_1"] / c["in_process_vs_threshold_1"]


def format_serve_bench(results: dict) -> str:
    s = results["settings"]
    loads = results["configs"][0]["loads"]
    lines = [f"{s['task']} test sentences (short: first {s.get('short_words', 10)} words), {s['texts_per_request']} per "
             f"request; saturated: {s['clients']} closed-loop clients; offered loads: Poisson arrivals; {s['seconds']:g} s "
             f"each, medians of {s.get('repeats', 1)} rounds; max batch {s['max_batch']}, max wait {s['max_wait_ms']:g} ms; "
             f"{results['cpus']} CPUs shared by client and server (client CPU: cores the load client used)",
             f"machine: {describe_machine(results.get('machine'))}", "", "| texts | threshold | ideal speedup | batching | packing | saturated texts/s | vs threshold 1 | "
             "in-process ratio | share of it | client CPU | p50 ms | p99 ms | "
             + " | ".join(f"at {load['offered_texts_per_second']:.0f}/s: p50 / p99 ms (vs thr. 1)" for load in loads)
             + " |", "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(loads)]
    for c in results["configs"]:
        sat = c["saturated"]
        cells = [f"{load['p50_ms']:.0f} / {load['p99_ms']:.0f} ({ratio:.2f})"
                 for load, ratio in zip(c["loads"], c["p99_vs_threshold_1"])]
        packing = f"{c['max_tokens']} tokens" if c.get("max_tokens") else f"{s.get('length_bucket', 16)} rows"
        in_process = c.get("in_process_vs_threshold_1")
        share = c.get("share_of_in_process_ratio")
        cpu = sat.get("client_cpu_cores")
        lines.append(f"| {c.get('texts', 'full')} | {c['threshold']:g} | {c['ideal_speedup']:.2f} | {c['batching']} | "
                     f"{packing} | {sat['texts_per_second']:.0f} | {c['throughput_vs_threshold_1']:.2f}x | "
                     f"{'—' if in_process is None else f'{in_process:.2f}x'} | {'—' if share is None else f'{share:.2f}'} | "
                     f"{'—' if cpu is None else f'{cpu:.2f}'} | {sat['p50_ms']:.0f} | {sat['p99_ms']:.0f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
