"""Certified operating points: Learn-then-Test (Angelopoulos et al. 2021; as CALM and "Fast yet Safe" use it).

``--max-drop ε`` alone picks the fastest threshold whose *dev* accuracy is within ε of the last exit's: a
point estimate, which a test set misses about half the time. With ``--risk δ`` the choice is certified:

1. dev is split (seeded) into a fit part and a calibration part; whatever is fitted on labels (an exit
   ensemble, a router) is fitted on the fit part alone and deployed as fitted there;
2. the candidate thresholds are ordered from conservative to aggressive by their cost on the fit part;
3. on the calibration part each example's loss is 1[last exit right] - 1[its exit right], clipped at 0
   (the last exit as the policy answers there: with an exit ensemble, the ensemble's mix at the last exit),
   and each candidate's mean loss gets an exact binomial p-value for "the population loss exceeds ε";
4. fixed-sequence testing from the most conservative candidate: each is certified while its p-value is at
   most δ, and testing stops at the first that is not;
5. the cheapest certified candidate is deployed; when none is, the model runs to its last exit.

Guarantee: if the data the model meets is exchangeable with dev, then with probability at least 1 - δ
(over the draw of the calibration part) the deployed point's accuracy drop against the last exit is at
most ε. The clipped loss bounds the drop from above, so the drop is certified too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from scipy.stats import binom

from frugalnlp.curves import replay
from frugalnlp.defaults import OPERATING_GRID
from frugalnlp.early_exit.ensemble import ExitEnsemble
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.errors import FrugalError


@dataclass
class Certificate:
    """What Learn-then-Test chose and why: ``threshold`` is what to deploy (1.0 when nothing was certified)."""

    threshold: float | list[float]
    certified: bool
    epsilon: float
    delta: float
    fit_examples: int
    calibration_examples: int
    tested: list[dict] = field(default_factory=list)  # in testing order: threshold, fit cost, risk, p-value

    def to_dict(self) -> dict:
        return asdict(self)


def check_risk(risk: float | None, max_drop: float | None) -> None:
    """FrugalError unless ``risk`` (δ) is in (0, 1) and comes with ``max_drop`` (ε)."""
    if risk is None:
        return
    if max_drop is None:
        raise FrugalError("--risk δ certifies a --max-drop ε: give both (e.g. --max-drop 0.01 --risk 0.1)")
    if not (isinstance(risk, (int, float)) and 0.0 < risk < 1.0):
        raise FrugalError(f"--risk {risk!r} is outside (0, 1) (the chance the guarantee fails, e.g. 0.1)")


def p_value(losses: np.ndarray, epsilon: float) -> float:
    """Exact binomial p-value of H0 "mean loss > ε" for 0/1 ``losses`` [m]: P(Binomial(m, ε) <= their sum)."""
    return float(binom.cdf(int(losses.sum()), len(losses), epsilon))


def learn_then_test(fit_cost: np.ndarray, calibration_losses: np.ndarray, epsilon: float,
                    delta: float) -> tuple[int | None, list[tuple[int, float]]]:
    """The core: candidates' fit-part cost [C] and calibration losses [C, m] in {0, 1} -> (the index of the
    cheapest certified candidate or None, [(candidate, p-value)] in testing order).

    Candidates are tested from the most costly (most conservative) down; testing stops at the first
    p-value above ``delta`` (fixed-sequence testing controls the family-wise error at ``delta``).
    """
    order = np.argsort(-fit_cost, kind="stable")
    chosen, tested = None, []
    for c in order:
        p = p_value(calibration_losses[c], epsilon)
        tested.append((int(c), p))
        if p > delta:
            break
        chosen = int(c)
    return chosen, tested


def split_dev(n: int, fit_share: float = 0.5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dev's rows drawn (with ``seed``) into a fit part and a calibration part, each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    cut = int(round(fit_share * n))
    if cut == 0 or cut == n:
        raise FrugalError(f"dev has {n} examples: too few to split into fit and calibration parts")
    return np.sort(order[:cut]), np.sort(order[cut:])


def certify_threshold(exit_logits: torch.Tensor, gold: np.ndarray, temperatures: list[float],
                      layers_to_exit: Sequence[int] | Callable[[float | list[float]], Sequence[int]], epsilon: float,
                      delta: float, policy: str = "confidence",
                      candidates: list[float | list[float]] | None = None, fit_share: float = 0.5, seed: int = 0,
                      ensemble: ExitEnsemble | None = None,
                      decide: Callable[[float | list[float]], tuple[torch.Tensor, torch.Tensor]] | None = None
                      ) -> Certificate:
    """Learn-then-Test over ``candidates`` (thresholds of ``policy``, deciding on ``ensemble``'s logits if
    given) on dev: raw exit logits [exits, n, labels] and gold labels [n]. The split of dev into fit and
    calibration parts is `split_dev(n, fit_share, seed)`: whatever ``decide`` (threshold -> exit index and
    answer per row; default: `replay` of ``policy``) was fitted on, such as a router, must be its fit part.
    ``layers_to_exit``: layers run by a row leaving at each exit, or threshold -> those (a cascade skips the
    models a candidate never uses). Candidates that cost as much as the fallback on the fit part (threshold 1:
    every row to the last exit, a cascade's last model alone) are not tested: they cannot save anything."""
    if not 0.0 <= epsilon <= 1.0:
        raise FrugalError(f"--max-drop {epsilon!r} is outside [0, 1]")
    check_risk(delta, epsilon)
    if decide is None:
        def decide(threshold):
            return replay(exit_logits, temperatures, make_policy(policy, threshold, len(exit_logits), ensemble))
    # Highest threshold first: among candidates of equal fit cost the more conservative is tested first.
    candidates = sorted(OPERATING_GRID if candidates is None else candidates, reverse=True)
    fit, calibration = split_dev(len(gold), fit_share, seed)
    gold = torch.as_tensor(gold)

    def fit_cost(threshold: float | list[float], exit_index: torch.Tensor) -> float:
        layers = layers_to_exit(threshold) if callable(layers_to_exit) else layers_to_exit
        return float(torch.tensor(layers, dtype=torch.float64)[exit_index[fit]].mean())

    last = 1.0 if isinstance(candidates[0], (int, float)) else [1.0] * len(candidates[0])
    # the reference is the fallback's own answer (the last exit as the policy answers there: an exit ensemble's
    # mix), so running to the last exit loses nothing by construction
    exit_index, labels = decide(last)
    fallback, last_right = fit_cost(last, exit_index), labels == gold
    kept, cost, losses = [], [], []
    for threshold in candidates:
        exit_index, labels = decide(threshold)
        spent = fit_cost(threshold, exit_index)
        if spent >= fallback - 1e-9:
            continue
        kept.append(threshold)
        cost.append(spent)
        losses.append((last_right & (labels != gold))[calibration].numpy().astype(np.int64))
    candidates = kept
    chosen, tested = learn_then_test(np.array(cost), np.stack(losses), epsilon, delta) if kept else (None, [])
    return Certificate(threshold=last if chosen is None else _rounded(candidates[chosen]),
                       certified=chosen is not None, epsilon=epsilon, delta=delta, fit_examples=len(fit),
                       calibration_examples=len(calibration),
                       tested=[{"threshold": _rounded(candidates[c]), "fit_layers": cost[c],
                                "calibration_risk": float(losses[c].mean()), "p_value": p, "certified": p <= delta}
                               for c, p in tested])


def _rounded(threshold: float | list[float]) -> float | list[float]:
    return round(float(threshold), 6) if isinstance(threshold, (int, float)) else [round(float(t), 6) for t in threshold]
