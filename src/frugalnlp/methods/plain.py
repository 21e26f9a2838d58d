"""``plain``: one classifier on the last layer (or on layer K with ``--num-layers K``: a static model), trained on
labels or distilled from ``--teacher RUN`` (DistilBERT-style logits: the static alternative at its strongest)."""

from __future__ import annotations

from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.errors import FrugalError
from frugalnlp.methods.base import TEACHER_FIELDS, Method, check_teacher_only, head_args


class Plain(Method):
    name = "plain"
    kind = "plain"
    recipe_fields = TEACHER_FIELDS

    def check(self, spec) -> None:
        check_teacher_only(spec)  # --num-layers is this method's

    def exit_layers(self, spec, num_layers: int) -> list[int]:
        if spec.exit_layers:
            raise FrugalError("--exit-layers needs --method joint, sweet, two-stage or multi-model")
        if spec.num_layers is not None and not 1 <= spec.num_layers <= num_layers:
            raise FrugalError(f"--num-layers {spec.num_layers} is out of range: this model has layers 1..{num_layers}")
        return [spec.num_layers or num_layers]

    def build(self, spec, model_path: str, task) -> list[EarlyExitModel]:
        return [EarlyExitModel.from_backbone(model_path, method="joint", num_layers=spec.num_layers,
                                             recipe=spec.recipe, **head_args(spec, task))]
