"""Wall-clock benchmark: the plain HF forward against adaptive inference, side by side in one process.

Every configuration runs over the same real task texts in the same batches. The runs are
interleaved: each repeat times every configuration once, so a noisy neighbour slows them all
alike. We report medians after a warm-up pass. The ideal speedup that the share of layers run predicts is set against
the measured one; their ratio is the efficiency of turning skipped layers into saved time.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frugalnlp.curves import CurvePoint, collect_exit_logits, speed_accuracy_curve
from frugalnlp.defaults import DEMO_MAX_LENGTH
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.policies import ExitPolicy
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.encoding import encode_split, encode_texts, unsorted_batches
from frugalnlp.errors import FrugalError
from frugalnlp.methods import early_exit_methods
from frugalnlp.run import RunSpec, load_run, load_run_config
from frugalnlp.tasks import load_task
from frugalnlp.timing import describe_machine, machine, median_times
from frugalnlp.training import train_run


@dataclass
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    examples: int = 512
    repeats: int = 5
    targets: tuple[float, ...] = (1.5, 2.0, 3.0)  # ideal speedups the early-exit thresholds aim at
    cascade_targets: tuple[float, ...] = (1.0, 1.5, 2.0)
    max_length: int = DEMO_MAX_LENGTH  # the published runs' length
    task: str = "mr"
    train_size: int = 320  # of the small runs trained when none is given


QUICK = BenchSettings(batch_sizes=(1, 32), examples=64, repeats=3, targets=(2.0,), cascade_targets=(1.5,),
                      train_size=64)


def plain_forward(model: EarlyExitModel) -> Callable[[dict], torch.Tensor]:
    """The plain classifier's forward: the HF encoder's own forward, then the last exit's head."""
    backbone, last_head = model.backbone, model.heads[-1]
    return lambda batch: last_head(backbone(**batch).last_hidden_state, batch["attention_mask"])


def _points_for(curve: list[CurvePoint], targets: tuple[float, ...]) -> list[CurvePoint]:
    """Per target, the curve point whose ideal speedup (full depth / mean layers run) is nearest it; each
    point once, by threshold."""
    nearest = [min(curve, key=lambda point: abs(point.speedup_layers - s)) for s in targets]
    return sorted((p for i, p in enumerate(nearest) if p not in nearest[:i]), key=lambda p: p.threshold)


def _quick_runs(folder: Path, settings: BenchSettings) -> tuple[Path, Path]:
    """Small joint and Multi-Model runs on the embedded model, for a bench with no run given."""
    runs = []
    for method in ("joint", "multi-model"):
        spec = RunSpec(output=str(folder / method), task=settings.task, method=method,
                       train_size=settings.train_size, epochs=1, max_length=settings.max_length)
        runs.append(train_run(spec))
    return runs[0], runs[1]


def run_bench(run: str | None = None, cascade_run: str | None = None, quick: bool = False,
              settings: BenchSettings | None = None, progress: Callable[[str], None] = print) -> dict:
    """Time plain vs early exit vs cascade; returns the JSON-ready results."""
    settings = settings or (QUICK if quick else BenchSettings())
    for given, methods, flag in ((run, early_exit_methods(), "--run"), (cascade_run, ("multi-model",), "--cascade-run")):
        if given is not None and load_run_config(given)["spec"]["method"] not in methods:  # before minutes of work
            raise FrugalError(f"{flag} {given} is not a {' or '.join(methods)} run")
    with tempfile.TemporaryDirectory(prefix="frugalnlp-bench-") as tmp:
        if run is None or cascade_run is None:
            progress("training small joint and multi-model runs to time (pass --run/--cascade-run to use yours)")
            quick_joint, quick_cascade = _quick_runs(Path(tmp), settings)
            run = run or str(quick_joint)
            cascade_run = cascade_run or str(quick_cascade)
        early_exit, multi_model = load_run(run), load_run(cascade_run)
        if not isinstance(early_exit.model, EarlyExitModel) or not isinstance(multi_model.model, Cascade):
            raise FrugalError("--run must be a joint/sweet run and --cascade-run a multi-model run")
        return _bench(early_exit.model, multi_model.model, early_exit.tokenizer, settings, progress)


