"""frugalnlp: cheaper Transformer classifiers at inference (SWEET early exit, Multi-Model cascades, PAPA)."""

from transformers import AutoConfig, AutoModel

from frugalnlp.early_exit.config import EarlyExitConfig
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.runner import Prediction

AutoConfig.register(EarlyExitConfig.model_type, EarlyExitConfig)
AutoModel.register(EarlyExitConfig, EarlyExitModel)

__all__ = ["EarlyExitConfig", "EarlyExitModel", "Prediction"]
__version__ = "0.1.0"
