"""Evaluation outputs a person reads: curve tables (JSON + CSV), exit scores, PNG plots."""

from __future__ import annotations

import csv
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from frugalnlp.early_exit.policies import make_policy
from frugalnlp.encoding import encode_split
from frugalnlp.errors import FrugalError
from frugalnlp.evaluation import (OPERATING_GRID, Oracle, check_operating_target, choose_threshold, collect_exit_logits,
                                  compare, exit_scores, speed_accuracy_curve, table_speedups)
from frugalnlp.rundir import RunDir, write_bytes, write_json
from frugalnlp.training import TrainedRun, load_run, load_run_config, load_spec_task

CURVE_COLUMNS = ["threshold", "accuracy", "macro_f1", "layers_share", "speedup_layers", "flops_share",
                 "speedup_flops", "exit_histogram"]


def evaluate_run(run: str | Path, split: str = "test", thresholds: int = 21, policy: str = "confidence",
                 output: str | Path | None = None, overwrite: bool = False, static: list[str] | None = None,
                 target_speedup: float | None = None, max_drop: float | None = None) -> tuple[Path, dict]:
    """Curve of a trained run on ``split`` beside its baselines; writes curve.json, curve.csv, exits.json, curve.png.

    Baselines: the fixed exits, the static frontier (``static``: multi-model or ``plain --num-layers``
    runs; a multi-model run's own members by default) and the oracle. ``target_speedup`` or
    ``max_drop`` choose a threshold on the dev curve and report ``split`` at it. Returns the output
    directory (default ``RUN/eval-SPLIT-POLICY``) and the curve.json content.
    """
    if thresholds < 2:
        raise FrugalError("--thresholds must be at least 2 (evenly spaced in [0, 1])")
    make_policy(policy, 0.5, 2)  # an unknown policy fails now, not after the forward passes
    if target_speedup is not None or max_drop is not None:
        check_operating_target(target_speedup, max_drop)
    out = RunDir(output or Path(run) / f"eval-{split}-{policy}", overwrite=overwrite)
    trained = load_run(run)
    spec, model = trained.spec, trained.model
    depth = model.exit_layers[-1]
    static_runs = static or ([str(run)] if spec.method == "multi-model" else None)
    static_pts = static_points(static_runs, split, trained.config, depth) if static_runs else None
    # Thresholds are chosen on dev and read on the reported split, on one fine grid.
    grid = np.linspace(0.0, 1.0, thresholds).round(6).tolist()
    fine = sorted({*OPERATING_GRID, *grid})
    dev_curve, dev_logits, dev_gold = split_curve(trained, "dev", fine, policy)
    full_curve, logits, gold = split_curve(trained, split, fine, policy)
    shown = set(grid)
    curve = [p for p in full_curve if p["threshold"] in shown]
    operating = None
    if target_speedup is not None or max_drop is not None:
        chosen = choose_threshold(dev_curve, target_speedup=target_speedup, max_drop=max_drop)
        operating = {"chosen_on": "dev", "target_speedup": target_speedup, "max_drop": max_drop,
                     "threshold": chosen["threshold"], "dev": chosen,
                     split: next(p for p in full_curve if p["threshold"] == chosen["threshold"])}
    fixed = exit_scores(model, logits, gold)
    oracle = Oracle(logits, gold, model.layers_to_exit, depth)
    speedups = table_speedups(model.exit_layers)
    result = {"run": str(run), "split": split, "policy": policy, "method": spec.method, "examples": len(gold),
              "points": curve,
              "baselines": {"fixed_exits": fixed, "static": static_pts, "oracle_best": oracle.best,
                            "oracle": [{"speedup_layers": s, "accuracy": oracle.accuracy(s)}
                                       for s in oracle_speedups(model.exit_layers)]},
              "comparison": compare(full_curve, dev_curve, fixed, static_pts, oracle, speedups),
              # The same on dev, where recipes may be compared and chosen without touching test.
              "dev_comparison": compare(dev_curve, dev_curve, exit_scores(model, dev_logits, dev_gold),
                                        static_points(static_runs, "dev", trained.config, depth) if static_runs else None,
                                        Oracle(dev_logits, dev_gold, model.layers_to_exit, depth), speedups),
              "operating_point": operating}
    out.open()
    write_json(out.path / "curve.json", result)
    write_bytes(out.path / "curve.csv", curve_csv(curve).encode())
    write_json(out.path / "exits.json", fixed)
    plot_curves({spec.method: curve}, out.path / "curve.png", title=f"{spec.task} ({split})",
                baselines=result["baselines"])
    return out.commit(), result


