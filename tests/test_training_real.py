"""The real embedded checkpoint, end to end (about a minute on 2 cores: part of the CI selection)."""

import json

import pytest

from conftest import run_cli


ARGS = ["train", "--task", "mr", "--model", "minilm", "--method", "plain", "--train-size", "1000", "--epochs", "1",
        "--seed", "0"]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    """One plain fine-tune of the embedded MiniLM on 1,000 MR sentences (about 45 s on 2 cores)."""
    from frugalnlp.cli import main

    path = tmp_path_factory.mktemp("real") / "a"
    assert main([str(a) for a in ARGS + ["--output", path]]) == 0
    return path


def test_plain_fine_tune_on_mr_reaches_070(fine_tuned):
    a = json.loads((fine_tuned / "metrics.json").read_text())
    assert a["test"]["accuracy"] >= 0.70
    assert a["test"]["examples"] == 854 and a["train_examples"] == 1000
    config = json.loads((fine_tuned / "config.json").read_text())
    assert config["spec"]["lr"] == 5e-5 and config["train_ids_sha256"]
    files = sorted(p.name for p in fine_tuned.rglob("*") if p.is_file())
    assert files == [".kind", "config.json", "config.json", "manifest.json", "metrics.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.slow  # a second 45-s fine-tune; the tiny model's reproducibility is in test_resume
def test_plain_fine_tune_on_mr_is_reproducible(fine_tuned, tmp_path, capsys):
    status, out, _ = run_cli(ARGS + ["--output", tmp_path / "b"], capsys)
    assert status == 0, out
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (fine_tuned, tmp_path / "b"))
    for key in ("dev", "test", "temperatures"):
        assert a[key] == b[key]


def test_real_checkpoint_evaluate_static_and_max_drop(tmp_path, capsys):
    """The embedded MiniLM on a small MR slice: a joint run against a separately trained 2-layer model."""
    from frugalnlp.baselines import static_frontier
    from frugalnlp.tasks import load_task, stratified_subset

    task = load_task("mr")
    for name, split, n in (("train", task.train, 96), ("dev", task.dev, 120), ("test", task.test, 120)):
        split = stratified_subset(split, n, seed=0)
        rows = [json.dumps({"text": t, "label": task.label_names[y]}) for t, y in zip(split.texts, split.labels)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    data = ["--train-file", tmp_path / "train.jsonl", "--dev-file", tmp_path / "dev.jsonl", "--test-file",
            tmp_path / "test.jsonl", "--model", "minilm", "--epochs", "1", "--max-length", "32"]
    status, _, err = run_cli(["train", *data, "--method", "joint", "--output", tmp_path / "joint"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["train", *data, "--method", "plain", "--num-layers", "2", "--output", tmp_path / "two"],
                             capsys)
    assert status == 0, err
    status, out, err = run_cli(["evaluate", tmp_path / "joint", "--static", tmp_path / "two", "--max-drop", "0.01"],
                               capsys)
    assert status == 0, err
    result = json.loads((tmp_path / "joint" / "eval-test-confidence" / "curve.json").read_text())
    static = result["baselines"]["static"]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    model = {"accuracy": two["test"]["accuracy"], "macro_f1": two["test"]["macro_f1"], "run": str(tmp_path / "two"),
             "distilled": False}
    assert static == [{"layers": 2, "layers_share": 2 / 6, "speedup_layers": 3.0, **model, "models": [model]}]
    row = next(r for r in result["comparison"] if r["speedup"] == 3.0)
    assert row["static"] == static_frontier(static, row["test_speedup"])  # read where the adaptive model landed
    assert static_frontier(static, 3.0) == two["test"]["accuracy"]
    assert row["fixed_exit"] == result["baselines"]["fixed_exits"][1]["accuracy"]
    point = result["operating_point"]
    last = next(p for p in result["points"] if p["threshold"] == 1.0)
    dev_last = json.loads((tmp_path / "joint" / "metrics.json").read_text())["dev"]["accuracy"]
    assert point["dev"]["accuracy"] >= dev_last - 0.01 - 1e-9 and point["test"]["speedup_layers"] >= 1.0
    assert last["accuracy"] == json.loads((tmp_path / "joint" / "metrics.json").read_text())["test"]["accuracy"]
    status, out, err = run_cli(["predict", tmp_path / "joint", "--input", tmp_path / "test.jsonl", "--max-drop", "0.01",
                                "--output", tmp_path / "p.jsonl"], capsys)
    assert status == 0, err
    assert f"threshold {point['threshold']:.4f} chosen on dev" in err
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 120
