"""Speed-accuracy evaluation: every exit runs once per example, thresholds are replayed on cached logits.

A decision depends only on the example's own logits, so replaying a policy over the cached
[exits, n, labels] logits gives exactly the decisions `predict` makes (a test holds both to it),
and a 21-point curve costs one pass over the data.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import PreTrainedTokenizerBase

from frugalnlp.cost import FlopCost
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.policies import ExitPolicy, make_policy
from frugalnlp.encoding import EncodedSplit, batches


@torch.inference_mode()
def collect_exit_logits(model: EarlyExitModel | Cascade, data: EncodedSplit, tokenizer: PreTrainedTokenizerBase,
                        batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Raw (uncalibrated) logits of every exit for every example: [exits, n, labels]."""
    from tqdm.auto import tqdm

    model.eval()
    device = model.models[0].device if isinstance(model, Cascade) else model.device
    out = torch.empty(model.num_exits, len(data), model.config.num_labels)
    total = (len(data) + batch_size - 1) // batch_size
    for index, batch in tqdm(batches(data, tokenizer, batch_size, device), total=total, disable=not progress,
                             desc="exit logits", leave=False):
        logits = model.exit_logits(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        out[:, torch.as_tensor(index)] = torch.stack(logits).float().cpu()
    return out


def replay(exit_logits: torch.Tensor, temperatures: list[float], policy: ExitPolicy) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each example leaves and what it answers: (exit_index [n], labels [n]).

    The policy steps through the exits exactly as in `predict`; the last exit always answers.
    """
    num_exits, n, _ = exit_logits.shape
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    state = policy.start(n, exit_logits.device)
    for e in range(num_exits - 1):
        leave, state = policy.step(exit_logits[e] / temperatures[e], state)
        leaving = leave & running
        exit_index[leaving] = e
        running &= ~leave
    labels = exit_logits.argmax(-1).gather(0, exit_index[None]).squeeze(0)
    return exit_index, labels


def scores(predicted: np.ndarray | torch.Tensor, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    predicted = np.asarray(predicted)
    return {"accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, average="macro", labels=list(range(num_labels)),
                                       zero_division=0))}


def exit_scores(model: EarlyExitModel | Cascade, exit_logits: torch.Tensor, gold: np.ndarray) -> list[dict]:
    """Each exit's own scores when every example is forced to it."""
    return [{"exit": e, "layer": layer, **scores(exit_logits[e].argmax(-1), gold, model.config.num_labels)}
            for e, layer in enumerate(model.exit_layers)]


def speed_accuracy_curve(model: EarlyExitModel | Cascade, exit_logits: torch.Tensor, gold: np.ndarray,
                         lengths: np.ndarray, thresholds: list[float], policy: str = "confidence") -> list[dict]:
    """One point per threshold: scores, share of layers run, FLOPs share, speedups, exit histogram.

    ``layers_share`` is the paper's speed measure: mean layers run (a cascade's recomputation
    included) over the full depth. ``flops_share`` counts heads and per-example lengths exactly.
    """
    cost = FlopCost(model)
    flops_to_exit = cost.to_exit(lengths)  # [exits, n]
    full_flops = cost.full(lengths).sum()
    depth = model.config.exit_layers[-1]
    layers_to_exit = torch.tensor(model.layers_to_exit, dtype=torch.float64)
    points = []
    for threshold in thresholds:
        exit_index, labels = replay(exit_logits, model.temperatures, make_policy(policy, threshold, model.num_exits))
        layers_share = float(layers_to_exit[exit_index].mean()) / depth
        flops_share = float(flops_to_exit[exit_index.numpy(), np.arange(len(gold))].sum() / full_flops)
        points.append({
            "threshold": round(float(threshold), 6), **scores(labels, gold, model.config.num_labels),
            "layers_share": layers_share, "speedup_layers": 1.0 / layers_share,
            "flops_share": flops_share, "speedup_flops": 1.0 / flops_share,
            "exit_histogram": torch.bincount(exit_index, minlength=model.num_exits).tolist(),
        })
    return points


def accuracy_at_speedup(curve: list[dict], speedup: float, key: str = "speedup_layers") -> float | None:
    """Best accuracy among curve points at least ``speedup`` times faster (None if none is)."""
    reachable = [p["accuracy"] for p in curve if p[key] >= speedup - 1e-9]
    return max(reachable) if reachable else None
