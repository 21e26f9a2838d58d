"""Prediction with a trained run: a Python `Predictor` for lists of texts, and file-to-JSONL streaming."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from frugalnlp.early_exit.policies import make_policy
from frugalnlp.encoding import EncodedSplit, batches, encode_texts
from frugalnlp.errors import FrugalError
from frugalnlp.tasks import Columns, read_rows, row_example
from frugalnlp.training import load_run


class Predictor:
    """Adaptive-inference predictions from a trained run (early exit or Multi-Model cascade).

    >>> predictor = Predictor("runs/sweet", threshold=0.9)
    >>> predictor(["a gorgeous, witty film", "tedious"])
    [{'label': 'positive', 'confidence': 0.97, 'exit_layer': 2, 'layers_run': 2}, ...]
    """

    def __init__(self, run: str | os.PathLike, threshold: float = 0.9, policy: str = "confidence",
                 batch_size: int = 32, trust_pickle: bool = False, target_speedup: float | None = None,
                 max_drop: float | None = None) -> None:
        """``target_speedup`` or ``max_drop`` replace ``threshold`` by one chosen on the run's dev split
        (see `frugalnlp.evaluation.choose_threshold`); the choice is kept in ``self.operating_point``."""
        if batch_size < 1:
            raise FrugalError(f"--batch-size {batch_size} must be at least 1")
        make_policy(policy, threshold, 2)
        trained = load_run(run, trust_pickle=trust_pickle)
        self.model, self.tokenizer = trained.model, trained.tokenizer
        self.operating_point = None
        if target_speedup is not None or max_drop is not None:
            from frugalnlp.report import operating_threshold

            self.operating_point = operating_threshold(trained, target_speedup, max_drop, policy)
            threshold = self.operating_point["threshold"]
        self.threshold = threshold
        self.policy = make_policy(policy, threshold, self.model.num_exits)
        self.max_length = trained.spec.max_length
        self.batch_size = batch_size
        self.is_pair = bool(trained.config["task"]["pair"])
        self.id2label = {int(k): v for k, v in self.model.config.id2label.items()}
        self.exit_layers = self.model.exit_layers

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
                                      policy=self.policy)
            for i, label, conf, exit_index, layers in zip(index.tolist(), pred.labels.tolist(),
                                                          pred.confidence.tolist(), pred.exit_index.tolist(),
                                                          pred.layers_run.tolist()):
                results[i] = {"label": self.id2label[label], "confidence": round(conf, 6),
                              "exit_layer": self.exit_layers[exit_index], "layers_run": layers}
        return results


def predict_file(predictor: Predictor, input_path: str | os.PathLike, output: str | os.PathLike,
                 columns: Columns, overwrite: bool = False, chunk: int = 256) -> tuple[int, list[tuple[int, str]]]:
    """Predict every good row of a CSV/TSV/JSONL file into ``output`` (JSONL, written atomically).

    Bad rows (malformed JSON, missing or empty text) are skipped and returned as (line, problem).
    Returns (rows written, bad rows).
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FrugalError(f"output {output} already exists; choose another --output or pass --overwrite")
    bad: list[tuple[int, str]] = []
    good: list[tuple[int, str, str | None]] = []
    for number, row in read_rows(input_path, bad=bad):
        try:
            text, pair, _ = row_example(input_path, number, row, columns, need_label=False)
        except FrugalError as e:
            bad.append((number, str(e).split(": ", 1)[-1]))
            continue
        good.append((number, text, pair))
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for lines, texts, pairs in _chunks(good, chunk):
            for number, result in zip(lines, predictor(texts, pairs)):
                f.write(json.dumps({"line": number, **result}) + "\n")
                written += 1
    os.replace(tmp, output)
    bad.sort()
    return written, bad


def _chunks(rows: list[tuple[int, str, str | None]], size: int) -> Iterator[tuple[list[int], list[str], list[str] | None]]:
    for start in range(0, len(rows), size):
        part = rows[start:start + size]
        pairs = [p for _, _, p in part]
        yield [n for n, _, _ in part], [t for _, t, _ in part], None if pairs[0] is None else pairs
