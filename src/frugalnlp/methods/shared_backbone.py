"""``joint`` (Early-Exit: one backbone, summed exit losses) and ``sweet`` (each exit's loss trains only its
own head and the layers since the previous exit): one backbone with exits, the recipe's boundary gradient
telling them apart (1 and 0)."""

from __future__ import annotations

from frugalnlp.early_exit.config import RECIPE_FIELDS
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.methods.base import Method, head_args


class SharedBackbone(Method):
    recipe_fields = RECIPE_FIELDS

    def __init__(self, name: str) -> None:
        self.name = name

    def build(self, spec, model_path: str, task) -> list[EarlyExitModel]:
        return [EarlyExitModel.from_backbone(model_path, exit_layers=spec.exit_layers, method=self.name,
                                             recipe=spec.recipe, **head_args(spec, task))]
