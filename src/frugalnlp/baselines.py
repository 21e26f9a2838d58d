"""What every adaptive curve stands beside: the static frontier (the upper envelope of truncated models trained
alone or distilled: at each depth the better, joined linearly in cost between neighbouring depths), the same
with a class bias fitted on dev, the oracle (each example at its first right exit) and the learnable ceiling (a
router cross-fitted on the reported split itself); `compare` reads them all at each target speedup beside the
adaptive point chosen on dev."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from frugalnlp.curves import CurvePoint, SplitScores, accuracy_at_speedup, exit_scores, split_scores
from frugalnlp.dev_choice import choose_threshold
from frugalnlp.early_exit.ensemble import fit_class_bias
from frugalnlp.errors import FrugalError
from frugalnlp.run import load_run, load_run_config, verify_run


def best_per_depth(points: list[dict]) -> list[dict]:
    """The most accurate of ``points`` (static models) at each depth (``"layers"``, else the same
    ``"layers_share"``), in the order the depths first appear; first of equals."""
    best: dict = {}
    for p in points:
        key = p["layers"] if "layers" in p else round(p["layers_share"], 9)
        if key not in best or p["accuracy"] > best[key]["accuracy"]:
            best[key] = p
    return list(best.values())


def static_envelope(points: list[dict], speedup: float) -> tuple[float | None, list[dict]]:
    """The static frontier at ``speedup`` and the static models that make it: (accuracy, points used).

    ``points``: one ``{"layers_share", "accuracy"}`` per static model (``"layers"`` too where known: models of
    one depth are one cost, whatever their measured times). At each depth the better model counts (the upper
    envelope: trained alone or distilled); between two neighbouring measured depths the frontier is linear in
    cost (a random share of the inputs sent to each model achieves it), never across a measured depth; and as
    a budget it is never below a faster model. (None, []) when even the shallowest model is slower; the deepest
    model's accuracy beyond it.
    """
    pts = sorted(best_per_depth(points), key=lambda p: (p["layers_share"], -p["accuracy"]))
    cost = 1.0 / speedup
    if not pts or cost < pts[0]["layers_share"] - 1e-9:
        return None, []
    faster = max((p for p in pts if p["layers_share"] <= cost + 1e-9), key=lambda p: p["accuracy"])
    value, used = faster["accuracy"], [faster]
    for p0, p1 in zip(pts, pts[1:]):
        c0, c1 = p0["layers_share"], p1["layers_share"]
        if c0 + 1e-9 < cost < c1 - 1e-9:
            mixed = p0["accuracy"] + (p1["accuracy"] - p0["accuracy"]) * (cost - c0) / (c1 - c0)
            if mixed > value + 1e-12:
                value, used = mixed, [p0, p1]
    return value, used


def static_frontier(points: list[dict], speedup: float) -> float | None:
    """Accuracy of the static frontier at ``speedup`` (share of layers, or of time, 1 / speedup):
    `static_envelope`'s value."""
    return static_envelope(points, speedup)[0]


class Oracle:
    """Each example leaves at the first exit that is right: the bound for any policy on these exits.

    Under a budget of mean layers run, the oracle pays every example the first exit's cost, then
    buys correct answers cheapest first (an example no exit gets right leaves at the first exit). With
    equal value per answer that greedy choice is optimal, so no policy on these exits, whatever its
    decisions, is more accurate at the same share of layers.
    """

    def __init__(self, exit_logits: torch.Tensor, gold: np.ndarray, layers_to_exit: list[int], depth: int) -> None:
        correct = (exit_logits.argmax(-1) == torch.as_tensor(gold)[None]).numpy()  # [exits, n]
        cost = np.asarray(layers_to_exit, dtype=np.float64) / depth
        right = correct.any(0)
        first_right = correct.argmax(0)
        self.n = correct.shape[1]
        self.base = cost[0]
        self.extra = np.cumsum(np.sort(cost[first_right[right]] - cost[0]))  # cost of the k cheapest answers

    def accuracy(self, speedup: float) -> float | None:
        """Best accuracy at mean layers share 1 / speedup; None faster than the first exit."""
        budget = (1.0 / speedup - self.base) * self.n
        if budget < -1e-9:
            return None
        return float(np.searchsorted(self.extra, budget + 1e-9, side="right")) / self.n

    @property
    def best(self) -> float:
        """Accuracy with every example at its first right exit (any exit right counts)."""
        return len(self.extra) / self.n


