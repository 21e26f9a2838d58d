"""Tasks on the real packaged files, and user files."""

import json

import numpy as np
import pytest

from frugalnlp.errors import FrugalError
from frugalnlp.tasks import Columns, load_files, load_task, stratified_subset, with_train_size

EXPECTED = {"mr": (8530, ["negative", "positive"], False), "imdb": (25000, ["negative", "positive"], False),
            "bbc": (2225, ["business", "entertainment", "politics", "sports", "tech"], False),
            "boolq": (9427 + 3270, ["False", "True"], True)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_packaged_task_counts_labels_and_disjoint_splits(name):
    task = load_task(name)
    total, labels, pair = EXPECTED[name]
    assert task.summary()["total"] == total
    assert task.label_names == labels
    assert task.is_pair == pair
    ids = [set(task.split(s).ids) for s in ("train", "dev", "test")]
    assert sum(map(len, ids)) == total  # ids unique within and across splits
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    for s in ("train", "dev", "test"):
        split = task.split(s)
        assert set(np.unique(split.labels)) == set(range(len(labels)))
        assert all(t.strip() for t in split.texts)
        if pair:
            assert len(split.pairs) == len(split) and all(p.strip() for p in split.pairs)


def test_splits_are_the_same_twice_and_stratified():
    a, b = load_task("mr"), load_task("mr")
    for s in ("train", "dev", "test"):
        assert a.split(s).ids == b.split(s).ids
        assert abs(a.split(s).labels.mean() - 0.5) < 0.01


def test_boolq_test_is_official_dev_and_train_excludes_its_questions():
    task = load_task("boolq")
    assert len(task.test) == 3270 and all(i.startswith("boolq:dev:") for i in task.test.ids)
    assert len(task.train) + len(task.dev) == 9427
    assert not set(task.test.texts) & set(task.train.texts + task.dev.texts)


def test_train_size_is_stratified_seeded_and_hashed():
    task = load_task("bbc")
    a, b, c = (with_train_size(task, 100, seed) for seed in (0, 0, 1))
    assert len(a.train) == 100 and a.train.ids == b.train.ids and a.train.ids != c.train.ids
    assert a.train.ids_hash() == b.train.ids_hash() != c.train.ids_hash()
    full = np.bincount(task.train.labels) / len(task.train)
    assert np.abs(np.bincount(a.train.labels) / 100 - full).max() < 0.02
    # A shuffled subset, not the first N examples (the official SWEET code's bug).
    assert a.train.ids != [i for i in task.train.ids if i in set(a.train.ids)]
    with pytest.raises(FrugalError, match="larger than the training split"):
        stratified_subset(task.train, len(task.train) + 1, 0)


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return str(path)


def test_user_files_csv_tsv_jsonl(tmp_path):
    rows = [("good film", "pos"), ("bad film", "neg")] * 20
    csv = _write(tmp_path / "d.csv", "text,label\n" + "".join(f'"{t}",{l}\n' for t, l in rows))
    tsv = _write(tmp_path / "d.tsv", "sentence\ty\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    jsonl = _write(tmp_path / "d.jsonl", "".join(f'{{"q": "{t}", "p": "x", "label": "{l}"}}\n' for t, l in rows))
    task = load_files(csv)
    assert task.label_names == ["neg", "pos"] and len(task.train) + len(task.dev) + len(task.test) == 40
    assert len(task.dev) == 4 and len(task.test) == 4
    assert len(load_files(tsv, columns=Columns(text="sentence", label="y")).train) == 32
    pair = load_files(jsonl, test_file=jsonl, columns=Columns(text="q", text_pair="p"))
    assert pair.is_pair and len(pair.test) == 40 and len(pair.train) == 36


@pytest.mark.parametrize("content,message", [
    (b"", "empty"),
    (b"text,label\n", "no rows"),
    (b"text,label\ncaf\xe9,pos\n", r"d.csv:2: not UTF-8"),
    (b"text,label\nok,pos\n  ,neg\n", r"d.csv:3: column 'text' is empty"),
    (b"words,label\nok,pos\n", r"no column 'text'"),
])
def test_user_file_errors_name_file_and_line(tmp_path, content, message):
    with pytest.raises(FrugalError, match=message):
        load_files(_write(tmp_path / "d.csv", content))


@pytest.mark.parametrize("name,content,message", [
    ("d.csv", "\n\ntext,label,text\nok,pos,other\n", r"d.csv:3: the header names column\(s\) 'text' more than once"),
    ("d.tsv", "text\tlabel\tlabel\nok\tpos\tneg\n", r"d.tsv:1: the header names column\(s\) 'label'"),
    ("d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": {"a": 1}}\n',
     r"d.jsonl:2: column 'label' holds a JSON object .*not a label"),
    ("d.jsonl", '{"text": "a", "label": ["pos"]}\n', r"d.jsonl:1: column 'label' holds a JSON list"),
    ("d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": true}\n',
     r"d.jsonl:2: the label true is a JSON boolean where line 1's is a string"),
    ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "0"}\n',
     r"d.jsonl:2: the label \"0\" is a JSON string where line 1's is a number"),
])
def test_duplicated_columns_and_labels_of_odd_kinds_are_refused_with_the_line(tmp_path, name, content, message):
    with pytest.raises(FrugalError, match=message):
        load_files(_write(tmp_path / name, content))


def test_labels_of_one_kind_are_classes(tmp_path):
    rows = "".join(f'{{"text": "t{i}", "label": {json.dumps(i % 2 == 0)}}}\n' for i in range(20))
    assert load_files(_write(tmp_path / "b.jsonl", rows)).label_names == ["False", "True"]
    rows = "".join(f'{{"text": "t{i}", "label": {[0, 1.0][i % 2]}}}\n' for i in range(20))  # 1.0 and 0: numbers
    assert load_files(_write(tmp_path / "n.jsonl", rows)).label_names == ["0", "1"]


def test_unseen_dev_label_is_an_error(tmp_path):
    train = _write(tmp_path / "train.csv", "text,label\n" + "a,x\nb,y\n" * 10)
    dev = _write(tmp_path / "dev.csv", "text,label\na,x\nb,z\n")
    with pytest.raises(FrugalError, match="label\\(s\\) 'z' never occur in the training data"):
        load_files(train, dev_file=dev, test_file=dev)


def test_unknown_task_names_the_choices():
    with pytest.raises(FrugalError, match="known tasks: mr, imdb, bbc, boolq"):
        load_task("sst2")
