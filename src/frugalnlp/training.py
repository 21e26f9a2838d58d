"""Training runs: task -> encode -> HF Trainer (one per model) -> calibrate on dev -> save -> metrics.

Methods: ``plain`` (one classifier on the last layer, or on layer K with ``num_layers``), ``joint`` and
``sweet`` (one backbone with exits), ``two-stage`` (DeeBERT: a plain fine-tune, then the exit heads
trained on the frozen backbone), ``multi-model`` (one truncated model per exit, each trained alone
with the same recipe). The exit recipe (boundary gradient, distillation, exit-loss weights) is
described in `EarlyExitConfig`.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from transformers import (DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from frugalnlp.assets import resolve_model
from frugalnlp.early_exit.calibration import fit_temperatures
from frugalnlp.early_exit.cascade import Cascade, load_adaptive
from frugalnlp.early_exit.config import check_recipe
from frugalnlp.early_exit.modeling import EarlyExitModel, check_exit_layers
from frugalnlp.encoding import EncodedSplit, encode_split, load_tokenizer
from frugalnlp.errors import FrugalError
from frugalnlp.evaluation import collect_exit_logits, exit_scores
from frugalnlp.rundir import RunDir, write_json
from frugalnlp.tasks import Columns, TaskData, load_task, with_train_size

METHODS = ("plain", "joint", "sweet", "two-stage", "multi-model")
RECIPE_METHODS = ("joint", "sweet", "two-stage")  # the methods with exits that share one backbone


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
    num_layers: int | None = None  # plain only: truncate the encoder to its first K layers (a static model)
    boundary_grad: float | None = None  # None: the method's (joint 1, sweet 0)
    distill: str | None = None  # None, "self" or "teacher"
    teacher: str | None = None  # a finished run whose last exit teaches (distill="teacher")
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    exit_weights: str = "uniform"

    def recipe(self) -> dict:
        """The exit-training recipe as `EarlyExitModel.from_backbone` keywords."""
        return dict(boundary_grad=self.boundary_grad, distill=self.distill, distill_alpha=self.distill_alpha,
                    distill_temperature=self.distill_temperature, exit_weights=self.exit_weights)


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
    checkpoint = last_complete_checkpoint(checkpoint_dir) if resume else None
    trainer = Trainer(model=model, args=_training_args(spec, checkpoint_dir), train_dataset=train,
                      data_collator=collator, callbacks=callbacks, optimizers=(optimizer, None))
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    return {"seconds": time.perf_counter() - start, "steps": result.global_step, "train_loss": result.training_loss}


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest Trainer checkpoint that was fully written; removes those a kill cut short.

    The Trainer writes ``trainer_state.json`` last and deletes the previous checkpoint only after it,
    so a process killed while saving leaves the previous, complete one to resume from. A checkpoint
    whose weights are cut short (a full disk, a copy that broke off) is passed over the same way.
    """
    complete = []
    for folder in checkpoint_dir.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            for weights in folder.glob("*.safetensors"):
                with safe_open(weights, "pt"):  # reads the header and checks the file covers every tensor
                    pass
            complete.append(folder)
        except (OSError, ValueError, SafetensorError):
            shutil.rmtree(folder, ignore_errors=True)
    return max(complete, key=lambda f: int(f.name.rsplit("-", 1)[-1]), default=None)


def check_max_length(max_length: int, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pair: bool) -> None:
    """FrugalError unless ``max_length`` leaves room for some text and fits the model's positions."""
    from frugalnlp.backbones import backbone_for

    shortest = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if max_length < shortest:
        raise FrugalError(f"--max-length {max_length} leaves no room for text after the special tokens; "
                          f"use at least {shortest} (e.g. 64)")
    longest = backbone_for(model).max_length
    if max_length > longest:
        raise FrugalError(f"--max-length {max_length} is longer than the model's {longest} positions; use at most {longest}")


