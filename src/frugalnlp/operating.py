"""Operating points saved with a run: the policy and thresholds to deploy, how they were chosen and what
they gave on dev, bound to everything that decides the run's answers.

``frugalnlp calibrate RUN --target-speedup S`` (or ``--max-drop E [--risk D]``) chooses on dev and writes
``RUN/operating-point.json`` (with a fitted exit ensemble or router, their tensors beside it in a file named by
its sha256, which the JSON records). `Predictor` (so `predict`, `serve` and ``--engine ray``) uses it by
default, explicit flags override it. On load every field is checked (against the run's exits and labels, too),
and a point is refused unless its binding is the sha256 of every file under the run's ``model/`` as the run's
manifest lists them (weights or graphs, export.json, configs, tokenizer) and its tensors are the ones recorded.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save

from frugalnlp.atomic import jsonable, write_bytes, write_json
from frugalnlp.early_exit.ensemble import ExitEnsemble
from frugalnlp.early_exit.router import ExitRouter
from frugalnlp.errors import FrugalError
from frugalnlp.manifest import listing_sha256, sha256_file

if TYPE_CHECKING:  # annotations only: loading a saved point needs none of their imports (scipy, the models)
    from frugalnlp.curves import SplitScores
    from frugalnlp.dev_choice import DevChoice, OperatingTarget

OPERATING_POINT = "operating-point.json"
# an exit ensemble's and a router's tensors, when the point has them: operating-point.<sha256[:16]>.safetensors
FITTED_TENSORS = re.compile(r"operating-point\.[0-9a-f]{16}\.safetensors")
LOCK = ".operating-point.lock"
KIND = "frugalnlp-operating-point"


@dataclass
class OperatingPoint:
    """One deployable decision rule of a run, with its provenance."""

    policy: str
    threshold: float | list[float]
    chosen_by: str  # "dev: target speedup 2", "dev: max drop 0.01", "learn-then-test: ..."
    dev: dict  # accuracy, macro-F1 and speedups on dev at this point
    model_sha256: str | None  # the binding: `run_binding`, over every file under RUN/model
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

    def speedup_text(self) -> str:
        """Its dev speedups: `speedup_text`."""
        return speedup_text(self.dev)

    def to_dict(self) -> dict:
        """The JSON record (the ensemble's and router's tensors go to their own safetensors file)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("ensemble", "router")}
        return {**record, "ensemble": self.ensemble is not None, "router": self.router is not None,
                "ensemble_forms": None if self.ensemble is None else self.ensemble.forms}

    def save(self, run: str | Path, overwrite: bool = False) -> Path:
        """Write ``RUN/operating-point.json`` and its tensors as one unit: the tensors go to a new file named by
        their hash, the JSON naming it replaces the old one atomically, and only then are older tensors
        removed. A crash at any step leaves the old point or the new one, never the JSON of one with the
        tensors of the other."""
        path = Path(run) / OPERATING_POINT
        if path.exists() and not overwrite:
            raise FrugalError(f"{path} already exists; pass --overwrite to replace the run's operating point")
        fitted = {**(self.ensemble.tensors() if self.ensemble else {}), **(self.router.tensors() if self.router else {})}
        tensors = digest = None
        if fitted:
            data = save(fitted, metadata={"format": "pt"})
            staged = path.with_name(f".{OPERATING_POINT}.tensors-{os.getpid()}")
            write_bytes(staged, data)
            digest = sha256_file(staged)
            tensors = f"operating-point.{digest[:16]}.safetensors"
            os.replace(staged, path.with_name(tensors))
        record = json.loads(json.dumps({"kind": KIND, **self.to_dict(), "tensors": tensors, "tensors_sha256": digest},
                                       default=jsonable))  # hashed as it will read back
        write_json(path, {**record, "sha256": record_sha256(record)})
        for old in path.parent.iterdir():
            if old.name != tensors and (FITTED_TENSORS.fullmatch(old.name) or old.name == "operating-point.safetensors"):
                old.unlink(missing_ok=True)
        return path


def speedup_text(figures: dict) -> str:
    """A point's speedups in layers and, where it was timed, in measured time: ``2.00x in layers``."""
    return ", ".join(f"{figures[k]:.2f}x in {unit}" for k, unit in (("speedup_layers", "layers"),
                                                                    ("speedup_time", "measured time")) if k in figures)


