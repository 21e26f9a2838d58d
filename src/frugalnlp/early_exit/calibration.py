"""Temperature scaling of each exit, fitted on the dev split (never on the split that is reported)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def minimize(params: list[torch.Tensor], loss: Callable[[], torch.Tensor], lr: float = 0.5, max_iter: int = 100,
             tolerance_grad: float = 1e-9, tolerance_change: float = 1e-12) -> None:
    """Minimise ``loss()`` over ``params`` in place: L-BFGS with a strong-Wolfe line search, as every fit on dev
    (temperatures, exit ensembles, class biases, routers) is done."""
    optimizer = torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, tolerance_grad=tolerance_grad,
                                  tolerance_change=tolerance_change, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 500) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T). logits: [n, labels], labels: [n].

    L-BFGS with a strong-Wolfe line search on log T runs until the gradient vanishes (the NLL is
    convex in 1/T), not for a fixed number of steps.
    """
    logits = logits.detach().float().clone()  # may come from inference mode
    labels = labels.detach().long().clone()
    log_t = torch.zeros(1, requires_grad=True)
    minimize([log_t], lambda: F.cross_entropy(logits / log_t.exp(), labels), lr=1.0, max_iter=max_iter)
    # Keep T in a sane range: a constant predictor would otherwise push it to infinity.
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def fit_temperatures(exit_logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """One temperature per exit. exit_logits: [exits, n, labels]."""
    return [fit_temperature(logits, labels) for logits in exit_logits]