@torch.inference_mode()
def _bench(model: EarlyExitModel, cascade: Cascade, tokenizer, settings: BenchSettings, progress) -> dict:
    task = load_task(settings.task)
    split = task.test.take(range(min(settings.examples, len(task.test))))
    results: dict = {"settings": settings.__dict__, "examples": len(split), "threads": torch.get_num_threads(),
                     "machine": machine(), "model": model.config.backbone_config.get("_name_or_path", ""),
                     "exit_layers": model.config.exit_layers, "batch_sizes": {}}

    tokenize_times = median_times({"tokenize": lambda: encode_texts(tokenizer, split.texts, split.pairs,
                                                                     settings.max_length)}, settings.repeats)
    results["tokenize_seconds"] = tokenize_times["tokenize"]
    data = encode_split(split, tokenizer, settings.max_length)
    lengths = data.lengths()
    grid = np.linspace(0.0, 1.0, 201).tolist()
    ee_curve, cascade_curve = (speed_accuracy_curve(m, collect_exit_logits(m, data, tokenizer), split.labels,
                                                    lengths, grid) for m in (model, cascade))
    # Ideal speedups and the cascade's FLOPs-predicted cost (recomputation, heads, real lengths counted).
    ee_points, cascade_points = _points_for(ee_curve, settings.targets), _points_for(cascade_curve, settings.cascade_targets)
    plain = plain_forward(model)

    for batch_size in settings.batch_sizes:
        progress(f"batch size {batch_size}")
        batches = unsorted_batches(data, tokenizer, batch_size)

        def over_batches(fn):
            return lambda: [fn(b) for b in batches]

        configs = {"plain": over_batches(plain)}
        configs["early-exit@1.0"] = over_batches(lambda b: model.predict(**b, threshold=1.0))
        for p in ee_points:
            configs[f"early-exit@{p.threshold:g}"] = over_batches(lambda b, t=p.threshold: model.predict(**b, threshold=t))
        for p in cascade_points:
            configs[f"cascade@{p.threshold:g}"] = over_batches(lambda b, t=p.threshold: cascade.predict(**b, threshold=t))
        times = median_times(configs, settings.repeats)
        row = {"plain_seconds": times["plain"], "machinery_seconds": times["early-exit@1.0"],
               "machinery_overhead": times["early-exit@1.0"] / times["plain"] - 1.0,
               "early_exit": [], "cascade": []}
        for p in ee_points:
            t, ideal = p.threshold, p.speedup_layers
            measured = times["plain"] / times[f"early-exit@{t:g}"]
            row["early_exit"].append({"threshold": t, "seconds": times[f"early-exit@{t:g}"], "ideal_speedup": ideal,
                                      "measured_speedup": measured, "efficiency": measured / ideal})
        for p in cascade_points:
            t, predicted = p.threshold, p.flops_share
            measured = times[f"cascade@{t:g}"] / times["plain"]
            row["cascade"].append({"threshold": t, "seconds": times[f"cascade@{t:g}"],
                                   "ideal_speedup": p.speedup_layers,
                                   "predicted_cost": predicted, "measured_cost": measured,
                                   "cost_ratio": measured / predicted})
        results["batch_sizes"][str(batch_size)] = row
    return results


