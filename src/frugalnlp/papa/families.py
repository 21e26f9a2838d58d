"""How each model family's layers reach PAPA's constant-head attention, keyed by ``config.model_type``.

The math is one function (`frugalnlp.papa.attention.constant_head_attention`); this registry only routes a
family's layers to it. BERT-style families select a function registered with `transformers.AttentionInterface`
by name, as any HF attention backend is selected. MPNet's layers do not go through that interface, so
each layer's self-attention module is replaced by `ConstantHeadsMPNetSelfAttention`, which holds the same
projection modules (so the state-dict keys are the same) and calls `constant_head_attention` itself.
The backbone adapters know nothing of PAPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from frugalnlp.backbones import Backbone
from frugalnlp.errors import FrugalError
from frugalnlp.papa.attention import ATTENTION, constant_head_attention


def _select_attention_function(adapter: Backbone) -> None:
    adapter.model.set_attn_implementation(ATTENTION)


class ConstantHeadsMPNetSelfAttention(nn.Module):
    """MPNet self-attention reading its ``papa`` (`ConstantHeads`): the relative position bias is part of
    the live heads' scores only; a constant head needs neither it nor a query or key.

    Built around an `MPNetSelfAttention`, whose q, k, v, o and dropout modules it takes over.
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.num_attention_heads = attention.num_attention_heads
        self.attention_head_size = attention.attention_head_size
        self.all_head_size = attention.all_head_size
        self.q, self.k, self.v, self.o, self.dropout = attention.q, attention.k, attention.v, attention.o, attention.dropout

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_bias: torch.Tensor | None = None, output_attentions: bool = False, **kwargs) -> tuple:
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.q(hidden_states).view(shape).transpose(1, 2)  # [batch, live heads, seq, head size]
        key = self.k(hidden_states).view(shape).transpose(1, 2)
        value = self.v(hidden_states).view(shape).transpose(1, 2)  # [batch, heads, seq, head size]
        out, probabilities = constant_head_attention(
            self.papa, query, key, value, attention_mask, self.attention_head_size ** -0.5, self.dropout.p,
            self.training, score_bias=position_bias)
        out = self.o(out.reshape(*hidden_states.shape[:-1], self.all_head_size))
        return (out, probabilities) if output_attentions else (out,)


def _replace_mpnet_attention(adapter: Backbone) -> None:
    for layer in adapter.layers:
        layer.attention.attn = ConstantHeadsMPNetSelfAttention(layer.attention.attn)


CONSTANT_HEADS: dict[str, Callable[[Backbone], None]] = {
    "bert": _select_attention_function,
    "roberta": _select_attention_function,
    "xlm-roberta": _select_attention_function,
    "electra": _select_attention_function,
    "mpnet": _replace_mpnet_attention,
}


def check_family(model_type: str | None) -> None:
    """FrugalError unless PAPA can run on this model type (a route to constant heads is registered)."""
    if model_type not in CONSTANT_HEADS:
        raise FrugalError(f"PAPA runs on {', '.join(CONSTANT_HEADS)} encoders; {model_type}'s backbone adapter has "
                          "no constant-head attention (no route for it in frugalnlp.papa.families)")


def use_constant_heads(adapter: Backbone) -> None:
    """Make every layer's attention read its self-attention module's ``papa`` (`ConstantHeads`)."""
    check_family(adapter.config.model_type)
    CONSTANT_HEADS[adapter.config.model_type](adapter)