def compare(test_curve: list[CurvePoint], dev_curve: list[CurvePoint], fixed: list[dict], static: list[dict] | None,
            oracle: Oracle, speedups: list[float],
            operating: Callable[[float], CurvePoint] | None = None, fixed_corrected: list[dict] | None = None,
            static_corrected: list[dict] | None = None,
            ceiling: Callable[[float], float | None] | None = None,
            cross_fitted: dict[float, float | None] | None = None) -> list[dict]:
    """Per target speedup: the adaptive curve at a threshold chosen on dev, beside the baselines.

    ``adaptive`` is the test accuracy at the threshold whose dev speedup reaches the target with the
    best dev accuracy; ``test_speedup`` is what it achieved on test, and the static frontier and oracle
    are read at that same cost. ``adaptive_best_on_test`` is the curve's own best point at the
    target (optimistic: chosen on test). ``gain_over_static`` is in accuracy points (x100) against the
    static frontier as trained, ``gain_over_corrected_static`` against the same models with a class bias
    fitted on dev (``static_corrected``; ``fixed_corrected`` are the fixed exits so corrected);
    ``gap_closed`` = (adaptive - static) / (oracle - static), the share of the way from the static
    frontier to the oracle that the curve covers; ``ceiling`` (speedup -> accuracy) is the learnable
    ceiling. Both curves hold the same thresholds in the same order. ``operating`` (target speedup -> test
    point) replaces the threshold chosen on the dev curve (e.g. per-exit thresholds). ``cross_fitted`` (on dev:
    target speedup -> `frugalnlp.dev_choice.cross_fitted_accuracy`) is ``adaptive_cross_fitted``, the accuracy
    the point's choice reaches on dev rows it was not tuned on, by which it competes with static models.
    """
    if operating is None:
        def operating(target: float) -> CurvePoint:
            return test_curve[dev_curve.index(choose_threshold(dev_curve, target_speedup=target))]

    def at_speedup(points: list[dict] | None, s: float) -> float | None:
        return next((f["accuracy"] for f in points or [] if abs(f["speedup_layers"] - s) < 1e-6), None)

    def points_gain(adaptive: float | None, frontier: float | None) -> float | None:
        return None if adaptive is None or frontier is None else 100 * (adaptive - frontier)

    rows = []
    for s in speedups:
        try:
            point = operating(s)
        except FrugalError:  # the dev curve never gets that fast
            point = None
        adaptive = None if point is None else point.accuracy
        at = s if point is None else point.speedup_layers
        frontier = static_frontier(static, at) if static else None
        corrected = static_frontier(static_corrected, at) if static_corrected else None
        bound = oracle.accuracy(at)
        gain = points_gain(adaptive, frontier)
        gap = None
        if gain is not None and bound is not None and bound - frontier > 1e-12:
            gap = (adaptive - frontier) / (bound - frontier)
        rows.append({"speedup": s, "threshold": None if point is None else point.threshold, "test_speedup": at,
                     "adaptive": adaptive, "adaptive_best_on_test": accuracy_at_speedup(test_curve, s),
                     "adaptive_cross_fitted": None if cross_fitted is None else cross_fitted.get(s),
                     "fixed_exit": at_speedup(fixed, s), "fixed_exit_corrected": at_speedup(fixed_corrected, s),
                     "static": frontier, "static_corrected": corrected, "oracle": bound,
                     "ceiling": None if ceiling is None else ceiling(at),
                     "gain_over_static": gain, "gain_over_corrected_static": points_gain(adaptive, corrected),
                     "gap_closed": gap})
    return rows


def table_speedups(exit_layers: list[int], base: tuple[float, ...] = (1.5, 2.0, 3.0)) -> list[float]:
    """1.5x, 2x, 3x and every earlier exit's own speedup, ascending."""
    depth = exit_layers[-1]
    return sorted({*base, *(depth / k for k in exit_layers[:-1])})


def oracle_speedups(exit_layers: list[int]) -> list[float]:
    """Speedups at which to draw the oracle: from 1x to the first exit's own, 40 steps in cost."""
    return (1.0 / np.linspace(1.0, exit_layers[0] / exit_layers[-1], 40)).tolist()


def learnable_ceiling(scored: SplitScores, thresholds: int = 101) -> list[CurvePoint]:
    """The learned router cross-fitted on ``scored`` itself (test): its curve, which no policy chosen on dev
    can be expected to beat; how much of the oracle a router on these features could reach. Reported only."""
    own = scored.subset()
    own.fit_router(cross_fitted=True)
    return [own.point("learned", t) for t in np.linspace(0.0, 1.0, thresholds).round(6).tolist()]


def corrected_logits(exit_logits: torch.Tensor, temperatures: list[float], bias: torch.Tensor) -> torch.Tensor:
    """Raw exit logits [exits, n, labels] -> calibrated log-probs plus a class bias per exit (`fit_class_bias`)."""
    return torch.stack([(exit_logits[e] / t).log_softmax(-1) + bias[e] for e, t in enumerate(temperatures)])


