"""`frugalnlp frontier`: measured texts/s against test accuracy on one runtime, on tiny runs (structure and
agreement with the evaluation; never absolute times)."""

import json

import pytest

from conftest import run_cli
from frugalnlp.errors import FrugalError
from frugalnlp.frontier import FrontierSettings, check_settings, dev_choices, format_frontier


@pytest.fixture(scope="module")
def runs(tiny_run, tiny_dir, tmp_path_factory):
    """A copy of the tiny joint run and a tiny multi-model run, both exported to int8 (RUN/onnx-int8)."""
    import shutil

    from frugalnlp.cli import main

    folder = tmp_path_factory.mktemp("frontier")
    joint, cascade = folder / "joint", folder / "mm"
    shutil.copytree(tiny_run, joint, ignore=shutil.ignore_patterns("onnx*", "eval-*"))
    assert main(["train", "--task", "mr", "--model", str(tiny_dir), "--method", "multi-model", "--exit-layers", "1,2,4",
                 "--train-size", "48", "--epochs", "1", "--max-length", "24", "--output", str(cascade)]) == 0
    for run in (joint, cascade):
        assert main(["export", str(run), "--quantize", "int8"]) == 0
    return joint, cascade


def test_frontier_on_int8_times_plain_static_and_adaptive_points(runs, tmp_path, capsys, monkeypatch):
    tiny_run, tiny_cascade = runs
    out = tmp_path / "frontier"
    status, stdout, err = run_cli(["frontier", tiny_run, "--static", tiny_cascade, "--runtime", "onnx", "--quantize",
                                   "int8", "--examples", 24, "--repeats", 1, "--batch-sizes", "1,8", "--targets", "1.2",
                                   "--policies", "confidence,per-exit+ensemble", "--output", out], capsys)
    assert status == 0, err
    results = json.loads((out / "frontier.json").read_text())
    assert (out / "frontier.png").stat().st_size > 0 and (out / "frontier.md").read_text().strip() in stdout
    rows = {r["name"]: r for r in results["rows"]}
    assert [r["kind"] for r in results["rows"]][:4] == ["plain", "static", "static", "static"]
    assert {r["layers"] for r in results["rows"] if r["kind"] == "static"} == {1, 2, 4}
    assert {r["policy"] for r in results["rows"] if r["kind"] == "adaptive"} == {"confidence", "per-exit+ensemble"}
    assert results["machine"]["cpu_features"] and results["settings"]["precision"] == "int8"
    reference = rows["plain, torch fp32 (reference)"]  # every runtime's speeds are also against torch fp32's
    assert reference["kind"] == "reference" and all(v == 1.0 for v in reference["vs_torch_fp32"].values())
    plain = rows["plain (threshold 1)"]
    for b in ("1", "8"):
        assert plain["measured_speedup"][b] == 1.0
        for r in results["rows"]:
            assert r["texts_per_second"][b] > 0
            if r["kind"] == "adaptive":  # set against the static frontier at its own measured speed
                assert ("gain_over_static" in r) and r["speedup_layers"] >= 1.0
    # accuracies are the int8 exports' own, as `frugalnlp export` scored them
    exported = json.loads((tiny_cascade / "onnx-int8" / "metrics.json").read_text())
    static_members = [r for r in results["rows"] if r["kind"] == "static"]
    assert [r["accuracy"] for r in static_members] == [e["accuracy"] for e in exported["test"]["exits"]]
    assert plain["accuracy"] == json.loads((tiny_run / "onnx-int8" / "metrics.json").read_text())["test"]["accuracy"]
    assert results["dev_segment_times"] is None  # targets in layers
    # what to deploy per target, chosen on dev among adaptive points and static models (in layers here)
    assert all(r["dev_speedup"] == r["speedup_layers"] for r in static_members)
    [choice] = results["dev_choices"]
    eligible = [r for r in results["rows"] if r["kind"] in ("static", "adaptive") and r["dev_speedup"] >= 1.2 - 1e-9]
    assert choice["target_speedup"] == 1.2 and choice["dev_accuracy"] == max(r["dev_accuracy"] for r in eligible)
    assert rows[choice["choice"]]["accuracy"] == choice["accuracy"] and "| 1.2x |" in stdout
    # targets in time measured on this runtime: each adaptive point at its target in dev time. The segments are
    # timed for real (runtime, batch, row counts recorded) but choose by per-call times the test gives them, so
    # whether 1.1x is reachable on dev does not hang on how loaded the machine is.
    import dataclasses

    import frugalnlp.frontier

    measured = frugalnlp.frontier.time_split

    def given_times(*args, **kwargs):
        real = measured(*args, **kwargs)
        calls = [[0.5 + layers * n for n in real.rows] for layers in (1, 1, 2)]  # exits 1, 2, 4
        return dataclasses.replace(real, call_seconds=calls, plain=sum(c[-1] for c in calls) / real.batch_size)

    monkeypatch.setattr(frugalnlp.frontier, "time_split", given_times)
    status, _, err = run_cli(["frontier", tiny_run, "--static", tiny_cascade, "--runtime", "onnx", "--quantize", "int8",
                              "--examples", 16, "--repeats", 1, "--batch-sizes", 8, "--targets", "1.1",
                              "--policies", "confidence", "--cost", "time", "--cost-batch-size", 8,
                              "--output", tmp_path / "in-time"], capsys)
    assert status == 0, err
    timed = json.loads((tmp_path / "in-time" / "frontier.json").read_text())
    assert any(r["kind"] == "adaptive" for r in timed["rows"])
    assert timed["dev_segment_times"]["runtime"] == "ONNX int8" and timed["dev_segment_times"]["batch_size"] == 8
    assert timed["dev_segment_times"]["call_seconds"][2] == [0.5 + 2 * n for n in (1, 2, 4, 8)]  # the given times
    for r in timed["rows"]:
        if r["kind"] == "adaptive":
            assert r["name"].endswith("time") and r["dev_speedup"] >= 1.1 - 1e-9
        if r["kind"] == "static":  # measured on dev on this runtime, not read from the layers
            assert r["dev_speedup"] > 0 and r["dev_speedup"] != r["speedup_layers"]
    assert timed["dev_choices"][0]["cost"] == "time"
    # refused before any timing: a precision torch does not run, an unknown policy, an output already there
    status, _, err = run_cli(["frontier", tiny_run, "--runtime", "torch", "--quantize", "int8"], capsys)
    assert status == 2 and "--runtime onnx" in err
    status, _, err = run_cli(["frontier", tiny_run, "--policies", "fastest"], capsys)
    assert status == 2 and "unknown exit policy 'fastest'" in err
    status, _, err = run_cli(["frontier", tiny_run, "--static", tiny_cascade, "--output", out], capsys)
    assert status == 2 and "exists" in err


