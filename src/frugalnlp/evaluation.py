"""Speed-accuracy evaluation: every exit runs once per example, thresholds are replayed on cached logits.

A decision depends only on the example's own logits, so replaying a policy over the cached
[exits, n, labels] logits gives exactly the decisions `predict` makes (a test holds both to it),
and a 21-point curve costs one pass over the data.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from frugalnlp.assets import weights_sha256
from frugalnlp.certify import certify_threshold, check_risk, split_dev
from frugalnlp.cost import FlopCost
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.ensemble import ExitEnsemble, cross_fit_ensemble, fit_class_bias, fit_exit_ensemble
from frugalnlp.early_exit.policies import ExitPolicy, check_policy, exit_step, heads_run, make_policy
from frugalnlp.early_exit.router import ExitRouter, cross_fit, fit_exit_router
from frugalnlp.encoding import EncodedSplit, batches, encode_split
from frugalnlp.errors import FrugalError
from frugalnlp.report import curve_csv, plot_curves
from frugalnlp.run import TrainedRun, load_run, load_run_config, load_spec_task
from frugalnlp.rundir import RunDir, write_bytes, write_json


@torch.inference_mode()
def collect_exit_logits(model: EarlyExitModel | Cascade, data: EncodedSplit, tokenizer: PreTrainedTokenizerBase,
                        batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Raw (uncalibrated) logits of every exit for every example: [exits, n, labels]."""
    from tqdm.auto import tqdm

    model.eval()
    device = model.device
    out = torch.empty(model.num_exits, len(data), model.config.num_labels)
    total = (len(data) + batch_size - 1) // batch_size
    for index, batch in tqdm(batches(data, tokenizer, batch_size, device), total=total, disable=not progress,
                             desc="exit logits", leave=False):
        logits = model.exit_logits(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        out[:, torch.as_tensor(index)] = torch.stack(logits).float().cpu()
    return out


def replay(exit_logits: torch.Tensor, temperatures: list[float], policy: ExitPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each example leaves and what it answers: (exit_index [n], labels [n]).

    Every exit decides through `exit_step`, as in `predict`; the last exit always answers.
    """
    num_exits, n, _ = exit_logits.shape
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    state = policy.start(n, exit_logits.device)
    for e in range(num_exits):
        leave, answers, state = exit_step(policy, e, num_exits, exit_logits[e], temperatures[e], state)
        leaving = leave & running
        exit_index[leaving] = e
        labels[leaving] = answers.argmax(-1)[leaving]
        running &= ~leave
    return exit_index, labels


def scores(predicted: np.ndarray | torch.Tensor, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over ``num_labels`` classes (a class never seen nor predicted scores F1 0, as
    sklearn's ``zero_division=0``); numpy only, since a curve scores hundreds of thresholds."""
    predicted, gold = np.asarray(predicted, dtype=np.int64), np.asarray(gold, dtype=np.int64)
    confusion = np.bincount(gold * num_labels + predicted, minlength=num_labels * num_labels).reshape(num_labels, -1)
    tp = np.diag(confusion).astype(np.float64)
    denominator = confusion.sum(0) + confusion.sum(1)  # 2 TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"accuracy": float(tp.sum() / len(gold)), "macro_f1": float(f1.mean())}


@dataclass(frozen=True)
class CurvePoint:
    """One point of a split's speed-accuracy curve: a policy at ``threshold`` (one per exit but the last
    for per-exit thresholds), its scores, the share of layers run (the paper's speed measure: mean layers
    run, a cascade's recomputation included, over the full depth), the FLOPs share (heads and per-example
    lengths counted) and how many examples left at each exit."""

    threshold: float | list[float]
    accuracy: float
    macro_f1: float
    layers_share: float
    flops_share: float
    exit_histogram: list[int]

    @property
    def speedup_layers(self) -> float:
        return 1.0 / self.layers_share

    @property
    def speedup_flops(self) -> float:
        return 1.0 / self.flops_share

    def to_dict(self) -> dict:
        """The JSON record (speedups included)."""
        return {"threshold": self.threshold, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "layers_share": self.layers_share, "speedup_layers": self.speedup_layers,
                "flops_share": self.flops_share, "speedup_flops": self.speedup_flops,
                "exit_histogram": self.exit_histogram}

    @classmethod
    def from_dict(cls, record: dict) -> CurvePoint:
        """A point read back from its JSON record (curve.json's ``points``)."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class DevChoice:
    """The dev point chosen to operate at (`choose_operating_point`) and the ``policy`` to deploy it with (the
    one asked for, or ``per-exit`` when one of the model's fixed exits is better on dev: its thresholds send
    every row to that exit). ``certified`` is None when the choice is not certified, else whether
    Learn-then-Test certified it (its record in ``certificate``); ``router`` is the learned policy's router
    to deploy with it, ``ensemble`` the exit ensemble (None: dev's, if any; certified: the one fitted on dev's
    fit part alone)."""

    point: CurvePoint
    policy: str
    certified: bool | None = None
    certificate: dict | None = None
    router: ExitRouter | None = None
    ensemble: ExitEnsemble | None = None


def exit_scores(model: EarlyExitModel | Cascade, exit_logits: torch.Tensor, gold: np.ndarray) -> list[dict]:
    """Each exit's own scores when every example is forced to it (the *fixed exits* baseline).

    A fixed exit runs ``layer`` of the full depth (a cascade member runs alone: no earlier models).
    """
    depth = model.exit_layers[-1]
    return [{"exit": e, "layer": layer, "layers_share": layer / depth, "speedup_layers": depth / layer,
             **scores(exit_logits[e].argmax(-1), gold, model.config.num_labels)}
            for e, layer in enumerate(model.exit_layers)]


class SplitScores:
    """A split's cached exit logits, ready to score any policy and threshold(s) by replay; with an
    ``ensemble`` (`ExitEnsemble`, fitted on dev) every policy decides on its logits. The learned policy
    scores each row with its ``routes`` entry: one router for every row (`use_router`), or, cross-fitted
    (`fit_router`), each row by the router fitted without its fold."""

    def __init__(self, model: EarlyExitModel | Cascade, exit_logits: torch.Tensor, gold: np.ndarray,
                 lengths: np.ndarray, ensemble: ExitEnsemble | None = None) -> None:
        self.model, self.exit_logits, self.gold, self.ensemble = model, exit_logits, gold, ensemble
        self.lengths = lengths
        self.cost = FlopCost(model)
        self._flops: dict[tuple[bool, ...], np.ndarray] = {}  # FLOPs to each exit [exits, n] by the heads run
        self.full_flops = self.cost.full(lengths).sum()
        self.depth = model.config.exit_layers[-1]
        self.router: ExitRouter | None = None  # the one to deploy
        self.routes: list[tuple[ExitRouter, np.ndarray]] = []
        # dev's held-out ensembled logits [exits, n, labels] (`cross_fit_ensemble`): what the curve decides on
        self.held_out: torch.Tensor | None = None

    def decision_logits(self) -> torch.Tensor:
        """The logits every policy decides on: temperature-scaled, ensembled if any (held out, if cross-fitted)
        [exits, n, labels]."""
        if self.held_out is not None:
            return self.held_out
        if self.ensemble is not None:
            return self.ensemble.apply(self.exit_logits, self.model.temperatures)
        return torch.stack([self.exit_logits[e] / t for e, t in enumerate(self.model.temperatures)])

    def fit_router(self, cross_fitted: bool = True, rows: np.ndarray | None = None) -> ExitRouter:
        """Fit the learned policy's router on ``rows`` (default all) of this split and deploy it; with
        ``cross_fitted`` each row is then scored by a router fitted on the other folds."""
        logits, gold = self.decision_logits(), np.asarray(self.gold)
        rows = np.arange(len(gold)) if rows is None else rows
        router = fit_exit_router(logits[:, torch.as_tensor(rows)], gold[rows])
        self.use_router(router)
        if cross_fitted:
            self.routes = [(r, rows[held]) for r, held in cross_fit(logits[:, torch.as_tensor(rows)], gold[rows])]
        return router

    def use_router(self, router: ExitRouter | None) -> None:
        """Score every row with ``router`` (fitted elsewhere)."""
        self.router = router
        self.routes = [] if router is None else [(router, np.arange(len(self.gold)))]

    def decide(self, policy: str, threshold: float | list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's exit index and answer [n] under ``policy`` at ``threshold``, by `replay`."""
        logits, temperatures, ensemble = self.exit_logits, self.model.temperatures, self.ensemble
        if self.held_out is not None:  # the policy alone on the held-out ensembled logits: what the ensemble does
            logits, temperatures, ensemble = self.held_out, [1.0] * self.model.num_exits, None

        def policy_for(router: ExitRouter | None = None) -> ExitPolicy:
            return make_policy(policy, threshold, self.model.num_exits, ensemble,
                               (router or self.router) if policy == "learned" else None)

        if policy != "learned":
            return replay(logits, temperatures, policy_for())
        if not self.routes:
            raise FrugalError("the learned policy needs a router: fit one on dev first")
        n = len(self.gold)
        exit_index, labels = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
        for router, rows in self.routes:
            rows = torch.as_tensor(rows)
            exit_index[rows], labels[rows] = replay(logits[:, rows], temperatures, policy_for(router))
        return exit_index, labels

    def layers_to_exit(self, policy: str, threshold: float | list[float]) -> list[int]:
        """Layers run by a row leaving at each exit under ``policy`` at ``threshold`` (a cascade skips the
        models the policy never uses)."""
        return self.model.layers_to_exit(self._heads(policy, threshold))

    def _heads(self, policy: str, threshold: float | list[float]) -> tuple[bool, ...]:
        # the learned policy uses every early exit once any row may leave, whichever router scores it
        name = "confidence" if policy == "learned" else policy
        return tuple(heads_run(make_policy(name, threshold, self.model.num_exits, self.ensemble), self.model.num_exits))

    def _flops_to_exit(self, heads: tuple[bool, ...]) -> np.ndarray:
        if heads not in self._flops:
            self._flops[heads] = self.cost.to_exit(self.lengths, heads)  # [exits, n]
        return self._flops[heads]

    def subset(self, rows: np.ndarray | None = None) -> SplitScores:
        """These scores for ``rows`` only (default: all, a copy to give another router); no router."""
        rows = np.arange(len(self.gold)) if rows is None else np.asarray(rows)
        index = torch.as_tensor(rows)
        scores = SplitScores(self.model, self.exit_logits[:, index], np.asarray(self.gold)[rows],
                             np.asarray(self.lengths)[rows], self.ensemble)
        scores.held_out = None if self.held_out is None else self.held_out[:, index]
        return scores

    def point(self, policy: str, threshold: float | list[float]) -> CurvePoint:
        """The curve point of ``policy`` at ``threshold`` on this split."""
        model = self.model
        exit_index, labels = self.decide(policy, threshold)
        heads = self._heads(policy, threshold)
        layers = torch.tensor(model.layers_to_exit(heads), dtype=torch.float64)
        flops = self._flops_to_exit(heads)
        return CurvePoint(
            threshold=round(float(threshold), 6) if isinstance(threshold, (int, float))
            else [round(float(t), 6) for t in threshold],
            **scores(labels, self.gold, model.config.num_labels),
            layers_share=float(layers[exit_index].mean()) / self.depth,
            flops_share=float(flops[exit_index.numpy(), np.arange(len(self.gold))].sum() / self.full_flops),
            exit_histogram=torch.bincount(exit_index, minlength=model.num_exits).tolist())


def speed_accuracy_curve(model: EarlyExitModel | Cascade, exit_logits: torch.Tensor, gold: np.ndarray,
                         lengths: np.ndarray, thresholds: list[float], policy: str = "confidence") -> list[CurvePoint]:
    """One `CurvePoint` per threshold, from raw exit logits [exits, n, labels], gold labels [n] and token
    lengths [n]."""
    split = SplitScores(model, exit_logits, gold, lengths)
    return [split.point(policy, threshold) for threshold in thresholds]


def search_per_exit(dev: SplitScores, dev_curve: list[CurvePoint], target_speedup: float | None = None,
                    max_drop: float | None = None, grid: int = 101, passes: int = 2) -> CurvePoint:
    """Per-exit thresholds chosen on dev (``dev_curve``: the confidence curve of the same split) by coordinate
    descent from the best single threshold: one exit's threshold at a time over ``grid`` values, ``passes``
    times. With ``target_speedup``: the best dev accuracy at that speedup or more; with ``max_drop``: the
    fastest point within that accuracy drop of the last exit. Returns the dev point of the thresholds found."""
    start = choose_threshold(dev_curve, target_speedup=target_speedup, max_drop=max_drop).threshold
    reference = last_exit_accuracy(dev_curve)

    def value(point: CurvePoint) -> tuple[float, float] | None:
        if target_speedup is not None:
            ok = point.speedup_layers >= target_speedup - 1e-9
            return (point.accuracy, point.speedup_layers) if ok else None
        ok = point.accuracy >= reference - max_drop - 1e-12
        return (point.speedup_layers, point.accuracy) if ok else None

    thresholds = [start] * (dev.model.num_exits - 1)
    best = dev.point("per-exit", thresholds)
    for _ in range(passes):
        for k in range(len(thresholds)):
            for t in np.linspace(0.0, 1.0, grid).round(6).tolist():
                candidate = dev.point("per-exit", thresholds[:k] + [t] + thresholds[k + 1:])
                score = value(candidate)
                if score is not None and score > value(best):
                    best, thresholds = candidate, list(candidate.threshold)
    return best


def accuracy_at_speedup(curve: list[CurvePoint], speedup: float) -> float | None:
    """Best accuracy among curve points at least ``speedup`` times faster in layers (None if none is)."""
    reachable = [p.accuracy for p in curve if p.speedup_layers >= speedup - 1e-9]
    return max(reachable) if reachable else None


def last_exit_accuracy(curve: list[CurvePoint]) -> float:
    """The curve's accuracy at threshold 1, where every example runs to the last exit."""
    return next(p.accuracy for p in curve if p.threshold >= 1.0)


# ----------------------------------------------------------------------------------------------- baselines

def static_frontier(points: list[dict], speedup: float) -> float | None:
    """Accuracy of separately trained truncated models at ``speedup`` (share of layers 1 / speedup).

    ``points``: one ``{"layers_share", "accuracy"}`` per static model. Between two neighbouring depths
    the frontier is linear in cost: sending a random share of the inputs to each model achieves it.
    None when even the shallowest model is slower; the deepest model's accuracy beyond it.
    """
    pts = sorted((p["layers_share"], p["accuracy"]) for p in points)
    cost = 1.0 / speedup
    if not pts or cost < pts[0][0] - 1e-9:
        return None
    for (c0, a0), (c1, a1) in zip(pts, pts[1:]):
        if c0 - 1e-9 <= cost <= c1 + 1e-9:
            return a0 + (a1 - a0) * (min(max(cost, c0), c1) - c0) / (c1 - c0)
    return pts[-1][1]


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
            ceiling: Callable[[float], float | None] | None = None) -> list[dict]:
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
    point) replaces the threshold chosen on the dev curve (e.g. per-exit thresholds).
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