def record_sha256(record: dict) -> str:
    """The sha256 of a JSON record's content (keys sorted): stored in the record, it is the point's manifest entry
    for its own JSON, so an edit to any field is refused even where the value would pass the checks."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def run_binding(run: str | Path) -> str:
    """What an operating point of ``run`` is bound to: one sha256 over every file under ``RUN/model`` (weights
    or ONNX graphs, export.json with its temperatures, configs, tokenizer) as the run's verified manifest lists
    them."""
    from frugalnlp.run import verify_run

    return listing_sha256(verify_run(run), "model/")


@contextmanager
def point_lock(run: str | Path) -> Iterator[None]:
    """Hold ``RUN/.operating-point.lock`` for the block: one calibration of a run at a time, taken before the
    minutes of computing, so a second one is refused at once instead of overwriting the first at the end."""
    path = Path(run) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FrugalError(f"{run} is being calibrated by another process; wait for it to finish") from None
        yield
    finally:
        os.close(fd)  # releases the lock


_REQUIRED = ("policy", "threshold", "chosen_by", "dev", "model_sha256", "ensemble", "router", "tensors",
             "tensors_sha256")
_RECORD = {f.name for f in fields(OperatingPoint)} | {"kind", "ensemble_forms", "tensors", "tensors_sha256"}


def load_operating_point(run: str | Path) -> OperatingPoint | None:
    """The run's saved operating point (None if it has none), every field checked: FrugalError in one line
    naming the file and what is wrong (an unknown or missing field, a value of the wrong type or range,
    thresholds or tensors that do not fit the run's exits and labels, tensors changed or of another point),
    or if it is bound to other files than the run's."""
    from frugalnlp.early_exit.registry import make_policy

    path = Path(run) / OPERATING_POINT
    if not path.exists():
        return None
    fix = f"run `frugalnlp calibrate {run} ... --overwrite`"

    def bad(what: str) -> FrugalError:
        return FrugalError(f"{path}: {what}; {fix}")

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise bad(f"not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise bad("not a frugalnlp operating point")
    if data.pop("sha256", None) != record_sha256(data):
        raise bad("edited since it was written (its sha256 field does not match its content)")
    unknown, missing = sorted(set(data) - _RECORD), [k for k in _REQUIRED if k not in data]
    if unknown or missing:
        raise bad(f"unknown field {', '.join(unknown)}" if unknown else f"no {', '.join(missing)}")
    binding = run_binding(run)
    if data["model_sha256"] != binding:
        raise FrugalError(f"{path} was chosen for other files (binding {str(data['model_sha256'])[:16]}, this run's "
                          f"model/ is {binding[:16]}): it belongs to another run or to files since changed; "
                          f"{fix} or pass --threshold")
    config = json.loads((Path(run) / "config.json").read_text())  # verified with the run's manifest
    num_exits, num_labels = len(config["spec"]["exit_layers"]), len(config["task"]["labels"])
    _check_record(data, bad)
    ensemble = router = None
    if data["ensemble"] or data["router"]:
        saved = _load_tensors(path, data, bad)
        ensemble = ExitEnsemble.from_tensors(saved, data.get("ensemble_forms")) if data["ensemble"] else None
        router = ExitRouter.from_tensors(saved) if data["router"] else None
        _check_fitted(ensemble, router, num_exits, num_labels, bad)
    elif data["tensors"] is not None:
        raise bad("it names tensors but neither an exit ensemble nor a router")
    try:  # the policy's own check of its thresholds against the run's exits
        make_policy(data["policy"], data["threshold"], num_exits, ensemble, router)
    except FrugalError as error:
        raise bad(str(error)) from None
    record = {k: v for k, v in data.items() if k not in ("kind", "ensemble", "router", "ensemble_forms", "tensors",
                                                         "tensors_sha256")}
    return OperatingPoint(**record, ensemble=ensemble, router=router)


def _finite(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_record(data: dict, bad) -> None:
    """Every field's type and range (the thresholds against the run's exits: `_check_fitted`)."""
    if not isinstance(data["policy"], str):
        raise bad("policy must be a policy name")
    threshold = data["threshold"]
    if not (_finite(threshold) or isinstance(threshold, list) and threshold and all(map(_finite, threshold))):
        raise bad("threshold must be a number or a list of numbers")
    if data["policy"] == "learned" and not data["router"]:
        raise bad("the learned policy's point has no router")
    dev = data["dev"]
    if not isinstance(dev, dict) or not _finite(dev.get("accuracy")) or not all(map(_finite, dev.values())):
        raise bad("dev must hold the point's accuracy and speedups on dev, as numbers")
    for name in ("target_speedup", "max_drop", "risk"):
        if data.get(name) is not None and not _finite(data[name]):
            raise bad(f"{name} must be a number or null")
    if data.get("cost", "layers") not in ("layers", "time") or not isinstance(data.get("segment_times") or {}, dict):
        raise bad("cost must be layers or time, and segment_times an object or null")
    for name, kind in (("chosen_by", str), ("command", str), ("certified", bool), ("certificate", dict),
                       ("ensemble", bool), ("router", bool), ("ensemble_forms", list)):
        if data.get(name) is not None and not isinstance(data[name], kind):
            raise bad(f"{name} must be {kind.__name__}")


def _load_tensors(path: Path, data: dict, bad) -> dict:
    """The point's safetensors file: named as recorded (a file beside the JSON), with the recorded sha256."""
    name, digest = data["tensors"], data["tensors_sha256"]
    if not isinstance(name, str) or not FITTED_TENSORS.fullmatch(name) or not isinstance(digest, str):
        raise bad("tensors must name its operating-point.<sha256>.safetensors file and tensors_sha256 its hash")
    tensors = path.with_name(name)
    if not tensors.is_file() or tensors.is_symlink():
        raise bad(f"its tensors {name} are missing")
    if sha256_file(tensors) != digest or not digest.startswith(name.split(".")[1]):
        raise bad(f"{name} is not the file it was saved with (its sha256 differs)")
    try:
        return load_file(str(tensors))
    except (SafetensorError, OSError, ValueError) as error:
        raise bad(f"{name} cannot be read as safetensors ({error})") from None


def _check_fitted(ensemble: ExitEnsemble | None, router: ExitRouter | None, num_exits: int, num_labels: int,
                  bad) -> None:
    """The fitted tensors' shapes against the run's exits and labels, their values finite."""
    import numpy as np
    import torch

    from frugalnlp.early_exit.router import router_features

    expected = {}
    if ensemble is not None:
        expected.update(maps=(ensemble.maps, (num_exits, num_labels, num_exits * num_labels)),
                        bias=(ensemble.bias, (num_exits, num_labels)))
    if router is not None:
        features = router_features(np.zeros((1, 1, num_labels)), num_exits).shape[1]
        expected.update({f"router {k}": (getattr(router, k), shape) for k, shape in (
            ("weights", (num_exits - 1, features)), ("bias", (num_exits - 1,)), ("mean", (num_exits - 1, features)),
            ("scale", (num_exits - 1, features)))})
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise bad(f"the {name} tensor is {list(tensor.shape)}, not {list(shape)} for this run's {num_exits} exits "
                      f"and {num_labels} labels: it belongs to another point")
        if not torch.isfinite(tensor).all():
            raise bad(f"the {name} tensor holds values that are not finite")


def calibrate_run(run: str | Path, target: OperatingTarget, ensemble: bool = False, overwrite: bool = False
                  ) -> OperatingPoint:
    """Choose the run's operating point on dev for ``target`` (`frugalnlp.dev_choice.operating_threshold`; with
    ``ensemble`` the policy decides on an exit ensemble fitted on dev; the learned policy's router is fitted on
    dev, its threshold chosen on cross-fitted dev scores) and save it. With ``target.cost == "time"`` the target
    speedup is in time measured on the run's own runtime (an ONNX export's, or torch) at the target's cost batch
    size (`time_split`), so 2x is twice the plain model's texts/s there, not half its layers."""
    from frugalnlp.curves import dev_scores, time_split
    from frugalnlp.dev_choice import operating_threshold
    from frugalnlp.run import load_run

    path = Path(run) / OPERATING_POINT
    if path.exists() and not overwrite:  # before minutes of dev logits
        raise FrugalError(f"{path} already exists; pass --overwrite to replace the run's operating point")
    trained = load_run(run)
    with point_lock(run):
        dev = dev_scores(trained, ensemble, target.policy)
        if target.cost == "time":  # a new SplitScores each call: the cached logits are untouched
            dev.times = time_split(trained, "dev", target.cost_batch_size)
        point = operating_point(run, dev, operating_threshold(dev, target), target)
        point.save(run, overwrite=overwrite)
    return point


def save_chosen_point(run: str | Path, target: OperatingTarget, ensemble: bool, chosen: dict) -> OperatingPoint:
    """Save a point chosen elsewhere on this run's dev split (the demo's choice in measured seconds): ``chosen``'s
    ``policy`` and ``threshold`` as they were chosen, its ``dev`` figures and ``chosen_by``, with the exit ensemble
    (``ensemble``) and the learned policy's router fitted on dev as the choice fitted them."""
    from frugalnlp.curves import dev_scores
    from frugalnlp.report import command_line
    from frugalnlp.run import load_run

    trained = load_run(run)
    with point_lock(run):
        dev = dev_scores(trained, ensemble, target.policy)
        point = OperatingPoint(policy=chosen["policy"], threshold=chosen["threshold"], chosen_by=chosen["chosen_by"],
                               dev=chosen["dev"], model_sha256=run_binding(run), target_speedup=target.speedup,
                               cost=target.cost, command=command_line(), ensemble=dev.ensemble, router=dev.router)
        point.save(run)
    return point


def operating_point(run: str | Path | None, dev: SplitScores, chosen: DevChoice, target: OperatingTarget
                    ) -> OperatingPoint:
    """The run's operating point for a choice made on its dev scores (`frugalnlp.dev_choice.operating_threshold`)
    for ``target`` (deployed as ``chosen.policy``: per-exit thresholds where a fixed exit won on dev), bound to
    the run's files (`run_binding`; None: bound to no run, never to be saved): what `calibrate_run` saves and
    what `Predictor` keeps when it chooses itself."""
    from frugalnlp.report import command_line

    target_speedup, max_drop, policy, risk = target.speedup, target.max_drop, target.policy, target.risk
    how = target.describe()
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
                          model_sha256=None if run is None else run_binding(run), target_speedup=target_speedup,
                          max_drop=max_drop, risk=risk, certified=chosen.certified, certificate=chosen.certificate,
                          command=command_line(),
                          ensemble=chosen.ensemble or dev.ensemble, router=chosen.router)
