"""PAPA experiments: constant matrices -> head ranking -> runs with N constant heads -> a sweep over N.

The constants file fixes the task, model and layout length; ranking and runs read them from it, so
every part of one experiment agrees. Each step writes its own directory atomically (`RunDir`).
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase, default_data_collator, set_seed

from frugalnlp.assets import MODEL_ALIASES, resolve_model, verify_checkpoint
from frugalnlp.atomic import write_bytes, write_json
from frugalnlp.curves import scores
from frugalnlp.defaults import PAPA_LENGTH
from frugalnlp.encoding import EncodedSplit, batches, encode_split, load_tokenizer
from frugalnlp.errors import FrugalError, check_positive, check_seed
from frugalnlp.manifest import MANIFEST, verify_manifest
from frugalnlp.papa.constants import compute_constant_attention, load_constant_attention, save_constant_attention
from frugalnlp.papa.families import check_family
from frugalnlp.papa.frozen_states import FrozenStates
from frugalnlp.papa.modeling import SETTINGS, PapaModel, layout_position_offset
from frugalnlp.report import command_line, new_figure, save_figure
from frugalnlp.rundir import RunDir
from frugalnlp.tasks import Columns, Split, TaskData, load_task, with_train_size
from frugalnlp.training import check_max_length, fit, remove_checkpoints

DEFAULT_LR = {"probe": 1e-3, "finetune": 5e-5}


def task_source(task: str | None = None, train_file: str | None = None, dev_file: str | None = None,
                test_file: str | None = None, columns: Columns = Columns()) -> dict:
    """Where a PAPA experiment's data comes from, as recorded in the constants' metadata: a task name, or
    the user's files (absolute paths) and columns."""
    files = {k: None if v is None else str(Path(v).resolve())
             for k, v in (("train_file", train_file), ("dev_file", dev_file), ("test_file", test_file))}
    return {"task": task if train_file is None else None, **files, "columns": asdict(columns)}


def load_source(source: dict) -> TaskData:
    return load_task(source["task"], train_file=source["train_file"], dev_file=source["dev_file"],
                     test_file=source["test_file"], columns=Columns(**source["columns"]))


def make_constants(task: str | None, model: str, max_length: int, output: str, train_size: int | None = None,
                   overwrite: bool = False, batch_size: int = 32, source: dict | None = None) -> Path:
    """Average attention of ``model`` over the task's training split (or a seed-0 stratified subset of
    ``train_size``) in the fixed layout of length ``max_length``; writes ``OUTPUT/constant_attention.safetensors``.

    ``source`` (from `task_source`) gives user files instead of the task name ``task``.
    """
    run = RunDir(output, overwrite=overwrite, kind="papa-constants")
    source = source or task_source(task)
    data = load_source(source)
    train = with_train_size(data, train_size, seed=0).train
    model_path = resolve_model(model)
    verify_checkpoint(model_path)
    encoder = AutoModel.from_pretrained(model_path, use_safetensors=True)
    check_family(encoder.config.model_type)
    tokenizer = load_tokenizer(model_path)
    check_max_length(max_length, encoder, tokenizer, data.is_pair)
    offset = layout_position_offset(encoder)
    encoded = encode_split(train, tokenizer, max_length, fixed_layout=True, position_offset=offset)
    started = time.perf_counter()
    constant = compute_constant_attention(encoder, [batch for _, batch in batches(encoded, tokenizer, batch_size)],
                                          progress=True)
    metadata = {"kind": "frugalnlp-papa-constants", "task": data.name, "source": source, "model": model, "length": max_length,
                "position_offset": offset, "examples": len(train), "train_size": train_size,
                "layers": constant.shape[0], "heads": constant.shape[1], "seconds": time.perf_counter() - started,
                "command": command_line()}
    run.open()
    save_constant_attention(run.path / "constant_attention.safetensors", constant, metadata)
    write_json(run.path / "constants.json", metadata)
    return run.commit()