# ----------------------------------------------------------------------------------------------- operating points

OPERATING_GRID = np.linspace(0.0, 1.0, 401).round(6).tolist()  # thresholds tried when choosing one on dev


def check_operating_target(target_speedup: float | None, max_drop: float | None, risk: float | None = None) -> None:
    """FrugalError unless exactly one of the two is given and in range, and ``risk`` (certification, with
    ``max_drop`` only) is in (0, 1); checked before any dev logits."""
    check_risk(risk, max_drop)
    if (target_speedup is None) == (max_drop is None):
        raise FrugalError("give exactly one of --target-speedup and --max-drop")
    if target_speedup is not None and not (isinstance(target_speedup, (int, float)) and 1.0 <= target_speedup < math.inf):
        raise FrugalError(f"--target-speedup {target_speedup!r} must be at least 1 (e.g. 2 for half the layers)")
    if max_drop is not None and not (isinstance(max_drop, (int, float)) and 0.0 <= max_drop <= 1.0):
        raise FrugalError(f"--max-drop {max_drop!r} is outside [0, 1] (an accuracy drop, e.g. 0.01)")


def choose_threshold(dev_curve: list[CurvePoint], target_speedup: float | None = None,
                     max_drop: float | None = None, reference: float | None = None) -> CurvePoint:
    """The dev curve point to operate at: best dev accuracy at ``target_speedup`` or more, or the fastest
    point whose dev accuracy is at most ``max_drop`` below the last exit's (``reference``; default the
    curve's own at threshold 1). On a tie the earlier point wins.

    Returns that point (its ``threshold`` is what to use on test or in production).
    """
    check_operating_target(target_speedup, max_drop)
    if target_speedup is not None:
        reachable = [p for p in dev_curve if p.speedup_layers >= target_speedup - 1e-9]
        if not reachable:
            fastest = max(p.speedup_layers for p in dev_curve)
            raise FrugalError(f"no threshold reaches a {target_speedup:g}x speedup on dev (at most {fastest:.2f}x)")
        return max(reachable, key=lambda p: (p.accuracy, p.speedup_layers))
    reference = last_exit_accuracy(dev_curve) if reference is None else reference
    allowed = [p for p in dev_curve if p.accuracy >= reference - max_drop - 1e-12]
    return max(allowed, key=lambda p: (p.speedup_layers, p.accuracy))


