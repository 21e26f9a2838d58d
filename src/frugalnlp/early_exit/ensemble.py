"""Exit ensembles (Zero Time Waste, Wołczyk et al. 2021): exit k answers from a learned mix of the
calibrated log-probabilities of exits 1..k, at no extra layer cost.

Exit k's logits are ``maps[k] @ concat(log p_1..log p_k) + bias[k]``. Two forms are fitted on dev by
cross-entropy: *weights* (one scalar per earlier exit, ``sum_j w_kj log p_j``, plus a class bias) and the
full *linear* map (a labels x labels block per earlier exit), whose L2 pull towards exit k alone is one of
`LINEAR_L2`. Each exit's form and regularisation are chosen by cross-validated dev cross-entropy, then
refitted on all of dev. Every fit starts from exit k alone (identity on itself, zero elsewhere) and is
pulled towards it, so the fit can only lower dev cross-entropy. `EnsembledPolicy` puts an ensemble in
front of any exit policy: the policy decides on the ensembled logits and a row that leaves answers with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from frugalnlp.early_exit.calibration import minimize
from frugalnlp.early_exit.policies import ExitPolicy, log_softmax

WEIGHTS_L2 = 1e-3
LINEAR_L2 = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class ExitEnsemble:
    """maps: [exits, labels, exits * labels] (exit k reads the first (k + 1) * labels columns); bias: [exits,
    labels]; forms: how each exit's map was fitted ("weights" or "linear l2=..."), for the record."""

    maps: torch.Tensor
    bias: torch.Tensor
    forms: list[str] | None = None

    @property
    def num_exits(self) -> int:
        return self.maps.shape[0]

    def combine(self, exit_index: int, log_probs: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """log_probs: [rows, exit_index + 1, labels] of exits 0..k -> ensembled logits [rows, labels], in the
        input's library and dtype (NumPy: an exit's decision; torch: a whole split's logits at once)."""
        columns = log_probs.shape[1] * log_probs.shape[2]
        if isinstance(log_probs, np.ndarray):
            maps, bias = self.arrays()
            m = maps[exit_index, :, :columns].astype(log_probs.dtype, copy=False)  # float32 both: no copy per call
            b = bias[exit_index].astype(log_probs.dtype, copy=False)
            return log_probs.reshape(len(log_probs), -1) @ m.T + b
        m = self.maps[exit_index, :, :columns].to(log_probs.dtype)
        return log_probs.flatten(1) @ m.T + self.bias[exit_index].to(log_probs.dtype)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """maps and bias as NumPy arrays (made once): what an exit's decision reads."""
        if getattr(self, "_arrays", None) is None:
            self._arrays = (self.maps.numpy(), self.bias.numpy())
        return self._arrays

    def apply(self, exit_logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
        """Every exit ensembled at once: raw logits [exits, n, labels] -> ensembled logits [exits, n, labels]."""
        log_probs = _log_probs(exit_logits, temperatures).to(exit_logits.dtype)
        return torch.stack([self.combine(e, log_probs[:, : e + 1]) for e in range(len(temperatures))])

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"ensemble.maps": self.maps.contiguous(), "ensemble.bias": self.bias.contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], forms: list[str] | None = None) -> ExitEnsemble:
        if "ensemble.weights" in tensors:  # saved before the linear form: scalar weights per earlier exit
            weights, bias = tensors["ensemble.weights"].float(), tensors["ensemble.bias"].float()
            eye = torch.eye(bias.shape[1])
            maps = torch.cat([torch.stack([w * eye for w in row], 1) for row in weights]).view(
                len(weights), bias.shape[1], -1)
            return cls(maps, bias, ["weights"] * len(weights))
        return cls(tensors["ensemble.maps"].float(), tensors["ensemble.bias"].float(), forms)


