"""Operating points saved with a run: `calibrate` writes one, predict and serve use it, another run's is refused."""

import json
import shutil

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
    assert point["kind"] == "frugalnlp-operating-point" and point["policy"] == "confidence"
    assert point["chosen_by"] == "dev: target speedup 1.5" and point["dev"]["speedup_layers"] >= 1.5
    status, _, err = run_cli(["calibrate", run, "--max-drop", 0.01], capsys)
    assert_clean_error(status, err, "already exists", "--overwrite")

    data = tmp_path / "in.jsonl"
    texts = ["a fine film", "dull and long", "a gorgeous, witty, seductive movie", "tedious"]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "p.jsonl"], capsys)
    assert status == 0 and "the run's saved operating point" in err, err
    expected = Predictor(run, threshold=point["threshold"])(texts)
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
    assert_clean_error(status, err, "chosen for other weights", "calibrate")
    assert not (tmp_path / "q.jsonl").exists()
    status, _, err = run_cli(["predict", other, "--input", data, "--output", tmp_path / "q.jsonl",
                              "--threshold", 0.9], capsys)
    assert status == 0, err  # an explicit threshold overrides the saved point
