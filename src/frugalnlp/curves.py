"""Speed-accuracy curves: every exit runs once per example, thresholds are replayed on cached logits.

A decision depends only on the example's own logits, so replaying a policy over the cached
[exits, n, labels] logits gives exactly the decisions `predict` makes (a test holds both to it),
and a 21-point curve costs one pass over the data. A finished run's exit logits are collected once per
split and process (`split_scores`, `dev_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from frugalnlp.assets import weights_sha256
from frugalnlp.cost import FlopCost
from frugalnlp.early_exit.ensemble import ExitEnsemble, cross_fit_ensemble, fit_exit_ensemble
from frugalnlp.early_exit.policies import ExitPolicy, exit_step, heads_run
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.early_exit.router import ExitRouter, cross_fit, fit_exit_router
from frugalnlp.early_exit.runner import SegmentRunner
from frugalnlp.encoding import EncodedSplit, batches, encode_split, unsorted_batches
from frugalnlp.errors import FrugalError
from frugalnlp.run import TrainedRun, load_spec_task
from frugalnlp.timing import SegmentTimes, time_segments


@torch.inference_mode()
def collect_exit_logits(model: SegmentRunner, data: EncodedSplit, tokenizer: PreTrainedTokenizerBase,
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
    exit_index = np.full(n, num_exits - 1, dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    running = np.ones(n, dtype=bool)
    state = policy.start(n)
    for e in range(num_exits):
        step = exit_step(policy, e, num_exits, exit_logits[e], temperatures[e], state)
        leaving = step.leave & running
        exit_index[leaving] = e
        labels[leaving] = step.logits.argmax(-1)[leaving]
        running &= ~step.leave
        state = step.state
    return torch.from_numpy(exit_index), torch.from_numpy(labels)


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
    lengths counted), how many examples left at each exit and, when the split's segments were timed on a
    runtime (`frugalnlp.timing.SegmentTimes`), the share of the plain model's measured time, the split run in
    batches in its own order."""

    threshold: float | list[float]
    accuracy: float
    macro_f1: float
    layers_share: float
    flops_share: float
    exit_histogram: list[int]
    time_share: float | None = None

    @property
    def speedup_layers(self) -> float:
        return 1.0 / self.layers_share

    @property
    def speedup(self) -> float:
        """The speedup operating points are chosen by: in measured time when the segments were timed
        (``--cost time``), else in layers (the paper's measure)."""
        return self.speedup_layers if self.time_share is None else 1.0 / self.time_share

    @property
    def speedup_flops(self) -> float:
        return 1.0 / self.flops_share

    def to_dict(self) -> dict:
        """The JSON record (speedups included)."""
        return {"threshold": self.threshold, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "layers_share": self.layers_share, "speedup_layers": self.speedup_layers,
                "flops_share": self.flops_share, "speedup_flops": self.speedup_flops,
                "exit_histogram": self.exit_histogram,
                **({} if self.time_share is None else {"time_share": self.time_share, "speedup_time": self.speedup})}

    @classmethod
    def from_dict(cls, record: dict) -> CurvePoint:
        """A point read back from its JSON record (curve.json's ``points``)."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})


def exit_scores(model: SegmentRunner, exit_logits: torch.Tensor, gold: np.ndarray) -> list[dict]:
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

    def __init__(self, model: SegmentRunner, exit_logits: torch.Tensor, gold: np.ndarray,
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
        self.times: SegmentTimes | None = None  # segments timed on a runtime: points get a measured time share

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
        scores.times = self.times
        return scores

    def point(self, policy: str, threshold: float | list[float]) -> CurvePoint:
        """The curve point of ``policy`` at ``threshold`` on this split."""
        model = self.model
        exit_index, labels = self.decide(policy, threshold)
        heads = self._heads(policy, threshold)
        layers = torch.tensor(model.layers_to_exit(heads), dtype=torch.float64)
        flops = self._flops_to_exit(heads)
        time_share = None if self.times is None else self.times.share(exit_index.numpy(), model.layers_to_exit(heads),
                                                                      np.asarray(self.lengths))
        return CurvePoint(
            threshold=round(float(threshold), 6) if isinstance(threshold, (int, float))
            else [round(float(t), 6) for t in threshold],
            **scores(labels, self.gold, model.config.num_labels),
            layers_share=float(layers[exit_index].mean()) / self.depth,
            flops_share=float(flops[exit_index.numpy(), np.arange(len(self.gold))].sum() / self.full_flops),
            exit_histogram=torch.bincount(exit_index, minlength=model.num_exits).tolist(), time_share=time_share)


def speed_accuracy_curve(model: SegmentRunner, exit_logits: torch.Tensor, gold: np.ndarray,
                         lengths: np.ndarray, thresholds: list[float], policy: str = "confidence") -> list[CurvePoint]:
    """One `CurvePoint` per threshold, from raw exit logits [exits, n, labels], gold labels [n] and token
    lengths [n]."""
    split = SplitScores(model, exit_logits, gold, lengths)
    return [split.point(policy, threshold) for threshold in thresholds]


def accuracy_at_speedup(curve: list[CurvePoint], speedup: float) -> float | None:
    """Best accuracy among curve points at least ``speedup`` times faster in layers (None if none is)."""
    reachable = [p.accuracy for p in curve if p.speedup_layers >= speedup - 1e-9]
    return max(reachable) if reachable else None


def last_exit_accuracy(curve: list[CurvePoint]) -> float:
    """The curve's accuracy at threshold 1, where every example runs to the last exit."""
    return next(p.accuracy for p in curve if p.threshold >= 1.0)


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


COSTS = ("layers", "time")


def time_split(trained: TrainedRun, split: str, batch_size: int, examples: int = 256, repeats: int = 3) -> SegmentTimes:
    """The run's segments timed on its runtime (`frugalnlp.timing.time_segments`) over the first ``examples``
    texts of ``split`` in their own order, at ``batch_size``: set as a split's ``times``, its points' speedups
    are in measured time (``--cost time``)."""
    precision = getattr(trained.model, "precision", None)  # an ONNX export's
    task_split = load_spec_task(trained.spec).split(split)
    timed = task_split.take(range(min(examples, len(task_split))))
    data = encode_split(timed, trained.tokenizer, trained.spec.max_length)
    return time_segments(trained.model, unsorted_batches(data, trained.tokenizer, batch_size), repeats,
                         "torch fp32" if precision is None else f"ONNX {precision}")