def format_bench(results: dict) -> str:
    lines = [f"{results['examples']} test examples of {results['settings']['task']}, {results['threads']} threads, "
             f"medians of {results['settings']['repeats']} interleaved repeats; tokenisation "
             f"{results['tokenize_seconds'] * 1e3:.1f} ms for all (not in the model times)",
             f"machine: {describe_machine(results.get('machine'))}", "",
             "| batch | configuration | ms | ideal speedup | measured speedup | efficiency |",
             "|---|---|---|---|---|---|"]
    for bs, row in results["batch_sizes"].items():
        lines.append(f"| {bs} | plain HF forward | {row['plain_seconds'] * 1e3:.1f} | 1.00 | 1.00 | |")
        lines.append(f"| {bs} | early exit, threshold 1 | {row['machinery_seconds'] * 1e3:.1f} | 1.00 | "
                     f"{1 / (1 + row['machinery_overhead']):.2f} | overhead {row['machinery_overhead']:+.1%} |")
        for p in row["early_exit"]:
            lines.append(f"| {bs} | early exit, threshold {p['threshold']:g} | {p['seconds'] * 1e3:.1f} | "
                         f"{p['ideal_speedup']:.2f} | {p['measured_speedup']:.2f} | {p['efficiency']:.2f} |")
        for p in row["cascade"]:
            lines.append(f"| {bs} | cascade, threshold {p['threshold']:g} | {p['seconds'] * 1e3:.1f} | "
                         f"{p['ideal_speedup']:.2f} | {1 / p['measured_cost']:.2f} | "
                         f"cost {p['measured_cost']:.2f} vs FLOPs {p['predicted_cost']:.2f} ({p['cost_ratio']:.2f}) |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- deployment


@dataclass
class DeploySettings:
    batch_sizes: tuple[int, ...] = (1, 32)
    examples: int = 512  # MR test sentences timed in process
    repeats: int = 3
    target: float = 2.0  # the early-exit point: chosen on dev at this speedup (layers)
    server_seconds: float = 10.0  # per saturated measurement
    clients: int = 32
    texts_per_request: int = 4
    server_rounds: int = 1
    task: str = "mr"
    max_length: int = DEMO_MAX_LENGTH
    static_layers: int = 3  # of the static model trained when none is given
    train_size: int = 320  # of the small runs trained when none are given


QUICK_DEPLOY = DeploySettings(batch_sizes=(1, 32), examples=64, repeats=1, server_seconds=2.0, clients=8,
                              train_size=64)
RUNTIME_NAMES = {"torch": "torch fp32", "onnx": "ONNX fp32", "onnx-int8": "ONNX int8"}


def plain_view(model: EarlyExitModel) -> EarlyExitModel:
    """The same weights as a plain classifier: the backbone and the last exit's head alone."""
    config = copy.deepcopy(model.config)
    config.exit_layers, config.temperatures = [model.exit_layers[-1]], [model.temperatures[-1]]
    plain = EarlyExitModel(config, backbone=model.backbone)
    plain.heads = torch.nn.ModuleList([model.heads[-1]])
    return plain.eval()


def _exports(run: str, folder: Path, progress) -> dict[str, str]:
    """The run's directory per runtime: its own ``RUN/onnx`` and ``RUN/onnx-int8`` if exported, else exports
    written into ``folder``."""
    from frugalnlp.export import export_dir

    return {"torch": run, "onnx": export_dir(run, None, folder, progress),
            "onnx-int8": export_dir(run, "int8", folder, progress)}


def run_deploy_bench(run: str | None = None, static_run: str | None = None, quick: bool = False,
                     settings: DeploySettings | None = None, progress: Callable[[str], None] = print) -> dict:
    """Plain, early exit at the dev-chosen point and a static model, each in torch fp32, ONNX fp32 and ONNX
    int8: texts/s in process per batch size and behind the server, test accuracy; every speed as a ratio to
    plain torch fp32 measured in the same run. JSON-ready results."""
    from frugalnlp.export import export_model
    from frugalnlp.onnx_model import OnnxModel

    settings = settings or (QUICK_DEPLOY if quick else DeploySettings())
    if run is not None and load_run_config(run)["spec"]["method"] not in early_exit_methods():
        raise FrugalError(f"--run {run} is not a {' or '.join(early_exit_methods())} run")
    if static_run is not None and load_run_config(static_run)["spec"]["method"] != "plain":
        raise FrugalError(f"--static-run {static_run} is not a plain run (train one with --num-layers K)")
    with tempfile.TemporaryDirectory(prefix="frugalnlp-deploy-") as tmp:
        tmp = Path(tmp)
        if run is None or static_run is None:
            progress("training small joint and static runs to time (pass --run/--static-run to use yours)")
            run = run or str(train_run(RunSpec(output=str(tmp / "joint"), task=settings.task, method="joint",
                                               train_size=settings.train_size, epochs=1, max_length=settings.max_length)))
            static_run = static_run or str(train_run(RunSpec(
                output=str(tmp / "static"), task=settings.task, method="plain", num_layers=settings.static_layers,
                train_size=settings.train_size, epochs=1, max_length=settings.max_length)))
        early = _exports(run, tmp, progress)
        static = _exports(static_run, tmp, progress)
        plain_torch = plain_view(load_run(run).model)
        plain = {"torch": plain_torch}
        for runtime, quantize in (("onnx", None), ("onnx-int8", "int8")):
            export_model(plain_torch, tmp / f"plain-{runtime}", quantize)
            plain[runtime] = OnnxModel(tmp / f"plain-{runtime}")
        return _deploy(early, static, plain, settings, progress)


def _deploy(early: dict[str, str], static: dict[str, str], plain: dict, settings: DeploySettings, progress) -> dict:
    import asyncio

    from frugalnlp.curves import dev_scores, split_scores
    from frugalnlp.dev_choice import OperatingTarget, operating_threshold
    from frugalnlp.loadtest import ServerProcess, closed_loop

    split = load_task(settings.task).test
    timed = split.take(range(min(settings.examples, len(split))))
    loaded = {runtime: load_run(path) for runtime, path in early.items()}
    statics = {runtime: load_run(path) for runtime, path in static.items()}
    tokenizer = loaded["torch"].tokenizer
    rows: dict[str, dict] = {}
    for runtime, trained in loaded.items():
        chosen = operating_threshold(dev_scores(trained), OperatingTarget(speedup=settings.target))
        threshold = chosen.point.threshold
        test = split_scores(trained, "test").point(chosen.policy, threshold)
        rows[f"early exit, {RUNTIME_NAMES[runtime]}"] = {
            "kind": "early exit", "runtime": runtime, "policy": chosen.policy, "threshold": threshold,
            "accuracy": test.accuracy,
            "speedup_layers": test.speedup_layers, "path": early[runtime],
            "model": trained.model}
    full = split_scores(loaded["torch"], "test")
    data = encode_split(split, tokenizer, settings.max_length)
    for runtime, model in plain.items():
        logits = collect_exit_logits(model, data, tokenizer)[-1]
        rows[f"plain, {RUNTIME_NAMES[runtime]}"] = {
            "kind": "plain", "runtime": runtime, "accuracy": float((logits.argmax(-1).numpy() == full.gold).mean()),
            "speedup_layers": 1.0, "model": model, "path": early[runtime]}
    for runtime, trained in statics.items():
        rows[f"static {trained.model.exit_layers[-1]}-layer, {RUNTIME_NAMES[runtime]}"] = {
            "kind": "static", "runtime": runtime, "accuracy": split_scores(trained, "test").point("confidence", 1.0).accuracy,
            "speedup_layers": loaded["torch"].model.exit_layers[-1] / trained.model.exit_layers[-1],
            "model": trained.model, "path": static[runtime]}
    encoded = encode_split(timed, tokenizer, settings.max_length)

    def runner(row: dict) -> Callable[[dict], object]:
        model = row["model"]
        if row["kind"] == "plain" and row["runtime"] == "torch":
            return plain_forward(model)
        if row["kind"] == "early exit":
            policy = make_policy(row["policy"], row["threshold"], model.num_exits)
            return lambda b: model.predict(**b, policy=policy)
        return lambda b: model.exit_logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))

    results: dict = {"settings": settings.__dict__, "examples": len(timed), "threads": torch.get_num_threads(),
                     "machine": machine(), "rows": {}, "batch_sizes": {}}
    base = "plain, torch fp32"
    with torch.inference_mode():
        for batch_size in settings.batch_sizes:
            progress(f"in process, batch size {batch_size}")
            batches = unsorted_batches(encoded, tokenizer, batch_size)
            configs = {name: (lambda fn=runner(row): [fn(b) for b in batches]) for name, row in rows.items()}
            times = median_times(configs, settings.repeats)
            results["batch_sizes"][str(batch_size)] = {
                name: {"texts_per_second": len(timed) / t, "vs_plain_torch": times[base] / t} for name, t in times.items()}
        size = max(settings.batch_sizes)
        batches = unsorted_batches(encoded, tokenizer, size)
        results["segments"] = {"batch_size": size, **{
            name: segment_times(row["model"], batches, make_policy(row["policy"], row["threshold"], row["model"].num_exits))
            for name, row in rows.items() if row["kind"] == "early exit"}}
    n = settings.texts_per_request
    requests = [timed.texts[i:i + n] for i in range(0, len(timed.texts) - n + 1, n)]
    served: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(settings.server_rounds):
        names = list(rows)
        for name in names[r % len(names):] + names[:r % len(names)]:
            row = rows[name]
            threshold = 1.0 if row["kind"] != "early exit" else row["threshold"]  # plain: its run at threshold 1
            policy = "confidence" if row["kind"] != "early exit" else row["policy"]
            threshold = ",".join(map(str, threshold)) if isinstance(threshold, list) else str(threshold)
            progress(f"server round {r + 1}/{settings.server_rounds}: {name}")
            with ServerProcess(row["path"], "--policy", policy, "--threshold", threshold, "--max-texts", str(n)) as server:
                asyncio.run(closed_loop(server.url, requests, settings.clients, min(1.0, settings.server_seconds)))
                served[name].append(asyncio.run(closed_loop(server.url, requests, settings.clients,
                                                            settings.server_seconds))["texts_per_second"])
    for name, row in rows.items():  # server_rounds 0: no server measured
        results["rows"][name] = {k: v for k, v in row.items() if k != "model"}
        results["rows"][name]["server_texts_per_second"] = statistics.median(served[name]) if served[name] else None
        results["rows"][name]["server_vs_plain_torch"] = \
            statistics.median(served[name]) / statistics.median(served[base]) if served[name] else None
    return results