# ----------------------------------------------------------------------------------------------- evaluating a run

def evaluation_dir(run: str | Path, split: str = "test", policy: str = "confidence") -> Path:
    """Where `evaluate_run` writes by default: ``RUN/eval-SPLIT-POLICY``."""
    return Path(run) / f"eval-{split}-{policy}"


def evaluate_run(run: str | Path, split: str = "test", thresholds: int = 21, policy: str = "confidence",
                 output: str | Path | None = None, overwrite: bool = False, static: list[str] | None = None,
                 target_speedup: float | None = None, max_drop: float | None = None,
                 risk: float | None = None, ensemble: bool = False) -> tuple[Path, dict]:
    """Curve of a trained run on ``split`` beside its baselines; writes curve.json, curve.csv, exits.json, curve.png.

    Baselines: the fixed exits, the static frontier (``static``: multi-model or ``plain --num-layers``
    runs; a multi-model run's own members by default), both also with a class bias fitted on dev (the
    *dev-corrected* frontier: what an ensemble fitted on dev is fairly measured against), the oracle and
    the learnable ceiling (the learned router cross-fitted on ``split`` itself: reported, never used to
    choose). ``target_speedup`` or ``max_drop`` choose a threshold on the dev curve and report ``split``
    at it (``risk``: certified by Learn-then-Test, with the drop ``split`` realises). With ``ensemble`` an
    `ExitEnsemble` is fitted on dev and every policy decides on its logits (the ensembled exits'
    fixed-exit scores are reported too). The learned policy's dev curve is cross-fitted (each dev example
    scored by a router that did not see it); ``split`` is scored by the router fitted on all of dev.
    Returns the output directory (default ``RUN/eval-SPLIT-POLICY[-ensemble]``) and the curve.json content.
    """
    if thresholds < 2:
        raise FrugalError("--thresholds must be at least 2 (evenly spaced in [0, 1])")
    check_policy(policy)  # an unknown policy fails now, not after the forward passes
    if target_speedup is not None or max_drop is not None or risk is not None:
        check_operating_target(target_speedup, max_drop, risk)
    out = RunDir(output or evaluation_dir(run, split, policy + ("-ensemble" if ensemble else "")), overwrite=overwrite)
    trained = load_run(run)
    spec, model = trained.spec, trained.model
    depth = model.exit_layers[-1]
    static_runs = static or ([str(run)] if spec.method == "multi-model" else None)
    # Thresholds are chosen on dev and read on the reported split, on one fine grid.
    grid = np.linspace(0.0, 1.0, thresholds).round(6).tolist()
    fine = sorted({*OPERATING_GRID, *grid})
    dev = dev_scores(trained, ensemble, policy)
    reported_split = split_scores(trained, split, dev.ensemble)  # an ensemble fitted on dev alone
    reported_split.use_router(dev.router)
    fitted = dev.ensemble
    dev_curve = [dev.point(policy, threshold) for threshold in fine]
    full_curve = [reported_split.point(policy, threshold) for threshold in fine]
    dev_logits, dev_gold, logits, gold = dev.exit_logits, dev.gold, reported_split.exit_logits, reported_split.gold
    shown = set(grid)
    curve = [p for p in full_curve if p.threshold in shown]
    fixed = exit_scores(model, logits, gold)
    bias = fit_class_bias(dev_logits, model.temperatures, dev_gold)
    operating = None
    if target_speedup is not None or max_drop is not None:
        operating = operating_record(dev, dev_curve, reported_split, split, policy, target_speedup, max_drop, risk)
    # over the exits the policy decides on: an ensemble's mixed exits answer differently from the raw ones
    oracle = Oracle(reported_split.decision_logits(), gold, model.layers_to_exit(), depth)
    ceiling_curve = learnable_ceiling(reported_split)

    def per_exit(scored: SplitScores) -> Callable[[float], CurvePoint] | None:
        """Per-exit thresholds searched on dev for each target speedup, read on ``scored`` (other policies: None)."""
        if policy != "per-exit":
            return None
        return lambda target: scored.point(policy, searched(target))

    @functools.lru_cache(maxsize=None)
    def searched(target: float) -> list[float]:  # one search per target serves the dev and the test table
        return search_per_exit(dev, dev_curve, target_speedup=target).threshold

    # each static model's dev class bias is fitted once, for both splits
    static_corrected = (corrected_static_points(static_runs, ["dev", split], trained.config, depth)
                        if static_runs else {})

    def baselines(on: str, scored: SplitScores) -> dict:
        """Fixed exits and static frontier on ``on``, as trained and with a class bias fitted on dev."""
        return {"fixed_corrected": exit_scores(model, corrected_logits(scored.exit_logits, model.temperatures, bias),
                                               scored.gold),
                "static": static_points(static_runs, on, trained.config, depth) if static_runs else None,
                "static_corrected": static_corrected.get(on)}

    speedups = table_speedups(model.exit_layers)
    test_base, dev_base = baselines(split, reported_split), baselines("dev", dev)
    result = {"run": str(run), "split": split, "policy": policy, "method": spec.method, "examples": len(gold),
              "points": [p.to_dict() for p in curve],
              "baselines": {"fixed_exits": fixed, "fixed_exits_corrected": test_base["fixed_corrected"],
                            "static": test_base["static"], "static_corrected": test_base["static_corrected"],
                            "oracle_best": oracle.best,
                            "oracle": [{"speedup_layers": s, "accuracy": oracle.accuracy(s)}
                                       for s in oracle_speedups(model.exit_layers)],
                            "ceiling": [{"speedup_layers": s, "accuracy": accuracy_at_speedup(ceiling_curve, s)}
                                        for s in oracle_speedups(model.exit_layers)]},
              "comparison": compare(full_curve, dev_curve, fixed, test_base["static"], oracle, speedups,
                                    per_exit(reported_split), test_base["fixed_corrected"],
                                    test_base["static_corrected"],
                                    lambda s: accuracy_at_speedup(ceiling_curve, s)),
              # The same on dev, where recipes may be compared and chosen without touching test.
              "dev_comparison": compare(dev_curve, dev_curve, exit_scores(model, dev_logits, dev_gold), dev_base["static"],
                                        Oracle(dev.decision_logits(), dev_gold, model.layers_to_exit(), depth), speedups,
                                        per_exit(dev), dev_base["fixed_corrected"], dev_base["static_corrected"]),
              "operating_point": operating,
              "ensemble": None if fitted is None else {
                  "maps": fitted.maps.tolist(), "bias": fitted.bias.tolist(), "forms": fitted.forms,
                  "fixed_exits": exit_scores(model, fitted.apply(logits, model.temperatures), gold),
                  "dev_fixed_exits": exit_scores(model, fitted.apply(dev_logits, model.temperatures), dev_gold)}}
    out.open()
    write_json(out.path / "curve.json", result)
    write_bytes(out.path / "curve.csv", curve_csv(result["points"]).encode())
    write_json(out.path / "exits.json", fixed)
    plot_curves({spec.method: result["points"]}, out.path / "curve.png", title=f"{spec.task} ({split})",
                baselines=result["baselines"])
    return out.commit(), result


