"""int8 for the CPU it runs on: the dynamic quantization configuration per instruction set, as the ecosystem's
tools choose it (Optimum's ``AutoQuantizationConfig.avx2/avx512/avx512_vnni/arm64``), picked from this CPU's
features unless ``--isa`` says otherwise, recorded in ``export.json`` and checked when an export loads.

Why it differs: on x86 without VNNI, ONNX Runtime runs u8 x s8 products with VPMADDUBSW, whose 16-bit
intermediate sums can saturate; 7-bit weights (``reduce_range``) keep that fast path exact enough (ONNX Runtime's
quantization guide). VNNI (AVX-512 or AVX) and ARM64 have no such issue and take full-range s8 weights. In
every configuration: per-channel weight scales, and only matmuls with a weight operand (attention's activation
products and the fused ``Attention`` op stay fp32).
"""

from __future__ import annotations

import platform
import sys

from frugalnlp.errors import FrugalError
from frugalnlp.timing import cpu_features

# isa -> (weights' range reduced to 7 bits, the CPU features any one of which it needs)
ISAS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "avx512_vnni": (False, ("avx512_vnni", "avx_vnni")),
    "avx512": (True, ("avx512f",)),
    "avx2": (True, ("avx2",)),
    "arm64": (False, ("arm64",)),
}
_NOTED: set[str] = set()  # exports already noted in this process


def _features() -> dict[str, bool]:
    return {**cpu_features(), "arm64": platform.machine().lower() in ("aarch64", "arm64")}


def detect_isa(features: dict[str, bool] | None = None) -> str:
    """The best configuration this CPU runs (``features``: `frugalnlp.timing.cpu_features` plus ``arm64``)."""
    features = _features() if features is None else features
    return next((isa for isa, (_, needs) in ISAS.items() if any(features.get(f) for f in needs)), "avx2")


def quantization_config(isa: str | None = None) -> dict:
    """What ``export --quantize int8`` records and applies: ``isa`` given (``--isa``), or this CPU's."""
    if isa not in (None, "auto") and isa not in ISAS:
        raise FrugalError(f"unknown --isa '{isa}'; choose auto or one of {', '.join(ISAS)}")
    chosen = detect_isa() if isa in (None, "auto") else isa
    return {"mode": "dynamic", "isa": chosen, "chosen": "--isa" if isa not in (None, "auto") else "this CPU's features",
            "weight_type": "QInt8", "activation_type": "QUInt8", "reduce_range": ISAS[chosen][0], "per_channel": True,
            "operators": "MatMul with a weight operand (MatMulConstBOnly); Attention stays fp32"}


def check_config(config: object) -> str | None:
    """What is wrong with an ``export.json`` quantization record (None: nothing, or no record)."""
    if config is None:
        return None
    if not isinstance(config, dict) or config.get("isa") not in ISAS or not isinstance(config.get("reduce_range"),
                                                                                        bool):
        return f"quantization must record an isa ({', '.join(ISAS)}) and reduce_range"
    return None


def note_isa(config: dict | None, where: str, features: dict[str, bool] | None = None) -> None:
    """Print one line (once per export and process) when ``where`` was quantized for an instruction set this CPU
    lacks: it runs, but its speed (and, past saturation, its accuracy) may not hold."""
    if config is None or where in _NOTED:
        return
    features = _features() if features is None else features
    if any(features.get(f) for f in ISAS[config["isa"]][1]):
        return
    _NOTED.add(where)
    print(f"frugalnlp: note: {where} was quantized for {config['isa']}, which this CPU lacks (it has "
          f"{detect_isa(features)}): its speed or accuracy may not hold; export it again here "
          "(`frugalnlp export RUN --quantize int8`, or --isa)", file=sys.stderr)
