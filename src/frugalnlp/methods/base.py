"""What a training method is: how a run builds its model(s) and trains them, stage by stage.

`frugalnlp.training.train_run` does everything around it (checks, data, the output directory, calibration,
scores) and hands the method a `Stages` to fit its models with the HF Trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from frugalnlp.defaults import default_exit_layers
from frugalnlp.early_exit.modeling import EarlyExitModel, check_exit_layers
from frugalnlp.errors import FrugalError

if TYPE_CHECKING:
    from frugalnlp.early_exit.cascade import Cascade
    from frugalnlp.run import RunSpec
    from frugalnlp.tasks import TaskData


class Stages(Protocol):
    """How a method trains: each call fits one model with the run's recipe (Trainer, checkpoints, resume)."""

    def fit(self, model: EarlyExitModel, stage: str, teacher: bool = True) -> None:
        """Train ``model`` as the stage named ``stage`` (its checkpoint folder); ``teacher``: on the run's
        teacher logits when it distils from one (False: plain labels, e.g. a stage that is the plain model)."""


class Method:
    """One training method, registered in `frugalnlp.methods.METHODS` under its ``name``.

    ``kind``: what the run's model is: ``"plain"`` (one classifier), ``"early-exit"`` (one backbone with exits)
    or ``"cascade"`` (models of growing depth).
    ``recipe_fields``: the `ExitRecipe` fields it takes (the others must keep their defaults).
    """

    name: str = ""
    kind: str = "early-exit"
    recipe_fields: tuple[str, ...] = ()

    def check(self, spec: RunSpec) -> None:
        """FrugalError for settings this method cannot take (checked before any work)."""
        if spec.num_layers is not None:
            raise FrugalError("--num-layers trains one truncated model: it needs --method plain "
                              "(multi-model trains one per --exit-layers)")

    def exit_layers(self, spec: RunSpec, num_layers: int) -> list[int]:
        """The run's exits on a ``num_layers``-layer encoder (the default set unless ``--exit-layers``)."""
        return check_exit_layers(spec.exit_layers or default_exit_layers(num_layers), num_layers)

    def build(self, spec: RunSpec, model_path: str, task: TaskData) -> list[EarlyExitModel]:
        """Fresh models (``spec.exit_layers`` is set), built under the run's seed."""
        raise NotImplementedError

    def train(self, models: list[EarlyExitModel], spec: RunSpec, stages: Stages) -> EarlyExitModel | Cascade:
        """Fit ``models`` and return the run's adaptive model. Default: each model is one stage."""
        for model in models:
            stages.fit(model, f"layers-{model.config.exit_layers[-1]}")
        return models[0]


# The recipe fields of a method whose models are each one classifier (plain, multi-model): logit distillation
# from --teacher RUN, the only recipe that does not need exits sharing a backbone.
TEACHER_FIELDS = ("distill", "distill_alpha", "distill_temperature")


def check_teacher_only(spec: RunSpec) -> None:
    """FrugalError for ``--distill self`` on models with one exit each: they have no later exit to learn from."""
    if spec.recipe.distill == "self":
        raise FrugalError(f"--distill self needs a model with exits (joint, sweet, two-stage); a {spec.method} model "
                          "distils from a finished run: --teacher RUN")


def head_args(spec: RunSpec, task: TaskData) -> dict:
    """`EarlyExitModel.from_backbone` keywords every method passes: labels and pooling."""
    return dict(num_labels=task.num_labels, pooling=spec.pooling, id2label=dict(enumerate(task.label_names)))
