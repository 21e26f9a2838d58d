"""A training run as a thing on disk: its spec (`RunSpec`, saved in ``config.json``), the task exactly as it
saw it, and loading a finished run for use (`load_run`) on the runtime its directory holds (torch, a cascade
or an ONNX export: `load_adaptive`, `runtime_path`). Nothing here trains: predicting, serving and
evaluating a run import this module, not the training stack."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerBase

from frugalnlp.defaults import MAX_LENGTH
from frugalnlp.early_exit.cascade import MANIFEST as CASCADE, Cascade
from frugalnlp.early_exit.config import RECIPE_FIELDS, ExitRecipe
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.runner import SegmentRunner
from frugalnlp.encoding import load_tokenizer
from frugalnlp.errors import FrugalError
from frugalnlp.manifest import verify_manifest
from frugalnlp.onnx_model import EXPORT, OnnxModel, is_export  # onnxruntime itself loads only for an export
from frugalnlp.tasks import Columns, TaskData, load_task, with_train_size

RUN_KIND = "frugalnlp-run"
RUNTIMES = ("torch", "onnx")


@dataclass
class RunSpec:
    """Everything that defines a training run; saved as the run's ``config.json``."""

    output: str
    task: str | None = "mr"
    model: str = "minilm"
    method: str = "plain"  # a name in frugalnlp.methods.METHODS
    exit_layers: list[int] | None = None
    pooling: str = "mean"
    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = MAX_LENGTH
    seed: int = 0
    train_size: int | None = None
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    columns: Columns = field(default_factory=Columns)
    save_steps: int | None = None  # checkpoint every N steps (default: every epoch)
    eval_batch_size: int = 64
    num_layers: int | None = None  # plain only: truncate the encoder to its first K layers (a static model)
    recipe: ExitRecipe = field(default_factory=ExitRecipe)  # how exits sharing a backbone train
    teacher: str | None = None  # a finished run whose last exit teaches (recipe.distill="teacher")


def spec_from_config(config: dict) -> RunSpec:
    """The RunSpec a run's ``config.json`` records (runs written before the recipe was one field too)."""
    values = dict(config["spec"])
    values["columns"] = Columns(**values["columns"])
    flat = {name: values.pop(name) for name in RECIPE_FIELDS if name in values}
    values["recipe"] = ExitRecipe(**{**flat, **values.get("recipe", {})})
    return RunSpec(**values)


def load_spec_task(spec: RunSpec) -> TaskData:
    """The run's task with its splits and training subset, exactly as the run saw them."""
    task = load_task(spec.task, train_file=spec.train_file, dev_file=spec.dev_file, test_file=spec.test_file,
                     columns=spec.columns)
    return with_train_size(task, spec.train_size, spec.seed)


def spec_inputs(spec: RunSpec) -> list[str]:
    """What a run reads besides the model: its data files and its teacher (an output may be none of them)."""
    return [p for p in (spec.train_file, spec.dev_file, spec.test_file, spec.teacher) if p]


def run_config(spec: RunSpec, task: TaskData) -> dict:
    """What a finished run's ``config.json`` holds: the spec, the task, the training ids' hash, versions."""
    from frugalnlp import __version__

    return {"kind": RUN_KIND, "spec": asdict(spec), "task": task.summary(),
            "train_ids_sha256": task.train.ids_hash(),
            "versions": {"frugalnlp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}}


def load_run_config(run: str | Path) -> dict:
    """A finished run's ``config.json``, or FrugalError if ``run`` is not a run directory."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise FrugalError(f"{run} is not a frugalnlp run directory (no config.json); give the --output of `frugalnlp train`")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FrugalError(f"{path} cannot be read as JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict) or config.get("kind") != RUN_KIND:
        raise FrugalError(f"{run} is not a frugalnlp run directory (config.json of another kind)")
    return config


@dataclass
class TrainedRun:
    """A finished run, loaded for use: its ``config.json``, spec, model (in eval mode) and tokenizer."""

    path: Path
    config: dict
    spec: RunSpec
    model: SegmentRunner  # an EarlyExitModel, a Cascade or an OnnxModel
    tokenizer: PreTrainedTokenizerBase


def load_adaptive(directory: str | Path, trust_pickle: bool = False) -> SegmentRunner:
    """An early-exit model, a cascade or an ONNX export of either, whichever the directory holds."""
    directory = Path(directory)
    if is_export(directory):
        return OnnxModel(directory)
    if (directory / CASCADE).exists():
        return Cascade.from_pretrained(directory, trust_pickle=trust_pickle)
    return EarlyExitModel.from_pretrained(directory, trust_pickle=trust_pickle)


def runtime_path(run: str | Path, runtime: str | None) -> Path:
    """The directory to load for ``runtime``: ``run`` itself, or for ``onnx`` on a torch run its ``RUN/onnx``
    export. An export directory is ONNX whatever the flag; ``--runtime torch`` on one is refused."""
    run = Path(run)
    if runtime is not None and runtime not in RUNTIMES:
        raise FrugalError(f"unknown --runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    exported = is_export(run / "model")
    if runtime == "torch" and exported:
        came_from = json.loads((run / "model" / EXPORT).read_text()).get("run")
        raise FrugalError(f"{run} is an ONNX export; for --runtime torch give the run it came from ({came_from})")
    if runtime == "onnx" and not exported:
        if is_export(run / "onnx" / "model"):
            return run / "onnx"
        raise FrugalError(f"{run} has no ONNX export: run `frugalnlp export {run}` (writes {run / 'onnx'}), "
                          "or give an export directory")
    return run


def load_run(run: str | Path, trust_pickle: bool = False) -> TrainedRun:
    """Load a run directory written by `frugalnlp.training.train_run` (or `frugalnlp.export.export_run`), every
    file checked against its manifest first; FrugalError if it is not one or a file has changed."""
    config = load_run_config(run)
    verify_run(run, config)
    folder = Path(run) / "model"
    return TrainedRun(path=Path(run), config=config, spec=spec_from_config(config),
                      model=load_adaptive(folder, trust_pickle=trust_pickle).eval(),
                      tokenizer=load_tokenizer(str(folder)))


def verify_run(run: str | Path, config: dict | None = None) -> dict[str, str]:
    """Check a run's (or an export's) files against its manifest (`frugalnlp.manifest.verify_manifest`); its
    listing. The fix named is the command that writes the directory again."""
    config = load_run_config(run) if config is None else config
    exported = config.get("exported_from")
    fix = (f"export the run again (`frugalnlp export {exported.get('run')} --output {run} --overwrite`)"
           if isinstance(exported, dict) else "train the run again (`frugalnlp train ... --output RUN --overwrite`)")
    return verify_manifest(run, fix, complete=("config.json", "model"))