@dataclass
class PapaSpec:
    """One PAPA training run (ranking or N constant heads); saved as the run's ``config.json``."""

    output: str
    constants: str
    ranking: str | None = None
    heads: int = 0
    setting: str = "probe"
    epochs: float = 3.0
    lr: float | None = None  # default: 1e-3 for the probe setting, 5e-5 for fine-tuning
    gate_lr: float = 0.05  # ranking: one scalar per head, which a probe's learning rate barely moves
    batch_size: int = 16
    seed: int = 0
    train_size: int | None = None
    save_steps: int | None = None
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise FrugalError(f"unknown setting '{self.setting}'; choose probe or finetune")
        self.lr = self.lr if self.lr is not None else DEFAULT_LR[self.setting]
        for name in ("epochs", "lr", "gate_lr", "batch_size", "save_steps"):
            check_positive(getattr(self, name), f"--{name.replace('_', '-')}")
        check_seed(self.seed)


@dataclass
class _Experiment:
    """What a constants file fixes: the matrices, the task (with the run's training subset) and the encoder."""

    constant: torch.Tensor
    metadata: dict
    task: TaskData
    model_path: str
    tokenizer: PreTrainedTokenizerBase

    @classmethod
    def load(cls, spec: PapaSpec) -> _Experiment:
        constant, metadata = load_constant_attention(spec.constants)
        source = metadata.get("source") or task_source(metadata["task"])  # constants written before user files
        task = with_train_size(load_source(source), spec.train_size, spec.seed)
        model_path = resolve_model(metadata["model"])
        return cls(constant, metadata, task, model_path, load_tokenizer(model_path))

    def encode(self, split: str | Split) -> EncodedSplit:
        split = self.task.split(split) if isinstance(split, str) else split
        return encode_split(split, self.tokenizer, self.metadata["length"], fixed_layout=True,
                            position_offset=self.metadata["position_offset"])

    def constant_heads(self, spec: PapaSpec) -> list[list[int]]:
        """The first ``spec.heads`` heads of the ranking; every head (no ranking needed) when that is all of them."""
        layers, heads = self.metadata["layers"], self.metadata["heads"]
        if not 0 <= spec.heads <= layers * heads:
            raise FrugalError(f"--heads {spec.heads} is out of range: the model has {layers * heads} heads")
        if spec.heads == layers * heads:
            return [[l, h] for l in range(layers) for h in range(heads)]
        if spec.heads and spec.ranking is None:
            raise FrugalError("--heads between 0 and all needs --ranking (from `frugalnlp papa rank`)")
        return load_ranking(spec.ranking)[:spec.heads] if spec.heads else []

    def model(self, spec: PapaSpec, constant_heads: list[list[int]], gated: bool = False) -> PapaModel:
        set_seed(spec.seed)  # the probe is initialised randomly
        # An alias is recorded as such (a run's saved probe names the encoder it rebuilds on), a directory resolved.
        encoder = self.metadata["model"] if self.metadata["model"] in MODEL_ALIASES else self.model_path
        return PapaModel.from_encoder(encoder, self.constant, constant_heads=constant_heads, gated=gated,
                                      setting="probe" if gated else spec.setting, num_labels=self.task.num_labels,
                                      position_offset=self.metadata["position_offset"],
                                      id2label=dict(enumerate(self.task.label_names)))

    def train(self, model: PapaModel, spec: PapaSpec, run: RunDir, resume: bool,
              states: FrozenStates | None = None) -> dict:
        """Fit with the HF Trainer; with ``states`` the probe reads the frozen encoder's precomputed states."""
        optimizer = torch.optim.AdamW(model.parameter_groups(spec.lr, spec.gate_lr), weight_decay=0.0)
        data = self.encode("train")
        if states is not None:
            data = states.dataset(data, self.task.train.ids)
        return fit(model, data, default_data_collator, spec, run.path / "checkpoints", resume, optimizer=optimizer)

    def evaluate(self, model: PapaModel, split: str, batch_size: int, states: FrozenStates | None = None) -> dict:
        data = self.encode(split)
        ids = self.task.split(split).ids
        logits = torch.empty(len(data), self.task.num_labels)
        model.eval()
        with torch.inference_mode():
            for index, batch in batches(data, self.tokenizer, batch_size, model.device):
                if states is not None:
                    batch["hidden_states"] = states.states_of([ids[i] for i in index]).to(model.device)
                logits[torch.as_tensor(index)] = model(**batch).logits.float().cpu()
        return {"examples": len(data), **scores(logits.argmax(-1), data.labels, self.task.num_labels)}


