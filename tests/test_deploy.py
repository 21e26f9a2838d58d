"""From data to a deployed model in one command (#37): the demo writes, per target, a deploy directory that
predict and serve run with no other flags and that answers as its card says."""

import json

import httpx
import pytest
from conftest import run_cli

from frugalnlp.loadtest import ServerProcess
from frugalnlp.manifest import MANIFEST
from frugalnlp.tasks import load_task


@pytest.fixture(scope="module")
def demo(tiny_dir, tmp_path_factory):
    from frugalnlp.cli import main

    out = tmp_path_factory.mktemp("deploy-demo") / "demo"
    assert main(["demo", "--model", str(tiny_dir), "--train-size", "64", "--epochs", "1", "--max-length", "24",
                 "--seeds", "0", "--exit-layers", "1,2,4", "--methods", "joint",
                 "--policies", "confidence,per-exit+ensemble", "--output", str(out)]) == 0
    return out


def _test_file(tmp_path):
    """MR's test split and the JSONL file of its texts that predict reads."""
    test = load_task("mr").test
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in test.texts))
    return test, data


def _predicts_as_its_card_says(folder, card, test, data, out, capsys):
    """`predict DIR` with no other flags on the test file: its saved point, exactly the card's test accuracy."""
    status, _, err = run_cli(["predict", folder, "--input", data, "--output", out], capsys)
    assert status == 0 and "the run's saved operating point" in err, err
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    accuracy = sum(p["label"] == card["labels"][g] for p, g in zip(predictions, test.labels)) / len(test.labels)
    assert accuracy == card["test"]["accuracy"]  # exactly what the card was measured with
    return predictions


def test_the_demo_writes_a_deploy_directory_per_target_that_answers_as_its_card_says(demo, tmp_path, capsys):
    results = json.loads((demo / "results.json").read_text())
    targets = [c["speedup"] for c in results["selected_on_dev"]["per_target"]]
    assert [d["target_speedup"] for d in results["deploy"]] == targets and targets
    test, data = _test_file(tmp_path)
    for deployed in results["deploy"]:
        folder = demo / deployed["path"]
        card = json.loads((folder / "deploy.json").read_text())
        listed = json.loads((folder / MANIFEST).read_text())["files"]
        assert {"deploy.json", "README.md", "operating-point.json", "config.json"} <= set(listed)
        assert card["target_speedup"] == deployed["target_speedup"] and card["labels"] == ["negative", "positive"]
        assert card["machine"]["cpu_features"] and card["command"].startswith("frugalnlp ")
        assert card["test"]["accuracy"] == deployed["test_accuracy"]
        out = tmp_path / f"{deployed['path'].replace('/', '-')}.jsonl"
        predictions = _predicts_as_its_card_says(folder, card, test, data, out, capsys)
        depth = card["full_depth"]
        assert card["test"]["speedup_layers"] == pytest.approx(
            depth / (sum(p["layers_run"] for p in predictions) / len(predictions)))
    last = demo / results["deploy"][-1]["path"]
    with ServerProcess(last, threads=1) as server:
        served = httpx.post(f"{server.url}/predict", json={"texts": test.texts[:24]}, timeout=60).json()["predictions"]
    assert [(s["label"], s["exit_layer"]) for s in served] == [(p["label"], p["exit_layer"]) for p in predictions[:24]]


def test_a_deploy_directory_on_another_cpu_says_its_speed_may_not_hold(demo, tmp_path, capsys, monkeypatch):
    import shutil

    import frugalnlp.deploy as deploy

    results = json.loads((demo / "results.json").read_text())
    folder = tmp_path / "deployed"
    shutil.copytree(demo / results["deploy"][0]["path"], folder)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    status, _, err = run_cli(["predict", folder, "--input", data, "--output", tmp_path / "a.jsonl"], capsys)
    assert status == 0 and "another CPU" not in err
    here = deploy.machine()
    other = {**here, "cpu_features": {k: not v for k, v in here["cpu_features"].items()}}
    monkeypatch.setattr(deploy, "machine", lambda: other)
    status, _, err = run_cli(["predict", folder, "--input", data, "--output", tmp_path / "b.jsonl"], capsys)
    assert status == 0 and sum("measured on another CPU" in line for line in err.splitlines()) == 1
    card = folder / "deploy.json"
    card.write_text(card.read_text().replace('"kind"', '"kind" ', 1))
    status, _, err = run_cli(["predict", folder, "--input", data, "--output", tmp_path / "c.jsonl"], capsys)
    assert status == 2 and "deploy.json has changed" in err and len(err.strip().splitlines()) == 1


def test_the_demo_answers_in_measured_seconds_and_deploys_what_it_timed(tiny_dir, tmp_path, capsys):
    """`demo --cost time --runtime onnx --precision int8`: the choice per target is made in seconds measured here,
    each choice is deployed as the ONNX graphs that were timed, and predict on the deploy directory gives the
    card's test accuracy exactly."""
    out = tmp_path / "demo"
    status, printed, err = run_cli(["demo", "--model", tiny_dir, "--train-size", 64, "--epochs", 1, "--max-length",
                                    24, "--seeds", "0", "--exit-layers", "1,2,4", "--methods", "joint",
                                    "--policies", "per-exit+ensemble", "--cost", "time", "--runtime", "onnx",
                                    "--precision", "int8",
                                    "--cost-batch-size", 8, "--output", out], capsys)
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    timed = results["in_seconds"]
    assert timed["settings"]["cost"] == "time" and timed["settings"]["precision"] == "int8"
    assert "In measured seconds" in printed and (out / "seconds" / "frontier.json").is_file()
    chosen = [c for c in timed["dev_choices"] if c["choice"] is not None]
    assert chosen and [d["target_speedup"] for d in results["deploy"]] == [c["target_speedup"] for c in chosen]
    test, data = _test_file(tmp_path)
    for deployed in results["deploy"]:
        folder = out / deployed["path"]
        card = json.loads((folder / "deploy.json").read_text())
        assert card["cost"] == "time" and card["measured"]["runtime"] == "ONNX Runtime int8"
        assert card["measured"]["speedup"] > 0 and card["measured"]["batch_size"] == 8
        assert json.loads((folder / "model" / "export.json").read_text())["precision"] == "int8"
        assert json.loads((folder / "operating-point.json").read_text())["kind"] == "frugalnlp-operating-point"
        _predicts_as_its_card_says(folder, card, test, data, tmp_path / f"{folder.name}.jsonl", capsys)
    status, _, err = run_cli(["demo", "--runtime", "onnx", "--output", tmp_path / "x"], capsys)
    assert status == 2 and "--cost time" in err and not (tmp_path / "x").exists()
