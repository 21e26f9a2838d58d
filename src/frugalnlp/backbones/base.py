"""The seam between generic code and a model family: run an HF encoder one layer at a time.

Early exit, SWEET's detached segments, Multi-Model truncation and batch compaction all need the
same four things from an encoder: embed a batch, run layer i, drop rows of the batch, and cut the
model to its first k layers. A `Backbone` adapter provides them for one family; nothing else in
frugalnlp knows how a family is built.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel



def used_length(attention_mask: torch.Tensor) -> int:
    """Columns up to the last real token of any row of a [batch, seq] mask: the rest is padding to cut."""
    real_columns = attention_mask.any(0).nonzero()
    return int(real_columns.max()) + 1 if len(real_columns) else attention_mask.shape[1]


@dataclass
class State:
    """A batch between two layers.

    hidden: [batch, seq, hidden] the layer input/output.
    attention_mask: [batch, seq] 1 for real tokens, 0 for padding.
    layer_mask: whatever the family's layers take as mask (e.g. [batch, 1, seq, seq]), or None.
    extras: family tensors with the batch in dim 0 that must follow the rows.
    shared: family tensors without a batch dim, computed once per batch from parameters that every
        layer uses (MPNet's position bias, DeBERTa's relative embeddings): computing them once in
        `embed` makes them part of the first segment under SWEET.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    layer_mask: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def detach(self) -> State:
        """The same batch cut from the graph behind it (SWEET's segment boundary)."""
        return self.boundary(0.0)

    def boundary(self, grad_scale: float) -> State:
        """The same batch, with the gradient flowing back through it multiplied by ``grad_scale``.

        0 cuts the graph (SWEET), 1 leaves it whole (joint); values between are a soft separation,
        so a loss k boundaries above a layer reaches it scaled by ``grad_scale ** k``.
        """
        if grad_scale == 1.0:
            return self
        if grad_scale == 0.0:
            cut = torch.Tensor.detach
        else:
            def cut(t: torch.Tensor) -> torch.Tensor:
                return _ScaleGrad.apply(t, grad_scale) if t.requires_grad else t
        return replace(self, hidden=cut(self.hidden),
                       layer_mask=None if self.layer_mask is None else cut(self.layer_mask),
                       extras={k: cut(v) for k, v in self.extras.items()},
                       shared={k: cut(v) for k, v in self.shared.items()})


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class Backbone:
    """Adapter over one HF encoder. Subclasses implement the family-specific parts."""

    families: tuple[str, ...] = ()  # config.model_type values this adapter runs
    query_key: tuple[str, str] = ("query", "key")  # attribute names of the self-attention's Q and K projections

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def max_length(self) -> int:
        """The longest input (in tokens) that the family's position embeddings cover."""
        return getattr(self.config, "max_position_embeddings", None) or 1 << 20

    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's layers (``model.encoder.layer`` in every family so far)."""
        return self.model.encoder.layer

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> State:
        """[batch, seq] token ids -> the state that layer 0 takes."""
        raise NotImplementedError

    def resume(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> State:
        """The state at a layer boundary from its hidden [batch, seq, hidden] and mask [batch, seq] alone.

        What `embed` ends with, and what an exported segment after the first starts from: the family's
        layer mask and shared position tensors are recomputed inside it rather than passed in.
        """
        return State(hidden=hidden, attention_mask=attention_mask, layer_mask=self.layer_mask(hidden, attention_mask))

    def layer(self, index: int, state: State) -> State:
        """Run layer ``index`` (0-based)."""
        raise NotImplementedError

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The family's layer mask for a [batch, seq] attention mask."""
        raise NotImplementedError

    def select(self, state: State, rows: torch.Tensor | np.ndarray) -> State:
        """Keep only ``rows`` (a [k] index tensor or array) of the batch, trimming padding no kept row needs.

        Right padding that only the dropped rows needed is cut, so a shrinking batch also gets
        shorter; the layer mask is rebuilt once here rather than in every layer.
        """
        rows = torch.as_tensor(rows, device=state.hidden.device)
        mask = state.attention_mask.index_select(0, rows)
        length = used_length(mask)
        hidden = state.hidden.index_select(0, rows)[:, :length]
        mask = mask[:, :length]
        extras = {k: self.trim(k, v.index_select(0, rows), length) for k, v in state.extras.items()}
        shared = {k: self.trim(k, v, length) for k, v in state.shared.items()}
        return State(hidden=hidden, attention_mask=mask, layer_mask=self.layer_mask(hidden, mask), extras=extras,
                     shared=shared)

    def merge(self, states: list[State]) -> State:
        """One batch of the rows of several states at the same layer, right-padded to the longest.

        Padding columns are masked, so each row's outputs stay those it would have alone. Shared
        tensors depend on positions only: the longest state's serve every row.
        """
        length = max(s.hidden.shape[1] for s in states)

        def pad(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]))

        hidden = torch.cat([pad(s.hidden) for s in states])
        mask = torch.cat([pad(s.attention_mask) for s in states])
        extras = {k: torch.cat([pad(s.extras[k]) for s in states]) for k in states[0].extras}
        longest = max(states, key=lambda s: s.hidden.shape[1])
        return State(hidden=hidden, attention_mask=mask, layer_mask=self.layer_mask(hidden, mask), extras=extras,
                     shared=dict(longest.shared))

    def trim(self, name: str, value: torch.Tensor, length: int) -> torch.Tensor:
        """Cut a family tensor (extra or shared) to the first ``length`` positions."""
        return value

    def truncate(self, num_layers: int) -> None:
        """Keep only the first ``num_layers`` layers (Multi-Model's shallow models)."""
        self.model.encoder.layer = self.layers[:num_layers]
        # The config object may be shared with other models built from it: change a copy.
        self.model.config = copy.deepcopy(self.config)
        self.model.config.num_hidden_layers = num_layers

    def self_attention(self, index: int) -> nn.Module:
        """Layer ``index``'s self-attention module: the one with the query/key/value projections (PAPA)."""
        return self.layers[index].attention.self

    def strip_pooler(self) -> None:
        """Remove the family's own pooler: every exit head has its own, and unused weights break DDP."""
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None
