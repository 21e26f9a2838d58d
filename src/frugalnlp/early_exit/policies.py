"""Exit policies: given one exit's logits for the rows still running, which rows leave now.

A policy knows nothing of models. Every decision goes through `exit_step` (temperature scaling, the
last-exit rule, the policy's step), which batched `predict`, the replay of cached logits in evaluation
and the server's segment worker all call, so all three decide alike, on every runtime. Decisions run in NumPy
on the CPU: they touch [rows, labels] arrays, too small for an accelerator or a thread pool to pay, and an
ONNX export's outputs are NumPy already (no torch in its hot path). A policy's state is one array with
the rows first (or None), so the server can split and merge it. Every policy's knob is a ``threshold`` in
[0, 1] where 1 means "never leave before the last exit"; `PerExitPolicy` has one per early exit.
Policies are found by name in `frugalnlp.early_exit.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from frugalnlp.errors import FrugalError

if TYPE_CHECKING:
    import torch


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, computed stably, in the logits' dtype."""
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, computed stably, in the logits' dtype."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
        raise FrugalError(f"threshold {threshold!r} is outside [0, 1]; use a value such as 0.9")
    return float(threshold)


@dataclass
class ExitPolicy:
    """Base: ``step(logits, probs, state) -> (leave, state)``; ``state`` is None or a NumPy array with the rows
    in dim 0."""

    threshold: float

    def __post_init__(self) -> None:
        self.threshold = check_threshold(self.threshold)

    @classmethod
    def create(cls, name: str, threshold: float | Sequence[float], num_exits: int, **fitted) -> ExitPolicy:
        """The policy registered as ``name`` (`frugalnlp.early_exit.registry.make_policy` calls this) for a model
        of ``num_exits`` exits; ``fitted`` holds what a fitted policy needs (``router``), ignored here."""
        if not isinstance(threshold, (int, float)):
            raise FrugalError(f"exit policy '{name}' takes one threshold, not {len(threshold)}; use --policy per-exit")
        return cls(threshold)

    def start(self, batch_size: int) -> np.ndarray | None:
        return None

    def transform(self, logits: np.ndarray, state: np.ndarray | None,
                  exit_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The logits this policy decides on and a leaving row answers with (default: the calibrated ones;
        an exit ensemble mixes in the earlier exits'), and the new state."""
        return logits, state

    def step(self, logits: np.ndarray, probs: np.ndarray, state: np.ndarray | None,
             exit_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """logits: [rows, labels], temperature-scaled (and transformed), at early exit ``exit_index`` (0-based);
        probs: their softmax, computed once per exit. Returns leave: bool [rows] and the new state."""
        raise NotImplementedError

    @property
    def never_leaves_early(self) -> bool:
        """True when no row can leave before the last exit: inference may skip the early heads."""
        return self.threshold >= 1.0

    def uses_exit(self, exit_index: int) -> bool:
        """Whether this policy needs early exit ``exit_index``'s logits (when not, its head is skipped, and a
        cascade skips the member altogether)."""
        return not self.never_leaves_early

    def reaches(self, score: np.ndarray) -> np.ndarray:
        """score >= threshold, except that threshold 1 never leaves (a saturated softmax reaches 1.0)."""
        if self.threshold >= 1.0:
            return np.zeros(score.shape, dtype=bool)
        return score >= self.threshold


class ConfidencePolicy(ExitPolicy):
    """Leave when the max softmax probability reaches the threshold (the SWEET paper's rule)."""

    def step(self, logits, probs, state, exit_index):
        return self.reaches(probs.max(-1)), state


class EntropyPolicy(ExitPolicy):
    """DeeBERT: leave when 1 - entropy / log(labels) reaches the threshold (low entropy leaves)."""

    def step(self, logits, probs, state, exit_index):
        entropy = -(probs * log_softmax(logits)).sum(-1)
        return self.reaches(1.0 - entropy / math.log(logits.shape[-1])), state


class PatiencePolicy(ExitPolicy):
    """PABEE: leave once the prediction has stayed the same for ``patience`` consecutive exits.

    The threshold maps to patience = round(threshold * max_patience); threshold 1 never leaves early.
    """

    max_patience: int = 6

    def __init__(self, threshold: float, max_patience: int = 6) -> None:
        super().__init__(threshold)
        self.max_patience = max_patience
        self.patience = round(self.threshold * max_patience)

    @classmethod
    def create(cls, name, threshold, num_exits, **fitted):
        policy = super().create(name, threshold, num_exits)  # patience is counted in exits
        return cls(policy.threshold, max_patience=max(num_exits - 1, 1))

    @property
    def never_leaves_early(self) -> bool:
        return self.patience >= self.max_patience

    def start(self, batch_size):
        # [rows, 2]: the previous exit's label (-1 before the first) and how many exits agreed with it.
        state = np.zeros((batch_size, 2), dtype=np.int64)
        state[:, 0] = -1
        return state

    def step(self, logits, probs, state, exit_index):
        labels = logits.argmax(-1)
        same = labels == state[:, 0]
        count = np.where(same, state[:, 1] + 1, 0)
        leave = np.zeros_like(same) if self.never_leaves_early else count >= self.patience
        return leave, np.stack([labels, count], axis=1)


class PerExitPolicy(ExitPolicy):
    """Confidence with a threshold of its own at each early exit (BERxiT): a row leaves exit k when its
    calibrated max probability reaches ``thresholds[k]``. ``threshold`` is the largest of them."""

    def __init__(self, thresholds: Sequence[float]) -> None:
        self.thresholds = [check_threshold(t) for t in thresholds]
        if not self.thresholds:
            raise FrugalError("per-exit thresholds: give one per early exit")
        super().__init__(max(self.thresholds))

    @classmethod
    def create(cls, name, threshold, num_exits, **fitted):
        """One threshold per early exit (``num_exits - 1`` of them), or one for all."""
        thresholds = [threshold] * (num_exits - 1) if isinstance(threshold, (int, float)) else list(threshold)
        if len(thresholds) != max(num_exits - 1, 1):
            raise FrugalError(f"per-exit thresholds: {len(thresholds)} given, the model has {num_exits - 1} early exits")
        return cls(thresholds)

    @property
    def never_leaves_early(self) -> bool:
        return all(t >= 1.0 for t in self.thresholds)

    def uses_exit(self, exit_index: int) -> bool:
        # a fixed exit k is thresholds [1, .., 1, 0]: the exits before it are never looked at
        return self.thresholds[exit_index] < 1.0

    def step(self, logits, probs, state, exit_index):
        threshold = self.thresholds[exit_index]
        if threshold >= 1.0:
            return np.zeros(len(logits), dtype=bool), state
        return probs.max(-1) >= threshold, state


class Step(NamedTuple):
    """One exit's decision for the rows standing there (NumPy, rows first): whether each row leaves (``leave``,
    bool [rows]), the ``logits`` a leaving row answers with and their ``probs`` ([rows, labels]: one softmax per
    exit, for the decision and the answer alike), and the rows' new policy ``state``."""

    leave: np.ndarray
    logits: np.ndarray
    probs: np.ndarray
    state: np.ndarray | None


def as_numpy(logits: np.ndarray | torch.Tensor) -> np.ndarray:
    """float32 NumPy logits from a runtime's output: an ONNX Runtime array as it is, a torch tensor (any
    device) copied to the CPU."""
    if isinstance(logits, np.ndarray):
        return logits if logits.dtype == np.float32 else logits.astype(np.float32)
    return logits.detach().float().cpu().numpy()


def exit_step(policy: ExitPolicy, exit_index: int, num_exits: int, logits: np.ndarray | torch.Tensor,
              temperature: float, state: np.ndarray | None) -> Step:
    """The decision at one exit for the rows standing there, in NumPy (`as_numpy`).

    logits: [rows, labels], the exit's raw logits; temperature: its calibration. The logits a leaving row
    answers with are temperature-scaled, then the policy's `transform`. Every row leaves at the last exit.
    """
    scaled, state = policy.transform(as_numpy(logits) / np.float32(temperature), state, exit_index)
    probs = softmax(scaled)
    if exit_index == num_exits - 1:
        return Step(np.ones(len(scaled), dtype=bool), scaled, probs, state)
    leave, state = policy.step(scaled, probs, state, exit_index)
    return Step(leave, scaled, probs, state)


def needs_head(policy: ExitPolicy, exit_index: int, num_exits: int) -> bool:
    """Whether exit ``exit_index``'s head must run: at the last exit always; before it, only if the policy
    uses that exit (a row may leave there, or a later decision reads its logits)."""
    return exit_index == num_exits - 1 or policy.uses_exit(exit_index)


def heads_run(policy: ExitPolicy, num_exits: int) -> list[bool]:
    """`needs_head` at every exit: what an example's cost depends on besides where it leaves."""
    return [needs_head(policy, e, num_exits) for e in range(num_exits)]
