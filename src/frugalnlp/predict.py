"""Prediction with a trained run: a Python `Predictor` for lists of texts, and file-to-JSONL streaming."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from frugalnlp.curves import dev_scores
from frugalnlp.defaults import THRESHOLD
from frugalnlp.dev_choice import OperatingTarget, operating_threshold
from frugalnlp.early_exit.ensemble import ExitEnsemble
from frugalnlp.early_exit.registry import check_policy, make_policy
from frugalnlp.early_exit.router import ExitRouter
from frugalnlp.encoding import EncodedSplit, batches, encode_texts
from frugalnlp.errors import FrugalError
from frugalnlp.operating import load_operating_point, operating_point
from frugalnlp.run import load_run
from frugalnlp.rundir import check_output_file
from frugalnlp.tasks import Columns, iter_rows, row_example


class Predictor:
    """Adaptive-inference predictions from a trained run (early exit or Multi-Model cascade).

    >>> predictor = Predictor("runs/sweet", threshold=0.9)
    >>> predictor(["a gorgeous, witty film", "tedious"])
    [{'label': 'positive', 'confidence': 0.97, 'exit_layer': 2, 'layers_run': 2}, ...]
    """

    def __init__(self, run: str | os.PathLike, threshold: float | list[float] | None = None, policy: str | None = None,
                 batch_size: int = 32, trust_pickle: bool = False, target: OperatingTarget | None = None,
                 ensemble: bool | ExitEnsemble = False, router: ExitRouter | None = None,
                 max_tokens: int | None = None) -> None:
        """A ``target`` (`frugalnlp.dev_choice.OperatingTarget`, its policy the one used) replaces ``threshold``
        by one chosen on the run's dev split (`frugalnlp.dev_choice.operating_threshold`; certified with its
        ``risk``, see `frugalnlp.certify`); the choice is kept in ``self.operating_point`` (an `OperatingPoint`,
        as the saved one is; ``self.operating_point_saved`` tells them apart). With neither, the run's saved
        operating point (`frugalnlp calibrate`) is used, else threshold 0.9 (confidence policy).
        ``ensemble``: the policy decides on an `ExitEnsemble`, fitted on the run's dev split (True) or given.
        ``router``: the learned policy's `ExitRouter` (default: the saved point's, else fitted on dev).
        ``max_tokens``: every segment of a ``batch_size`` block runs in length-sorted runs of at most that
        many padded tokens (`frugalnlp.early_exit.runner.length_runs`)."""
        chooses = target is not None
        if chooses and policy is not None and policy != target.policy:
            raise FrugalError(f"policy {policy} and the target's policy {target.policy} differ; give one")
        policy = target.policy if chooses else policy
        saved = None if threshold is not None or chooses or ensemble is not False else load_operating_point(run)
        fitted = ensemble if isinstance(ensemble, ExitEnsemble) else None
        if saved is not None:
            if policy is not None and policy != saved.policy:
                raise FrugalError(f"{run}'s saved operating point is for the {saved.policy} policy; give --threshold "
                                  f"with --policy {policy}, or calibrate the run for it")
            threshold, policy, fitted, router = saved.threshold, saved.policy, saved.ensemble, saved.router
        policy = policy or "confidence"
        threshold = THRESHOLD if threshold is None else threshold
        self.check_args(threshold, policy, batch_size, max_tokens)
        trained = load_run(run, trust_pickle=trust_pickle)
        # What another process needs to rebuild this predictor (Ray actors), with the threshold as chosen.
        self.args = {"run": str(run), "policy": policy, "batch_size": batch_size, "trust_pickle": trust_pickle,
                     "max_tokens": max_tokens}
        self.model, self.tokenizer = trained.model, trained.tokenizer
        self.operating_point, self.operating_point_saved = saved, saved is not None
        if ensemble is True or chooses or (policy == "learned" and router is None):
            # one pass over dev serves the ensemble's fit, the router's and the choice
            dev = dev_scores(trained, True if ensemble is True else fitted, policy)
            fitted, router = dev.ensemble, dev.router
            if chooses:
                self.operating_point = operating_point(run, dev, operating_threshold(dev, target), target)
                threshold, router = self.operating_point.threshold, self.operating_point.router
                fitted = self.operating_point.ensemble  # certified: fitted on dev's fit part alone
                policy = self.operating_point.policy  # per-exit where a fixed exit won on dev
        self.ensemble, self.router = fitted, router
        self.threshold = threshold
        self.args.update(policy=policy, threshold=threshold, ensemble=fitted if fitted is not None else False,
                         router=router)
        self.policy_name = policy
        self.policy = make_policy(policy, threshold, self.model.num_exits, fitted, router)
        self.max_length = trained.spec.max_length
        self.batch_size, self.max_tokens = batch_size, max_tokens
        self.is_pair = bool(trained.config["task"]["pair"])
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.exit_layers = self.model.exit_layers

    @staticmethod
    def check_args(threshold: float | list[float] | None = None, policy: str | None = None, batch_size: int = 32,
                   max_tokens: int | None = None) -> None:
        """FrugalError for settings out of range, before the run loads and its dev split is scored."""
        if batch_size < 1:
            raise FrugalError(f"--batch-size {batch_size} must be at least 1")
        if max_tokens is not None and max_tokens < 1:
            raise FrugalError(f"--max-tokens {max_tokens} must be at least 1")
        threshold = THRESHOLD if threshold is None else threshold
        if check_policy(policy or "confidence") != "learned":  # a learned policy's router comes later
            make_policy(policy or "confidence", threshold,
                        2 if isinstance(threshold, (int, float)) else len(threshold) + 1)

    @torch.inference_mode()
    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """One dict per text: label, confidence, exit_layer (1-based layer it left after), layers_run."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise FrugalError(f"text {i} is empty; every input needs some text")
        if self.is_pair and pairs is None:
            raise FrugalError("this model classifies text pairs: pass pairs=[...] (or --text-pair-column)")
        data = EncodedSplit(encode_texts(self.tokenizer, texts, pairs, self.max_length), labels=None)
        results: list[dict] = [{} for _ in texts]
        for index, batch in batches(data, self.tokenizer, self.batch_size):
            pred = self.model.predict(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                      policy=self.policy, max_tokens=self.max_tokens)
            check_finite(pred.confidence)
            for i, label, conf, exit_index, layers in zip(index.tolist(), pred.labels.tolist(),
                                                          pred.confidence.tolist(), pred.exit_index.tolist(),
                                                          pred.layers_run.tolist()):
                results[i] = {"label": self.id2label[label], "confidence": round(conf, 6),
                              "exit_layer": self.exit_layers[exit_index], "layers_run": layers}
        return results


