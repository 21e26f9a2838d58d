"""`frugalnlp demo`: joint vs SWEET vs Multi-Model on the same data and seeds, one table and a report.

Each (seed, method) is an ordinary training run under ``OUTPUT/seed-S/METHOD`` followed by a test
curve; rerunning with ``--resume`` skips the runs already finished.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from frugalnlp.evaluation import accuracy_at_speedup
from frugalnlp.report import command_line, evaluate_run, plot_curves
from frugalnlp.rundir import RunDir, write_bytes, write_json
from frugalnlp.training import RunSpec, train_run

DEMO_METHODS = ("joint", "sweet", "multi-model")
SPEEDUPS = (1.5, 2.0, 3.0)


def _mean_std(values: list[float | None]) -> tuple[float, float] | None:
    if any(v is None for v in values):
        return None
    return float(np.mean(values)), float(np.std(values))


def _fmt(ms: tuple[float, float] | None, seeds: int) -> str:
    if ms is None:
        return "—"
    return f"{ms[0]:.3f}" + (f" ± {ms[1]:.3f}" if seeds > 1 else "")


def run_demo(task: str = "mr", model: str = "minilm", seeds: list[int] = (0,), output: str = "demo",
             train_size: int | None = 2000, epochs: float = 2.0, max_length: int = 64,
             exit_layers: list[int] | None = None, overwrite: bool = False, resume: bool = False) -> dict:
    """Train and evaluate the three methods for every seed; print and write the comparison."""
    started = time.perf_counter()
    out = RunDir(output, overwrite=overwrite, resume=resume)
    out.open()
    results: dict[str, dict] = {m: {"exits": [], "curves": []} for m in DEMO_METHODS}
    layers = None
    for seed in seeds:
        for method in DEMO_METHODS:
            run = out.path / f"seed-{seed}" / method
            if not (run / "metrics.json").exists():
                spec = RunSpec(output=str(run), task=task, model=model, method=method, exit_layers=exit_layers,
                               epochs=epochs, seed=seed, train_size=train_size, max_length=max_length)
                print(f"== seed {seed}: training {method}", file=sys.stderr)
                train_run(spec, resume=(run.with_name(run.name + ".partial")).exists())
            metrics = json.loads((run / "metrics.json").read_text())
            curve_file = run / "eval-test-confidence" / "curve.json"
            curve = (json.loads(curve_file.read_text())["points"] if curve_file.exists()
                     else evaluate_run(run, split="test")[1])
            layers = [e["layer"] for e in metrics["test"]["exits"]]
            results[method]["exits"].append([e["accuracy"] for e in metrics["test"]["exits"]])
            results[method]["curves"].append(curve)

    summary = {"task": task, "model": model, "seeds": list(seeds), "train_size": train_size, "epochs": epochs,
               "max_length": max_length, "exit_layers": layers, "methods": {}}
    for method, r in results.items():
        exits = np.array(r["exits"])
        summary["methods"][method] = {
            "exit_accuracy_mean": exits.mean(0).tolist(), "exit_accuracy_std": exits.std(0).tolist(),
            "exit_accuracy_per_seed": exits.tolist(),
            "accuracy_at_speedup": {str(s): _mean_std([accuracy_at_speedup(c, s) for c in r["curves"]])
                                    for s in SPEEDUPS},
            "mean_curve": _mean_curve(r["curves"]),
        }
    summary["seconds"] = time.perf_counter() - started
    summary["command"] = command_line()
    table = format_table(summary)
    print(table)
    write_json(out.path / "results.json", summary)
    plot_curves({m: (s["mean_curve"]["mean"], s["mean_curve"]["std"]) for m, s in summary["methods"].items()},
                out.path / "curves.png", title=f"{task}, {model}, train size {train_size}, seeds {list(seeds)}")
    write_bytes(out.path / "report.md", (f"# frugalnlp demo: {task}\n\n{table}\n\n![curves](curves.png)\n").encode())
    out.commit()
    return summary


def _mean_curve(curves: list[list[dict]]) -> dict:
    """Point-wise mean and std over seeds (same thresholds in every curve)."""
    keys = ("accuracy", "speedup_layers", "speedup_flops", "layers_share")
    return {name: [{"threshold": pts[0]["threshold"], **{k: float(stat([p[k] for p in pts])) for k in keys}}
                   for pts in zip(*curves)]
            for name, stat in (("mean", np.mean), ("std", np.std))}


def format_table(summary: dict) -> str:
    """Markdown tables: each exit's accuracy per method, and accuracy at given speedups."""
    n = len(summary["seeds"])
    layers = summary["exit_layers"]
    lines = [f"Task `{summary['task']}`, model `{summary['model']}`, train size {summary['train_size']}, "
             f"{summary['epochs']:g} epochs, seeds {summary['seeds']} (test accuracy" + (", mean ± std)" if n > 1 else ")"),
             "", "Each exit's accuracy (every example forced to that exit):", "",
             "| method | " + " | ".join(f"layer {k}" for k in layers) + " |",
             "|---" * (len(layers) + 1) + "|"]
    for method, m in summary["methods"].items():
        cells = [_fmt((mu, sd), n) for mu, sd in zip(m["exit_accuracy_mean"], m["exit_accuracy_std"])]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Best accuracy at a speedup of at least (share of layers run, cascade recomputation counted):", "",
              "| method | " + " | ".join(f"{s:g}x" for s in SPEEDUPS) + " |", "|---" * (len(SPEEDUPS) + 1) + "|"]
    for method, m in summary["methods"].items():
        lines.append(f"| {method} | " + " | ".join(_fmt(m["accuracy_at_speedup"][str(s)], n) for s in SPEEDUPS) + " |")
    return "\n".join(lines)
