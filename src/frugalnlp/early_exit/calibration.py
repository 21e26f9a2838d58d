"""Temperature scaling of each exit, fitted on the dev split (never on the split that is reported)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 500) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T). logits: [n, labels], labels: [n].

    L-BFGS with a strong-Wolfe line search on log T runs until the gradient vanishes (the NLL is
    convex in 1/T), not for a fixed number of steps.
    """
    logits = logits.detach().float().clone()  # may come from inference mode
    labels = labels.detach().long().clone()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Keep T in a sane range: a constant predictor would otherwise push it to infinity.
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_temperatures(exit_logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """One temperature per exit. exit_logits: [exits, n, labels]."""
    return [fit_temperature(logits, labels) for logits in exit_logits]