def segment_times(model, batches: list[dict], policy: ExitPolicy) -> dict:
    """Where adaptive inference's time goes: seconds in each segment's runs (and rows they ran), in
    shrinking the batch, and the rest (decisions, bookkeeping), over one pass of ``batches``."""
    advance, keep_rows = model.advance, model.keep_rows
    seconds, rows = [0.0] * model.num_exits, [0] * model.num_exits
    spent = {"keep_rows": 0.0}

    def timed_advance(e, state, head=True):
        start = time.perf_counter()
        out = advance(e, state, head=head)
        seconds[e] += time.perf_counter() - start
        rows[e] += state.attention_mask.shape[0]
        return out

    def timed_keep_rows(state, kept):
        start = time.perf_counter()
        out = keep_rows(state, kept)
        spent["keep_rows"] += time.perf_counter() - start
        return out

    model.advance, model.keep_rows = timed_advance, timed_keep_rows  # instance attributes shadow the methods
    try:
        start = time.perf_counter()
        for b in batches:
            model.predict(**b, policy=policy)
        total = time.perf_counter() - start
    finally:
        del model.advance, model.keep_rows
    return {"total_seconds": total, "segment_seconds": seconds, "segment_rows": rows,
            "keep_rows_seconds": spent["keep_rows"], "other_seconds": total - sum(seconds) - spent["keep_rows"]}


