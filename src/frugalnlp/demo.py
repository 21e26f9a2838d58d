"""`frugalnlp demo`: adaptive methods and recipes against the static frontier, on the same data and seeds.

Each (seed, variant) is an ordinary training run under ``OUTPUT/seed-S/VARIANT`` followed by a test
curve; rerunning with ``--resume`` skips the runs already finished. Every seed also trains the
Multi-Model run: its members alone are the static frontier (and its last member the plain
full-depth model), and it teaches the variants that distil from a teacher.

A variant is ``METHOD[:key=value...]`` with METHOD one of joint, sweet, two-stage, multi-model and
keys boundary-grad, distill (self or teacher), distill-alpha, distill-temperature, exit-weights,
e.g. ``joint:boundary-grad=0.5:distill=self``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from transformers import AutoConfig

from frugalnlp.assets import resolve_model
from frugalnlp.early_exit.modeling import check_exit_layers
from frugalnlp.errors import FrugalError
from frugalnlp.evaluation import accuracy_at_speedup, table_speedups
from frugalnlp.report import command_line, evaluate_run, format_comparison, plot_curves
from frugalnlp.rundir import RunDir, write_bytes, write_json
from frugalnlp.training import RunSpec, check_seed, check_spec, load_spec_task, train_run

DEMO_METHODS = ("joint", "sweet", "multi-model")
STATIC = "multi-model"  # the variant whose members are the static frontier
SPEEDUPS = (1.5, 2.0, 3.0)
RECIPE_KEYS = {"boundary-grad": float, "distill": str, "distill-alpha": float, "distill-temperature": float,
               "exit-weights": str}


def parse_variant(variant: str, base: RunSpec) -> RunSpec:
    """``METHOD[:key=value...]`` -> the run spec of that variant (``base`` gives everything else)."""
    method, *options = variant.split(":")
    values: dict = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in RECIPE_KEYS:
            raise FrugalError(f"demo variant '{variant}': '{option}' is not KEY=VALUE with KEY one of "
                              f"{', '.join(RECIPE_KEYS)}")
        try:
            values[key.replace("-", "_")] = RECIPE_KEYS[key](value)
        except ValueError:
            raise FrugalError(f"demo variant '{variant}': {key} needs a number, not '{value}'")
    if values and method not in ("joint", "sweet", "two-stage"):
        raise FrugalError(f"demo variant '{variant}': recipe options need joint, sweet or two-stage")
    if method == "two-stage" and "boundary_grad" not in values:
        values["boundary_grad"] = None  # a demo-wide --boundary-grad is meant for joint/sweet
    spec = replace(base, method=method, **values)
    if method not in ("joint", "sweet", "two-stage"):
        return replace(spec, boundary_grad=None, distill=None, teacher=None, exit_weights="uniform")
    if spec.teacher and spec.distill is None:
        spec = replace(spec, distill="teacher")
    return spec


def _run_name(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", variant.replace("=", "-"))


def _mean_std(values: list[float | None]) -> list[float] | None:
    if not values or any(v is None for v in values):
        return None
    return [float(np.mean(values)), float(np.std(values))]


def _fmt(ms: list[float] | None, seeds: int) -> str:
    if ms is None:
        return "—"
    return f"{ms[0]:.3f}" + (f" ± {ms[1]:.3f}" if seeds > 1 else "")


def run_demo(task: str | None = "mr", model: str = "minilm", seeds: list[int] = (0,), output: str = "demo",
             train_size: int | None = 2000, epochs: float = 2.0, max_length: int = 64,
             exit_layers: list[int] | None = None, overwrite: bool = False, resume: bool = False,
             methods: list[str] = DEMO_METHODS, base: RunSpec | None = None) -> dict:
    """Train and evaluate every variant for every seed; print and write the comparison.

    ``base`` carries the data flags and the demo-wide recipe (any RunSpec field); the named arguments
    override its task, model, sizes and exit layers.
    """
    started = time.perf_counter()
    if not seeds:
        raise FrugalError("--seeds is empty; give e.g. --seeds 0,1,2")
    for seed in seeds:
        check_seed(seed, "--seeds")
    base = replace(base or RunSpec(output=""), task=task, model=model, train_size=train_size, epochs=epochs,
                   max_length=max_length, exit_layers=exit_layers)
    variants = list(dict.fromkeys([*methods, STATIC]))  # the static frontier is always trained
    specs = {v: parse_variant(v, base) for v in variants}
    for v, spec in specs.items():
        if spec.method == "plain":
            raise FrugalError(f"demo variant '{v}': plain has no exits (the static frontier is trained anyway)")
        check_spec(replace(spec, teacher=spec.teacher or ("static" if spec.distill == "teacher" else None)))
    num_layers = AutoConfig.from_pretrained(resolve_model(model)).num_hidden_layers  # a bad model fails here
    if exit_layers is not None:
        check_exit_layers(exit_layers, num_layers)
    load_spec_task(base)  # and a bad task, file or column here: before the output is created
    out = RunDir(output, overwrite=overwrite, resume=resume)
    out.open()
    results: dict[str, dict] = {v: {"exits": [], "curves": [], "comparisons": [], "dev_comparisons": [],
                                    "last_vs_plain": [], "dev_last_vs_plain": []} for v in variants}
    static_by_seed, oracles, layers = {}, [], None
    for seed in seeds:
        static_run = out.path / f"seed-{seed}" / _run_name(STATIC)
        for variant in [STATIC] + [v for v in variants if v != STATIC]:
            run = out.path / f"seed-{seed}" / _run_name(variant)
            if not (run / "metrics.json").exists():
                teacher = specs[variant].teacher or str(static_run)  # default teacher: the plain full-depth member
                spec = replace(specs[variant], output=str(run), seed=seed,
                               teacher=teacher if specs[variant].distill == "teacher" else None)
                print(f"== seed {seed}: training {variant}", file=sys.stderr)
                train_run(spec, resume=run.with_name(run.name + ".partial").exists())
            metrics = json.loads((run / "metrics.json").read_text())
            curve_file = run / "eval-test-confidence" / "curve.json"
            evaluation = json.loads(curve_file.read_text()) if curve_file.exists() else {}
            if "dev_comparison" not in evaluation:  # not evaluated yet, or by a version without the baselines
                evaluation = evaluate_run(run, split="test", static=[str(static_run)], overwrite=True)[1]
            layers = [e["layer"] for e in metrics["test"]["exits"]]
            plain = json.loads((static_run / "metrics.json").read_text())
            r = results[variant]
            r["exits"].append([e["accuracy"] for e in metrics["test"]["exits"]])
            r["curves"].append(evaluation["points"])
            r["comparisons"].append(evaluation["comparison"])
            r["dev_comparisons"].append(evaluation["dev_comparison"])
            r["last_vs_plain"].append(100 * (metrics["test"]["accuracy"] - plain["test"]["accuracy"]))
            r["dev_last_vs_plain"].append(100 * (metrics["dev"]["accuracy"] - plain["dev"]["accuracy"]))
            oracles.append(evaluation["baselines"]["oracle"])
            if variant == STATIC:
                static_by_seed[seed] = evaluation["baselines"]["static"]

    summary = {"task": base.task or Path(base.train_file).stem, "model": model, "seeds": list(seeds),
               "train_size": train_size, "epochs": epochs, "max_length": max_length, "exit_layers": layers,
               "speedups": table_speedups(layers), "static": _mean_static(list(static_by_seed.values())),
               "oracle": _best_oracle(oracles, len(seeds)),
               "methods": {}}
    for variant, r in results.items():
        exits = np.array(r["exits"])
        summary["methods"][variant] = {
            "spec": {k: getattr(specs[variant], k) for k in ("method", "boundary_grad", "distill", "distill_alpha",
                                                              "distill_temperature", "exit_weights")},
            "exit_accuracy_mean": exits.mean(0).tolist(), "exit_accuracy_std": exits.std(0).tolist(),
            "exit_accuracy_per_seed": exits.tolist(),
            "last_exit_vs_plain_points": _mean_std(r["last_vs_plain"]),
            "accuracy_at_speedup": {str(s): _mean_std([accuracy_at_speedup(c, s) for c in r["curves"]])
                                    for s in SPEEDUPS},
            "comparison": _mean_comparison(r["comparisons"]),
            "comparison_per_seed": r["comparisons"],
            "dev_comparison": _mean_comparison(r["dev_comparisons"]),
            "dev_last_exit_vs_plain_points": _mean_std(r["dev_last_vs_plain"]),
            "mean_curve": _mean_curve(r["curves"]),
        }
    summary["selected_on_dev"] = select_on_dev(summary["methods"])
    summary["seconds"] = time.perf_counter() - started
    summary["command"] = command_line()
    table = format_table(summary)
    print(table)
    write_json(out.path / "results.json", summary)
    plot_curves({m: (s["mean_curve"]["mean"], s["mean_curve"]["std"]) for m, s in summary["methods"].items()},
                out.path / "curves.png", title=f"{summary['task']}, {model}, train size {train_size}, seeds {list(seeds)}",
                baselines={"static": summary["static"], "oracle": summary["oracle"]})
    write_bytes(out.path / "report.md", (f"# frugalnlp demo: {summary['task']}\n\n{table}\n\n![curves](curves.png)\n").encode())
    out.commit()
    return summary


def select_on_dev(methods: dict[str, dict], low: float = 1.5, high: float = 3.0, tolerance: float = 0.5) -> dict:
    """The variant to publish, chosen on dev only: the largest worst-case gain over the static frontier
    at the target speedups in [low, high] (mean over seeds), among variants whose last exit is within
    ``tolerance`` points of the plain model on dev (all variants if none is)."""
    def worst_gain(m: dict) -> float:
        gains = [row["gain_over_static"] for row in m["dev_comparison"] if low - 1e-9 <= row["speedup"] <= high + 1e-9]
        return min((g[0] if g else float("-inf")) for g in gains) if gains else float("-inf")

    def last_ok(m: dict) -> bool:
        last = m["dev_last_exit_vs_plain_points"]
        return last is not None and last[0] >= -tolerance

    candidates = [v for v, m in methods.items() if last_ok(m)] or list(methods)
    best = max(candidates, key=lambda v: worst_gain(methods[v]))
    return {"variant": best, "criterion": f"max over variants of min over target speedups {low:g}x-{high:g}x of the "
                                         f"mean dev gain over static; last exit within {tolerance:g} pt of plain on dev",
            "dev_worst_gain_points": {v: worst_gain(methods[v]) for v in methods},
            "eligible": candidates}


def _best_oracle(oracles: list[list[dict]], seeds: int) -> list[dict]:
    """The oracle to draw beside every variant: at each speedup, the best variant's mean over seeds.

    ``oracles`` holds one oracle curve per (seed, variant), seed-major, all at the same speedups.
    """
    per_variant = len(oracles) // seeds
    points = []
    for i, first in enumerate(oracles[0]):
        means = []
        for v in range(per_variant):
            values = [oracles[s * per_variant + v][i]["accuracy"] for s in range(seeds)]
            if all(a is not None for a in values):
                means.append(float(np.mean(values)))
        points.append({"speedup_layers": first["speedup_layers"], "accuracy": max(means) if means else None})
    return points


def _mean_static(per_seed: list[list[dict]]) -> list[dict]:
    """The static frontier's points averaged over seeds (same depths in every seed)."""
    return [{"layers": pts[0]["layers"], "layers_share": pts[0]["layers_share"], "speedup_layers": pts[0]["speedup_layers"],
             "accuracy": float(np.mean([p["accuracy"] for p in pts])), "accuracy_std": float(np.std([p["accuracy"] for p in pts]))}
            for pts in zip(*per_seed)]


