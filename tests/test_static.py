"""The strongest static alternative: static models distilled from the full model, a static model at every depth in
the demo, and the static frontier as the upper envelope of all of them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from frugalnlp.baselines import static_envelope, static_frontier, static_points


def _csv(path, rows):
    path.write_text("text,label\n" + "\n".join(f"{t},{label}" for t, label in rows) + "\n")


def _rows(flip: bool = False) -> list[tuple[str, str]]:
    words = {"pos": "good fine great lovely", "neg": "bad dull awful boring"}
    rows = []
    for i in range(32):
        label = "pos" if i % 2 else "neg"
        shown = ("neg" if label == "pos" else "pos") if flip else label
        rows.append((f"{words[label]} film {i}", shown))
    return rows


def _train(capsys, args):
    status, _, err = run_cli(["train", *args], capsys)
    assert status == 0, err


def _train_logits(run, texts):
    from frugalnlp.run import load_run

    trained = load_run(run)
    enc = trained.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return trained.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).exit_logits[-1]


def test_a_distilled_static_model_learns_from_the_teachers_logits(tiny_dir, tmp_path, capsys):
    # The teacher is trained on the same file with every label flipped, so its logits pull against the labels:
    # a student that uses them moves towards them, one trained on labels alone away from them.
    (tmp_path / "flipped").mkdir()
    (tmp_path / "true").mkdir()
    _csv(tmp_path / "flipped" / "train.csv", _rows(flip=True))
    _csv(tmp_path / "true" / "train.csv", _rows())
    fast = ["--model", tiny_dir, "--max-length", 16, "--epochs", 8, "--lr", "5e-3", "--batch-size", 8]
    _train(capsys, ["--train-file", tmp_path / "flipped" / "train.csv", *fast, "--output", tmp_path / "teacher"])
    student = ["--train-file", tmp_path / "true" / "train.csv", *fast, "--method", "plain", "--num-layers", 2]
    _train(capsys, [*student, "--output", tmp_path / "labels"])
    _train(capsys, [*student, "--teacher", tmp_path / "teacher", "--distill-alpha", "0.9", "--distill-temperature", 1,
                    "--output", tmp_path / "distilled"])
    spec = json.loads((tmp_path / "distilled" / "config.json").read_text())["spec"]
    assert spec["teacher"] == str(tmp_path / "teacher") and spec["num_layers"] == 2
    assert (spec["recipe"]["distill"], spec["recipe"]["distill_alpha"]) == ("teacher", 0.9)
    model_config = json.loads((tmp_path / "distilled" / "model" / "config.json").read_text())
    assert model_config["distill"] == "teacher" and model_config["exit_layers"] == [2]

    texts = [t for t, _ in _rows()]
    teacher = _train_logits(tmp_path / "teacher", texts)

    def towards_teacher(run):
        """(share of answers the teacher's, KL(teacher || run)) on the training texts."""
        logits = _train_logits(run, texts)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
        return (logits.argmax(-1) == teacher.argmax(-1)).float().mean().item(), kl.item()

    (agree_distilled, kl_distilled), (agree_labels, kl_labels) = map(towards_teacher, (tmp_path / "distilled",
                                                                                        tmp_path / "labels"))
    assert agree_distilled > agree_labels + 0.5 and kl_distilled < kl_labels / 2

    # A multi-model run distils every member the same way; --distill self has nothing to learn from there.
    _train(capsys, ["--train-file", tmp_path / "true" / "train.csv", "--model", tiny_dir, "--max-length", 16,
                    "--epochs", 1, "--method", "multi-model", "--exit-layers", "1,4", "--teacher", tmp_path / "teacher",
                    "--output", tmp_path / "mm"])
    assert json.loads((tmp_path / "mm" / "config.json").read_text())["spec"]["recipe"]["distill"] == "teacher"
    for method in ("plain", "multi-model"):
        status, _, err = run_cli(["train", "--train-file", tmp_path / "true" / "train.csv", "--model", tiny_dir,
                                  "--method", method, "--distill", "self", "--output", tmp_path / "o"], capsys)
        assert status == 2 and "--teacher RUN" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli(["train", "--train-file", tmp_path / "true" / "train.csv", "--model", tiny_dir,
                              "--num-layers", 2, "--boundary-grad", "0.5", "--output", tmp_path / "o"], capsys)
    assert status == 2 and "--method plain takes no --boundary-grad" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def _fake_static_run(path, layers, dev, test, distilled=False, method="plain"):
    """A run directory with what static_points reads: config.json and metrics.json."""
    from frugalnlp.manifest import write_manifest

    path.mkdir(parents=True)
    task = {"name": "mr", "labels": ["neg", "pos"], "sizes": {"train": 10}, "pair": False}
    spec = {"method": method, "model": "minilm", "exit_layers": layers, "teacher": "full" if distilled else None}
    (path / "config.json").write_text(json.dumps({"kind": "frugalnlp-run", "task": task, "spec": spec}))

    def split(accs):
        exits = [{"layer": k, "accuracy": a, "macro_f1": a} for k, a in zip(layers, accs)]
        return {"exits": exits, "accuracy": accs[-1], "macro_f1": accs[-1]}

    (path / "metrics.json").write_text(json.dumps({"dev": split(dev), "test": split(test)}))
    write_manifest(path)  # as a finished run has one
    return str(path)


def test_the_envelope_takes_the_better_model_per_depth_on_each_split_and_never_interpolates_across_a_depth(tmp_path):
    config = {"task": {"name": "mr", "labels": ["neg", "pos"], "sizes": {"train": 10}, "pair": False},
              "spec": {"model": "minilm"}}
    mm = _fake_static_run(tmp_path / "mm", [1, 2, 4, 6], [0.60, 0.62, 0.78, 0.85], [0.61, 0.63, 0.77, 0.84],
                          method="multi-model")
    alone = _fake_static_run(tmp_path / "s3", [3], [0.74], [0.70])
    distilled = _fake_static_run(tmp_path / "s3d", [3], [0.72], [0.80], distilled=True)
    worse4 = _fake_static_run(tmp_path / "s4d", [4], [0.70], [0.70], distilled=True)
    runs = [mm, alone, distilled, worse4]
    dev, test = static_points(runs, "dev", config, 6), static_points(runs, "test", config, 6)
    assert [p["layers"] for p in dev] == [1, 2, 3, 4, 6]
    three = {split: next(p for p in points if p["layers"] == 3) for split, points in (("dev", dev), ("test", test))}
    # on each split the model that is better there: trained alone on dev, distilled on test
    assert (three["dev"]["accuracy"], three["dev"]["run"], three["dev"]["distilled"]) == (0.74, alone, False)
    assert (three["test"]["accuracy"], three["test"]["run"], three["test"]["distilled"]) == (0.80, distilled, True)
    assert len(three["test"]["models"]) == 2
    assert next(p for p in test if p["layers"] == 4)["accuracy"] == 0.77  # the multi-model member beats its rival
    # between 2 and 3 layers: linear between those two, never between 1 and 3 (or 2 and 4) across a measured depth
    at = 6 / 2.5
    assert static_frontier(test, at) == pytest.approx(0.63 + (0.80 - 0.63) * 0.5)
    value, used = static_envelope(test, at)
    assert [p["layers"] for p in used] == [2, 3]
    # at a measured depth, exactly that depth's best model
    assert static_frontier(test, 2.0) == pytest.approx(0.80)
    assert static_frontier(dev, 2.0) == pytest.approx(0.74)
    # a budget: the 4-layer model (0.77 on test) is below the 3-layer one, so at 4 layers the 3-layer model stands
    assert static_frontier(test, 1.5) == pytest.approx(0.80)
    assert [p["layers"] for p in static_envelope(test, 1.5)[1]] == [3]
    assert static_frontier(test, 6 / 0.5) is None  # faster than the shallowest model


def test_demo_trains_a_static_model_at_every_depth_and_distilled_ones(tiny_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    status, stdout, err = run_cli(["demo", "--model", tiny_dir, "--train-size", 48, "--epochs", 1, "--max-length", 24,
                                   "--exit-layers", "1,2,4", "--methods", "joint", "--static-layers", "1,3",
                                   "--static-distill", "--output", out], capsys)
    assert status == 0, err
    seed = out / "seed-0"
    assert sorted(p.name for p in seed.iterdir()) == ["joint", "multi-model", "static-1-distilled", "static-3",
                                                      "static-3-distilled"]
    for name, layers in (("static-3", 3), ("static-1-distilled", 1), ("static-3-distilled", 3)):
        spec = json.loads((seed / name / "config.json").read_text())["spec"]
        assert (spec["method"], spec["num_layers"]) == ("plain", layers)
        assert (spec["teacher"] or "").endswith("seed-0/multi-model") == name.endswith("distilled")
    results = json.loads((out / "results.json").read_text())
    assert [p["layers"] for p in results["static"]] == [1, 2, 3, 4]
    assert results["static_distill"] is True and results["static_runs"]["static-3-distilled"] == 3
    curve = json.loads((seed / "joint" / "eval-test-confidence" / "curve.json").read_text())
    assert {Path(r).name for r in curve["static_runs"]} == {"multi-model", "static-3", "static-1-distilled",
                                                            "static-3-distilled"}
    three = next(p for p in curve["baselines"]["static"] if p["layers"] == 3)
    assert three["accuracy"] == max(json.loads((seed / n / "metrics.json").read_text())["test"]["accuracy"]
                                    for n in ("static-3", "static-3-distilled"))
    assert "upper envelope of every static model" in stdout and "| depth | trained alone | distilled | envelope |" in stdout
    row = next(p for p in results["static"] if p["layers"] == 3)
    assert row["accuracy"] == pytest.approx(max(row["alone_accuracy"][0], row["distilled_accuracy"][0]))
    assert next(p for p in results["static"] if p["layers"] == 2)["distilled_accuracy"] is None  # not distilled at 2
    # adaptive points compete on dev by their cross-fitted accuracy (tuned on one half of dev, read on the other)
    dev_rows = results["methods"]["joint [confidence]"]["dev_comparison"]
    assert all(r["adaptive_cross_fitted"] is None or 0 <= r["adaptive_cross_fitted"][0] <= 1 for r in dev_rows)
    assert any(r["adaptive_cross_fitted"] is not None for r in dev_rows)
    for choice in results["selected_on_dev"]["per_target"]:
        row = next(r for r in results["methods"].get(choice["candidate"], {"dev_comparison": dev_rows})["dev_comparison"]
                   if r["speedup"] == choice["speedup"])
        if choice["choice"] == "adaptive":
            assert choice["dev_accuracy"] == row["adaptive_cross_fitted"][0]
            assert choice["dev_accuracy_in_sample"] == row["adaptive"][0]
        elif "adaptive_beside" in choice:
            assert choice["adaptive_beside"]["dev_accuracy"] <= choice["dev_accuracy"]
    # frontier: every static model timed beside the adaptive points, the envelope in measured time
    statics = [a for n in ("multi-model", "static-3", "static-1-distilled", "static-3-distilled")
               for a in ("--static", seed / n)]
    status, _, err = run_cli(["frontier", seed / "joint", *statics, "--runtime", "torch", "--examples", 16,
                              "--repeats", 1, "--batch-sizes", 8, "--targets", "1.5", "--policies", "confidence",
                              "--output", tmp_path / "frontier"], capsys)
    assert status == 0, err
    rows = json.loads((tmp_path / "frontier" / "frontier.json").read_text())["rows"]
    static_rows = {r["name"]: r for r in rows if r["kind"] == "static"}
    assert set(static_rows) == {"static 1-layer", "static 2-layer", "static 4-layer", "static 3-layer",
                                "static 1-layer distilled", "static 3-layer distilled"}
    assert static_rows["static 3-layer distilled"]["distilled"] and not static_rows["static 3-layer"]["distilled"]
    adaptive_rows = [r for r in rows if r["kind"] == "adaptive"]
    assert adaptive_rows and all("dev_accuracy_cross_fitted" in r for r in adaptive_rows)
    # the default on a 4-layer encoder: every depth, no distillation
    status, _, err = run_cli(["demo", "--model", tiny_dir, "--train-size", 48, "--epochs", 1, "--max-length", 24,
                              "--exit-layers", "2,4", "--methods", "joint", "--output", tmp_path / "d2"], capsys)
    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "d2" / "seed-0").iterdir()) == ["joint", "multi-model", "static-1",
                                                                              "static-3"]
    status, _, err = run_cli(["demo", "--model", tiny_dir, "--static-layers", "0,2", "--output", tmp_path / "bad"],
                             capsys)
    assert status == 2 and "--static-layers 0 is out of range" in err and not (tmp_path / "bad").exists()


