"""EarlyExitConfig: everything needed to rebuild an early-exit model, saved with it as JSON."""

from __future__ import annotations

from transformers import PretrainedConfig

from frugalnlp.errors import FrugalError

METHODS = ("joint", "sweet", "two-stage")
POOLINGS = ("first", "mean")
DISTILL = (None, "self", "teacher")
EXIT_WEIGHTS = ("uniform", "depth")
# The gradient kept across each exit boundary by default: joint keeps it all, SWEET none.
# two-stage trains the exits on a frozen backbone, so no gradient crosses a boundary anyway.
DEFAULT_BOUNDARY_GRAD = {"joint": 1.0, "sweet": 0.0, "two-stage": 1.0}


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
        boundary_grad: A in [0, 1], the factor on the gradient flowing back across each exit boundary
            (None: the method's, 1 for joint, 0 for SWEET).
        distill: None, ``"self"`` (early exits learn from the model's own last exit) or ``"teacher"``
            (from another model's logits, given to ``forward`` as ``teacher_logits``).
        distill_alpha: weight of the distillation KL; cross-entropy gets 1 - alpha.
        distill_temperature: softmax temperature of both sides of the KL (the loss is scaled by T^2).
        exit_weights: ``"uniform"`` or ``"depth"`` (each exit's loss weighted in proportion to its layer,
            normalised so the weights sum to the number of exits, as uniform ones do).
    """

    model_type = "frugalnlp-early-exit"

    def __init__(self, backbone_config: dict | None = None, exit_layers: list[int] | None = None,
                 method: str | None = None, pooling: str = "mean", classifier_dropout: float = 0.1,
                 temperatures: list[float] | None = None, boundary_grad: float | None = None,
                 distill: str | None = None, distill_alpha: float = 0.5, distill_temperature: float = 2.0,
                 exit_weights: str = "uniform", **kwargs) -> None:
        self.backbone_config = backbone_config
        self.exit_layers = list(exit_layers) if exit_layers is not None else None
        self.method = method
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        self.temperatures = list(temperatures) if temperatures is not None else None
        if boundary_grad is None and method in DEFAULT_BOUNDARY_GRAD:
            boundary_grad = DEFAULT_BOUNDARY_GRAD[method]
        self.boundary_grad = boundary_grad
        self.distill = distill
        self.distill_alpha = distill_alpha
        self.distill_temperature = distill_temperature
        self.exit_weights = exit_weights
        super().__init__(**kwargs)

    def validate_recipe(self) -> None:
        """FrugalError naming the field when a training field is out of its range."""
        if self.method not in METHODS:
            raise FrugalError(f"training method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.pooling not in POOLINGS:
            raise FrugalError(f"pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        check_recipe(self.boundary_grad, self.distill, self.distill_alpha, self.distill_temperature,
                     self.exit_weights)


def check_recipe(boundary_grad: float | None, distill: str | None, distill_alpha: float,
                 distill_temperature: float, exit_weights: str) -> None:
    """Validate the exit-training recipe (shared by the config and the CLI, before any work starts)."""
    if boundary_grad is not None and not (isinstance(boundary_grad, (int, float)) and 0.0 <= boundary_grad <= 1.0):
        raise FrugalError(f"--boundary-grad {boundary_grad!r} is outside [0, 1] (1 = joint, 0 = SWEET)")
    if distill not in DISTILL:
        raise FrugalError(f"--distill {distill!r} is not one of self, teacher")
    if not 0.0 <= distill_alpha <= 1.0:
        raise FrugalError(f"--distill-alpha {distill_alpha!r} is outside [0, 1]")
    if not distill_temperature > 0:
        raise FrugalError(f"--distill-temperature {distill_temperature!r} must be positive")
    if exit_weights not in EXIT_WEIGHTS:
        raise FrugalError(f"--exit-weights {exit_weights!r} is not one of {', '.join(EXIT_WEIGHTS)}")
