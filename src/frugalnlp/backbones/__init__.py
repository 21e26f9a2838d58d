"""Backbone adapters, one per model family; `backbone_for` picks the one a model needs."""

from __future__ import annotations

from transformers import PreTrainedModel

from frugalnlp.backbones.base import Backbone, State
from frugalnlp.backbones.bert import BertBackbone
from frugalnlp.backbones.deberta_v2 import DebertaV2Backbone
from frugalnlp.backbones.mpnet import MPNetBackbone
from frugalnlp.errors import FrugalError

ADAPTERS: list[type[Backbone]] = [BertBackbone, DebertaV2Backbone, MPNetBackbone]


def supported_families() -> list[str]:
    return [family for adapter in ADAPTERS for family in adapter.families]


def backbone_for(model: PreTrainedModel) -> Backbone:
    """The adapter for ``model``'s family (its ``config.model_type``)."""
    for adapter in ADAPTERS:
        if model.config.model_type in adapter.families:
            return adapter(model)
    raise FrugalError(f"model family '{model.config.model_type}' is not supported; "
                      f"supported: {', '.join(supported_families())}")


__all__ = ["Backbone", "State", "backbone_for", "supported_families"]
