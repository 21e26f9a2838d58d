"""BERT-family adapter: BERT, RoBERTa, XLM-RoBERTa, ELECTRA share one layer loop."""

from __future__ import annotations

from dataclasses import replace

import torch
from transformers.masking_utils import create_bidirectional_mask

from frugalnlp.backbones.base import Backbone, State


class BertBackbone(Backbone):
    families = ("bert", "roberta", "xlm-roberta", "electra")

    @property
    def max_length(self) -> int:
        positions = self.config.max_position_embeddings
        if self.config.model_type in ("roberta", "xlm-roberta", "mpnet"):  # position ids start after the padding id
            positions -= self.config.pad_token_id + 1
        return positions

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> State:
        # RoBERTa-style embeddings derive position ids from the ids themselves (padding-aware).
        hidden = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        project = getattr(self.model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden
        if project is not None:
            hidden = project(hidden)
        return self.resume(hidden, attention_mask)

    def layer_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def layer(self, index: int, state: State) -> State:
        return replace(state, hidden=self.layers[index](state.hidden, state.layer_mask))
