"""``plain``: one classifier on the last layer (or on layer K with ``--num-layers K``: a static model)."""

from __future__ import annotations

from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.errors import FrugalError
from frugalnlp.methods.base import Method, head_args


class Plain(Method):
    name = "plain"
    kind = "plain"

    def check(self, spec) -> None:
        pass  # --num-layers is this method's

    def exit_layers(self, spec, num_layers: int) -> list[int]:
        if spec.exit_layers:
            raise FrugalError("--exit-layers needs --method joint, sweet, two-stage or multi-model")
        if spec.num_layers is not None and not 1 <= spec.num_layers <= num_layers:
            raise FrugalError(f"--num-layers {spec.num_layers} is out of range: this model has layers 1..{num_layers}")
        return [spec.num_layers or num_layers]

    def build(self, spec, model_path: str, task) -> list[EarlyExitModel]:
        return [EarlyExitModel.from_backbone(model_path, method="joint", num_layers=spec.num_layers,
                                             **head_args(spec, task))]