def _log_probs(exit_logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """Raw logits [exits, n, labels] -> calibrated log-probs [n, exits, labels] (float64)."""
    return torch.stack([(exit_logits[e].double() / t).log_softmax(-1) for e, t in enumerate(temperatures)], 1)


def _fit_exit(log_probs: torch.Tensor, target: torch.Tensor, k: int, form: str,
              l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit k's map [labels, (k + 1) * labels] and bias [labels] by L-BFGS on cross-entropy + l2 * ||params - exit k alone||^2."""
    labels = log_probs.shape[2]
    x = log_probs[:, : k + 1]
    if form == "weights":
        start = torch.zeros(k + 1, dtype=torch.float64)
        start[k] = 1.0
    else:
        start = torch.zeros(labels, (k + 1) * labels, dtype=torch.float64)
        start[:, k * labels:] = torch.eye(labels, dtype=torch.float64)
    w = start.clone().requires_grad_(True)
    b = torch.zeros(labels, dtype=torch.float64, requires_grad=True)

    def logits() -> torch.Tensor:
        return (torch.einsum("rjl,j->rl", x, w) if form == "weights" else x.flatten(1) @ w.T) + b

    minimize([w, b], lambda: torch.nn.functional.cross_entropy(logits(), target) + l2 * ((w - start) ** 2).sum())
    w, b = w.detach(), b.detach()
    if form == "weights":
        w = torch.cat([wj * torch.eye(labels, dtype=torch.float64) for wj in w], 1)
    return w, b


def fit_exit_ensemble(exit_logits: torch.Tensor, temperatures: list[float], gold: np.ndarray, folds: int = 5,
                      seed: int = 0) -> ExitEnsemble:
    """Fit each exit's map and class bias on these examples (dev's, never test's): raw logits [exits, n,
    labels], gold [n]. The form (weights, or the linear map with one of `LINEAR_L2`) is chosen per exit by
    ``folds``-fold cross-validated cross-entropy, then refitted on all the examples."""
    num_exits, n, labels = exit_logits.shape
    log_probs = _log_probs(exit_logits, temperatures)
    target = torch.as_tensor(gold, dtype=torch.long)
    candidates = [("weights", WEIGHTS_L2), *(("linear", l2) for l2 in LINEAR_L2)]
    parts = _folds(n, folds, seed)
    maps = torch.zeros(num_exits, labels, num_exits * labels, dtype=torch.float64)
    bias = torch.zeros(num_exits, labels, dtype=torch.float64)
    forms = []
    for k in range(num_exits):
        def cv_loss(form: str, l2: float) -> float:
            total = 0.0
            for held in parts:
                rest = torch.as_tensor(np.setdiff1d(np.arange(n), held))
                held = torch.as_tensor(held)
                m, b = _fit_exit(log_probs[rest], target[rest], k, form, l2)
                logits = log_probs[held, : k + 1].flatten(1) @ m.T + b
                total += float(torch.nn.functional.cross_entropy(logits, target[held], reduction="sum"))
            return total

        form, l2 = min(candidates, key=lambda c: cv_loss(*c)) if n >= 2 * len(parts) else candidates[0]
        m, b = _fit_exit(log_probs, target, k, form, l2)
        maps[k, :, : (k + 1) * labels], bias[k] = m, b
        forms.append("weights" if form == "weights" else f"linear l2={l2:g}")
    return ExitEnsemble(maps.float(), bias.float(), forms)


def _folds(n: int, folds: int, seed: int) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), max(2, min(folds, n)))


