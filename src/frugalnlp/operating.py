"""Operating points saved with a run: the policy and thresholds to deploy, how they were chosen and what
they gave on dev, bound to the run's weights.

``frugalnlp calibrate RUN --target-speedup S`` (or ``--max-drop E [--risk D]``) chooses on dev and writes
``RUN/operating-point.json``; `Predictor` (so `predict`, `serve` and ``--engine ray``) uses it by default,
explicit flags override it, and a point whose weights' sha256 is not the run's is refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save

from frugalnlp.assets import weights_sha256
from frugalnlp.early_exit.ensemble import ExitEnsemble
from frugalnlp.early_exit.router import ExitRouter
from frugalnlp.errors import FrugalError
from frugalnlp.rundir import write_bytes, write_json

if TYPE_CHECKING:  # annotations only: loading a saved point needs none of their imports (scipy, the models)
    from frugalnlp.curves import SplitScores
    from frugalnlp.dev_choice import DevChoice

OPERATING_POINT = "operating-point.json"
FITTED_TENSORS = "operating-point.safetensors"  # an exit ensemble's and a router's tensors, when the point has them
KIND = "frugalnlp-operating-point"


@dataclass
class OperatingPoint:
    """One deployable decision rule of a run, with its provenance."""

    policy: str
    threshold: float | list[float]
    chosen_by: str  # "dev: target speedup 2", "dev: max drop 0.01", "learn-then-test: ..."
    dev: dict  # accuracy, macro-F1 and speedups on dev at this point
    model_sha256: str | None  # sha256 of the run's weights (model/**.safetensors)
    target_speedup: float | None = None
    max_drop: float | None = None
    risk: float | None = None
    certified: bool | None = None  # None: not certified (no --risk); else whether Learn-then-Test certified it
    certificate: dict | None = None
    command: str = ""
    cost: str = "layers"  # what the target speedup is in: layers, or time measured on the run's runtime
    segment_times: dict | None = None  # with cost "time": `frugalnlp.timing.SegmentTimes` it was chosen by
    ensemble: ExitEnsemble | None = None  # fitted on dev; saved beside the JSON as safetensors
    router: ExitRouter | None = None  # the learned policy's, fitted on dev; saved the same way

    def to_dict(self) -> dict:
        """The JSON record (the ensemble's and router's tensors go to ``operating-point.safetensors``)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("ensemble", "router")}
        return {**record, "ensemble": self.ensemble is not None, "router": self.router is not None,
                "ensemble_forms": None if self.ensemble is None else self.ensemble.forms}

    def save(self, run: str | Path, overwrite: bool = False) -> Path:
        path = Path(run) / OPERATING_POINT
        if path.exists() and not overwrite:
            raise FrugalError(f"{path} already exists; pass --overwrite to replace the run's operating point")
        tensors = path.with_name(FITTED_TENSORS)
        fitted = {**(self.ensemble.tensors() if self.ensemble else {}), **(self.router.tensors() if self.router else {})}
        if fitted:
            write_bytes(tensors, save(fitted, metadata={"format": "pt"}))
        else:
            tensors.unlink(missing_ok=True)
        write_json(path, {"kind": KIND, **self.to_dict()})
        return path


def run_weights_sha256(run: str | Path) -> str | None:
    """The hash an operating point of ``run`` is bound to: every safetensors file under ``RUN/model``."""
    return weights_sha256(Path(run) / "model", recursive=True)


def load_operating_point(run: str | Path) -> OperatingPoint | None:
    """The run's saved operating point (None if it has none); FrugalError if it belongs to other weights."""
    path = Path(run) / OPERATING_POINT
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise FrugalError(f"{path} is not valid JSON ({error}); run `frugalnlp calibrate {run} --overwrite`") from None
    if not isinstance(data, dict) or data.pop("kind", None) != KIND:
        raise FrugalError(f"{path} is not a frugalnlp operating point")
    has_ensemble, has_router = data.pop("ensemble", False), data.pop("router", False)
    forms = data.pop("ensemble_forms", None)
    ensemble = router = None
    if has_ensemble or has_router:
        tensors = path.with_name(FITTED_TENSORS)
        if not tensors.is_file():
            raise FrugalError(f"{path} names fitted tensors (exit ensemble or router) but {tensors} is missing; run "
                              f"`frugalnlp calibrate {run} ... --overwrite`")
        saved = load_file(str(tensors))
        ensemble = ExitEnsemble.from_tensors(saved, forms) if has_ensemble else None
        router = ExitRouter.from_tensors(saved) if has_router else None
    point = OperatingPoint(**data, ensemble=ensemble, router=router)
    actual = run_weights_sha256(run)
    if point.model_sha256 != actual:
        raise FrugalError(f"{path} was chosen for other weights (sha256 {str(point.model_sha256)[:16]}, this run's "
                          f"are {str(actual)[:16]}): it belongs to another run; run `frugalnlp calibrate {run} "
                          "--overwrite` or pass --threshold")
    return point


