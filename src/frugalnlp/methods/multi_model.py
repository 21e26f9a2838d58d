"""``multi-model``: one model truncated to each exit's depth, trained alone, run as a cascade in which a later
model recomputes from the input (its members alone are static models); with ``--teacher RUN`` each member is
distilled from that run's last exit."""

from __future__ import annotations

from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.methods.base import TEACHER_FIELDS, Method, Stages, check_teacher_only, head_args


class MultiModel(Method):
    name = "multi-model"
    kind = "cascade"
    recipe_fields = TEACHER_FIELDS

    def check(self, spec) -> None:
        super().check(spec)
        check_teacher_only(spec)

    def build(self, spec, model_path: str, task) -> list[EarlyExitModel]:
        return [EarlyExitModel.from_backbone(model_path, method="joint", num_layers=k, recipe=spec.recipe,
                                             **head_args(spec, task))
                for k in spec.exit_layers]

    def train(self, models: list[EarlyExitModel], spec, stages: Stages) -> Cascade:
        super().train(models, spec, stages)
        return Cascade(models)
