"""The real embedded checkpoint, end to end (about a minute on 2 cores: part of the CI selection)."""

import json

from conftest import run_cli


def test_plain_fine_tune_on_mr_reaches_070_and_is_reproducible(tmp_path, capsys):
    args = ["train", "--task", "mr", "--model", "minilm", "--method", "plain", "--train-size", "1000",
            "--epochs", "1", "--seed", "0"]
    status, out, _ = run_cli(args + ["--output", tmp_path / "a"], capsys)
    assert status == 0, out
    status, _, _ = run_cli(args + ["--output", tmp_path / "b"], capsys)
    assert status == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert a["test"]["accuracy"] >= 0.70
    assert a["test"]["examples"] == 854 and a["train_examples"] == 1000
    for key in ("dev", "test", "temperatures"):
        assert a[key] == b[key]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["spec"]["lr"] == 5e-5 and config["train_ids_sha256"]
    files = sorted(p.name for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == ["config.json", "config.json", "metrics.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