def format_deploy_bench(results: dict) -> str:
    s = results["settings"]
    sizes = list(results["batch_sizes"])
    lines = [f"{results['examples']} {s['task']} test sentences in process ({results['threads']} threads, medians of "
             f"{s['repeats']} interleaved repeats, tokenisation not counted); server: {s['clients']} closed-loop "
             f"clients, {s['texts_per_request']} texts per request, {s['server_seconds']:g} s, {s['server_rounds']} "
             "round(s); every speed is a ratio to plain torch fp32 measured in this run",
             f"machine: {describe_machine(results.get('machine'))}", "",
             "| configuration | test accuracy | layers speedup | "
             + " | ".join(f"batch {b}: texts/s (vs plain torch)" for b in sizes)
             + " | server texts/s (vs plain torch) |", "|---|---|---|" + "---|" * (len(sizes) + 1)]
    for name, row in results["rows"].items():
        cells = [f"{results['batch_sizes'][b][name]['texts_per_second']:.0f} "
                 f"({results['batch_sizes'][b][name]['vs_plain_torch']:.2f}x)" for b in sizes]
        server = "—" if row["server_texts_per_second"] is None else \
            f"{row['server_texts_per_second']:.0f} ({row['server_vs_plain_torch']:.2f}x)"
        lines.append(f"| {name} | {row['accuracy']:.4f} | {row['speedup_layers']:.2f} | " + " | ".join(cells)
                     + f" | {server} |")
    segments = {k: v for k, v in results.get("segments", {}).items() if k != "batch_size"}
    if segments:
        exits = len(next(iter(segments.values()))["segment_seconds"])
        lines += ["", f"Early exit, batch {results['segments']['batch_size']}: where one pass's time goes "
                      "(ms; rows run per segment)", "",
                  "| configuration | total | " + " | ".join(f"segment {e + 1}" for e in range(exits))
                  + " | shrinking the batch | decisions and the rest |", "|---|---|" + "---|" * (exits + 2)]
        for name, t in segments.items():
            cells = [f"{s * 1e3:.0f} ({r})" for s, r in zip(t["segment_seconds"], t["segment_rows"])]
            lines.append(f"| {name} | {t['total_seconds'] * 1e3:.0f} | " + " | ".join(cells)
                         + f" | {t['keep_rows_seconds'] * 1e3:.0f} | {t['other_seconds'] * 1e3:.0f} |")
    return "\n".join(lines)