def operating_record(dev: SplitScores, dev_curve: list[CurvePoint], reported: SplitScores, split: str, policy: str,
                     target_speedup: float | None = None, max_drop: float | None = None,
                     risk: float | None = None) -> dict:
    """The operating point chosen on dev (`choose_operating_point`; ``dev_curve``: ``policy`` on ``dev``) and what
    it gives on ``reported``: the ``operating_point`` record of curve.json, with the drop ``split`` realises
    against the last exit (as the policy answers there: an ensemble's mix, the raw exit otherwise), the
    reference of ``--max-drop`` and of its certificate."""
    chosen = choose_operating_point(dev_curve, dev, target_speedup, max_drop, policy, risk)
    read = reported
    if chosen.ensemble is not None or (chosen.router is not None and chosen.router is not dev.router):
        read = reported.subset()  # certified: read with what was fitted on dev's fit part
        read.ensemble = chosen.ensemble or reported.ensemble
        read.use_router(chosen.router)
    point = read.point(chosen.policy, chosen.point.threshold)
    last = read.point("confidence", 1.0).accuracy  # every row at the last exit, ensembled if the policy is
    return {"chosen_on": "dev", "policy": chosen.policy, "target_speedup": target_speedup, "max_drop": max_drop,
            "risk": risk, "certified": chosen.certified, "certificate": chosen.certificate,
            "threshold": chosen.point.threshold, "dev": chosen.point.to_dict(), split: point.to_dict(),
            f"{split}_drop": last - point.accuracy}


