"""EarlyExitConfig: everything needed to rebuild an early-exit model, saved with it as JSON; and `ExitRecipe`,
how the exits share a backbone while training, whose fields are the recipe's CLI flags too."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from transformers import PretrainedConfig

from frugalnlp.errors import FrugalError

METHODS = ("joint", "sweet", "two-stage")  # how a model's exits were trained (the run's methods are in frugalnlp.methods)
POOLINGS = ("first", "mean")
DISTILL = (None, "self", "teacher")
EXIT_WEIGHTS = ("uniform", "depth")
# The gradient kept across each exit boundary by default: joint keeps it all, SWEET none.
# two-stage trains the exits on a frozen backbone, so no gradient crosses a boundary anyway.
DEFAULT_BOUNDARY_GRAD = {"joint": 1.0, "sweet": 0.0, "two-stage": 1.0}


@dataclass
class ExitRecipe:
    """How exits that share one backbone are trained (joint, sweet, two-stage). Each field's metadata gives
    its CLI flag's type and help; `frugalnlp train`, `demo`'s ``METHOD:key=value`` and the checks read them."""

    boundary_grad: float | None = field(default=None, metadata={
        "type": float, "help": "A in [0, 1]: gradient kept across each exit boundary (joint 1, sweet 0)"})
    distill: str | None = field(default=None, metadata={
        "type": str, "help": "self: early exits learn from the model's own last exit (teacher: from --teacher RUN)"})
    distill_alpha: float = field(default=0.5, metadata={
        "type": float, "help": "weight of the KL term (cross-entropy gets 1 - alpha)"})
    distill_temperature: float = field(default=2.0, metadata={
        "type": float, "help": "softmax temperature of both sides of the KL (the loss is scaled by T^2)"})
    exit_weights: str = field(default="uniform", metadata={
        "type": str, "help": "uniform, or depth (each exit's loss weighted in proportion to its layer)"})

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def changed(self) -> list[str]:
        """Names of the fields set to something other than their default."""
        return [f.name for f in fields(self) if getattr(self, f.name) != f.default]

    def check(self) -> None:
        """FrugalError naming the flag when a field is out of its range."""
        a = self.boundary_grad
        if a is not None and not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
            raise FrugalError(f"--boundary-grad {a!r} is outside [0, 1] (1 = joint, 0 = SWEET)")
        if self.distill not in DISTILL:
            raise FrugalError(f"--distill {self.distill!r} is not one of self, teacher")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise FrugalError(f"--distill-alpha {self.distill_alpha!r} is outside [0, 1]")
        if not (self.distill_temperature > 0 and math.isfinite(self.distill_temperature)):
            raise FrugalError(f"--distill-temperature {self.distill_temperature!r} must be positive")
        if self.exit_weights not in EXIT_WEIGHTS:
            raise FrugalError(f"--exit-weights {self.exit_weights!r} is not one of {', '.join(EXIT_WEIGHTS)}")


RECIPE_FIELDS = tuple(f.name for f in fields(ExitRecipe))


class EarlyExitConfig(PretrainedConfig):
    """Configuration of an `EarlyExitModel`.

    Args:
        backbone_config: the wrapped encoder's own config, as a dict (``model_type`` included).
        exit_layers: 1-based layer numbers with a classifier after them, ascending, ending at the
            backbone's last layer.
        method: ``"joint"`` (one backbone, summed losses), ``"sweet"`` (each exit's loss only
            updates its own head and segment) or ``"two-stage"`` (DeeBERT: the exits were trained on a
            frozen, already fine-tuned backbone). Required: there is no silent default.
        pooling: how an exit head reads the sequence: ``"first"`` token, or masked ``"mean"``.
        classifier_dropout: dropout before each exit's classifier.
        temperatures: one calibration temperature per exit (1.0 = uncalibrated).
        boundary_grad, distill, distill_alpha, distill_temperature, exit_weights: the `ExitRecipe`
            (``boundary_grad`` None becomes the method's: 1 for joint, 0 for SWEET). They are saved as
            flat fields, as HF configs are; ``config.recipe`` gives them back as the dataclass.
    """

    model_type = "frugalnlp-early-exit"

    def __init__(self, backbone_config: dict | None = None, exit_layers: list[int] | None = None,
                 method: str | None = None, pooling: str = "mean", classifier_dropout: float = 0.1,
                 temperatures: list[float] | None = None, **kwargs) -> None:
        self.backbone_config = backbone_config
        self.exit_layers = list(exit_layers) if exit_layers is not None else None
        self.method = method
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.temperatures = list(temperatures) if temperatures is not None else None
        recipe = ExitRecipe(**{name: kwargs.pop(name) for name in RECIPE_FIELDS if name in kwargs})
        if recipe.boundary_grad is None and method in DEFAULT_BOUNDARY_GRAD:
            recipe.boundary_grad = DEFAULT_BOUNDARY_GRAD[method]
        for name, value in asdict(recipe).items():
            setattr(self, name, value)
        super().__init__(**kwargs)

    @property
    def recipe(self) -> ExitRecipe:
        return ExitRecipe(**{name: getattr(self, name) for name in RECIPE_FIELDS})

    def validate_recipe(self) -> None:
        """FrugalError naming the field when a training field is out of its range."""
        if self.method not in METHODS:
            raise FrugalError(f"training method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.pooling not in POOLINGS:
            raise FrugalError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        self.recipe.check()
