"""EarlyExitConfig: everything needed to rebuild an early-exit model, saved with it as JSON."""

from __future__ import annotations

from transformers import PretrainedConfig

METHODS = ("joint", "sweet")
POOLINGS = ("first", "mean")


class EarlyExitConfig(PretrainedConfig):
    """Configuration of an `EarlyExitModel`.

    Args:
        backbone_config: the wrapped encoder's own config, as a dict (``model_type`` included).
        exit_layers: 1-based layer numbers with a classifier after them, ascending, ending at the
            backbone's last layer.
        method: ``"joint"`` (one backbone, summed losses) or ``"sweet"`` (each exit's loss only
            updates its own head and segment). Required: there is no silent default.
        pooling: how an exit head reads the sequence: ``"first"`` token, or masked ``"mean"``.
        classifier_dropout: dropout before each exit's classifier.
        temperatures: one calibration temperature per exit (1.0 = uncalibrated).
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
        super().__init__(**kwargs)