def check_finite(confidence: torch.Tensor | np.ndarray) -> None:
    """FrugalError if a confidence [rows] is NaN or infinite: never written as an answer (nor as invalid JSON)."""
    if not np.isfinite(np.asarray(confidence)).all():
        raise FrugalError("the model gave a confidence that is not a finite number (NaN or infinite logits): its "
                          "weights or temperatures are broken; export or train the run again")


ENGINES = ("local", "ray")


def check_prediction_paths(input_path: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output file, refused when it cannot be written or is the input itself (links resolved)."""
    output = check_output_file(output, overwrite)
    if output.exists() and Path(input_path).exists() and os.path.samefile(input_path, output):
        raise FrugalError(f"--output {output} is the --input file; write the predictions to another file")
    return output


def predict_file(predictor: Predictor, input_path: str | os.PathLike, output: str | os.PathLike,
                 columns: Columns, overwrite: bool = False, chunk: int = 256, progress: bool = False,
                 engine: str = "local", ray_actors: int | None = None, ray_cpus_per_actor: float = 1.0,
                 ray_window: int = 200, strict: bool = False) -> tuple[int, list[tuple[int, str]]]:
    """Predict every good row of a CSV/TSV/JSONL file into ``output`` (JSONL, published atomically).

    Rows are streamed ``chunk`` at a time, so memory stays flat however large the file. Bad rows
    (malformed JSON or CSV, missing or empty text, invalid Unicode) are skipped and returned as
    (line, problem); with ``strict`` the first one raises FrugalError and ``output`` is left as it was.
    A CSV/TSV header without the text column, or a JSONL file none of whose rows has it, raises too.
    Returns (rows written, bad rows).

    ``engine="ray"`` sends the chunks to Ray Data (`map_batches` over actors that each load the model
    once; ``RAY_ADDRESS`` names a cluster, else a local one starts): ``ray_window`` chunks at a time,
    ``ray_actors`` actors of ``ray_cpus_per_actor`` CPUs (default: as many as the cluster's CPUs allow).
    Each actor predicts whole chunks, so the output is the local engine's, line for line.
    """
    if engine not in ENGINES:
        raise FrugalError(f"unknown --engine '{engine}'; choose one of {', '.join(ENGINES)}")
    output = check_prediction_paths(input_path, output, overwrite)
    bad: list[tuple[int, str]] = []
    rows = iter_rows(input_path, bad=bad, required=columns.names(label=False))
    rows = itertools.chain(list(itertools.islice(rows, 1)), rows)  # a CSV header is checked before any writing
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    written = 0
    try:
        # delay: a file that fails or finishes within a second gets no bar above its one line.
        with open(tmp, "w", encoding="utf-8") as f, tqdm(total=_count_lines(input_path), unit="line", desc="predict",
                                                         disable=not progress, delay=1.0) as bar:
            chunks = _chunks(_good_rows(input_path, rows, columns, bad, bar, strict), chunk)
            if engine == "ray":
                lines = _ray_lines(predictor, chunks, ray_actors, ray_cpus_per_actor, ray_window)
            else:
                lines = (_predict_chunk(predictor, part) for part in chunks)
            for text in lines:
                f.write(text)
                written += text.count("\n")
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    bad.sort()
    return written, bad


def _predict_chunk(predictor: Predictor, part: list[tuple[int, str, str | None]]) -> str:
    """The JSONL lines of one chunk of (line number, text, pair) rows."""
    texts, pairs = [t for _, t, _ in part], [p for _, _, p in part]
    results = predictor(texts, None if pairs[0] is None else pairs)
    return "".join(json.dumps({"line": number, **result}, allow_nan=False) + "\n"
                   for (number, _, _), result in zip(part, results))


class _RayChunkPredictor:
    """A Ray Data actor: loads the model once, then turns chunks of rows into their JSONL lines."""

    def __init__(self, args: dict) -> None:
        self.predictor = Predictor(**args)

    def __call__(self, batch: dict) -> dict:
        return {"jsonl": [_predict_chunk(self.predictor, json.loads(part)) for part in batch["rows"]]}


def _ray_lines(predictor: Predictor, chunks: Iterator[list], actors: int | None, cpus_per_actor: float,
               window: int) -> Iterator[str]:
    try:
        import ray
    except ImportError:
        raise FrugalError("--engine ray needs the 'ray' extra: pip install -e '.[ray]' (make install has it)") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its plans and timings would bury our bar
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # output lines in input order
        context.enable_progress_bars = False  # the file's own bar counts lines
        if actors is None:
            actors = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
        while True:
            # Chunks travel as JSON strings: one Arrow cell each, whatever their texts hold.
            rows = [{"rows": json.dumps(part)} for part in itertools.islice(chunks, window)]
            if not rows:
                return
            data = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                _RayChunkPredictor, fn_constructor_kwargs={"args": predictor.args}, batch_size=1,
                concurrency=actors, num_cpus=cpus_per_actor, batch_format="numpy", max_restarts=0)
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                yield from (str(text) for text in batch["jsonl"])
    finally:
        if started:
            ray.shutdown()


def _good_rows(input_path: str | os.PathLike, rows: Iterator[tuple[int, dict]], columns: Columns,
               bad: list[tuple[int, str]], bar, strict: bool = False) -> Iterator[tuple[int, str, str | None]]:
    """(line, text, pair) of the good ``rows`` of `iter_rows` (which appends the unreadable ones to ``bad``)."""
    last = count = without_column = 0
    seen: dict[str, None] = {}  # columns of the rows that lack the text column, in order
    required = columns.names(label=False)

    def refuse_if_strict() -> None:
        if strict and bad:
            line, problem = min(bad)
            raise FrugalError(f"{input_path}:{line}: {problem}; --strict wrote nothing (the output is as it was)")

    for number, row in rows:
        refuse_if_strict()
        bar.update(number - last)
        last = number
        count += 1
        if any(c not in row for c in required):
            without_column += 1
            seen.update(dict.fromkeys(map(str, row)))
        try:
            text, pair, _ = row_example(input_path, number, row, columns, need_label=False)
        except FrugalError as e:
            bad.append((number, str(e).split(": ", 1)[-1]))
            refuse_if_strict()
            continue
        yield number, text, pair
    refuse_if_strict()
    if count and without_column == count:  # JSONL has no header: a wrong column shows as every row lacking it
        raise FrugalError(f"{input_path}: no row has column {', '.join(map(repr, required))} "
                          f"(columns: {', '.join(seen)}); set --text-column (and --text-pair-column)")


def _count_lines(path: str | os.PathLike) -> int | None:
    try:
        with open(path, "rb") as f:
            return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def _chunks(rows: Iterator[tuple[int, str, str | None]], size: int) -> Iterator[list[tuple[int, str, str | None]]]:
    part = []
    for row in rows:
        part.append(row)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part
