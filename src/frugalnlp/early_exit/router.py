"""A learned router (CATs, Schuster et al. 2021; BERxiT's learning-to-exit): at each early exit a logistic
regression on what exits 1..k said predicts whether exit k's answer is right; a row leaves when that
predicted probability reaches the threshold.

Features of a row at exit k (`router_features`): the exit's max probability, its margin (top-1 minus
top-2), 1 - normalised entropy, how many consecutive earlier exits agree with its answer (over k), and
the probability each earlier exit gave that answer (zero-padded to a fixed width). Depth is not a
feature: each exit has its own router.

Fitting on dev and choosing a threshold on the same dev scores would choose on a router that has seen
the examples; `cross_fit` gives every example a score from a router fitted on the other folds, and the
threshold is chosen on those, while the router deployed is fitted on all of dev.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from frugalnlp.early_exit.calibration import minimize
from frugalnlp.early_exit.policies import ExitPolicy, log_softmax
from frugalnlp.errors import FrugalError


def router_features(log_probs: np.ndarray, num_exits: int) -> np.ndarray:
    """log_probs: [rows, k + 1, labels] of exits 0..k (calibrated) -> features [rows, 4 + num_exits - 1]."""
    rows, seen, labels = log_probs.shape
    k = seen - 1
    probs = np.exp(log_probs)
    current = probs[:, k]
    top = -np.sort(-current, axis=-1)[:, : min(2, labels)]
    margin = top[:, 0] - (top[:, 1] if labels > 1 else 0.0)
    entropy = -(current * log_probs[:, k]).sum(-1) / math.log(max(labels, 2))
    answer = current.argmax(-1)
    earlier = np.take_along_axis(probs[:, :k], np.broadcast_to(answer[:, None, None], (rows, k, 1)), 2)[:, :, 0]
    agree = probs[:, :k].argmax(-1) == answer[:, None]
    streak = np.cumprod(agree[:, ::-1].astype(np.float64), 1).sum(1).astype(current.dtype)
    padded = np.zeros((rows, num_exits - 1), dtype=current.dtype)
    padded[:, :k] = earlier
    return np.concatenate([top[:, :1], margin[:, None], 1.0 - entropy[:, None], (streak / max(k, 1))[:, None], padded], 1)


@dataclass
class ExitRouter:
    """weights: [early exits, features]; bias: [early exits]; mean, scale: [early exits, features] (the
    standardisation of the examples it was fitted on)."""

    weights: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    @property
    def num_exits(self) -> int:
        return self.weights.shape[0] + 1

    def score(self, exit_index: int, log_probs: np.ndarray) -> np.ndarray:
        """log_probs: [rows, exit_index + 1, labels] -> predicted P(exit's answer is right) [rows], in NumPy."""
        # float64: the features are differences of probabilities, and float32 rounding must not decide a row
        x = router_features(np.asarray(log_probs, dtype=np.float64), self.num_exits)
        weights, bias, mean, scale = (a[exit_index] for a in self.arrays())
        z = ((x - mean) / scale) @ weights + bias
        return (1.0 / (1.0 + np.exp(-z))).astype(np.asarray(log_probs).dtype)

    def arrays(self) -> tuple[np.ndarray, ...]:
        """weights, bias, mean and scale as float64 NumPy arrays (made once): what an exit's decision reads."""
        if getattr(self, "_arrays", None) is None:
            self._arrays = tuple(t.double().numpy() for t in (self.weights, self.bias, self.mean, self.scale))
        return self._arrays

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"router.{name}": getattr(self, name).contiguous() for name in ("weights", "bias", "mean", "scale")}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ExitRouter:
        return cls(*(tensors[f"router.{name}"].float() for name in ("weights", "bias", "mean", "scale")))


def decision_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Exit logits as the policy sees them (calibrated, ensembled if any) [exits, n, labels] -> [n, exits, labels]."""
    return logits.log_softmax(-1).transpose(0, 1)


def fit_exit_router(logits: torch.Tensor, gold: np.ndarray, l2: float = 1e-2) -> ExitRouter:
    """One logistic regression per early exit on these examples (dev's, never test's): ``logits`` [exits, n,
    labels] as the policy sees them (temperature-scaled, ensembled if the policy is), gold [n]."""
    num_exits = logits.shape[0]
    log_probs = decision_log_probs(logits.double())
    gold = torch.as_tensor(gold)
    width = 4 + num_exits - 1
    weights, bias = torch.zeros(num_exits - 1, width, dtype=torch.float64), torch.zeros(num_exits - 1, dtype=torch.float64)
    mean, scale = torch.zeros_like(weights), torch.ones_like(weights)
    for k in range(num_exits - 1):
        x = torch.from_numpy(router_features(log_probs[:, : k + 1].numpy(), num_exits))
        y = (log_probs[:, k].argmax(-1) == gold).double()
        # features are probabilities: one that varies by less than 1e-3 over dev is noise, not to be magnified
        mean[k], scale[k] = x.mean(0), x.std(0).clamp_min(1e-3)
        x = (x - mean[k]) / scale[k]
        w = torch.zeros(width, dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        # a small pull on the bias too keeps it finite when every (or no) example is right
        minimize([w, b], lambda: (torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
                                  + l2 * (w ** 2).sum() + 1e-4 * b ** 2), max_iter=200)
        weights[k], bias[k] = w.detach(), b.detach()
    return ExitRouter(weights.float(), bias.float(), mean.float(), scale.float())


def cross_fit(logits: torch.Tensor, gold: np.ndarray, folds: int = 5,
              seed: int = 0) -> list[tuple[ExitRouter, np.ndarray]]:
    """Routers fitted with each fold held out: [(router fitted on the other folds, the held-out rows)]; every
    example is in exactly one held-out part, so its score never comes from a router that saw it."""
    n = len(gold)
    folds = max(2, min(folds, n))
    parts = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    out = []
    for held in parts:
        rest = np.setdiff1d(np.arange(n), held)
        out.append((fit_exit_router(logits[:, rest], np.asarray(gold)[rest]), np.sort(held)))
    return out


class LearnedPolicy(ExitPolicy):
    """Leave exit k when its router's predicted P(right) reaches the threshold. State: None before the first
    exit, then the log-probs of the exits so far, [rows, exits * labels]."""

    def __init__(self, threshold: float, router: ExitRouter) -> None:
        super().__init__(threshold)
        self.router = router

    @classmethod
    def create(cls, name, threshold, num_exits, router: ExitRouter | None = None, **fitted):
        if router is None:
            raise FrugalError("the learned policy needs a router fitted on dev: calibrate the run with --policy learned, "
                              "or let evaluate/predict/serve fit one")
        if not isinstance(threshold, (int, float)):
            raise FrugalError(f"exit policy 'learned' takes one threshold, not {len(threshold)}")
        if router.num_exits != num_exits:
            raise FrugalError(f"the router was fitted for {router.num_exits} exits, the model has {num_exits}")
        return cls(threshold, router)

    def step(self, logits, probs, state, exit_index):
        labels = logits.shape[-1]
        if state is None:
            state = np.zeros((len(logits), self.router.num_exits * labels), dtype=np.float32)
        state = state.copy()
        state[:, exit_index * labels:(exit_index + 1) * labels] = log_softmax(logits)
        history = state.reshape(len(state), -1, labels)[:, : exit_index + 1]
        return self.reaches(self.router.score(exit_index, history)), state
