"""Wall-clock benchmark: the plain HF forward against adaptive inference, side by side in one process.

Every configuration runs over the same real task texts in the same batches. The runs are
interleaved: each repeat times every configuration once, so a noisy neighbour slows them all
alike. We report medians after a warm-up pass. The ideal speedup that the share of layers run predicts is set against
the measured one; their ratio is the efficiency of turning skipped layers into saved time.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from frugalnlp.curves import CurvePoint, collect_exit_logits, speed_accuracy_curve
from frugalnlp.defaults import DEMO_MAX_LENGTH
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.modeling import EarlyExitModel
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


def plain_view(model: EarlyExitModel) -> EarlyExitModel:
    """The same weights as a plain classifier: the backbone and the last exit's head alone."""
    config = copy.deepcopy(model.config)
    config.exit_layers, config.temperatures = [model.exit_layers[-1]], [model.temperatures[-1]]
    plain = EarlyExitModel(config, backbone=model.backbone)
    plain.heads = torch.nn.ModuleList([model.heads[-1]])
    return plain.eval()