def test_a_mismatched_teacher_is_refused_before_any_training(tiny_dir, tiny_run, tmp_path, capsys):
    config = json.loads((tiny_run / "config.json").read_text())

    def teacher(folder, **task):
        path = tmp_path / folder
        shutil.copytree(tiny_run, path)
        (path / "config.json").write_text(json.dumps({**config, "task": {**config["task"], **task}}))
        return path

    other_tokenizer = teacher("vocab")
    tokens = json.loads((other_tokenizer / "model" / "tokenizer.json").read_text())
    tokens["model"]["vocab"] = {t: i for i, t in enumerate(list(tokens["model"]["vocab"])[:500])}
    (other_tokenizer / "model" / "tokenizer.json").write_text(json.dumps(tokens))
    (other_tokenizer / "model" / "vocab.txt").write_text("\n".join(list(tokens["model"]["vocab"])) + "\n")
    cases = [(teacher("task", name="bbc"), "task 'bbc'"),
             (teacher("labels", labels=["pos", "neg"]), "labels ['pos', 'neg']"),
             (teacher("pair", pair=True), "input kind"),
             (other_tokenizer, "another tokenizer"),
             (tmp_path / "nothing", "not a frugalnlp run directory")]
    common = ["--task", "mr", "--model", tiny_dir, "--train-size", 48, "--epochs", 1, "--max-length", 24]
    for run, message in cases:
        for args in (["train", *common, "--method", "plain", "--num-layers", 2],
                     ["train", *common, "--method", "joint", "--exit-layers", "2,4"],
                     ["demo", *common, "--methods", "joint:distill=teacher"]):
            out = tmp_path / "out"
            status, _, err = run_cli([*args, "--teacher", run, "--output", out], capsys)
            assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (args, run, err)
            assert not out.exists() and not out.with_name("out.partial").exists()