def calibrate_run(run: str | Path, policy: str = "confidence", target_speedup: float | None = None,
                  max_drop: float | None = None, risk: float | None = None, ensemble: bool = False,
                  overwrite: bool = False, cost: str = "layers", cost_batch_size: int = 32) -> OperatingPoint:
    """Choose the run's operating point on dev (`frugalnlp.dev_choice.operating_threshold`; with ``ensemble``
    the policy decides on an exit ensemble fitted on dev; the learned policy's router is fitted on dev, its
    threshold chosen on cross-fitted dev scores) and save it. ``cost="time"``: the target speedup is in time
    measured on the run's own runtime (an ONNX export's, or torch) at ``cost_batch_size`` (`time_split`), so
    2x is twice the plain model's texts/s there, not half its layers."""
    from frugalnlp.curves import COSTS, dev_scores, time_split
    from frugalnlp.dev_choice import check_operating_target, operating_threshold
    from frugalnlp.early_exit.registry import check_policy
    from frugalnlp.run import load_run

    check_policy(policy)  # an unknown policy fails before the dev logits
    check_operating_target(target_speedup, max_drop, risk)
    if cost not in COSTS:
        raise FrugalError(f"unknown --cost '{cost}'; choose one of {', '.join(COSTS)}")
    if cost_batch_size < 1:
        raise FrugalError(f"--cost-batch-size {cost_batch_size} must be at least 1")
    path = Path(run) / OPERATING_POINT
    if path.exists() and not overwrite:  # before minutes of dev logits
        raise FrugalError(f"{path} already exists; pass --overwrite to replace the run's operating point")
    trained = load_run(run)
    dev = dev_scores(trained, ensemble, policy)
    if cost == "time":  # a new SplitScores each call: the cached logits are untouched
        dev.times = time_split(trained, "dev", cost_batch_size)
    point = operating_point(run, dev, operating_threshold(dev, target_speedup, max_drop, policy, risk), policy,
                            target_speedup, max_drop, risk)
    point.save(run, overwrite=overwrite)
    return point


def operating_point(run: str | Path, dev: SplitScores, chosen: DevChoice, policy: str,
                    target_speedup: float | None = None, max_drop: float | None = None,
                    risk: float | None = None) -> OperatingPoint:
    """The run's operating point for a choice made on its dev scores (`frugalnlp.dev_choice.operating_threshold`)
    for ``policy`` (deployed as ``chosen.policy``: per-exit thresholds where a fixed exit won on dev), bound to
    the run's weights: what `calibrate_run` saves and what `Predictor` keeps when it chooses itself."""
    from frugalnlp.report import command_line

    how = f"dev: target speedup {target_speedup:g}" if target_speedup is not None else f"dev: max drop {max_drop:g}"
    if dev.times is not None:
        how += f" (in time measured on {dev.times.runtime} at batch {dev.times.batch_size})"
    if risk is not None:
        how = f"learn-then-test on dev: max drop {max_drop:g} with risk {risk:g}"
    if chosen.policy != policy:
        fixed = chosen.point.threshold.index(0.0)  # `fixed_exit_thresholds`: 1 before the exit, 0 at it
        how += f"; fixed exit {fixed + 1} (layer {dev.model.exit_layers[fixed]}) beats the {policy} policy there"
    figures = chosen.point.to_dict()
    return OperatingPoint(policy=chosen.policy, threshold=chosen.point.threshold, chosen_by=how,
                          dev={k: figures[k] for k in ("accuracy", "macro_f1", "speedup_layers", "speedup_flops",
                                                        "speedup_time") if k in figures},
                          cost="layers" if dev.times is None else "time",
                          segment_times=None if dev.times is None else dev.times.to_dict(),
                          model_sha256=run_weights_sha256(run), target_speedup=target_speedup, max_drop=max_drop,
                          risk=risk, certified=chosen.certified, certificate=chosen.certificate, command=command_line(),
                          ensemble=chosen.ensemble or dev.ensemble, router=chosen.router)
