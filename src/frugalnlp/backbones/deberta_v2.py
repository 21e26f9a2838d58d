"""DeBERTa-v2/v3 adapter: relative positions and relative embeddings travel in the state."""

from __future__ import annotations

from dataclasses import replace

import torch

from frugalnlp.backbones.base import Backbone, State


class DebertaV2Backbone(Backbone):
    families = ("deberta-v2",)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> State:
        hidden = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask)
        return self.resume(hidden, attention_mask)

    def resume(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> State:
        encoder = self.model.encoder
        shared = {}
        rel_embeddings = encoder.get_rel_embedding()  # one LayerNorm of a parameter all layers use
        if rel_embeddings is not None:
            shared["rel_embeddings"] = rel_embeddings
            shared["relative_pos"] = encoder.get_rel_pos(hidden)  # [1, seq, seq]
        return State(hidden=hidden, attention_mask=attention_mask, layer_mask=self.layer_mask(hidden, attention_mask),
                     shared=shared)

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return self.model.encoder.get_attention_mask(attention_mask)

    def layer(self, index: int, state: State) -> State:
        out, _ = self.layers[index](state.hidden, state.layer_mask, relative_pos=state.shared.get("relative_pos"),
                                    rel_embeddings=state.shared.get("rel_embeddings"))
        conv = self.model.encoder.conv
        if index == 0 and conv is not None:  # DeBERTa-v3's convolution reads the embeddings too
            out = conv(state.hidden, out, state.attention_mask)
        return replace(state, hidden=out)

    def trim(self, name: str, value: torch.Tensor, length: int) -> torch.Tensor:
        return value[:, :length, :length] if name == "relative_pos" else value
