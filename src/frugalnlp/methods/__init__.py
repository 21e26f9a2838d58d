"""Training methods by name. A new method is a `Method` subclass in a file of its own and one line here."""

from __future__ import annotations

from frugalnlp.methods.base import Method, Stages, head_args
from frugalnlp.methods.multi_model import MultiModel
from frugalnlp.methods.plain import Plain
from frugalnlp.methods.shared_backbone import SharedBackbone
from frugalnlp.methods.two_stage import TwoStage

METHODS: dict[str, Method] = {method.name: method for method in (
    Plain(),
    SharedBackbone("joint"),
    SharedBackbone("sweet"),
    TwoStage(),
    MultiModel(),
)}


def early_exit_methods() -> list[str]:
    """Names of the methods whose run is one backbone with exits (not a cascade, not a lone classifier)."""
    return [name for name, method in METHODS.items() if method.kind == "early-exit"]


__all__ = ["METHODS", "Method", "Stages", "early_exit_methods", "head_args"]