def check_positive(value: float | None, flag: str) -> None:
    """FrugalError unless ``value`` is a positive finite number (None passes: the default applies)."""
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise FrugalError(f"{flag} {value!r} must be a positive finite number")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """FrugalError unless ``seed`` is one that NumPy, torch and the Trainer all take (0 .. 2**32 - 1)."""
    if not (isinstance(seed, int) and 0 <= seed < 2**32):
        raise FrugalError(f"{flag} {seed!r} is out of range: a seed is a whole number from 0 to {2**32 - 1}")


def check_spec(spec: RunSpec) -> None:
    """FrugalError naming the flag for any setting out of range, before anything is created."""
    check_seed(spec.seed)
    if spec.method not in METHODS:
        raise FrugalError(f"unknown method '{spec.method}'; choose one of {', '.join(METHODS)}")
    if spec.pooling not in ("first", "mean"):
        raise FrugalError(f"unknown pooling '{spec.pooling}'; choose first or mean")
    for name in ("epochs", "lr", "batch_size", "max_length", "save_steps", "eval_batch_size"):
        check_positive(getattr(spec, name), f"--{name.replace('_', '-')}")
    if spec.exit_layers is not None and not spec.exit_layers:
        raise FrugalError("--exit-layers is empty; give e.g. --exit-layers 1,2,4,6 or leave it out for the default")
    if spec.num_layers is not None and spec.method != "plain":
        raise FrugalError("--num-layers trains one truncated model: it needs --method plain "
                          "(multi-model trains one per --exit-layers)")
    if spec.distill == "teacher" and not spec.teacher:
        raise FrugalError("--distill teacher needs --teacher RUN")
    if spec.teacher and spec.distill is None:
        spec.distill = "teacher"
    if spec.teacher and spec.distill != "teacher":
        raise FrugalError("--teacher RUN distils from that run: drop --distill self, or drop --teacher")
    custom = {"--boundary-grad": spec.boundary_grad is not None, "--distill/--teacher": spec.distill is not None,
              "--exit-weights": spec.exit_weights != "uniform"}
    if spec.method not in RECIPE_METHODS and any(custom.values()):
        flags = ", ".join(k for k, v in custom.items() if v)
        raise FrugalError(f"{flags} shape(s) how exits share a backbone: use --method {', '.join(RECIPE_METHODS)}")
    if spec.method == "two-stage" and spec.boundary_grad is not None:
        raise FrugalError("--boundary-grad has no effect with --method two-stage (its backbone is frozen)")
    check_recipe(spec.boundary_grad, spec.distill, spec.distill_alpha, spec.distill_temperature, spec.exit_weights)


def _build_models(spec: RunSpec, model_path: str, task: TaskData) -> list[EarlyExitModel]:
    """Fresh models for the method, built under the run's seed (heads are initialised randomly)."""
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(model_path).num_hidden_layers
    id2label = dict(enumerate(task.label_names))
    common = dict(num_labels=task.num_labels, pooling=spec.pooling, id2label=id2label)
    if spec.method == "plain":
        if spec.exit_layers:
            raise FrugalError("--exit-layers needs --method joint, sweet, two-stage or multi-model")
        if spec.num_layers is not None and not 1 <= spec.num_layers <= num_layers:
            raise FrugalError(f"--num-layers {spec.num_layers} is out of range: this model has layers 1..{num_layers}")
        exits = [spec.num_layers or num_layers]
    else:
        exits = check_exit_layers(spec.exit_layers or default_exit_layers(num_layers), num_layers)
    spec.exit_layers = exits
    set_seed(spec.seed)
    if spec.method == "multi-model":
        return [EarlyExitModel.from_backbone(model_path, method="joint", num_layers=k, **common) for k in exits]
    if spec.method in ("plain", "two-stage"):  # two-stage starts as exactly the plain run
        return [EarlyExitModel.from_backbone(model_path, method="joint", num_layers=spec.num_layers, **common)]
    return [EarlyExitModel.from_backbone(model_path, exit_layers=exits, method=spec.method, **common, **spec.recipe())]