def test_frontier_settings_are_checked():
    with pytest.raises(FrugalError, match="--precision int4 is not one of onnx's"):
        check_settings(FrontierSettings(precision="int4"))
    with pytest.raises(FrugalError, match="it needs --runtime torch"):
        check_settings(FrontierSettings(precision="bf16"))
    check_settings(FrontierSettings(runtime="torch", precision="bf16"))
    with pytest.raises(FrugalError, match="--targets"):
        check_settings(FrontierSettings(targets=(0.5,)))
    with pytest.raises(FrugalError, match="POLICY or POLICY\\+ensemble"):
        check_settings(FrontierSettings(policies=("confidence+mix",)))


def test_dev_choice_can_be_a_static_model():
    """Per target, the most accurate on dev of what reaches it on dev; a static model wins ties and can win."""
    def row(name, kind, dev_accuracy, dev_speedup, accuracy):
        return {"name": name, "kind": kind, "dev_accuracy": dev_accuracy, "dev_speedup": dev_speedup,
                "accuracy": accuracy, "measured_speedup": {"32": dev_speedup}, "gain_over_static": {"32": 0.0}}

    results = {"settings": {"targets": [1.5, 2.0, 3.0, 8.0], "cost": "time"},
               "rows": [{"name": "plain (threshold 1)", "kind": "plain"},
                        row("static 2-layer", "static", 0.74, 2.8, 0.73), row("static 4-layer", "static", 0.81, 1.45, 0.80),
                        row("adaptive a @ 1.5x time", "adaptive", 0.80, 1.5, 0.79),
                        row("adaptive a @ 2x time", "adaptive", 0.74, 2.0, 0.76),
                        row("adaptive a @ 3x time", "adaptive", 0.72, 3.0, 0.70)]}
    chosen = {c["target_speedup"]: c for c in dev_choices(results)}
    assert chosen[1.5]["choice"] == "adaptive a @ 1.5x time"  # the 4-layer model is more accurate but too slow on dev
    assert chosen[2.0]["choice"] == "static 2-layer" and chosen[2.0]["kind"] == "static"  # a tie: the static model
    assert chosen[3.0]["choice"] == "adaptive a @ 3x time" and chosen[3.0]["accuracy"] == 0.70
    assert chosen[8.0]["choice"] is None
    # an adaptive point competes by its cross-fitted dev accuracy: tuned on the rows it is scored on it seems
    # 0.80 at 2x, read on dev rows it was not tuned on 0.73, below the static 2-layer model, which is chosen,
    # with the adaptive point beside it
    results["rows"][4]["dev_accuracy"], results["rows"][4]["dev_accuracy_cross_fitted"] = 0.80, 0.73
    at_2x = next(c for c in dev_choices(results) if c["target_speedup"] == 2.0)
    assert at_2x["choice"] == "static 2-layer" and at_2x["adaptive_beside"]["choice"] == "adaptive a @ 2x time"
    assert at_2x["adaptive_beside"]["dev_accuracy"] == 0.73 and at_2x["adaptive_beside"]["dev_accuracy_in_sample"] == 0.80
    assert "beside it: adaptive a @ 2x time" in format_frontier({**results, "dev_choices": [at_2x], "examples_timed": 1,
                                                                 "test_examples": 1, "rows": [],
                                                                 "settings": {**results["settings"], "batch_sizes": [32],
                                                                              "repeats": 1, "runtime": "onnx",
                                                                              "precision": "int8", "cost_batch_size": 32}})