def _static_members(run: str, config: dict, depth: int) -> tuple[dict, list[int]]:
    """A static run's config and member depths, refused unless it is a static frontier for ``config``'s run
    (and its files are the ones its manifest lists: its metrics are read as the frontier)."""
    other = load_run_config(run)
    verify_run(run, other)
    for key in ("name", "labels", "sizes", "pair"):
        if other["task"].get(key) != config["task"].get(key):
            raise FrugalError(f"--static {run} was trained on another task ({other['task'].get('name')}, "
                              f"{key} differs); give runs of task {config['task'].get('name')}")
    if other["spec"]["model"] != config["spec"]["model"]:
        raise FrugalError(f"--static {run} truncates model {other['spec']['model']}, not {config['spec']['model']}: "
                          "layer shares would not compare")
    method = other["spec"]["method"]
    if method not in ("multi-model", "plain"):
        raise FrugalError(f"--static {run} is a {method} run; the static frontier needs separately trained "
                          "models: a multi-model run, or plain runs with --num-layers K")
    metrics = json.loads((Path(run) / "metrics.json").read_text())["dev"]
    layers = [e["layer"] for e in metrics["exits"]] if method == "multi-model" else [other["spec"]["exit_layers"][-1]]
    for k in layers:
        if k > depth:
            raise FrugalError(f"--static {run} has a {k}-layer model, deeper than this run ({depth})")
    return other, layers


def is_distilled(config: dict) -> bool:
    """Whether a run (its ``config.json``) learnt from a teacher's logits."""
    return bool(config["spec"].get("teacher"))


def _frontier_points(by_depth: dict[int, list[dict]], depth: int) -> list[dict]:
    """The upper envelope's points: per depth, the most accurate of its static models (``{"accuracy", "macro_f1",
    "run", "distilled"}`` each), with every model of that depth under ``models``."""
    points = []
    for k, models in sorted(by_depth.items()):
        best = max(models, key=lambda m: m["accuracy"])  # first of equals: the order the runs were given
        points.append({"layers": k, "layers_share": k / depth, "speedup_layers": depth / k,
                       "accuracy": best["accuracy"], "macro_f1": best["macro_f1"], "run": best["run"],
                       "distilled": best["distilled"], "models": models})
    return points


def static_points(runs: list[str], split: str, config: dict, depth: int) -> list[dict]:
    """The static frontier's points on ``split``: the upper envelope of separately trained truncated models.

    ``runs`` are multi-model runs (every member alone) or plain runs (``--num-layers K``, trained on labels or
    distilled from a teacher) of the same task and model as ``config`` (the evaluated run's config.json). At each
    depth the model most accurate on ``split`` itself stands for it (so the frontier is as strong as any of
    them on the split it is read on).
    """
    by_depth: dict[int, list[dict]] = {}
    for run in runs:
        other, layers = _static_members(run, config, depth)
        metrics = json.loads((Path(run) / "metrics.json").read_text())[split]
        members = ([(e["accuracy"], e["macro_f1"]) for e in metrics["exits"]] if other["spec"]["method"] == "multi-model"
                   else [(metrics["accuracy"], metrics["macro_f1"])])
        for k, (accuracy, f1) in zip(layers, members):
            by_depth.setdefault(k, []).append({"accuracy": accuracy, "macro_f1": f1, "run": str(run),
                                               "distilled": is_distilled(other)})
    return _frontier_points(by_depth, depth)


def corrected_static_points(runs: list[str], splits: list[str], config: dict, depth: int) -> dict[str, list[dict]]:
    """`static_points` on each of ``splits`` with each static model given a class bias fitted on its dev split
    (`fit_class_bias`): the baseline a policy that fits more than temperatures on dev labels is fairly
    compared with. Returns split -> points."""
    by_split: dict[str, dict[int, list[dict]]] = {split: {} for split in splits}
    for run in runs:
        other, layers = _static_members(run, config, depth)
        trained = load_run(run)
        dev = split_scores(trained, "dev")
        temperatures = trained.model.temperatures
        bias = fit_class_bias(dev.exit_logits, temperatures, dev.gold)
        for split, by_depth in by_split.items():
            scored = dev if split == "dev" else split_scores(trained, split)
            corrected = corrected_logits(scored.exit_logits, temperatures, bias)
            for k, e in zip(layers, exit_scores(trained.model, corrected, scored.gold)):
                by_depth.setdefault(k, []).append({"accuracy": e["accuracy"], "macro_f1": e["macro_f1"],
                                                   "run": str(run), "distilled": is_distilled(other)})
    return {split: _frontier_points(by_depth, depth) for split, by_depth in by_split.items()}
