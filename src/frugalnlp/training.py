"""Training runs: task -> encode -> the method's models through the HF Trainer -> calibrate on dev -> save -> metrics.

A method (`frugalnlp.methods.METHODS`: plain, joint, sweet, two-stage, multi-model) builds its models and
says which to fit in which stage; everything around that is here, the same for every method. The exit
recipe (boundary gradient, distillation, exit-loss weights) is an `ExitRecipe`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors import SafetensorError, safe_open
from transformers import (AutoConfig, DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)

from frugalnlp.assets import resolve_model
from frugalnlp.atomic import write_json
from frugalnlp.curves import collect_exit_logits, exit_scores
from frugalnlp.early_exit.calibration import fit_temperatures
from frugalnlp.early_exit.config import ExitRecipe
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.encoding import EncodedSplit, encode_split, load_tokenizer
from frugalnlp.errors import FrugalError, check_positive, check_seed
from frugalnlp.methods import METHODS
from frugalnlp.run import RunSpec, load_run, load_run_config, load_spec_task, run_config, spec_inputs
from frugalnlp.rundir import RunDir
from frugalnlp.tasks import TaskData


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


def check_spec(spec: RunSpec) -> None:
    """FrugalError naming the flag for any setting out of range, before anything is created."""
    check_seed(spec.seed)
    if spec.method not in METHODS:
        raise FrugalError(f"unknown method '{spec.method}'; choose one of {', '.join(METHODS)}")
    method = METHODS[spec.method]
    if spec.pooling not in ("first", "mean"):
        raise FrugalError(f"unknown pooling '{spec.pooling}'; choose first or mean")
    for name in ("epochs", "lr", "batch_size", "max_length", "save_steps", "eval_batch_size"):
        check_positive(getattr(spec, name), f"--{name.replace('_', '-')}")
    if spec.exit_layers is not None and not spec.exit_layers:
        raise FrugalError("--exit-layers is empty; give e.g. --exit-layers 1,2,4,6 or leave it out for the default")
    recipe = spec.recipe
    if recipe.distill == "teacher" and not spec.teacher:
        raise FrugalError("--distill teacher needs --teacher RUN")
    if spec.teacher and recipe.distill is None:
        spec.recipe = recipe = replace(recipe, distill="teacher")
    if spec.teacher and recipe.distill != "teacher":
        raise FrugalError("--teacher RUN distils from that run: drop --distill self, or drop --teacher")
    method.check(spec)
    refused = [name for name in recipe.changed() if name not in method.recipe_fields]
    if refused:
        flags = ", ".join("--distill/--teacher" if name == "distill" else ExitRecipe.flag(name) for name in refused)
        takers = ", ".join(name for name, m in METHODS.items() if set(refused) <= set(m.recipe_fields))
        raise FrugalError(f"--method {spec.method} takes no {flags}: use --method {takers}")
    recipe.check()


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


def check_teacher(teacher_run: str, task: TaskData, tokenizer: PreTrainedTokenizerBase) -> None:
    """FrugalError in one line unless ``teacher_run`` is a finished run of ``task`` (same name, labels in the same
    order, single texts or pairs alike) whose tokenizer splits text as ``tokenizer`` does (the same vocabulary):
    checked before any training, so a mismatched teacher costs nothing."""
    config = load_run_config(teacher_run)
    theirs, ours = config["task"], task.summary()
    for key, what in (("name", "task"), ("labels", "labels"), ("pair", "input kind (single text or pair)")):
        if theirs.get(key) != ours.get(key):
            raise FrugalError(f"--teacher {teacher_run} was trained with {what} {theirs.get(key)!r}, not "
                              f"{ours.get(key)!r}; give a run of the same task")
    if load_tokenizer(Path(teacher_run) / "model").get_vocab() != tokenizer.get_vocab():
        raise FrugalError(f"--teacher {teacher_run} uses another tokenizer ({config['spec']['model']}, not this "
                          "run's): give a teacher trained from the same model family")


def teacher_logits(teacher_run: str, task: TaskData) -> torch.Tensor:
    """The raw last-exit logits of a finished run on ``task``'s training split: [n, labels]."""
    teacher = load_run(teacher_run)
    data = encode_split(task.train, teacher.tokenizer, teacher.spec.max_length)
    return collect_exit_logits(teacher.model, data, teacher.tokenizer, teacher.spec.eval_batch_size)[-1]


class _Stages:
    """The `frugalnlp.methods.Stages` of one run: fits models on its training set and records each stage."""

    def __init__(self, spec: RunSpec, train: EncodedSplit, tokenizer: PreTrainedTokenizerBase,
                 teacher: torch.Tensor | None, checkpoints: Path, resume: bool,
                 callbacks: list[TrainerCallback] | None) -> None:
        self.spec, self.train, self.checkpoints, self.resume, self.callbacks = spec, train, checkpoints, resume, callbacks
        self.plain_collator = DataCollatorWithPadding(tokenizer)
        self.teacher = teacher
        self.records: list[dict] = []

    def fit(self, model: EarlyExitModel, stage: str, teacher: bool = True) -> None:
        data, collator = self.train, self.plain_collator
        if teacher and self.teacher is not None:
            data, collator = WithTeacher(data, self.teacher), TeacherCollator(collator)
        self.records.append({"stage": stage, "layers": model.config.exit_layers[-1],
                             **fit(model, data, collator, self.spec, self.checkpoints / stage, self.resume,
                                   self.callbacks)})


def train_run(spec: RunSpec, overwrite: bool = False, resume: bool = False,
              callbacks: list[TrainerCallback] | None = None) -> Path:
    """Train, calibrate and score one run into ``spec.output``; returns the finished directory.

    ``callbacks`` are HF `TrainerCallback`s passed to every Trainer of the run. Under ``torchrun`` or
    ``accelerate launch`` every process trains (the Trainer wraps the model in DDP); only the main
    process writes the run directory, calibrates and scores.
    """
    started = time.perf_counter()
    check_spec(spec)
    method = METHODS[spec.method]
    processes = PartialState(cpu=not torch.cuda.is_available())
    run = RunDir(spec.output, overwrite=overwrite, resume=resume, inputs=spec_inputs(spec))  # before any work
    task = load_spec_task(spec)
    model_path = resolve_model(spec.model)
    tokenizer = load_tokenizer(model_path)
    if spec.teacher:
        check_teacher(spec.teacher, task, tokenizer)
    spec.exit_layers = method.exit_layers(spec, AutoConfig.from_pretrained(model_path).num_hidden_layers)
    set_seed(spec.seed)  # heads are initialised randomly
    models = method.build(spec, model_path, task)
    check_max_length(spec.max_length, models[0].backbone, tokenizer, task.is_pair)
    teacher = teacher_logits(spec.teacher, task) if spec.teacher else None
    processes.wait_for_everyone()  # every rank has checked the output before the main one creates it
    if processes.is_main_process:
        run.open(spec={k: v for k, v in asdict(spec).items() if k != "output"})
    data = {name: encode_split(task.split(name), tokenizer, spec.max_length) for name in ("train", "dev", "test")}
    stages = _Stages(spec, data["train"], tokenizer, teacher, run.path / "checkpoints", resume, callbacks)
    adaptive = method.train(models, spec, stages)
    if not processes.is_main_process:
        processes.wait_for_everyone()
        return run.final
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
    metrics.update(train_examples=len(task.train), temperatures=adaptive.temperatures, training=stages.records,
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
