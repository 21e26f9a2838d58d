"""Choosing where to operate on dev: one threshold (`choose_threshold`), per-exit thresholds (`search_per_exit`),
a certified point (Learn-then-Test, `frugalnlp.certify`) or one of the model's own fixed exits when it beats
the policy, as a `DevChoice`; `operating_record` reads that choice on the reported split."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from frugalnlp.certify import certify_threshold, check_risk, split_dev
from frugalnlp.curves import COSTS, CurvePoint, SplitScores, last_exit_accuracy
from frugalnlp.defaults import OPERATING_GRID
from frugalnlp.early_exit.ensemble import ExitEnsemble, fit_exit_ensemble
from frugalnlp.early_exit.registry import check_policy
from frugalnlp.early_exit.router import ExitRouter
from frugalnlp.errors import FrugalError


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


@dataclass(frozen=True)
class OperatingTarget:
    """Where to operate, chosen on dev, validated once where it is parsed: ``speedup`` (the most accurate point at
    least this fast) or ``max_drop`` (the fastest within this accuracy drop of the last exit), certified with
    ``risk`` (with ``max_drop`` only); the ``policy`` deciding at the exits; the ``cost`` the speedup is in
    (``layers``, or ``time`` measured on the run's runtime at ``cost_batch_size`` rows)."""

    speedup: float | None = None
    max_drop: float | None = None
    risk: float | None = None
    policy: str = "confidence"
    cost: str = "layers"
    cost_batch_size: int = 32

    def __post_init__(self) -> None:
        check_operating_target(self.speedup, self.max_drop, self.risk)
        check_policy(self.policy)
        if self.cost not in COSTS:
            raise FrugalError(f"unknown --cost '{self.cost}'; choose one of {', '.join(COSTS)}")
        if not (isinstance(self.cost_batch_size, int) and self.cost_batch_size >= 1):
            raise FrugalError(f"--cost-batch-size {self.cost_batch_size!r} must be at least 1")

    def describe(self) -> str:
        """``dev: target speedup 2`` or ``dev: max drop 0.01``: how a point was chosen, for its record."""
        return f"dev: target speedup {self.speedup:g}" if self.speedup is not None else f"dev: max drop {self.max_drop:g}"


KINDS = ("static", "fixed exit", "adaptive")  # the tie rule, simplest first: one graph and nothing to tune wins


@dataclass(frozen=True)
class Candidate:
    """One thing that could be deployed at a target, as dev sees it: ``kind`` (one of `KINDS`), a name, its dev
    accuracy and its dev speedup in the cost the choice is made in (layers, or measured seconds); ``item`` is
    whatever the caller deploys when it is chosen."""

    kind: str
    name: str
    dev_accuracy: float
    dev_speedup: float
    item: object = None


def choose(candidates: list[Candidate], target_speedup: float | None = None, max_drop: float | None = None,
           reference: float | None = None) -> Candidate | None:
    """The one choice of what to deploy, made on dev: with ``target_speedup`` the most accurate candidate at that
    speedup or faster; with ``max_drop`` the fastest within that drop of ``reference`` (an accuracy). A tie goes
    by `KINDS` (a static model, then a fixed exit, then an adaptive point), then to the faster (or, with
    ``max_drop``, the more accurate), then to the earlier candidate. None when no candidate qualifies."""
    rank = {kind: -i for i, kind in enumerate(KINDS)}
    if target_speedup is not None:
        allowed = [c for c in candidates if c.dev_speedup >= target_speedup - 1e-9]
        return max(allowed, key=lambda c: (c.dev_accuracy, rank[c.kind], c.dev_speedup), default=None)
    allowed = [c for c in candidates if c.dev_accuracy >= reference - max_drop - 1e-12]
    return max(allowed, key=lambda c: (c.dev_speedup, rank[c.kind], c.dev_accuracy), default=None)


def choose_threshold(dev_curve: list[CurvePoint], target_speedup: float | None = None,
                     max_drop: float | None = None, reference: float | None = None) -> CurvePoint:
    """The dev curve point to operate at: best dev accuracy at ``target_speedup`` or more (`CurvePoint.speedup`:
    in layers, or in measured time when the split's segments were timed), or the fastest
    point whose dev accuracy is at most ``max_drop`` below the last exit's (``reference``; default the
    curve's own at threshold 1). On a tie the earlier point wins.

    Returns that point (its ``threshold`` is what to use on test or in production).
    """
    check_operating_target(target_speedup, max_drop)
    if target_speedup is not None:
        reachable = [p for p in dev_curve if p.speedup >= target_speedup - 1e-9]
        if not reachable:
            fastest = max(p.speedup for p in dev_curve)
            raise FrugalError(f"no threshold reaches a {target_speedup:g}x speedup on dev (at most {fastest:.2f}x)")
        return max(reachable, key=lambda p: (p.accuracy, p.speedup))
    reference = last_exit_accuracy(dev_curve) if reference is None else reference
    allowed = [p for p in dev_curve if p.accuracy >= reference - max_drop - 1e-12]
    return max(allowed, key=lambda p: (p.speedup, p.accuracy))


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
            ok = point.speedup >= target_speedup - 1e-9
            return (point.accuracy, point.speedup) if ok else None
        ok = point.accuracy >= reference - max_drop - 1e-12
        return (point.speedup, point.accuracy) if ok else None

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


def cross_fitted_accuracy(dev: SplitScores, policy: str, targets: list[float],
                          choose_on: Callable[[SplitScores, list[CurvePoint], float], tuple[str, float | list[float]]],
                          grid: list[float] = OPERATING_GRID) -> list[float | None]:
    """Per target speedup, the dev accuracy of the point ``choose_on`` picks, without the optimism of tuning and
    scoring on the same rows: dev is split in two halves (`split_dev`), ``choose_on(half, its curve of
    ``policy`` on ``grid``, target)`` gives the policy and thresholds it would deploy, and they are read on the
    other half; both ways, the share of dev rows answered right. A static model has nothing to tune on dev, so
    an adaptive point competes with it by this accuracy. The learned policy's router is fitted on the half
    that chooses. None at a target a half cannot reach (``choose_on`` raises `FrugalError`)."""
    halves = split_dev(len(dev.gold))
    right = np.zeros(len(targets))
    for fit, read in (halves, halves[::-1]):
        part, other = dev.subset(fit), dev.subset(read)
        if policy == "learned":
            other.use_router(part.fit_router(cross_fitted=True))
        curve = [part.point(policy, t) for t in grid]
        for i, target in enumerate(targets):
            try:
                chosen_policy, threshold = choose_on(part, curve, target)
            except FrugalError:
                right[i] = math.nan
                continue
            right[i] += other.point(chosen_policy, threshold).accuracy * len(read)
    return [None if math.isnan(r) else float(r) / len(dev.gold) for r in right]


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


def operating_threshold(dev: SplitScores, target: OperatingTarget) -> DevChoice:
    """The dev point to predict with, on `OPERATING_GRID`: see `choose_operating_point`."""
    curve = [dev.point(target.policy, threshold) for threshold in OPERATING_GRID]
    return choose_operating_point(curve, dev, target)


def choose_operating_point(dev_curve: list[CurvePoint], dev: SplitScores, target: OperatingTarget) -> DevChoice:
    """The dev point to operate at: `choose_threshold`'s on the dev curve; per-exit thresholds found by
    `search_per_exit` (``policy="per-exit"``); or, with ``risk``, the threshold that Learn-then-Test
    certifies (`frugalnlp.certify`). For the learned policy the choice's ``router`` is the router to
    deploy: dev's, or with ``risk`` one fitted on the fit part alone; with ``risk`` an exit ensemble is
    refitted on the fit part alone too (the choice's ``ensemble``), so the calibration part stays unseen.
    With ``risk`` and per-exit, the candidates are the uniform thresholds and per-exit thresholds searched on
    the fit part at a ladder of target speedups. Uncertified, a fixed exit of the model that beats the
    policy's point on dev is deployed instead (`_unless_fixed_exit`)."""
    target_speedup, max_drop, policy, risk = target.speedup, target.max_drop, target.policy, target.risk
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
            fastest = max(p.speedup for p in curve)
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
    """``chosen``, or the model's fixed exit that `choose` prefers on dev: at ``target_speedup`` or faster and at
    least as accurate, or within ``max_drop`` of ``last_accuracy`` (the last exit's, as the policy answers
    there) and at least as fast. So no deployed point is below its own model's fixed exit at the same cost."""
    n = dev.model.num_exits
    candidates = [Candidate("adaptive", chosen.policy, chosen.point.accuracy, chosen.point.speedup, chosen)]
    for k in range(n - 1):
        point = dev.point("per-exit", fixed_exit_thresholds(n, k))
        candidates.append(Candidate("fixed exit", f"exit {k + 1}", point.accuracy, point.speedup,
                                    DevChoice(point, "per-exit")))
    best = choose(candidates, target_speedup, max_drop, reference=last_accuracy)
    return chosen if best is None else best.item


def operating_record(dev: SplitScores, dev_curve: list[CurvePoint], reported: SplitScores, split: str,
                     target: OperatingTarget) -> dict:
    """The operating point chosen on dev (`choose_operating_point`; ``dev_curve``: ``policy`` on ``dev``) and what
    it gives on ``reported``: the ``operating_point`` record of curve.json, with the drop ``split`` realises
    against the last exit (as the policy answers there: an ensemble's mix, the raw exit otherwise), the
    reference of ``--max-drop`` and of its certificate."""
    chosen = choose_operating_point(dev_curve, dev, target)
    read = reported
    if chosen.ensemble is not None or (chosen.router is not None and chosen.router is not dev.router):
        read = reported.subset()  # certified: read with what was fitted on dev's fit part
        read.ensemble = chosen.ensemble or reported.ensemble
        read.use_router(chosen.router)
    point = read.point(chosen.policy, chosen.point.threshold)
    last = read.point("confidence", 1.0).accuracy  # every row at the last exit, ensembled if the policy is
    return {"chosen_on": "dev", "policy": chosen.policy, "target_speedup": target.speedup, "max_drop": target.max_drop,
            "risk": target.risk, "certified": chosen.certified, "certificate": chosen.certificate,
            "threshold": chosen.point.threshold, "dev": chosen.point.to_dict(), split: point.to_dict(),
            f"{split}_drop": last - point.accuracy}
