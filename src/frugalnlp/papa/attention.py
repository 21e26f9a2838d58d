"""The attention of a layer with constant heads: the math every model family shares.

A constant head's probabilities do not depend on the input, so its output is one batched matmul of its
fixed matrix with the values (rows renormalised over each example's real tokens), and it needs no
query, key, scores or softmax. Live heads keep `scaled_dot_product_attention`. How a family's layer
reaches `constant_head_attention` is registered in `frugalnlp.papa.families`: BERT-style models through
`transformers.AttentionInterface` (`papa_attention` below), MPNet through a replacement self-attention
module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.bert.modeling_bert import eager_attention_forward

ATTENTION = "frugalnlp_papa"


class ConstantHeads(nn.Module):
    """PAPA state of one self-attention layer.

    ``heads`` hold a constant matrix each (``constant``: [len(heads), n, n]). Without gates they replace
    the real attention (and have no query/key rows); with ``gated`` every head of the layer has a constant
    and mixes sigmoid(gate) * real + (1 - sigmoid(gate)) * constant, gates starting at 0 (an even mix).
    ``return_probabilities`` (not saved) makes the layer build and return the full [batch, heads, seq, seq]
    probabilities, as ``output_attentions`` needs; otherwise none are materialised.
    """

    def __init__(self, num_heads: int, length: int, heads: list[int], gated: bool = False) -> None:
        super().__init__()
        self.heads = sorted(heads)
        self.live = [h for h in range(num_heads) if h not in self.heads] if not gated else list(range(num_heads))
        self.register_buffer("constant", torch.zeros(len(self.heads), length, length))
        self.gates = nn.Parameter(torch.zeros(num_heads)) if gated else None
        self.return_probabilities = False


class NoHeads(nn.Module):
    """Query/key projection of a layer whose heads are all constant: one zero head, never read."""

    def __init__(self, head_size: int) -> None:
        super().__init__()
        self.head_size = head_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.head_size)


def drop_query_key(attention: nn.Module, papa: ConstantHeads, names: tuple[str, str]) -> None:
    """Attach ``papa`` to a self-attention module; its constant heads lose their rows of the query and key
    projections (``names``, e.g. ("query", "key")); a layer with no live head keeps none at all."""
    attention.papa = papa
    if papa.gates is not None or not papa.heads:
        return
    size = attention.attention_head_size
    rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in papa.live]) if papa.live else None
    for name in names:
        full: nn.Linear = getattr(attention, name)
        if rows is None:
            setattr(attention, name, NoHeads(size))
            continue
        live = nn.Linear(full.in_features, len(rows), device=full.weight.device, dtype=full.weight.dtype)
        with torch.no_grad():
            live.weight.copy_(full.weight[rows])
            live.bias.copy_(full.bias[rows])
        setattr(attention, name, live)


def constant_head_attention(papa: ConstantHeads, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            training: bool = False, score_bias: torch.Tensor | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of one layer with PAPA heads.

    query, key: [batch, live heads, seq, head size] (constant heads have no rows; every head when gated);
    value: [batch, heads, seq, head size]; attention_mask: additive or boolean, [batch, 1, seq|1, seq], or
    None; score_bias: added to every head's scores ([1|batch, heads, seq, seq], MPNet's relative positions),
    or None. Returns (output [batch, seq, heads, head size], probabilities [batch, heads, seq, seq] when
    ``papa.return_probabilities``, else None).
    """
    batch, num_heads, seq, _ = value.shape
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=value.dtype).masked_fill(
            ~attention_mask, torch.finfo(value.dtype).min)
    if attention_mask is None:
        keys = value.new_ones(batch, seq, dtype=torch.bool)
    else:  # [batch, seq]: padding masks keys, so a key is real if any query may attend to it
        keys = (attention_mask > torch.finfo(attention_mask.dtype).min / 2).any(-2)[:, 0].expand(batch, seq)
    constant = papa.constant[:, :seq, :seq].to(value.dtype)
    live_mask = attention_mask
    if score_bias is not None:
        bias = score_bias if papa.gates is not None else score_bias[:, papa.live]
        live_mask = bias if attention_mask is None else attention_mask + bias
    if papa.return_probabilities:
        return _with_probabilities(papa, query, key, value, live_mask, keys, constant, scaling, dropout, training)

    def real(heads: list[int]) -> torch.Tensor:  # [batch, seq, len(heads), head size]
        out = F.scaled_dot_product_attention(query, key, _heads(value, heads), attn_mask=live_mask,
                                             dropout_p=dropout if training else 0.0, scale=scaling)
        return out.transpose(1, 2)

    if papa.gates is not None:
        gate = papa.gates.sigmoid().to(value.dtype)[None, None, :, None]
        return gate * real(papa.live) + (1 - gate) * _constant_output(constant, value, keys), None
    if not papa.live:
        return _constant_output(constant, value, keys), None
    if not papa.heads:
        return real(papa.live), None
    constant_out, live_out = _constant_output(constant, _heads(value, papa.heads), keys), real(papa.live)
    if papa.heads[-1] < papa.live[0]:  # ranges side by side: no scatter
        return torch.cat([constant_out, live_out], 2), None
    if papa.live[-1] < papa.heads[0]:
        return torch.cat([live_out, constant_out], 2), None
    out = value.new_empty(batch, seq, num_heads, value.shape[-1])
    out[:, :, papa.heads], out[:, :, papa.live] = constant_out, live_out
    return out, None


