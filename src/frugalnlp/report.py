"""Rendering only: curve tables (CSV), comparison tables (markdown), PNG plots, the command line to record.

Nothing here loads a run or runs a model; `frugalnlp.evaluation` computes what these functions show.
"""

from __future__ import annotations

import csv
import io
import shlex
import sys
from pathlib import Path

import numpy as np

from frugalnlp.atomic import write_bytes

CURVE_COLUMNS = ["threshold", "accuracy", "macro_f1", "layers_share", "speedup_layers", "flops_share",
                 "speedup_flops", "exit_histogram"]


COMPARISON_COLUMNS = [("speedup", "target", "{:.2f}x"), ("test_speedup", "test speedup", "{:.2f}x"),
                      ("adaptive", "adaptive (dev thr.)", "{:.3f}"), ("fixed_exit", "fixed exit", "{:.3f}"),
                      ("static", "static", "{:.3f}"), ("static_corrected", "static, dev bias", "{:.3f}"),
                      ("ceiling", "learnable ceiling", "{:.3f}"), ("oracle", "oracle", "{:.3f}"),
                      ("gain_over_static", "gain over static (pts)", "{:+.1f}"),
                      ("gain_over_corrected_static", "gain over static + dev bias (pts)", "{:+.1f}"),
                      ("gap_closed", "gap closed", "{:.0%}")]


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


LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]
MARKERS = ["o", "s", "^", "v", "D"]


def plot_curves(curves: dict[str, list[dict] | tuple[list[dict], list[dict]]], path: str | Path, title: str = "",
                key: str = "speedup_layers", baselines: dict | None = None) -> None:
    """Accuracy against speedup, one line per method; a (mean, std) pair draws a band.

    ``baselines`` (as in curve.json) adds the fixed exits (points), the static frontier (grey line) and
    the oracle (dashed), all in layer-share speedup.
    """
    many = len(curves) > 6  # a demo's (recipe, policy) grid: legend beside the axes, one colour per recipe
    fig, ax = new_figure(figsize=(10, 5) if many else (6, 4), dpi=120)
    recipes = list(dict.fromkeys(label.split(" [")[0] for label in curves))  # "recipe [policy]" labels
    seen: dict[str, int] = {}
    for label, curve in curves.items():
        std = None
        if isinstance(curve, tuple):
            curve, std = curve
        recipe = label.split(" [")[0]
        k = seen[recipe] = seen.get(recipe, -1) + 1  # the policy's place among its recipe's curves
        color = f"C{recipes.index(recipe) % 10}"
        order = np.argsort([p[key] for p in curve])
        x = np.array([curve[i][key] for i in order])
        y = np.array([curve[i]["accuracy"] for i in order])
        ax.plot(x, y, color=color, linestyle=LINESTYLES[k % len(LINESTYLES)], marker=MARKERS[k % len(MARKERS)],
                markersize=3, label=label)
        if std is not None:
            s = np.array([std[i]["accuracy"] for i in order])
            ax.fill_between(x, y - s, y + s, color=color, alpha=0.08 if many else 0.2)
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
        ceiling = [p for p in baselines.get("ceiling") or [] if p["accuracy"] is not None]
        if ceiling:
            ax.plot([p["speedup_layers"] for p in ceiling], [p["accuracy"] for p in ceiling], linestyle=":",
                    color="0.4", label="learnable ceiling (router fitted on test)")
    ax.set_xlabel("speedup (full depth / layers run)" if key == "speedup_layers" else "speedup (FLOPs)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
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