def cross_fit_ensemble(exit_logits: torch.Tensor, temperatures: list[float], gold: np.ndarray, ensemble: ExitEnsemble,
                       folds: int = 5, seed: int = 1) -> torch.Tensor:
    """Held-out ensembled logits of these examples (dev's): raw logits [exits, n, labels] -> [exits, n, labels],
    each row's from maps fitted, in ``ensemble``'s form per exit, on the other ``folds`` - 1 parts. A dev
    curve scored on these chooses thresholds without an ensemble that saw the rows it decides on (an
    ensemble scored on its own fit looks better than it is: on a 221-example dev by several points)."""
    num_exits, n, labels = exit_logits.shape
    log_probs = _log_probs(exit_logits, temperatures)
    target = torch.as_tensor(gold, dtype=torch.long)
    forms = ensemble.forms or ["weights"] * num_exits
    out = torch.empty(num_exits, n, labels, dtype=torch.float64)
    for held in _folds(n, folds, seed):
        rest = torch.as_tensor(np.setdiff1d(np.arange(n), held))
        held = torch.as_tensor(held)
        for k, form in enumerate(forms):
            kind, l2 = ("weights", WEIGHTS_L2) if form == "weights" else ("linear", float(form.split("=")[1]))
            m, b = _fit_exit(log_probs[rest], target[rest], k, kind, l2)
            out[k, held] = log_probs[held, : k + 1].flatten(1) @ m.T + b
    return out.float()


class EnsembledPolicy(ExitPolicy):
    """``policy`` deciding on an `ExitEnsemble`'s logits. Its state is one float32 array, rows first: the
    log-probs of the exits so far ([rows, exits * labels]), then the inner policy's state (as floats)."""

    def __init__(self, policy: ExitPolicy, ensemble: ExitEnsemble) -> None:
        self.inner, self.ensemble = policy, ensemble
        super().__init__(policy.threshold)

    @property
    def never_leaves_early(self) -> bool:
        return self.inner.never_leaves_early

    def uses_exit(self, exit_index: int) -> bool:
        return True  # every later exit's mix reads this exit's log-probs, even where no row may leave

    def start(self, batch_size: int) -> np.ndarray:
        exits, labels = self.ensemble.bias.shape
        history = np.zeros((batch_size, exits * labels), dtype=np.float32)
        inner = self.inner.start(batch_size)
        self.inner_dtype = np.float32 if inner is None else inner.dtype  # a None state may become one
        return history if inner is None else np.concatenate([history, inner.astype(np.float32)], 1)

    def _split(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        size = self.ensemble.bias.numel()
        inner = None if state.shape[1] == size else state[:, size:].astype(self.inner_dtype)
        return state[:, :size], inner

    def _join(self, history: np.ndarray, inner: np.ndarray | None) -> np.ndarray:
        return history if inner is None else np.concatenate([history, inner.astype(np.float32)], 1)

    def transform(self, logits: np.ndarray, state: np.ndarray, exit_index: int) -> tuple[np.ndarray, np.ndarray]:
        exits, labels = self.ensemble.bias.shape
        history, inner = self._split(state)
        history = history.copy()
        history[:, exit_index * labels:(exit_index + 1) * labels] = log_softmax(logits)
        mixed = self.ensemble.combine(exit_index, history.reshape(len(history), exits, labels)[:, : exit_index + 1])
        return mixed, self._join(history, inner)

    def step(self, logits, probs, state, exit_index):
        history, inner = self._split(state)
        leave, inner = self.inner.step(logits, probs, inner, exit_index)
        return leave, self._join(history, inner)


def fit_class_bias(exit_logits: torch.Tensor, temperatures: list[float], gold: np.ndarray) -> torch.Tensor:
    """A class bias per exit fitted on these examples (dev's) by cross-entropy, each exit's calibrated log-probs
    left as they are: what the baselines (fixed exits, static models) get when an ensemble is fitted on dev.
    Raw logits [exits, n, labels] -> bias [exits, labels]; the corrected logits are log p + bias."""
    log_probs = _log_probs(exit_logits, temperatures)
    target = torch.as_tensor(gold, dtype=torch.long)
    out = torch.zeros(log_probs.shape[1], log_probs.shape[2], dtype=torch.float64)
    for k in range(log_probs.shape[1]):
        b = torch.zeros(log_probs.shape[2], dtype=torch.float64, requires_grad=True)
        minimize([b], lambda: torch.nn.functional.cross_entropy(log_probs[:, k] + b, target),
                 tolerance_grad=1e-7, tolerance_change=1e-9)
        out[k] = b.detach()
    return out.float()
