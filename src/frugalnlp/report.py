"""Evaluation outputs a person reads: curve tables (JSON + CSV), exit scores, PNG plots."""

from __future__ import annotations

import csv
import io
import shlex
import sys
from pathlib import Path

import numpy as np

from frugalnlp.encoding import encode_split
from frugalnlp.errors import FrugalError
from frugalnlp.evaluation import collect_exit_logits, exit_scores, speed_accuracy_curve
from frugalnlp.rundir import RunDir, write_bytes, write_json
from frugalnlp.training import load_run, load_spec_task

CURVE_COLUMNS = ["threshold", "accuracy", "macro_f1", "layers_share", "speedup_layers", "flops_share",
                 "speedup_flops", "exit_histogram"]


def evaluate_run(run: str | Path, split: str = "test", thresholds: int = 21, policy: str = "confidence",
                 output: str | Path | None = None, overwrite: bool = False) -> tuple[Path, list[dict]]:
    """Curve of a trained run on ``split``: writes curve.json, curve.csv, exits.json and curve.png.

    Returns the output directory (default ``RUN/eval-SPLIT-POLICY``) and the curve points.
    """
    if thresholds < 2:
        raise FrugalError("--thresholds must be at least 2 (evenly spaced in [0, 1])")
    out = RunDir(output or Path(run) / f"eval-{split}-{policy}", overwrite=overwrite)
    trained = load_run(run)
    spec, model, tokenizer = trained.spec, trained.model, trained.tokenizer
    task = load_spec_task(spec)
    data = encode_split(task.split(split), tokenizer, spec.max_length)
    logits = collect_exit_logits(model, data, tokenizer, spec.eval_batch_size, progress=True)
    gold = task.split(split).labels
    curve = speed_accuracy_curve(model, logits, gold, data.lengths(),
                                 np.linspace(0.0, 1.0, thresholds).tolist(), policy=policy)
    out.open()
    write_json(out.path / "curve.json", {"run": str(run), "split": split, "policy": policy,
                                         "examples": len(gold), "points": curve})
    write_bytes(out.path / "curve.csv", curve_csv(curve).encode())
    write_json(out.path / "exits.json", exit_scores(model, logits, gold))
    plot_curves({spec.method: curve}, out.path / "curve.png", title=f"{spec.task} ({split})")
    return out.commit(), curve


def curve_csv(curve: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CURVE_COLUMNS)
    writer.writeheader()
    for point in curve:
        writer.writerow({**point, "exit_histogram": " ".join(map(str, point["exit_histogram"]))})
    return buffer.getvalue()


def plot_curves(curves: dict[str, list[dict] | tuple[list[dict], list[dict]]], path: str | Path, title: str = "",
                key: str = "speedup_layers") -> None:
    """Accuracy against speedup, one line per method; a (mean, std) pair draws a band."""
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
    ax.set_xlabel("speedup (full depth / layers run)" if key == "speedup_layers" else "speedup (FLOPs)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
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