def certified_point(run: str | Path, policy: str, ensemble: bool, max_drop: float, risk: float,
                    split: str = "test") -> dict:
    """The run's Learn-then-Test point for ``policy`` (on an exit ensemble fitted on dev, with ``ensemble``) at
    ``max_drop`` and ``risk``, read on ``split``: `operating_record` without the rest of `evaluate_run`."""
    check_operating_target(None, max_drop, risk)
    trained = load_run(run)
    dev = dev_scores(trained, ensemble, policy)
    dev_curve = [dev.point(policy, threshold) for threshold in OPERATING_GRID]
    return operating_record(dev, dev_curve, split_scores(trained, split, dev.ensemble), split, policy, None, max_drop,
                            risk)


def learnable_ceiling(scored: SplitScores, thresholds: int = 101) -> list[CurvePoint]:
    """The learned router cross-fitted on ``scored`` itself (test): its curve, which no policy chosen on dev
    can be expected to beat; how much of the oracle a router on these features could reach. Reported only."""
    own = scored.subset()
    own.fit_router(cross_fitted=True)
    return [own.point("learned", t) for t in np.linspace(0.0, 1.0, thresholds).round(6).tolist()]


# Exit logits by (run, weights' sha256, split), and exit ensembles fitted on dev by (run, weights' sha256):
# a demo scores the same runs for many policies, certificates and as baselines.
_LOGITS: dict[tuple[str, str | None, str], tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
_ENSEMBLES: dict[tuple[str, str | None, tuple[float, ...]], tuple[ExitEnsemble, torch.Tensor]] = {}


def _run_key(trained: TrainedRun) -> tuple[str, str | None]:
    return str(trained.path.resolve()), weights_sha256(trained.path / "model", recursive=True)


def split_scores(trained: TrainedRun, split: str, ensemble: ExitEnsemble | None = None) -> SplitScores:
    """A finished run's cached scores on one split of its task (raw exit logits [exits, n, labels], gold [n])."""
    spec, model, tokenizer = trained.spec, trained.model, trained.tokenizer
    key = (*_run_key(trained), split)
    if key not in _LOGITS:
        task = load_spec_task(spec)
        data = encode_split(task.split(split), tokenizer, spec.max_length)
        logits = collect_exit_logits(model, data, tokenizer, spec.eval_batch_size, progress=True)
        _LOGITS[key] = (logits, task.split(split).labels, data.lengths())
    logits, gold, lengths = _LOGITS[key]
    return SplitScores(model, logits, gold, lengths, ensemble)


def dev_scores(trained: TrainedRun, ensemble: bool | ExitEnsemble | None = None, policy: str = "confidence",
               router: ExitRouter | None = None) -> SplitScores:
    """The run's dev scores; ``ensemble=True`` fits an `ExitEnsemble` on them (dev alone, never test), an
    `ExitEnsemble` is used as given. For the learned policy the given ``router`` is used, or one is fitted on
    dev and dev is scored cross-fitted."""
    dev = split_scores(trained, "dev")
    if ensemble is True:
        key = (*_run_key(trained), tuple(trained.model.temperatures))
        if key not in _ENSEMBLES:
            fitted = fit_exit_ensemble(dev.exit_logits, trained.model.temperatures, dev.gold)
            _ENSEMBLES[key] = fitted, cross_fit_ensemble(dev.exit_logits, trained.model.temperatures, dev.gold,
                                                         fitted)
        ensemble, dev.held_out = _ENSEMBLES[key]
    dev.ensemble = ensemble or None
    if router is not None:
        dev.use_router(router)
    elif policy == "learned":
        dev.fit_router(cross_fitted=True)
    return dev


def operating_threshold(dev: SplitScores, target_speedup: float | None = None, max_drop: float | None = None,
                        policy: str = "confidence", risk: float | None = None) -> DevChoice:
    """The dev point to predict with, on `OPERATING_GRID`: see `choose_operating_point`."""
    curve = [dev.point(policy, threshold) for threshold in OPERATING_GRID]
    return choose_operating_point(curve, dev, target_speedup, max_drop, policy, risk)


def choose_operating_point(dev_curve: list[CurvePoint], dev: SplitScores, target_speedup: float | None,
                           max_drop: float | None, policy: str, risk: float | None) -> DevChoice:
    """The dev point to operate at: `choose_threshold`'s on the dev curve; per-exit thresholds found by
    `search_per_exit` (``policy="per-exit"``); or, with ``risk``, the threshold that Learn-then-Test
    certifies (`frugalnlp.certify`). For the learned policy the choice's ``router`` is the router to
    deploy: dev's, or with ``risk`` one fitted on the fit part alone; with ``risk`` an exit ensemble is
    refitted on the fit part alone too (the choice's ``ensemble``), so the calibration part stays unseen.
    With ``risk`` and per-exit, the candidates are the uniform thresholds and per-exit thresholds searched on
    the fit part at a ladder of target speedups. Uncertified, a fixed exit of the model that beats the
    policy's point on dev is deployed instead (`_unless_fixed_exit`)."""
    if risk is not None:
        fit, _ = split_dev(len(dev.gold))
        candidates = [p.threshold for p in dev_curve]
        # Everything fitted on labels (the exit ensemble, its forms, the router) is fitted on the fit part alone,
        # so the calibration part is unseen, as the guarantee requires.
        scored = dev.subset()
        if dev.ensemble is not None:
            rows = torch.as_tensor(fit)
            scored.held_out = None
            scored.ensemble = fit_exit_ensemble(dev.exit_logits[:, rows], dev.model.temperatures,
                                               np.asarray(dev.gold)[fit])
        if policy == "learned":
            scored.fit_router(cross_fitted=False, rows=fit)
        if policy == "per-exit":
            part = scored.subset(fit)
            curve = [part.point("confidence", t) for t in OPERATING_GRID[::4]]
            fastest = max(p.speedup_layers for p in curve)
            ladder = np.linspace(1.0, fastest, 12)[1:]
            candidates = ([[t] * (dev.model.num_exits - 1) for t in candidates]
                          + [search_per_exit(part, curve, target_speedup=s, grid=51).threshold for s in ladder])
        model = dev.model
        certificate = certify_threshold(dev.exit_logits, dev.gold, model.temperatures,
                                        lambda threshold: scored.layers_to_exit(policy, threshold), max_drop,
                                        risk, policy=policy, candidates=candidates,
                                        decide=lambda threshold: scored.decide(policy, threshold))
        return DevChoice(scored.point(policy, certificate.threshold), policy, certificate.certified,
                         certificate.to_dict(), scored.router, scored.ensemble)
    if policy == "per-exit":
        chosen = DevChoice(search_per_exit(dev, dev_curve, target_speedup, max_drop), policy)
    else:
        chosen = DevChoice(choose_threshold(dev_curve, target_speedup=target_speedup, max_drop=max_drop), policy,
                           router=dev.router)
    return _unless_fixed_exit(chosen, dev, last_exit_accuracy(dev_curve), target_speedup, max_drop)


def fixed_exit_thresholds(num_exits: int, exit_index: int) -> list[float]:
    """Per-exit thresholds that send every row to early exit ``exit_index``: 1 before it (never looked at, so
    not even computed), 0 at it."""
    return [1.0] * exit_index + [0.0] + [1.0] * (num_exits - 2 - exit_index)


def _unless_fixed_exit(chosen: DevChoice, dev: SplitScores, last_accuracy: float, target_speedup: float | None,
                       max_drop: float | None) -> DevChoice:
    """``chosen``, or the model's fixed exit that beats it on dev: at ``target_speedup`` or faster with a
    better dev accuracy, or within ``max_drop`` of ``last_accuracy`` (the last exit's, as the policy answers
    there) and faster. So no deployed point is below its own model's fixed exit at the same cost on dev."""
    n = dev.model.num_exits
    fixed = [dev.point("per-exit", fixed_exit_thresholds(n, k)) for k in range(n - 1)]
    # chosen first: on a tie it stays
    best = choose_threshold([chosen.point, *fixed], target_speedup, max_drop, reference=last_accuracy)
    return chosen if best is chosen.point else DevChoice(best, "per-exit")


def corrected_logits(exit_logits: torch.Tensor, temperatures: list[float], bias: torch.Tensor) -> torch.Tensor:
    """Raw exit logits [exits, n, labels] -> calibrated log-probs plus a class bias per exit (`fit_class_bias`)."""
    return torch.stack([(exit_logits[e] / t).log_softmax(-1) + bias[e] for e, t in enumerate(temperatures)])


def _static_members(run: str, config: dict, depth: int) -> tuple[dict, list[int]]:
    """A static run's config and member depths, refused unless it is a static frontier for ``config``'s run."""
    other = load_run_config(run)
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


def _frontier_points(by_depth: dict[int, list[tuple[float, float, str]]], depth: int) -> list[dict]:
    """Static points from (accuracy, macro-F1, run) per depth; models of equal depth are averaged."""
    return [{"layers": k, "layers_share": k / depth, "speedup_layers": depth / k,
             "accuracy": float(np.mean([a for a, _, _ in v])), "macro_f1": float(np.mean([f for _, f, _ in v])),
             "runs": [r for _, _, r in v]}
            for k, v in sorted(by_depth.items())]


def static_points(runs: list[str], split: str, config: dict, depth: int) -> list[dict]:
    """The static frontier's points: each separately trained truncated model's accuracy on ``split``.

    ``runs`` are multi-model runs (every member alone) or plain runs (``--num-layers K``) of the same
    task and model as ``config`` (the evaluated run's config.json). Models of equal depth are averaged.
    """
    by_depth: dict[int, list[tuple[float, float, str]]] = {}
    for run in runs:
        other, layers = _static_members(run, config, depth)
        metrics = json.loads((Path(run) / "metrics.json").read_text())[split]
        members = ([(e["accuracy"], e["macro_f1"]) for e in metrics["exits"]] if other["spec"]["method"] == "multi-model"
                   else [(metrics["accuracy"], metrics["macro_f1"])])
        for k, (accuracy, f1) in zip(layers, members):
            by_depth.setdefault(k, []).append((accuracy, f1, str(run)))
    return _frontier_points(by_depth, depth)


def corrected_static_points(runs: list[str], splits: list[str], config: dict, depth: int) -> dict[str, list[dict]]:
    """`static_points` on each of ``splits`` with each static model given a class bias fitted on its dev split
    (`fit_class_bias`): the baseline a policy that fits more than temperatures on dev labels is fairly
    compared with. Returns split -> points."""
    by_split: dict[str, dict[int, list[tuple[float, float, str]]]] = {split: {} for split in splits}
    for run in runs:
        _, layers = _static_members(run, config, depth)
        trained = load_run(run)
        dev = split_scores(trained, "dev")
        temperatures = trained.model.temperatures
        bias = fit_class_bias(dev.exit_logits, temperatures, dev.gold)
        for split, by_depth in by_split.items():
            scored = dev if split == "dev" else split_scores(trained, split)
            corrected = corrected_logits(scored.exit_logits, temperatures, bias)
            for k, e in zip(layers, exit_scores(trained.model, corrected, scored.gold)):
                by_depth.setdefault(k, []).append((e["accuracy"], e["macro_f1"], str(run)))
    return {split: _frontier_points(by_depth, depth) for split, by_depth in by_split.items()}


def oracle_speedups(exit_layers: list[int]) -> list[float]:
    """Speedups at which to draw the oracle: from 1x to the first exit's own, 40 steps in cost."""
    return (1.0 / np.linspace(1.0, exit_layers[0] / exit_layers[-1], 40)).tolist()