def _heads(value: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """value[:, heads] of a [batch, heads, seq, head size] tensor: a view when the heads are consecutive."""
    if heads == list(range(heads[0], heads[-1] + 1)):
        return value[:, heads[0]:heads[-1] + 1]
    return value[:, heads]


def _constant_output(constant: torch.Tensor, value: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Constant heads' output: each row of ``constant`` [c, seq, seq] restricted to the real keys ``keys``
    [batch, seq] (bool) and renormalised (uniform over real keys where it has no mass there), times
    ``value`` [batch, c, seq, head size]. Returns [batch, seq, c, head size].

    (C * k) V / (C k) = C (k * V) / (C k): one matmul per head over the whole batch, and no [batch, seq, seq]
    tensor. Without padding the normalisation goes into the [c, seq, seq] matrix itself.
    """
    batch, heads, seq, size = value.shape
    tiny = torch.finfo(value.dtype).tiny
    if bool(keys.all()):
        total = constant.sum(-1, keepdim=True)
        constant = torch.where(total > 0, constant / total.clamp_min(tiny), 1.0 / seq)
        values = value.permute(1, 2, 0, 3).reshape(heads, seq, batch * size)
        return torch.bmm(constant, values).view(heads, seq, batch, size).permute(2, 1, 0, 3)
    k = keys.to(value.dtype)
    keep = k.t()[None, :, :, None]  # padded keys' values are zeroed
    if torch.is_grad_enabled() and value.requires_grad:
        values = (value.permute(1, 2, 0, 3) * keep).contiguous()
    else:  # one pass instead of two (out= has no autograd)
        values = torch.empty(heads, seq, batch, size, dtype=value.dtype, device=value.device)
        torch.mul(value.permute(1, 2, 0, 3), keep, out=values)
    out = torch.bmm(constant, values.view(heads, seq, batch * size)).view(heads, seq, batch, size)
    total = torch.matmul(constant, k.t())  # [c, seq, batch]: each row's mass on each example's real keys
    empty = total == 0
    out.div_(total.clamp_min(tiny)[..., None])
    if bool(empty.any()):  # uniform over the real keys instead
        uniform = values.sum(1) / k.sum(1).clamp_min(1)[None, :, None]  # [c, batch, head size]
        out = torch.where(empty[..., None], uniform[:, None], out)
    return out.permute(2, 1, 0, 3)


def _with_probabilities(papa: ConstantHeads, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        live_mask: torch.Tensor | None, keys: torch.Tensor, constant: torch.Tensor, scaling: float,
                        dropout: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention with every head's [seq, seq] probabilities built explicitly (``output_attentions``)."""
    batch, num_heads, seq, _ = value.shape
    keys = keys[:, None, None, :]
    constant = constant * keys
    total = constant.sum(-1, keepdim=True)
    uniform = (keys / keys.sum(-1, keepdim=True).clamp_min(1)).expand_as(constant)
    constant = torch.where(total > 0, constant / total.clamp_min(torch.finfo(value.dtype).tiny), uniform)
    real = None
    if papa.live:
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        if live_mask is not None:
            scores = scores + live_mask
        real = nn.functional.dropout(scores.softmax(-1), p=dropout, training=training)
    if papa.gates is not None:
        gate = papa.gates.sigmoid().to(value.dtype)[None, :, None, None]
        probs = gate * real + (1 - gate) * constant
    else:
        probs = value.new_empty(batch, num_heads, seq, seq)
        probs[:, papa.heads] = constant
        if papa.live:
            probs[:, papa.live] = real
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def papa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`AttentionInterface` function of BERT-style layers (query/key: live heads only): ([batch, seq, heads,
    head size], probabilities or None)."""
    papa: ConstantHeads | None = getattr(module, "papa", None)
    if papa is None:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    return constant_head_attention(papa, query, key, value, attention_mask, scaling or query.size(-1) ** -0.5,
                                   dropout, module.training)


AttentionInterface.register(ATTENTION, papa_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)