def _mean_comparison(per_seed: list[list[dict]]) -> list[dict]:
    """Comparison rows with [mean, std] over seeds for every numeric column (None if any seed lacks it)."""
    keys = ("test_speedup", "adaptive", "adaptive_best_on_test", "fixed_exit", "static", "oracle",
            "gain_over_static", "gap_closed")
    return [{"speedup": rows[0]["speedup"], **{k: _mean_std([r[k] for r in rows]) for k in keys}}
            for rows in zip(*per_seed)]


def _mean_curve(curves: list[list[dict]]) -> dict:
    """Point-wise mean and std over seeds (same thresholds in every curve)."""
    keys = ("accuracy", "speedup_layers", "speedup_flops", "layers_share")
    return {name: [{"threshold": pts[0]["threshold"], **{k: float(stat([p[k] for p in pts])) for k in keys}}
                   for pts in zip(*curves)]
            for name, stat in (("mean", np.mean), ("std", np.std))}


def format_table(summary: dict) -> str:
    """Markdown tables: each exit's accuracy per variant, then every variant against the baselines."""
    n = len(summary["seeds"])
    layers = summary["exit_layers"]
    lines = [f"Task `{summary['task']}`, model `{summary['model']}`, train size {summary['train_size']}, "
             f"{summary['epochs']:g} epochs, seeds {summary['seeds']} (test accuracy" + (", mean ± std)" if n > 1 else ")"),
             "", "Each exit's accuracy (every example forced to that exit), and the last exit against the plain "
             "full-depth model (the multi-model run's last member), in points:", "",
             "| method | " + " | ".join(f"layer {k}" for k in layers) + " | last exit vs plain |",
             "|---" * (len(layers) + 2) + "|"]
    for method, m in summary["methods"].items():
        cells = [_fmt([mu, sd], n) for mu, sd in zip(m["exit_accuracy_mean"], m["exit_accuracy_std"])]
        last = m["last_exit_vs_plain_points"]
        cells.append("—" if last is None else f"{last[0]:+.1f}" + (f" ± {last[1]:.1f}" if n > 1 else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Against the baselines: thresholds chosen on dev for each target speedup (share of layers run, "
              "a cascade's recomputation counted), test accuracy at them; static frontier = the multi-model "
              "members alone, linear in cost between depths; oracle = each example at its first right exit:", "",
              format_comparison({method: [{k: v if not isinstance(v, list) or n > 1 else [v[0], None]
                                           for k, v in row.items()} for row in m["comparison"]]
                                 for method, m in summary["methods"].items()})]
    selected = summary.get("selected_on_dev")
    if selected:
        gains = ", ".join(f"{v} {g:+.1f}" for v, g in selected["dev_worst_gain_points"].items())
        lines += ["", f"Selected on dev: **{selected['variant']}** ({selected['criterion']}). "
                      f"Worst dev gain over static per variant, points: {gains}."]
    return "\n".join(lines)