def split_curve(trained: TrainedRun, split: str, thresholds: list[float],
                policy: str = "confidence") -> tuple[list[dict], torch.Tensor, np.ndarray]:
    """A finished run's curve on one split of its task: (points, raw exit logits [exits, n, labels], gold [n])."""
    spec, model, tokenizer = trained.spec, trained.model, trained.tokenizer
    task = load_spec_task(spec)
    data = encode_split(task.split(split), tokenizer, spec.max_length)
    logits = collect_exit_logits(model, data, tokenizer, spec.eval_batch_size, progress=True)
    gold = task.split(split).labels
    return speed_accuracy_curve(model, logits, gold, data.lengths(), thresholds, policy=policy), logits, gold


def operating_threshold(trained: TrainedRun, target_speedup: float | None = None, max_drop: float | None = None,
                        policy: str = "confidence") -> dict:
    """The dev curve point chosen by `choose_threshold` (its ``threshold`` is what to predict with)."""
    return choose_threshold(split_curve(trained, "dev", OPERATING_GRID, policy)[0], target_speedup=target_speedup,
                            max_drop=max_drop)


def static_points(runs: list[str], split: str, config: dict, depth: int) -> list[dict]:
    """The static frontier's points: each separately trained truncated model's accuracy on ``split``.

    ``runs`` are multi-model runs (every member alone) or plain runs (``--num-layers K``) of the same
    task and model as ``config`` (the evaluated run's config.json). Models of equal depth are averaged.
    """
    by_depth: dict[int, list[tuple[float, float, str]]] = {}
    for run in runs:
        other = load_run_config(run)
        for key in ("name", "labels", "sizes", "pair"):
            if other["task"].get(key) != config["task"].get(key):
                raise FrugalError(f"--static {run} was trained on another task ({other['task'].get('name')}, "
                                  f"{key} differs); give runs of task {config['task'].get('name')}")
        if other["spec"]["model"] != config["spec"]["model"]:
            raise FrugalError(f"--static {run} truncates model {other['spec']['model']}, not {config['spec']['model']}: "
                              "layer shares would not compare")
        metrics = json.loads((Path(run) / "metrics.json").read_text())[split]
        method = other["spec"]["method"]
        if method == "multi-model":
            members = [(e["layer"], e["accuracy"], e["macro_f1"]) for e in metrics["exits"]]
        elif method == "plain":
            members = [(other["spec"]["exit_layers"][-1], metrics["accuracy"], metrics["macro_f1"])]
        else:
            raise FrugalError(f"--static {run} is a {method} run; the static frontier needs separately trained "
                              "models: a multi-model run, or plain runs with --num-layers K")
        for layers, accuracy, f1 in members:
            if layers > depth:
                raise FrugalError(f"--static {run} has a {layers}-layer model, deeper than this run ({depth})")
            by_depth.setdefault(layers, []).append((accuracy, f1, str(run)))
    return [{"layers": k, "layers_share": k / depth, "speedup_layers": depth / k,
             "accuracy": float(np.mean([a for a, _, _ in v])), "macro_f1": float(np.mean([f for _, f, _ in v])),
             "runs": [r for _, _, r in v]}
            for k, v in sorted(by_depth.items())]


def oracle_speedups(exit_layers: list[int]) -> list[float]:
    """Speedups at which to draw the oracle: from 1x to the first exit's own, 40 steps in cost."""
    return (1.0 / np.linspace(1.0, exit_layers[0] / exit_layers[-1], 40)).tolist()


