"""MPNet adapter (all-mpnet-base-v2): a relative position bias shared by every layer travels in the state."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.models.mpnet.modeling_mpnet import MPNetSelfAttention

from frugalnlp.backbones.base import State
from frugalnlp.backbones.bert import BertBackbone


class MPNetBackbone(BertBackbone):
    """Masks as in BERT; layers also take the position bias."""

    families = ("mpnet",)
    query_key = ("q", "k")

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> State:
        hidden = self.model.embeddings(input_ids=input_ids)  # MPNet has no token types
        # [1, heads, seq, seq]: depends on positions only, so one copy serves every row.
        bias = self.model.encoder.compute_position_bias(hidden[:1])
        return State(hidden=hidden, attention_mask=attention_mask, layer_mask=self.layer_mask(hidden, attention_mask),
                     shared={"position_bias": bias})

    def layer(self, index: int, state: State) -> State:
        out = self.layers[index](state.hidden, state.layer_mask, state.shared["position_bias"])[0]
        return replace(state, hidden=out)

    def trim(self, name: str, value: torch.Tensor, length: int) -> torch.Tensor:
        return value[..., :length, :length]

    def self_attention(self, index: int) -> MPNetSelfAttention:
        return self.layers[index].attention.attn

    def use_constant_heads(self) -> None:
        # MPNet's attention does not go through transformers.AttentionInterface: each layer's module becomes
        # the subclass below (same parameters and state-dict keys, another forward).
        for index in range(self.num_layers):
            self.self_attention(index).__class__ = ConstantHeadsMPNetSelfAttention


class ConstantHeadsMPNetSelfAttention(MPNetSelfAttention):
    """MPNet self-attention reading its ``papa`` (`ConstantHeads`): the relative position bias is part of
    the live heads' scores only; a constant head needs neither it nor a query or key."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs) -> tuple:
        # Imported here: frugalnlp.papa imports the backbones.
        from frugalnlp.papa.attention import constant_head_attention

        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.q(hidden_states).view(shape).transpose(1, 2)  # [batch, live heads, seq, head size]
        key = self.k(hidden_states).view(shape).transpose(1, 2)
        value = self.v(hidden_states).view(shape).transpose(1, 2)  # [batch, heads, seq, head size]
        out, probabilities = constant_head_attention(
            self.papa, query, key, value, attention_mask, self.attention_head_size ** -0.5, self.dropout.p,
            self.training, score_bias=position_bias)
        out = self.o(out.reshape(*hidden_states.shape[:-1], self.all_head_size))
        return (out, probabilities) if output_attentions else (out,)