def exits_on_frozen_backbone(plain: EarlyExitModel, spec: RunSpec) -> EarlyExitModel:
    """Two-stage's second model: ``plain``'s backbone and head as the last exit, fresh early heads.

    The backbone and the last head are frozen, so the last exit stays the plain model bit for bit.
    """
    model = EarlyExitModel.from_backbone(plain.backbone, exit_layers=spec.exit_layers, method="two-stage",
                                         num_labels=plain.config.num_labels, pooling=spec.pooling,
                                         id2label=plain.config.id2label, **spec.recipe())
    model.heads[-1].load_state_dict(plain.heads[0].state_dict())
    model.backbone.requires_grad_(False)
    model.heads[-1].requires_grad_(False)
    return model


class WithTeacher(torch.utils.data.Dataset):
    """A training set whose items also carry the teacher's logits (``teacher_logits``: [labels])."""

    def __init__(self, data: EncodedSplit, teacher_logits: torch.Tensor) -> None:
        self.data, self.teacher_logits = data, teacher_logits

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "teacher_logits": self.teacher_logits[i]}


class TeacherCollator:
    """Pads like ``collator`` and stacks the teacher's logits beside: [batch, labels]."""

    def __init__(self, collator: Callable) -> None:
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        teacher = torch.stack([item["teacher_logits"] for item in items])
        batch = self.collator([{k: v for k, v in item.items() if k != "teacher_logits"} for item in items])
        batch["teacher_logits"] = teacher
        return batch


def teacher_logits(teacher_run: str, task: TaskData) -> torch.Tensor:
    """The raw last-exit logits of a finished run on ``task``'s training split: [n, labels]."""
    teacher = load_run(teacher_run)
    labels = list(teacher.config["task"]["labels"])
    if labels != task.label_names:
        raise FrugalError(f"--teacher {teacher_run} was trained on labels {labels}, not {task.label_names}; "
                          "give a run of the same task")
    data = encode_split(task.train, teacher.tokenizer, teacher.spec.max_length)
    return collect_exit_logits(teacher.model, data, teacher.tokenizer, teacher.spec.eval_batch_size)[-1]


def train_run(spec: RunSpec, overwrite: bool = False, resume: bool = False,
              callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train, calibrate and score one run into ``spec.output``; returns the finished directory.

    ``callbacks`` are HF `TrainerCallback`s passed to every Trainer of the run. Under ``torchrun`` or
    ``accelerate launch`` every process trains (the Trainer wraps the model in DDP); only the main
    process writes the run directory, calibrates and scores.
    """
    started = time.perf_counter()
    check_spec(spec)
    processes = PartialState(cpu=not torch.cuda.is_available())
    run = RunDir(spec.output, overwrite=overwrite, resume=resume)  # refuses before any work, on every rank
    task = load_spec_task(spec)
    model_path = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_path)
    models = _build_models(spec, model_path, task)
    check_max_length(spec.max_length, models[0].backbone, tokenizer, task.is_pair)
    teacher = teacher_logits(spec.teacher, task) if spec.teacher else None
    processes.wait_for_everyone()  # every rank has checked the output before the main one creates it
    if processes.is_main_process:
        run.open(spec={k: v for k, v in asdict(spec).items() if k != "output"})
    data = {name: encode_split(task.split(name), tokenizer, spec.max_length) for name in ("train", "dev", "test")}
    train_set, collator = data["train"], DataCollatorWithPadding(tokenizer)
    if teacher is not None:
        train_set, collator = WithTeacher(train_set, teacher), TeacherCollator(collator)
    checkpoints = run.path / "checkpoints"
    training = []
    if spec.method == "two-stage":  # stage 1 is the plain run; stage 2 learns the exits on its frozen backbone
        plain = models[0]
        training.append({"stage": "plain", "layers": plain.exit_layers[-1],
                         **fit(plain, data["train"], DataCollatorWithPadding(tokenizer), spec, checkpoints / "plain",
                               resume, callbacks)})
        models = [exits_on_frozen_backbone(plain, spec)]
    for model in models:
        depth = model.config.exit_layers[-1]
        stage = "exits" if spec.method == "two-stage" else f"layers-{depth}"
        training.append({"stage": stage, "layers": depth,
                         **fit(model, train_set, collator, spec, checkpoints / stage, resume, callbacks)})
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