COMPARISON_COLUMNS = [("speedup", "target", "{:.2f}x"), ("test_speedup", "test speedup", "{:.2f}x"),
                      ("adaptive", "adaptive (dev thr.)", "{:.3f}"), ("fixed_exit", "fixed exit", "{:.3f}"),
                      ("static", "static", "{:.3f}"), ("oracle", "oracle", "{:.3f}"),
                      ("gain_over_static", "gain over static (pts)", "{:+.1f}"), ("gap_closed", "gap closed", "{:.0%}")]


def format_comparison(rows_by_method: dict[str, list[dict]]) -> str:
    """Markdown table: per method and target speedup, the adaptive curve against its baselines.

    A cell is a number, None (shown as —) or a ``[mean, std]`` pair over seeds.
    """
    def cell(value, fmt: str) -> str:
        if value is None:
            return "—"
        if isinstance(value, (list, tuple)):
            mean, std = value
            return fmt.format(mean) + ("" if std is None else f" ± {fmt.format(std).lstrip('+')}")
        return fmt.format(value)

    lines = ["| method | " + " | ".join(title for _, title, _ in COMPARISON_COLUMNS) + " |",
             "|---" * (len(COMPARISON_COLUMNS) + 1) + "|"]
    for method, rows in rows_by_method.items():
        for row in rows:
            lines.append(f"| {method} | " + " | ".join(cell(row.get(key), fmt) for key, _, fmt in COMPARISON_COLUMNS) + " |")
    return "\n".join(lines)


def curve_csv(curve: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CURVE_COLUMNS)
    writer.writeheader()
    for point in curve:
        writer.writerow({**point, "exit_histogram": " ".join(map(str, point["exit_histogram"]))})
    return buffer.getvalue()


def plot_curves(curves: dict[str, list[dict] | tuple[list[dict], list[dict]]], path: str | Path, title: str = "",
                key: str = "speedup_layers", baselines: dict | None = None) -> None:
    """Accuracy against speedup, one line per method; a (mean, std) pair draws a band.

    ``baselines`` (as in curve.json) adds the fixed exits (points), the static frontier (grey line) and
    the oracle (dashed), all in layer-share speedup.
    """
    fig, ax = new_figure(figsize=(6, 4), dpi=120)
    for label, curve in curves.items():
        std = None
        if isinstance(curve, tuple):
            curve, std = curve
        order = np.argsort([p[key] for p in curve])
        x = np.array([curve[i][key] for i in order])
        y = np.array([curve[i]["accuracy"] for i in order])
        ax.plot(x, y, marker="o", markersize=3, label=label)
        if std is not None:
            s = np.array([std[i]["accuracy"] for i in order])
            ax.fill_between(x, y - s, y + s, alpha=0.2)
    if baselines and key == "speedup_layers":
        static = baselines.get("static")
        if static:
            ax.plot([p["speedup_layers"] for p in static], [p["accuracy"] for p in static], color="0.3",
                    marker="s", markersize=4, label="static frontier")
        fixed = baselines.get("fixed_exits")
        if fixed:
            ax.scatter([p["speedup_layers"] for p in fixed], [p["accuracy"] for p in fixed], marker="x",
                       color="black", zorder=5, label="fixed exits")
        oracle = [p for p in baselines.get("oracle") or [] if p["accuracy"] is not None]
        if oracle:
            ax.plot([p["speedup_layers"] for p in oracle], [p["accuracy"] for p in oracle], linestyle="--",
                    color="0.5", label="oracle")
    ax.set_xlabel("speedup (full depth / layers run)" if key == "speedup_layers" else "speedup (FLOPs)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def new_figure(**subplots):
    """A (figure, axes) pair from ``plt.subplots(**subplots)`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**subplots)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def command_line() -> str:
    """The ``frugalnlp`` command this process runs, shell-quoted, to record next to its results."""
    return " ".join(["frugalnlp", *map(shlex.quote, sys.argv[1:])])
