"""Operating points saved with a run: `calibrate` writes one, predict and serve use it, another run's is refused."""

import json
import shutil

import numpy as np

import httpx

from conftest import run_cli
from frugalnlp.loadtest import ServerProcess
from frugalnlp.predict import Predictor
from test_cli_errors import assert_clean_error


def test_a_saved_operating_point_is_used_by_predict_and_serve_and_refused_by_another_run(tiny_run, tiny_dir,
                                                                                        tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    status, out, err = run_cli(["calibrate", run, "--target-speedup", 1.5], capsys)
    assert status == 0, err
    point = json.loads((run / "operating-point.json").read_text())
    assert point["kind"] == "frugalnlp-operating-point"
    # the random tiny model's exits are all at chance: a fixed exit may win the tie (`choose`: the simpler first)
    assert point["policy"] == "confidence" or "fixed exit" in point["chosen_by"]
    assert point["chosen_by"].startswith("dev: target speedup 1.5") and point["dev"]["speedup_layers"] >= 1.5
    status, _, err = run_cli(["calibrate", run, "--max-drop", 0.01], capsys)
    assert_clean_error(status, err, "already exists", "--overwrite")

    data = tmp_path / "in.jsonl"
    texts = ["a fine film", "dull and long", "a gorgeous, witty, seductive movie", "tedious"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "p.jsonl"], capsys)
    assert status == 0 and "the run's saved operating point" in err, err
    expected = Predictor(run, threshold=point["threshold"], policy=point["policy"])(texts)
    got = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(g["label"], g["exit_layer"]) for g in got] == [(e["label"], e["exit_layer"]) for e in expected]
    assert Predictor(run).threshold == point["threshold"]  # the library's default too

    with ServerProcess(run, threads=1) as server:
        health = httpx.get(f"{server.url}/healthz").json()
        assert health["threshold"] == point["threshold"] and health["operating_point"]["saved"]
        served = httpx.post(f"{server.url}/predict", json={"texts": texts}).json()["predictions"]
        assert [(s["label"], s["exit_layer"]) for s in served] == [(e["label"], e["exit_layer"]) for e in expected]

    other = tmp_path / "other"
    status, _, err = run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", "joint", "--exit-layers",
                              "1,2,4", "--train-size", 48, "--epochs", 1, "--max-length", 24, "--seed", 1,
                              "--output", other], capsys)
    assert status == 0, err
    shutil.copy(run / "operating-point.json", other / "operating-point.json")
    status, _, err = run_cli(["predict", other, "--input", data, "--output", tmp_path / "q.jsonl"], capsys)
    assert_clean_error(status, err, "chosen for other", "calibrate")
    assert not (tmp_path / "q.jsonl").exists()
    status, _, err = run_cli(["predict", other, "--input", data, "--output", tmp_path / "q.jsonl",
                              "--threshold", 0.9], capsys)
    assert status == 0, err  # an explicit threshold overrides the saved point


