"""Exact compute of adaptive inference: FLOPs per layer and head, per example length.

FLOPs are counted by `torch.utils.flop_counter` on the model's own modules (matrix products, as
FLOP counts usually are), once per distinct sequence length, so every family and attention
implementation is measured rather than modelled. The reference is the plain classifier: all
layers of the deepest exit plus one head.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from frugalnlp.early_exit.runner import SegmentRunner

_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry:
    # torch counts the CUDA kernels of scaled_dot_product_attention but not the CPU one, so on CPU an
    # sdpa model's scores and weighted sums (Q K^T and P V) would cost nothing.
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    """FLOPs (matrix products) of calling ``fn()``, counted by `torch.utils.flop_counter`."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class FlopCost:
    """FLOPs of leaving at each exit, for examples of given lengths."""

    def __init__(self, model: SegmentRunner) -> None:
        self.model = model
        self.member = model.cost_model  # a torch model whose one layer and one head are counted
        self._layer = lru_cache(maxsize=None)(self._layer_flops)

    @torch.inference_mode()
    def _layer_flops(self, length: int) -> int:
        adapter = self.member.adapter
        ids = torch.full((1, length), 1, dtype=torch.long, device=self.member.device)
        state = adapter.embed(ids, torch.ones_like(ids))
        return count_flops(lambda: adapter.layer(0, state))

    @torch.inference_mode()
    def head_flops(self) -> int:
        hidden = torch.zeros(1, 1, self.member.adapter.hidden_size, device=self.member.device)
        return count_flops(lambda: self.member.heads[0](hidden, torch.ones(1, 1, device=hidden.device)))

    def layer_flops(self, lengths: np.ndarray) -> np.ndarray:
        """FLOPs of one layer for each example length: [n]."""
        return np.array([self._layer(int(t)) for t in lengths], dtype=np.float64)

    def to_exit(self, lengths: np.ndarray, heads: Sequence[bool] | None = None) -> np.ndarray:
        """[exits, n]: FLOPs an example of each length has spent when it leaves at each exit.

        Early exit: layers up to the exit plus every head evaluated so far. Cascade: each earlier
        model's layers and head too, since a later model recomputes from the input. ``heads`` (default
        all): which exits' heads run (`frugalnlp.early_exit.policies.heads_run`); a skipped cascade model
        costs nothing.
        """
        per_layer = self.layer_flops(lengths)
        head = self.head_flops()
        run = np.ones(self.model.num_exits) if heads is None else np.asarray(heads, dtype=np.float64)
        heads_so_far = np.cumsum(run)
        layers = np.array(self.model.layers_to_exit(heads), dtype=np.float64)
        return layers[:, None] * per_layer[None, :] + heads_so_far[:, None] * head

    def full(self, lengths: np.ndarray) -> np.ndarray:
        """[n]: FLOPs of the plain classifier (all layers of the deepest exit, one head)."""
        return self.model.config.exit_layers[-1] * self.layer_flops(lengths) + self.head_flops()
