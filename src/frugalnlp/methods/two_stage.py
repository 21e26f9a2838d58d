"""``two-stage`` (DeeBERT): a plain fine-tune, then the early exits trained on its frozen backbone, whose last
exit stays the plain model bit for bit."""

from __future__ import annotations

from frugalnlp.early_exit.config import RECIPE_FIELDS
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.errors import FrugalError
from frugalnlp.methods.base import Method, Stages, head_args


class TwoStage(Method):
    name = "two-stage"
    recipe_fields = tuple(f for f in RECIPE_FIELDS if f != "boundary_grad")

    def check(self, spec) -> None:
        super().check(spec)
        if spec.recipe.boundary_grad is not None:
            raise FrugalError("--boundary-grad has no effect with --method two-stage (its backbone is frozen)")

    def build(self, spec, model_path: str, task) -> list[EarlyExitModel]:
        return [EarlyExitModel.from_backbone(model_path, method="joint", **head_args(spec, task))]

    def train(self, models: list[EarlyExitModel], spec, stages: Stages) -> EarlyExitModel:
        (plain,) = models
        stages.fit(plain, "plain", teacher=False)
        model = exits_on_frozen_backbone(plain, spec)
        stages.fit(model, "exits")
        return model


def exits_on_frozen_backbone(plain: EarlyExitModel, spec) -> EarlyExitModel:
    """Two-stage's second model: ``plain``'s backbone and head as the last exit, fresh early heads.

    The backbone and the last head are frozen, so the last exit stays the plain model bit for bit.
    """
    model = EarlyExitModel.from_backbone(plain.backbone, exit_layers=spec.exit_layers, method="two-stage",
                                         num_labels=plain.config.num_labels, pooling=spec.pooling,
                                         id2label=plain.config.id2label, recipe=spec.recipe)
    model.heads[-1].load_state_dict(plain.heads[0].state_dict())
    model.backbone.requires_grad_(False)
    model.heads[-1].requires_grad_(False)
    return model