def test_the_exit_ensemble_is_fitted_on_dev_alone_and_saved_with_the_point(tiny_run, tmp_path, capsys, monkeypatch):
    import torch

    import frugalnlp.curves as curves
    from frugalnlp.early_exit.ensemble import fit_exit_ensemble
    from frugalnlp.tasks import load_task

    seen = []

    def recording(exit_logits, temperatures, gold, **kwargs):
        seen.append(np.asarray(gold).copy())
        return fit_exit_ensemble(exit_logits, temperatures, gold, **kwargs)

    monkeypatch.setattr(curves, "fit_exit_ensemble", recording)
    monkeypatch.setattr(curves, "_ENSEMBLES", {})  # fitted here, not taken from an earlier test's fit
    status, _, err = run_cli(["evaluate", tiny_run, "--ensemble", "--thresholds", 3, "--output", tmp_path / "e"], capsys)
    assert status == 0, err
    task = load_task("mr")
    assert len(seen) == 1 and np.array_equal(seen[0], task.dev.labels)  # dev's labels, never test's
    result = json.loads((tmp_path / "e" / "curve.json").read_text())
    assert len(result["ensemble"]["fixed_exits"]) == 3 and not any(result["ensemble"]["maps"][0][0][2:])  # exit 1 reads itself alone
    # the oracle is over the ensembled exits the policy decides on: no ensembled exit is above it
    assert result["baselines"]["oracle_best"] >= max(e["accuracy"] for e in result["ensemble"]["fixed_exits"])

    # The fit never raises dev cross-entropy above each exit's own (it starts there).
    predictor = Predictor(tiny_run, threshold=1.0)
    from frugalnlp.curves import collect_exit_logits
    from frugalnlp.encoding import encode_split

    data = encode_split(task.dev, predictor.tokenizer, predictor.max_length)
    logits = collect_exit_logits(predictor.model, data, predictor.tokenizer, 64)
    temperatures = predictor.model.temperatures
    fitted = fit_exit_ensemble(logits, temperatures, task.dev.labels)
    gold = torch.as_tensor(task.dev.labels)
    mixed = fitted.apply(logits, temperatures)
    for e, t in enumerate(temperatures):
        alone = torch.nn.functional.cross_entropy(logits[e] / t, gold)
        assert torch.nn.functional.cross_entropy(mixed[e], gold) <= alone + 1e-6

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    status, _, err = run_cli(["calibrate", run, "--ensemble", "--target-speedup", 1.5], capsys)
    assert status == 0, err
    saved = json.loads((run / "operating-point.json").read_text())
    assert saved["ensemble"] is True
    assert (run / saved["tensors"]).exists() and len(list(run.glob("operating-point.*.safetensors"))) == 1
    saved = Predictor(run)
    texts = ["a fine film", "dull and long", "tedious"]
    fresh = Predictor(run, threshold=saved.threshold, policy=saved.policy_name, ensemble=saved.ensemble)
    assert saved.ensemble is not None and saved(texts) == fresh(texts)


def test_the_ensembles_dev_scores_are_cross_fitted_no_row_scored_by_a_fit_that_saw_it():
    """The dev curve of an ensemble policy decides on held-out ensembled logits: changing the labels of one
    fold's rows leaves those rows' logits as they were (their ensemble never saw them) and moves the others'."""
    import torch

    from frugalnlp.early_exit.ensemble import _folds, cross_fit_ensemble, fit_exit_ensemble

    g = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 3, (120,), generator=g).numpy()
    logits = torch.randn(3, 120, 3, generator=g) + 2.0 * torch.nn.functional.one_hot(torch.as_tensor(gold), 3)
    temperatures = [1.0, 1.0, 1.0]
    ensemble = fit_exit_ensemble(logits, temperatures, gold)
    held_out = cross_fit_ensemble(logits, temperatures, gold, ensemble)
    fold = np.sort(_folds(120, 5, 1)[0])
    changed = gold.copy()
    changed[fold] = (changed[fold] + 1) % 3
    again = cross_fit_ensemble(logits, temperatures, changed, ensemble)
    assert torch.equal(again[:, fold], held_out[:, fold])
    others = np.setdiff1d(np.arange(120), fold)
    assert not torch.allclose(again[:, others], held_out[:, others])
    # in-sample, the same ensemble looks better than it is held out
    in_sample = ensemble.apply(logits, temperatures)
    gold_t = torch.as_tensor(gold)
    nll = [float(torch.nn.functional.cross_entropy(x[-1], gold_t)) for x in (in_sample, held_out)]
    assert nll[0] < nll[1]


