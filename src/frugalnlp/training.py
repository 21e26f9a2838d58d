"""Training runs: task -> encode -> HF Trainer (one per model) -> calibrate on dev -> save -> metrics.

Methods: ``plain`` (one classifier on the last layer), ``joint`` and ``sweet`` (one backbone with
exits), ``multi-model`` (one truncated model per exit, each trained alone with the same recipe).
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from transformers import (DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from frugalnlp.assets import resolve_model
from frugalnlp.early_exit.calibration import fit_temperatures
from frugalnlp.early_exit.cascade import Cascade, load_adaptive
from frugalnlp.early_exit.modeling import EarlyExitModel, check_exit_layers
from frugalnlp.encoding import EncodedSplit, encode_split, load_tokenizer
from frugalnlp.errors import FrugalError
from frugalnlp.evaluation import collect_exit_logits, exit_scores
from frugalnlp.rundir import RunDir, write_json
from frugalnlp.tasks import Columns, TaskData, load_task, with_train_size

METHODS = ("plain", "joint", "sweet", "multi-model")


def default_exit_layers(num_layers: int) -> list[int]:
    """The paper's exits 1,4,6,12 on 12 layers; 1,2,4,6 on the 6-layer MiniLM."""
    return {6: [1, 2, 4, 6], 12: [1, 4, 6, 12]}.get(num_layers, sorted({1, num_layers // 3, num_layers // 2, num_layers}))


@dataclass
class RunSpec:
    """Everything that defines a training run; saved as the run's ``config.json``."""

    output: str
    task: str | None = "mr"
    model: str = "minilm"
    method: str = "plain"
    exit_layers: list[int] | None = None
    pooling: str = "mean"
    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 128
    seed: int = 0
    train_size: int | None = None
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    columns: Columns = field(default_factory=Columns)
    save_steps: int | None = None  # checkpoint every N steps (default: every epoch)
    eval_batch_size: int = 64


def _training_args(spec: RunSpec, checkpoint_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoint_dir), per_device_train_batch_size=spec.batch_size,
        num_train_epochs=spec.epochs, learning_rate=spec.lr, seed=spec.seed, data_seed=spec.seed,
        save_strategy="steps" if spec.save_steps else "epoch", save_steps=spec.save_steps or 500,
        save_total_limit=1, logging_strategy="epoch", report_to=[],
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), disable_tqdm=False)


def fit(model: PreTrainedModel, train: EncodedSplit, collator: Callable, spec: RunSpec, checkpoint_dir: Path,
        resume: bool, callbacks: list[TrainerCallback] | None = None,
        optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Train ``model`` with the HF Trainer; resumes from the newest checkpoint when asked and present.

    ``spec`` gives the recipe (any object with RunSpec's batch_size, epochs, lr, seed and save_steps);
    ``optimizer`` replaces the Trainer's AdamW (e.g. for per-group learning rates; the schedule still applies).
    """
    has_checkpoint = resume and any(checkpoint_dir.glob("checkpoint-*"))
    trainer = Trainer(model=model, args=_training_args(spec, checkpoint_dir), train_dataset=train,
                      data_collator=collator, callbacks=callbacks, optimizers=(optimizer, None))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if has_checkpoint else None)
    return {"seconds": time.perf_counter() - start, "steps": result.global_step, "train_loss": result.training_loss}


def _check_spec(spec: RunSpec) -> None:
    if spec.method not in METHODS:
        raise FrugalError(f"unknown method '{spec.method}'; choose one of {', '.join(METHODS)}")
    if spec.pooling not in ("first", "mean"):
        raise FrugalError(f"unknown pooling '{spec.pooling}'; choose first or mean")
    for name in ("epochs", "lr", "batch_size", "max_length"):
        if getattr(spec, name) <= 0:
            raise FrugalError(f"--{name.replace('_', '-')} must be positive")


def _build_models(spec: RunSpec, model_path: str, task: TaskData) -> list[EarlyExitModel]:
    """Fresh models for the method, built under the run's seed (heads are initialised randomly)."""
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    id2label = dict(enumerate(task.label_names))
    common = dict(num_labels=task.num_labels, pooling=spec.pooling, id2label=id2label)
    if spec.method == "plain":
        if spec.exit_layers:
            raise FrugalError("--exit-layers needs --method joint, sweet or multi-model")
        exits = [num_layers]
    else:
        exits = check_exit_layers(spec.exit_layers or default_exit_layers(num_layers), num_layers)
    spec.exit_layers = exits
    set_seed(spec.seed)
    if spec.method == "multi-model":
        return [EarlyExitModel.from_backbone(model_path, method="joint", num_layers=k, **common) for k in exits]
    method = "joint" if spec.method == "plain" else spec.method
    return [EarlyExitModel.from_backbone(model_path, exit_layers=exits, method=method, **common)]


def train_run(spec: RunSpec, overwrite: bool = False, resume: bool = False,
              callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train, calibrate and score one run into ``spec.output``; returns the finished directory.

    ``callbacks`` are HF `TrainerCallback`s passed to every Trainer of the run. Under ``torchrun`` or
    ``accelerate launch`` every process trains (the Trainer wraps the model in DDP); only the main
    process writes the run directory, calibrates and scores.
    """
    started = time.perf_counter()
    _check_spec(spec)
    processes = PartialState(cpu=not torch.cuda.is_available())
    run = RunDir(spec.output, overwrite=overwrite, resume=resume)  # refuses before any work, on every rank
    task = load_spec_task(spec)
    model_path = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_path)
    models = _build_models(spec, model_path, task)
    processes.wait_for_everyone()  # every rank has checked the output before the main one creates it
    if processes.is_main_process:
        run.open()
    data = {name: encode_split(task.split(name), tokenizer, spec.max_length) for name in ("train", "dev", "test")}
    checkpoints = run.path / "checkpoints"
    training = []
    for model in models:
        depth = model.config.exit_layers[-1]
        training.append({"layers": depth, **fit(model, data["train"], DataCollatorWithPadding(tokenizer), spec,
                                                 checkpoints / f"layers-{depth}", resume, callbacks)})
    if not processes.is_main_process:
        processes.wait_for_everyone()
        return run.final
    adaptive: EarlyExitModel | Cascade = Cascade(models) if spec.method == "multi-model" else models[0]
    logits = {name: collect_exit_logits(adaptive, data[name], tokenizer, spec.eval_batch_size)
              for name in ("dev", "test")}
    adaptive.temperatures = fit_temperatures(logits["dev"], torch.as_tensor(task.dev.labels))
    adaptive.save_pretrained(run.path / "model")
    tokenizer.save_pretrained(run.path / "model")
    metrics = {name: {"examples": len(task.split(name)),
                      "exits": exit_scores(adaptive, logits[name], task.split(name).labels)}
               for name in ("dev", "test")}
    for name in ("dev", "test"):  # the last exit is the full model's answer
        metrics[name].update({k: metrics[name]["exits"][-1][k] for k in ("accuracy", "macro_f1")})
    metrics.update(train_examples=len(task.train), temperatures=adaptive.temperatures, training=training,
                   seconds=time.perf_counter() - started, processes=processes.num_processes)
    write_json(run.path / "config.json", run_config(spec, task))
    write_json(run.path / "metrics.json", metrics)
    remove_checkpoints(run.path)
    final = run.commit()
    processes.wait_for_everyone()  # the other ranks return once the run is published
    return final


def remove_checkpoints(run_path: Path) -> None:
    """Delete a finished run's Trainer checkpoints: they hold pickles and only serve ``--resume``."""
    shutil.rmtree(run_path / "checkpoints", ignore_errors=True)


def load_spec_task(spec: RunSpec) -> TaskData:
    """The run's task with its splits and training subset, exactly as the run saw them."""
    task = load_task(spec.task, train_file=spec.train_file, dev_file=spec.dev_file, test_file=spec.test_file,
                     columns=spec.columns)
    return with_train_size(task, spec.train_size, spec.seed)


def run_config(spec: RunSpec, task: TaskData) -> dict:
    return {"kind": "frugalnlp-run", "spec": asdict(spec), "task": task.summary(),
            "train_ids_sha256": task.train.ids_hash(),
            "versions": {"frugalnlp": _version(), "torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()}}


def _version() -> str:
    from frugalnlp import __version__

    return __version__


def load_run_config(run: str | Path) -> dict:
    """A finished run's ``config.json``, or FrugalError if ``run`` is not a run directory."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise FrugalError(f"{run} is not a frugalnlp run directory (no config.json); give the --output of `frugalnlp train`")
    config = json.loads(path.read_text())
    if config.get("kind") != "frugalnlp-run":
        raise FrugalError(f"{run} is not a frugalnlp run directory (config.json of another kind)")
    return config


def spec_from_config(config: dict) -> RunSpec:
    values = dict(config["spec"])
    values["columns"] = Columns(**values["columns"])
    return RunSpec(**values)


@dataclass
class TrainedRun:
    """A finished run, loaded for use: its ``config.json``, spec, model (in eval mode) and tokenizer."""

    path: Path
    config: dict
    spec: RunSpec
    model: EarlyExitModel | Cascade
    tokenizer: PreTrainedTokenizerBase


def load_run(run: str | Path, trust_pickle: bool = False) -> TrainedRun:
    """Load a run directory written by `train_run`; FrugalError if it is not one."""
    config = load_run_config(run)
    folder = Path(run) / "model"
    return TrainedRun(path=Path(run), config=config, spec=spec_from_config(config),
                      model=load_adaptive(folder, trust_pickle=trust_pickle).eval(),
                      tokenizer=load_tokenizer(str(folder)))

