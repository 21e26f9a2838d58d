"""MPNet adapter (all-mpnet-base-v2): a relative position bias shared by every layer travels in the state."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from frugalnlp.backbones.base import State
from frugalnlp.backbones.bert import BertBackbone


class MPNetBackbone(BertBackbone):
    """Masks as in BERT; layers also take the position bias."""

    families = ("mpnet",)
    query_key = ("q", "k")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> State:
        return self.resume(self.model.embeddings(input_ids=input_ids), attention_mask)  # MPNet has no token types

    def resume(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> State:
        # [1, heads, seq, seq]: depends on positions only, so one copy serves every row.
        bias = self.model.encoder.compute_position_bias(hidden[:1])
        return State(hidden=hidden, attention_mask=attention_mask, layer_mask=self.layer_mask(hidden, attention_mask),
                     shared={"position_bias": bias})

    def layer(self, index: int, state: State) -> State:
        out = self.layers[index](state.hidden, state.layer_mask, state.shared["position_bias"])[0]
        return replace(state, hidden=out)

    def trim(self, name: str, value: torch.Tensor, length: int) -> torch.Tensor:
        return value[..., :length, :length]

    def self_attention(self, index: int) -> nn.Module:
        return self.layers[index].attention.attn
