"""Exit ensembles (Zero Time Waste, Wołczyk et al. 2021): exit k answers from a learned mix of the
calibrated log-probabilities of exits 1..k, at no extra layer cost.

Exit k's logits are ``sum_{j<=k} weights[k, j] * log p_j + bias[k]``; each exit's weights and class bias
are fitted on dev by cross-entropy, starting from exit k alone (weight 1 on itself, 0 elsewhere), so the
fit can only lower dev cross-entropy. `EnsembledPolicy` puts an ensemble in front of any exit policy:
the policy decides on the ensembled logits and a row that leaves answers with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from frugalnlp.early_exit.policies import ExitPolicy


@dataclass
class ExitEnsemble:
    """weights: [exits, exits], lower-triangular (exit k mixes exits 0..k); bias: [exits, labels]."""

    weights: torch.Tensor
    bias: torch.Tensor

    @property
    def num_exits(self) -> int:
        return self.weights.shape[0]

    def combine(self, exit_index: int, log_probs: torch.Tensor) -> torch.Tensor:
        """log_probs: [rows, exit_index + 1, labels] of exits 0..k -> ensembled logits [rows, labels]."""
        w = self.weights[exit_index, : exit_index + 1].to(log_probs.dtype)
        return torch.einsum("rjl,j->rl", log_probs, w) + self.bias[exit_index].to(log_probs.dtype)

    def apply(self, exit_logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
        """Every exit ensembled at once: raw logits [exits, n, labels] -> ensembled logits [exits, n, labels]."""
        log_probs = torch.stack([(exit_logits[e] / t).log_softmax(-1) for e, t in enumerate(temperatures)], 1)
        return torch.stack([self.combine(e, log_probs[:, : e + 1]) for e in range(len(temperatures))])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ensemble.weights": self.weights.contiguous(), "ensemble.bias": self.bias.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ExitEnsemble:
        return cls(tensors["ensemble.weights"].float(), tensors["ensemble.bias"].float())


def fit_exit_ensemble(exit_logits: torch.Tensor, temperatures: list[float], gold: np.ndarray,
                      l2: float = 1e-3) -> ExitEnsemble:
    """Fit each exit's weights and class bias by cross-entropy (L-BFGS) on these examples (dev's, never
    test's): raw logits [exits, n, labels], gold [n]. ``l2`` pulls the weights towards exit k alone."""
    num_exits, _, labels = exit_logits.shape
    log_probs = torch.stack([(exit_logits[e] / t).log_softmax(-1) for e, t in enumerate(temperatures)], 1).double()
    target = torch.as_tensor(gold, dtype=torch.long)
    weights = torch.zeros(num_exits, num_exits, dtype=torch.float64)
    bias = torch.zeros(num_exits, labels, dtype=torch.float64)
    for k in range(num_exits):
        start = torch.zeros(k + 1, dtype=torch.float64)
        start[k] = 1.0
        w = start.clone().requires_grad_(True)
        b = torch.zeros(labels, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], lr=0.5, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                      line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            logits = torch.einsum("rjl,j->rl", log_probs[:, : k + 1], w) + b
            loss = torch.nn.functional.cross_entropy(logits, target) + l2 * ((w - start) ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        weights[k, : k + 1], bias[k] = w.detach(), b.detach()
    return ExitEnsemble(weights.float(), bias.float())


class EnsembledPolicy(ExitPolicy):
    """``policy`` deciding on an `ExitEnsemble`'s logits. Its state is one tensor, rows first: the log-probs
    of the exits so far ([rows, exits * labels]), then the inner policy's state (as floats)."""

    def __init__(self, policy: ExitPolicy, ensemble: ExitEnsemble) -> None:
        self.inner, self.ensemble = policy, ensemble
        super().__init__(policy.threshold)

    @property
    def never_leaves_early(self) -> bool:
        return self.inner.never_leaves_early

    def start(self, batch_size: int, device: torch.device) -> torch.Tensor:
        exits, labels = self.ensemble.bias.shape
        history = torch.zeros(batch_size, exits * labels, device=device)
        inner = self.inner.start(batch_size, device)
        self.inner_dtype = None if inner is None else inner.dtype
        return history if inner is None else torch.cat([history, inner.to(history.dtype)], 1)

    def _split(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = self.ensemble.bias.numel()
        inner = None if state.shape[1] == size else state[:, size:].to(self.inner_dtype)
        return state[:, :size], inner

    def _join(self, history: torch.Tensor, inner: torch.Tensor | None) -> torch.Tensor:
        return history if inner is None else torch.cat([history, inner.to(history.dtype)], 1)

    def transform(self, logits: torch.Tensor, state: torch.Tensor, exit_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        exits, labels = self.ensemble.bias.shape
        history, inner = self._split(state)
        history = history.clone()
        history[:, exit_index * labels:(exit_index + 1) * labels] = logits.log_softmax(-1)
        mixed = self.ensemble.combine(exit_index, history.view(len(history), exits, labels)[:, : exit_index + 1])
        return mixed, self._join(history, inner)

    def step(self, logits, state, exit_index):
        history, inner = self._split(state)
        leave, inner = self.inner.step(logits, inner, exit_index)
        return leave, self._join(history, inner)