def rank_heads(spec: PapaSpec, overwrite: bool = False, resume: bool = False) -> Path:
    """Learn one gate per head (probe setting: only gates and probe train) and order the heads by gate logit,
    ascending: the first heads are those that lean most on their constant matrix. Writes ``ranking.json``
    and a layers x heads heatmap ``ranking.png``."""
    run = RunDir(spec.output, overwrite=overwrite, resume=resume, kind="papa-ranking", inputs=[spec.constants])
    experiment = _Experiment.load(spec)
    model = experiment.model(spec, constant_heads=[], gated=True)
    run.open()
    training = experiment.train(model, spec, run, resume)
    gates = model.gate_logits()  # [layers, heads]
    order = torch.argsort(gates.flatten(), stable=True)
    heads = gates.shape[1]
    ranking = {"kind": "frugalnlp-papa-ranking", "order": [[int(i) // heads, int(i) % heads] for i in order],
               "gate_logits": gates.tolist(), "constants": experiment.metadata, "spec": asdict(spec),
               "dev": experiment.evaluate(model, "dev", spec.eval_batch_size), "training": training,
               "command": command_line()}
    write_json(run.path / "ranking.json", ranking)
    _plot_gates(gates, run.path / "ranking.png",
                f"PAPA gates sigma(lambda): {experiment.metadata['model']} on {experiment.metadata['task']}")
    remove_checkpoints(run.path)
    return run.commit()


def load_ranking(path: str | Path) -> list[list[int]]:
    """Head order ``[[layer, head], ...]`` (most constant-leaning first) from a ranking directory or file."""
    path = Path(path)
    path = path / "ranking.json" if path.is_dir() else path
    if not path.exists():
        raise FrugalError(f"no head ranking at {path}; make one with `frugalnlp papa rank`")
    verify_manifest(path.parent, "make it again with `frugalnlp papa rank`", complete=(path.name,))
    ranking = json.loads(path.read_text())
    if ranking.get("kind") != "frugalnlp-papa-ranking":
        raise FrugalError(f"{path} is not a frugalnlp head ranking")
    return ranking["order"]


def run_papa(spec: PapaSpec, overwrite: bool = False, resume: bool = False,
             states: dict[str, FrozenStates] | None = None) -> Path:
    """Train and score a model whose first ``spec.heads`` ranked heads are constant; returns the run directory.

    ``states`` (probe setting): the frozen encoder's hidden states per split (train, dev, test), from
    `frozen_states`; the probe then trains and is scored on them without running the encoder.
    """
    run = RunDir(spec.output, overwrite=overwrite, resume=resume, kind="papa-run",
                 inputs=[spec.constants, *([spec.ranking] if spec.ranking else [])])
    experiment = _Experiment.load(spec)
    total = experiment.metadata["layers"] * experiment.metadata["heads"]
    constant_heads = experiment.constant_heads(spec)
    model = experiment.model(spec, constant_heads)
    states = states or {}
    if any(s.constant_heads != model.config.constant_heads for s in states.values()):
        raise ValueError("the precomputed states are for other constant heads than this run's")
    run.open()
    started = time.perf_counter()
    training = experiment.train(model, spec, run, resume, states.get("train"))
    metrics = {split: experiment.evaluate(model, split, spec.eval_batch_size, states.get(split))
               for split in ("dev", "test")}
    metrics.update(heads=spec.heads, total_heads=total, constant_heads=constant_heads, training=training,
                   train_examples=len(experiment.task.train), seconds=time.perf_counter() - started)
    model.save_pretrained(run.path / "model")
    experiment.tokenizer.save_pretrained(run.path / "model")
    write_json(run.path / "config.json", {"kind": "frugalnlp-papa-run", "spec": asdict(spec),
                                          "constants": experiment.metadata, "command": command_line()})
    write_json(run.path / "metrics.json", metrics)
    remove_checkpoints(run.path)
    return run.commit()


def frozen_states(spec: PapaSpec, seeds: list[int], directory: Path,
                  dtype: torch.dtype = torch.float16) -> dict[str, FrozenStates]:
    """The frozen encoder's hidden states (first ``spec.heads`` ranked heads constant) on every example that
    the runs of ``spec`` with ``seeds`` train or are scored on: the union of the seeds' training subsets, dev
    and test. Scratch memory maps under ``directory``."""
    experiment = _Experiment.load(replace(spec, train_size=None))
    pool = experiment.task
    position = {example: i for i, example in enumerate(pool.train.ids)}
    needed = dict.fromkeys(example for seed in seeds
                           for example in with_train_size(pool, spec.train_size, seed).train.ids)
    splits = {"train": pool.train.take([position[example] for example in needed]), "dev": pool.dev, "test": pool.test}
    model = experiment.model(spec, experiment.constant_heads(spec))
    return {name: FrozenStates.compute(model, experiment.encode(split), split.ids, experiment.tokenizer,
                                       directory / f"{name}.states", batch_size=spec.eval_batch_size, dtype=dtype,
                                       desc=f"{spec.heads} constant heads: {name} states")
            for name, split in splits.items()}


def resolve_heads(text: str, layers: int, heads: int) -> list[int]:
    """Parse ``--heads`` for a sweep: integers, ``half``, ``all``, ``all-but-K`` and ``all-but-few``
    (all but one in twelve, e.g. 66 of MiniLM's 72)."""
    total = layers * heads
    named = {"half": total // 2, "all": total, "all-but-few": total - max(1, total // 12)}
    values = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item in named:
            value = named[item]
        elif item.startswith("all-but-") and item[8:].isdigit():
            value = total - int(item[8:])
        elif item.isdigit():
            value = int(item)
        else:
            raise FrugalError(f"--heads: '{item}' is not a number, half, all, all-but-few or all-but-K")
        if not 0 <= value <= total:
            raise FrugalError(f"--heads: {item} is out of range: the model has {total} heads")
        values.append(value)
    return sorted(set(values))


@dataclass
class SweepSpec:
    """A PAPA sweep: constants (unless given: then they fix the data, model and length), one ranking (seed
    ``seeds[0]``, unless given), then a run per (number of constant heads, seed)."""

    output: str
    source: dict = field(default_factory=lambda: task_source("mr"))  # where the data comes from (`task_source`)
    model: str = "minilm"
    max_length: int = PAPA_LENGTH
    heads: str = "0,half,all-but-few,all"  # integers, half, all, all-but-few, all-but-K
    seeds: list[int] = field(default_factory=lambda: [0])
    setting: str = "probe"
    train_size: int | None = None
    epochs: float = 3.0
    lr: float | None = None
    gate_lr: float = 0.05
    constants: str | None = None  # reuse these constants (default: compute into OUTPUT/constants)
    ranking: str | None = None  # reuse this ranking (default: rank into OUTPUT/ranking when some N needs one)
    constants_train_size: int | None = None  # examples to average attention over

    def run(self, path: Path, constants: str, **overrides) -> PapaSpec:
        """The `PapaSpec` of one of the sweep's runs (or its ranking) at ``path``."""
        recipe = dict(constants=constants, setting=self.setting, epochs=self.epochs, lr=self.lr, gate_lr=self.gate_lr,
                      train_size=self.train_size)
        return PapaSpec(output=str(path), **{**recipe, **overrides})


def sweep(spec: SweepSpec, overwrite: bool = False, resume: bool = False) -> dict:
    """Run a `SweepSpec`. Prints a table of test accuracy and relative drop against N=0; writes ``sweep.json``,
    ``sweep.png`` and ``report.md``. With ``resume`` the finished parts are kept."""
    started = time.perf_counter()
    out = RunDir(spec.output, overwrite=overwrite, resume=resume, kind="papa-sweep",
                 inputs=[spec.constants] if spec.constants else [])
    seeds, setting, lr = spec.seeds, spec.setting, spec.lr
    if not seeds:
        raise FrugalError("--seeds: give at least one seed")
    for seed in seeds:
        check_seed(seed, "--seeds")
    spec.run(Path(), "")  # a bad setting or learning rate fails before any work
    # Everything that can be checked without the constants is checked before the output is created.
    constants = spec.constants
    if constants is None:
        config = AutoConfig.from_pretrained(resolve_model(spec.model))
        check_family(config.model_type)
        resolve_heads(spec.heads, config.num_hidden_layers, config.num_attention_heads)
        load_source(spec.source)
    else:
        metadata = load_constant_attention(constants)[1]
        resolve_heads(spec.heads, metadata["layers"], metadata["heads"])
    out.open()
    if constants is None:
        constants = str(out.path / "constants")
        if not Path(constants).exists():
            make_constants(None, spec.model, spec.max_length, constants, train_size=spec.constants_train_size,
                           source=spec.source)
    metadata = load_constant_attention(constants)[1]
    counts = resolve_heads(spec.heads, metadata["layers"], metadata["heads"])
    ranking = spec.ranking
    if ranking is None and any(0 < n < metadata["layers"] * metadata["heads"] for n in counts):
        ranking = str(out.path / "ranking")
        if not Path(ranking).exists():  # gates are learnt in the probe setting, with the first seed
            rank_spec = spec.run(Path(ranking), constants, seed=seeds[0], setting="probe",
                                 lr=lr if setting == "probe" else None)
            rank_heads(rank_spec, resume=Path(ranking + ".partial").exists())
    results: dict[int, list[dict]] = {n: [] for n in counts}
    for n in counts:
        paths = {seed: out.path / f"heads-{n}" / f"seed-{seed}" for seed in seeds}
        missing = [seed for seed, path in paths.items() if not (path / "metrics.json").exists()]
        scratch = out.path / f"heads-{n}" / "states"
        # The frozen encoder's states are computed once for every seed's probe (the probe setting only).
        states = frozen_states(spec.run(scratch, constants, heads=n, ranking=ranking), seeds, scratch) \
            if missing and setting == "probe" else None
        for seed in missing:
            print(f"== {n} constant heads, seed {seed}", file=sys.stderr)
            run_papa(spec.run(paths[seed], constants, heads=n, seed=seed, ranking=ranking),
                     resume=paths[seed].with_name(paths[seed].name + ".partial").exists(), states=states)
        # Unmap the store before the next one is built: a mapping keeps a deleted file's pages and disk
        # space alive, and the Trainer's reference cycles hold the training set (and its store) until collected.
        # Holding two stores at once got an MPNet BoolQ sweep killed for memory.
        del states
        gc.collect()
        shutil.rmtree(scratch, ignore_errors=True)
        for seed in seeds:  # a run finished by an earlier, interrupted sweep is read only once verified
            verify_manifest(paths[seed], "run the sweep again with --overwrite", complete=("metrics.json", "model"))
        results[n] = [json.loads((paths[seed] / "metrics.json").read_text()) for seed in seeds]

    base = float(np.mean([m["test"]["accuracy"] for m in results[counts[0]]])) if counts[0] == 0 else None
    flops = {n: PapaModel.from_pretrained(out.path / f"heads-{n}" / f"seed-{seeds[0]}" / "model").encoder_flops()
             for n in counts}
    rows = []
    for n, runs in results.items():
        accuracy = [m["test"]["accuracy"] for m in runs]
        macro_f1 = [m["test"]["macro_f1"] for m in runs]
        mean = float(np.mean(accuracy))
        rows.append({"heads": n, "share": n / (metadata["layers"] * metadata["heads"]), "accuracy_mean": mean,
                     "accuracy_std": float(np.std(accuracy)), "accuracy_per_seed": accuracy,
                     "macro_f1_mean": float(np.mean(macro_f1)), "macro_f1_std": float(np.std(macro_f1)),
                     "macro_f1_per_seed": macro_f1,
                     "dev_accuracy_per_seed": [m["dev"]["accuracy"] for m in runs],
                     "relative_drop": None if base is None else (base - mean) / base,
                     "encoder_flops": flops[n], "encoder_flops_share": flops[n] / flops[counts[0]]})
    summary = {"kind": "frugalnlp-papa-sweep", "task": metadata["task"], "model": metadata["model"], "length": metadata["length"],
               "setting": setting, "seeds": list(seeds), "train_size": spec.train_size, "epochs": spec.epochs,
               "lr": lr or DEFAULT_LR[setting], "gate_lr": spec.gate_lr, "constants": metadata,
               # where the ranking will be once the sweep is published, not its .partial directory
               "ranking": ranking and ranking.replace(str(out.path), str(out.final)), "rows": rows,
               "seconds": time.perf_counter() - started, "command": command_line()}
    table = format_sweep(summary)
    print(table)
    write_json(out.path / "sweep.json", summary)
    _plot_sweep(summary, out.path / "sweep.png")
    write_bytes(out.path / "report.md", f"# PAPA sweep: {metadata['task']}\n\n{table}\n\n![sweep](sweep.png)\n".encode())
    out.commit()
    return summary


def format_sweep(summary: dict) -> str:
    """Markdown table: heads replaced, test accuracy (mean ± std over seeds), relative drop against N=0,
    macro-F1, and the encoder's FLOPs on n tokens against the first row (counted by `torch.utils.flop_counter`)."""
    seeds = len(summary["seeds"])
    lines = [f"Task `{summary['task']}`, model `{summary['model']}`, {summary['setting']} setting, "
             f"length {summary['length']}, train size {summary['train_size']}, seeds {summary['seeds']}", "",
             "| constant heads | share | test accuracy | relative drop | test macro-F1 | "
             f"encoder FLOPs (vs {summary['rows'][0]['heads']}) |", "|---|---|---|---|---|---|"]

    def spread(row: dict, name: str) -> str:
        return f"{row[name + '_mean']:.3f}" + (f" ± {row[name + '_std']:.3f}" if seeds > 1 else "")

    for row in summary["rows"]:
        drop = "—" if row["relative_drop"] is None else f"{100 * row['relative_drop']:.1f}%"
        lines.append(f"| {row['heads']} | {100 * row['share']:.0f}% | {spread(row, 'accuracy')} | {drop} | "
                     f"{spread(row, 'macro_f1')} | {row['encoder_flops_share']:.3f} |")
    return "\n".join(lines)


def load_sweep(path: str | Path) -> dict:
    """A sweep's summary (``sweep.json``) from its directory or the file itself."""
    path = Path(path)
    path = path / "sweep.json" if path.is_dir() else path
    if (path.parent / MANIFEST).is_file():  # a sweep's output; a summary copied on its own is read as given
        verify_manifest(path.parent, "run the sweep again with --overwrite", complete=(path.name,))
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FrugalError(f"cannot read a sweep summary at {path}: {error}") from None
    # Summaries written before they carried a kind are recognised by their rows.
    if summary.get("kind", "frugalnlp-papa-sweep") != "frugalnlp-papa-sweep" or "rows" not in summary:
        raise FrugalError(f"{path} is not a `frugalnlp papa sweep` summary")
    return summary


def compare_sweeps(paths: list[str], output: str, overwrite: bool = False) -> dict:
    """Models side by side (the paper's third finding: do better models lose more from constant attention?).

    For each sweep: the all-real baseline and the relative drop with half and with all heads constant (of
    test accuracy and of macro-F1). For each task and setting with several models: whether the model with
    the best baseline lost the most with all heads constant. Writes ``compare.json``, ``compare.md`` and
    ``compare.png`` (relative drops per task and model); returns the summary.
    """
    run = RunDir(output, overwrite=overwrite, kind="papa-compare", inputs=paths)
    if not paths:
        raise FrugalError("give at least one sweep directory")
    rows = []
    for path in paths:
        summary = load_sweep(path)
        by_share = {row["share"]: row for row in summary["rows"]}
        if 0 not in by_share:
            raise FrugalError(f"{path}: the sweep has no run with 0 constant heads to compare against")
        base = by_share[0]

        def drop(share: float, name: str) -> float | None:
            row = by_share.get(share)
            return None if row is None else (base[f"{name}_mean"] - row[f"{name}_mean"]) / base[f"{name}_mean"]

        rows.append({"task": summary["task"], "model": summary["model"], "setting": summary["setting"],
                     "length": summary["length"], "train_size": summary["train_size"], "seeds": summary["seeds"],
                     "accuracy": base["accuracy_mean"], "accuracy_std": base["accuracy_std"],
                     "macro_f1": base["macro_f1_mean"],
                     "accuracy_drop_half": drop(0.5, "accuracy"), "accuracy_drop_all": drop(1.0, "accuracy"),
                     "macro_f1_drop_half": drop(0.5, "macro_f1"), "macro_f1_drop_all": drop(1.0, "macro_f1"),
                     "sweep": str(Path(path))})
    verdicts = []
    for task, setting in dict.fromkeys((r["task"], r["setting"]) for r in rows):
        group = [r for r in rows if (r["task"], r["setting"]) == (task, setting) and r["accuracy_drop_all"] is not None]
        if len({r["model"] for r in group}) < 2:
            continue
        best = max(group, key=lambda r: r["accuracy"])
        most = max(group, key=lambda r: r["accuracy_drop_all"])
        # "Better" only means something when the baselines differ by more than their seeds' spread.
        clear = all(best["accuracy"] - r["accuracy"] > best["accuracy_std"] + r["accuracy_std"]
                    for r in group if r is not best)
        verdicts.append({"task": task, "setting": setting, "best_model": best["model"],
                         "most_drop_model": most["model"], "better_lost_more": best is most,
                         "baselines_differ": clear})
    comparison = {"kind": "frugalnlp-papa-comparison", "rows": rows, "verdicts": verdicts, "command": command_line()}
    table = format_comparison(comparison)
    print(table)
    run.open()
    write_json(run.path / "compare.json", comparison)
    write_bytes(run.path / "compare.md", f"# PAPA: models side by side\n\n{table}\n\n![drops](compare.png)\n".encode())
    _plot_comparison(rows, run.path / "compare.png")
    run.commit()
    return comparison


def format_comparison(comparison: dict) -> str:
    """Markdown: one row per sweep (baseline, relative drops), then one line per task on the third finding."""
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{100 * value:.1f}%"

    lines = ["| task | setting | model | all-real test accuracy | macro-F1 | relative drop, half | relative drop, all "
             "| macro-F1 drop, half | macro-F1 drop, all |", "|---|---|---|---|---|---|---|---|---|"]
    for r in comparison["rows"]:
        spread = f" ± {r['accuracy_std']:.3f}" if len(r["seeds"]) > 1 else ""
        lines.append(f"| {r['task']} | {r['setting']} | {r['model']} | {r['accuracy']:.3f}{spread} | {r['macro_f1']:.3f} | "
                     f"{pct(r['accuracy_drop_half'])} | {pct(r['accuracy_drop_all'])} | {pct(r['macro_f1_drop_half'])} | "
                     f"{pct(r['macro_f1_drop_all'])} |")
    for v in comparison["verdicts"]:
        answer = "yes" if v["better_lost_more"] else f"no ({v['most_drop_model']} lost more)"
        caveat = "" if v["baselines_differ"] else " (but the baselines are within their seeds' spread: no model is clearly better)"
        lines.append(f"\n- {v['task']} ({v['setting']}): the better model, {v['best_model']}, lost more with all heads "
                     f"constant: **{answer}**{caveat}")
    return "\n".join(lines)


def _plot_comparison(rows: list[dict], path: Path) -> None:
    tasks = list(dict.fromkeys(f"{r['task']} ({r['setting']})" for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = new_figure(ncols=2, figsize=(4 + 1.2 * len(tasks) * len(models), 3.8), sharey=True)
    width = 0.8 / len(models)
    for ax, key, title in zip(axes, ("accuracy_drop_half", "accuracy_drop_all"), ("half the heads", "all heads")):
        for m, model in enumerate(models):
            values = {f"{r['task']} ({r['setting']})": r[key] for r in rows if r["model"] == model}
            x = [t + m * width for t, task in enumerate(tasks) if values.get(task) is not None]
            ax.bar(x, [100 * values[task] for task in tasks if values.get(task) is not None], width, label=model)
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, fontsize=8)
        ax.set_title(f"{title} constant", fontsize=9)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("relative drop of test accuracy (%)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


def _plot_sweep(summary: dict, path: Path) -> None:
    rows = summary["rows"]
    fig, ax = new_figure(figsize=(5.5, 3.8))
    ax.errorbar([r["heads"] for r in rows], [r["accuracy_mean"] for r in rows],
                yerr=[r["accuracy_std"] for r in rows], marker="o", capsize=3)
    ax.set_xlabel("heads replaced by constant attention")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"PAPA {summary['setting']}: {summary['model']} on {summary['task']}, seeds {summary['seeds']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _plot_gates(gates: torch.Tensor, path: Path, title: str) -> None:
    fig, ax = new_figure(figsize=(1 + 0.45 * gates.shape[1], 1 + 0.45 * gates.shape[0]))
    image = ax.imshow(gates.sigmoid().numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer (0-based)")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, label="weight of real attention")
    save_figure(fig, path)
