"""PAPA (Hassid et al., 2022): how much of a pretrained Transformer's attention depends on the input."""

from frugalnlp.papa.constants import compute_constant_attention, load_constant_attention, save_constant_attention
from frugalnlp.papa.attention import ConstantHeads
from frugalnlp.papa.modeling import PapaConfig, PapaModel, Probe

__all__ = ["compute_constant_attention", "load_constant_attention", "save_constant_attention", "ConstantHeads",
           "PapaConfig", "PapaModel", "Probe"]