def test_calibrate_with_cost_time_chooses_in_the_segment_times_it_is_given(tiny_run, tmp_path, capsys, monkeypatch):
    """The choosing logic on segment times the test controls (how fast the machine is now cannot flip it)."""
    import frugalnlp.curves
    from frugalnlp.timing import SegmentTimes

    # exits after layers 1, 2, 4: segments of 1, 1 and 2 layers, each call costing its layers per row plus a fixed
    # overhead; the plain model at threshold 1 runs all three segments on full batches of 8
    calls = [[0.5 + layers * n for n in (1, 2, 4, 8)] for layers in (1, 1, 2)]
    given = SegmentTimes(rows=[1, 2, 4, 8], call_seconds=calls, plain=sum(c[-1] for c in calls) / 8, batch_size=8,
                         runtime="torch fp32")
    monkeypatch.setattr(frugalnlp.curves, "time_split", lambda *args, **kwargs: given)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    status, stdout, err = run_cli(["calibrate", run, "--target-speedup", "1.1", "--cost", "time",
                                   "--cost-batch-size", 8], capsys)
    assert status == 0, err
    saved = json.loads((run / "operating-point.json").read_text())
    assert saved["cost"] == "time" and "in time measured on torch fp32 at batch 8" in saved["chosen_by"]
    assert saved["segment_times"] == given.to_dict() and "in measured time" in stdout
    assert saved["dev"]["speedup_time"] >= 1.1 - 1e-9
    assert Predictor(run).operating_point.cost == "time"  # predict and serve load it as any saved point
    status, _, err = run_cli(["calibrate", run, "--target-speedup", "2", "--cost", "flops", "--overwrite"], capsys)
    assert status == 2 and "unknown --cost 'flops'" in err


def test_calibrate_with_cost_time_measures_the_runtime(tiny_run, tmp_path, capsys):
    """The real timer, asserting only what a loaded machine cannot flip: it runs, records every segment's time at
    every row count, and a --max-drop choice (always reachable: threshold 1 drops nothing) is saved in time."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    status, _, err = run_cli(["calibrate", run, "--max-drop", "0.5", "--cost", "time", "--cost-batch-size", 8],
                             capsys)
    assert status == 0, err
    saved = json.loads((run / "operating-point.json").read_text())
    times = saved["segment_times"]
    assert saved["cost"] == "time" and times["rows"] == [1, 2, 4, 8] and times["batch_size"] == 8 and times["plain"] > 0
    assert len(times["call_seconds"]) == 3 and all(len(c) == 4 and min(c) > 0 for c in times["call_seconds"])
    assert saved["dev"]["speedup_time"] > 0


def test_an_export_without_the_runs_saved_point_is_refused_never_answered_at_the_default(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "onnx", ignore_errors=True)
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a fine film", "dull and long"]))
    for args in (["export", run], ["calibrate", run, "--target-speedup", 1.5]):
        status, _, err = run_cli(args, capsys)
        assert status == 0, err
    predict = ["predict", run, "--runtime", "onnx", "--input", data]
    status, _, err = run_cli([*predict, "--output", tmp_path / "a.jsonl"], capsys)
    assert_clean_error(status, err, "has a saved operating point but its export", f"frugalnlp calibrate {run / 'onnx'}")
    assert not (tmp_path / "a.jsonl").exists()
    status, _, err = run_cli(["serve", run, "--runtime", "onnx", "--port", 0], capsys)
    assert_clean_error(status, err, "has a saved operating point but its export")
    # an explicit threshold is the user's choice; a point calibrated on the export is used as saved
    status, _, err = run_cli([*predict, "--threshold", 0.9, "--output", tmp_path / "b.jsonl"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["calibrate", run / "onnx", "--target-speedup", 1.5], capsys)
    assert status == 0, err
    status, _, err = run_cli([*predict, "--output", tmp_path / "c.jsonl"], capsys)
    assert status == 0 and "the run's saved operating point" in err, err
    # and a run with no point at all says which threshold it answers at
    (run / "operating-point.json").unlink()
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "d.jsonl"], capsys)
    assert status == 0 and "no saved operating point: answered at confidence threshold 0.9" in err, err
