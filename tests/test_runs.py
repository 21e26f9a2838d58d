"""Runs end to end on a tiny random BERT with the real tokenizer: train, evaluate, reload, analyse."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from frugalnlp import EarlyExitModel
from frugalnlp.curves import collect_exit_logits, speed_accuracy_curve
from frugalnlp.early_exit.cascade import Cascade
from frugalnlp.encoding import encode_split, load_tokenizer
from frugalnlp.tasks import load_task


def train(tmp_path, capsys, tiny_dir, method, name, *extra):
    status, out, err = run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", method, "--train-size", 64,
                                "--epochs", 1, "--max-length", 24, "--output", tmp_path / name, *extra], capsys)
    assert status == 0, err
    return tmp_path / name


def test_sweet_model_reloads_with_the_same_curve(tiny_dir, tmp_path):
    task = load_task("mr")
    tokenizer = load_tokenizer(str(tiny_dir))
    data = encode_split(task.test.take(range(200)), tokenizer, 24)
    gold = task.test.labels[:200]
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(str(tiny_dir), exit_layers=[1, 2, 4], method="sweet").eval()
    model.temperatures = [0.01, 0.02, 1.0]

    def curve(m):
        return speed_accuracy_curve(m, collect_exit_logits(m, data, tokenizer), gold, data.lengths(),
                                    np.linspace(0, 1, 11).tolist())

    before = curve(model)
    model.save_pretrained(tmp_path / "m")
    after = curve(EarlyExitModel.from_pretrained(tmp_path / "m"))
    assert before == after
    assert len({p.layers_share for p in before}) > 1


def test_train_and_evaluate_cli(tiny_dir, tmp_path, capsys):
    run = train(tmp_path, capsys, tiny_dir, "sweet", "sweet", "--exit-layers", "1,2,4")
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["layer"] for e in metrics["test"]["exits"]] == [1, 2, 4] and len(metrics["temperatures"]) == 3
    status, out, err = run_cli(["evaluate", run, "--thresholds", 5], capsys)
    assert status == 0, err
    folder = run / "eval-test-confidence"
    curve = json.loads((folder / "curve.json").read_text())["points"]
    assert [p["threshold"] for p in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve[0]["exit_histogram"][0] == 854 and curve[-1]["exit_histogram"][-1] == 854
    assert curve[-1]["layers_share"] == 1.0 and curve[0]["layers_share"] == 0.25
    assert curve[-1]["flops_share"] == pytest.approx(1.0)  # threshold 1 skips the early heads, as predict does
    assert (folder / "curve.csv").read_text().startswith("threshold,accuracy")
    assert (folder / "curve.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((folder / "exits.json").read_text())) == 3
    status, _, err = run_cli(["evaluate", run, "--thresholds", 5], capsys)
    assert status == 2 and "already exists" in err  # a second evaluation does not overwrite the first

    status, out, err = run_cli(["analyze-gradients", run, "--batches", 2], capsys)
    assert status == 0, err
    grads = json.loads((run / "gradients" / "gradients.json").read_text())
    assert grads["pairs"] == [[0, 1], [0, 2], [1, 2]]
    layer1, layer3 = grads["cosine"][0], grads["cosine"][2]
    assert all(-1 <= v <= 1 for v in layer1)  # every pair shares layer 1
    assert layer3[:2] == [None, None] and layer3[2] is None  # layer 3 is reached by exit 3 only


def test_multi_model_cascade_run(tiny_dir, tmp_path, capsys):
    run = train(tmp_path, capsys, tiny_dir, "multi-model", "mm", "--exit-layers", "1,2,4")
    assert json.loads((run / "model" / "cascade.json").read_text())["members"] == ["layers-1", "layers-2", "layers-4"]
    status, _, err = run_cli(["evaluate", run, "--thresholds", 3], capsys)
    assert status == 0, err
    curve = json.loads((run / "eval-test-confidence" / "curve.json").read_text())["points"]
    assert curve[0]["exit_histogram"] == [854, 0, 0] and curve[0]["layers_share"] == 0.25
    # threshold 1 runs the last model alone (the earlier ones could let no row go): the plain model's cost
    assert curve[-1]["exit_histogram"] == [0, 0, 854] and curve[-1]["layers_share"] == 1.0


def test_cascade_curve_is_not_flat(tiny_bert):
    """The official code credited every example to the last model, so its curve was flat."""
    from transformers import BertModel

    torch.manual_seed(0)
    members = []
    for k in (1, 2, 4):
        backbone = BertModel(tiny_bert.config)
        backbone.load_state_dict(tiny_bert.state_dict())
        members.append(EarlyExitModel.from_backbone(backbone, method="joint", num_layers=k, num_labels=3).eval())
    cascade = Cascade(members)
    ids = torch.randint(3, 120, (64, 10), generator=torch.Generator().manual_seed(0))
    logits = torch.stack(cascade.exit_logits(ids, torch.ones_like(ids)))
    gold = logits[-1].argmax(-1).numpy()  # the last model is right by construction
    curve = speed_accuracy_curve(cascade, logits, gold, np.full(64, 10), [0.0, 1.0])
    assert curve[-1].accuracy == 1.0 and curve[0].accuracy < 1.0


def test_predict_cli_reports_bad_rows_and_predictor(tiny_dir, tmp_path, capsys):
    from frugalnlp.predict import Predictor

    run = train(tmp_path, capsys, tiny_dir, "joint", "joint", "--exit-layers", "1,2,4")
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n{"text": "broken\n{"text": "dull and long"}\n{"other": 1}\n')
    status, out, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "out.jsonl",
                                "--threshold", 0.5], capsys)
    assert status == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3]
    assert all(r["label"] in ("negative", "positive") and r["exit_layer"] in (1, 2, 4) for r in rows)
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 2 and "in.jsonl:2: not valid JSON" in warnings[0] and "in.jsonl:4:" in warnings[1]
    assert "2 bad row(s)" in out
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "strict.jsonl", "--strict"],
                             capsys)
    assert status == 2 and "in.jsonl:2: not valid JSON" in err
    assert not (tmp_path / "strict.jsonl").exists()  # exit 2 leaves the output as it was

    predictor = Predictor(run, threshold=1.0)
    results = predictor(["a fine film", "dull and long"])
    assert [r["exit_layer"] for r in results] == [4, 4] and [r["layers_run"] for r in results] == [4, 4]
    single = Predictor(run, threshold=0.5, batch_size=1)(["a fine film", "dull and long"])
    assert [r["label"] for r in single] == [r["label"] for r in rows]


def test_pickle_checkpoints_are_refused(tiny_dir, tmp_path, capsys):
    from frugalnlp.manifest import write_manifest

    run = train(tmp_path, capsys, tiny_dir, "plain", "plain")
    (run / "model" / "pytorch_model.bin").write_bytes(b"not safe")
    data = tmp_path / "in.csv"
    data.write_text("text\nhello\n")
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "o.jsonl"], capsys)
    assert status == 2 and "pytorch_model.bin is not listed in" in err  # not what was written: refused first
    write_manifest(run)  # listed by hand, the weights' own check still refuses the pickle
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "o.jsonl"], capsys)
    assert status == 2 and "pytorch_model.bin" in err and "--trust-pickle" in err


def test_demo_prints_the_table_and_writes_the_report(tiny_dir, tmp_path, capsys):
    status, out, err = run_cli(["demo", "--model", tiny_dir, "--train-size", 64, "--epochs", 1, "--max-length", 24,
                                "--seeds", "0,1", "--exit-layers", "1,2,4", "--methods",
                                "sweet,joint:boundary-grad=0.5:distill=teacher:exit-weights=depth",
                                "--policies", "confidence", "--output", tmp_path / "demo"], capsys)
    assert status == 0, err
    assert "| method | layer 1 | layer 2 | layer 4 | last exit vs plain |" in out and "| multi-model |" in out
    assert "± " in out and "| sweet | 1.50x |" in out and "gain over static" in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    variants = {"sweet", "joint:boundary-grad=0.5:distill=teacher:exit-weights=depth", "multi-model"}
    assert set(results["methods"]) == variants and results["seeds"] == [0, 1]
    recipe = results["methods"]["joint:boundary-grad=0.5:distill=teacher:exit-weights=depth"]["spec"]
    assert (recipe["boundary_grad"], recipe["distill"], recipe["exit_weights"]) == (0.5, "teacher", "depth")
    for method in results["methods"].values():
        assert len(method["exit_accuracy_per_seed"]) == 2 and len(method["mean_curve"]["mean"]) == 21
        assert [r["speedup"] for r in method["comparison"]] == [1.5, 2.0, 3.0, 4.0]
    mm = results["methods"]["multi-model"]
    assert mm["last_exit_vs_plain_points"] == [0.0, 0.0]  # its last member is the plain model
    assert [p["layers"] for p in results["static"]] == [1, 2, 3, 4]  # a static model at every depth
    slowest = results["oracle"][0]  # 1x: any exit right counts, for the best variant
    assert slowest["speedup_layers"] == 1.0
    assert all(slowest["accuracy"] >= m["mean_curve"]["mean"][-1]["accuracy"] - 1e-12 for m in results["methods"].values())
    assert results["static"][0]["accuracy"] == pytest.approx(np.mean([s[0] for s in mm["exit_accuracy_per_seed"]]))
    assert (tmp_path / "demo" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "curves.png" in (tmp_path / "demo" / "report.md").read_text()
    teacher = json.loads((tmp_path / "demo" / "seed-1" / "joint_boundary-grad-0.5_distill-teacher_exit-weights-depth"
                          / "config.json").read_text())["spec"]["teacher"]
    assert teacher.endswith("seed-1/multi-model")


def test_demo_chooses_recipe_and_policy_together_on_dev_and_certifies(tiny_dir, tmp_path, capsys):
    status, out, err = run_cli(["demo", "--model", tiny_dir, "--train-size", 64, "--epochs", 1, "--max-length", 24,
                                "--seeds", "0", "--exit-layers", "1,2,4", "--methods", "joint",
                                "--policies", "confidence,learned,confidence+ensemble", "--certify", "0.05",
                                "--output", tmp_path / "demo"], capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    names = {f"{v} [{p}]" for v in ("joint", "multi-model") for p in ("confidence", "learned", "confidence+ensemble")}
    assert set(results["methods"]) == names
    assert {m["policy"] for m in results["methods"].values()} == {"confidence", "learned", "confidence+ensemble"}
    assert results["selected_on_dev"]["variant"] in names  # a (recipe, policy) pair, chosen on dev
    assert all(row["ceiling"] is not None for m in results["methods"].values() for row in m["comparison"][:1])
    certified = results["certified"]["per_candidate"]
    assert set(certified) == names  # every (recipe, policy) pair is certified, the cascade against its last model
    for name, by_eps in certified.items():
        points = by_eps["0.05"]
        assert len(points) == 1 and {"certified", "test_drop_points", "test_speedup"} <= set(points[0])
        if "ensemble" not in name:  # an ensembled cascade mixes every model's answer: its fallback runs them all
            # cheaper than the last model alone on dev's fit part, so about as fast on test (a cascade run to
            # its end would be 7/4 of it: 0.57x)
            assert points[0]["test_speedup"] >= 0.9, name
    assert "Certified operating points" in out and "| joint [learned] | 0.05 |" in out
    status, _, err = run_cli(["demo", "--model", tiny_dir, "--policies", "confidence+sparkle",
                              "--output", tmp_path / "bad"], capsys)
    assert status == 2 and "POLICY+ensemble" in err and not (tmp_path / "bad").exists()


def test_demo_takes_user_files_and_refuses_bad_variants(tiny_dir, tmp_path, capsys):
    rows = ["text,label"] + [f"{'good fine great' if i % 2 else 'bad dull awful'} film {i},{'pos' if i % 2 else 'neg'}"
                             for i in range(60)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    status, out, err = run_cli(["demo", "--model", tiny_dir, "--train-file", tmp_path / "train.csv", "--train-size", 40,
                                "--epochs", 1, "--max-length", 16, "--methods", "sweet", "--output", tmp_path / "d"],
                               capsys)
    assert status == 0, err
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    # the default policies: one confidence threshold, and per-exit thresholds on an exit ensemble
    assert results["task"] == "train" and set(results["methods"]) == {
        f"{v} [{p}]" for v in ("sweet", "multi-model") for p in ("confidence", "per-exit+ensemble")}
    assert len(results["deploy"]) == len(results["selected_on_dev"]["per_target"])  # user files deploy too
    for bad, message in [("joint:boundary-grad=x", "needs a number"), ("joint:color=red", "KEY=VALUE"),
                         ("plain", "plain has no exits"), ("magic", "unknown method"),
                         ("multi-model:boundary-grad=0.5", "multi-model takes no boundary-grad")]:
        status, _, err = run_cli(["demo", "--model", tiny_dir, "--methods", bad, "--output", tmp_path / "bad"], capsys)
        assert status == 2 and message in err, (bad, err)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
