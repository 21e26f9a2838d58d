"""Baselines beside every curve: fixed exits, the static frontier, the oracle; operating points chosen on dev."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import run_cli
from frugalnlp.baselines import Oracle, static_frontier
from frugalnlp.curves import CurvePoint, replay
from frugalnlp.dev_choice import choose_threshold
from frugalnlp.early_exit.registry import POLICIES, make_policy
from frugalnlp.errors import FrugalError


class Layers:
    """The few attributes of a model that a replayed curve reads (no forward pass needed)."""

    def __init__(self, exit_layers, layers_to_exit, temperatures):
        self.exit_layers, self.layers_to_exit, self.temperatures = exit_layers, layers_to_exit, temperatures
        self.num_exits = len(exit_layers)


@pytest.mark.parametrize("layers_to_exit", [[1, 2, 4, 6], [1, 3, 7, 13]])  # early exit; a cascade's recomputation
@pytest.mark.parametrize("seed", range(3))
def test_oracle_is_never_below_any_policy(layers_to_exit, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 300, 3, generator=g) * torch.tensor([0.5, 1.0, 2.0, 3.0])[:, None, None]
    gold = torch.randint(0, 3, (300,), generator=g).numpy()
    oracle = Oracle(logits, gold, layers_to_exit, 6)
    temperatures = [0.7, 1.0, 1.3, 1.0]
    cost = torch.tensor(layers_to_exit, dtype=torch.float64) / 6
    for name in (name for name in POLICIES if name != "learned"):  # the learned one needs a router
        for threshold in np.linspace(0, 1, 41):
            exit_index, labels = replay(logits, temperatures, make_policy(name, float(threshold), 4))
            accuracy = float((labels.numpy() == gold).mean())
            speedup = 1 / float(cost[exit_index].mean())
            assert oracle.accuracy(speedup) >= accuracy - 1e-12, (name, threshold)
    correct = (logits.argmax(-1).numpy() == gold[None])
    assert oracle.best == correct.any(0).mean()
    assert oracle.accuracy(6 / layers_to_exit[0]) == correct[0].mean()  # every example at the first exit
    assert oracle.accuracy(6 / layers_to_exit[0] + 0.5) is None  # faster than the first exit: impossible


def test_static_frontier_interpolates_linearly_in_cost():
    points = [{"layers_share": 1 / 6, "accuracy": 0.6}, {"layers_share": 0.5, "accuracy": 0.7},
              {"layers_share": 1.0, "accuracy": 0.8}]
    for p in points:
        assert static_frontier(points, 1 / p["layers_share"]) == pytest.approx(p["accuracy"])
    assert static_frontier(points, 1 / 0.75) == pytest.approx(0.75)  # halfway in cost between 3 and 6 layers
    assert static_frontier(points, 1 / (1 / 6 + (0.5 - 1 / 6) / 4)) == pytest.approx(0.625)
    assert static_frontier(points, 7.0) is None


def test_choose_threshold_on_dev():
    curve = [CurvePoint(threshold=t, accuracy=a, macro_f1=a, layers_share=1 / s, flops_share=1 / s, exit_histogram=[])
             for t, a, s in [(0.0, 0.70, 4.0), (0.5, 0.78, 2.5), (0.8, 0.80, 1.6), (0.9, 0.82, 1.2), (1.0, 0.83, 1.0)]]
    assert choose_threshold(curve, target_speedup=2.0).threshold == 0.5
    assert choose_threshold(curve, target_speedup=1.5).threshold == 0.8
    assert choose_threshold(curve, max_drop=0.01).threshold == 0.9
    assert choose_threshold(curve, max_drop=0.0).threshold == 1.0
    assert choose_threshold(curve, max_drop=0.2).threshold == 0.0
    with pytest.raises(FrugalError, match="at most 4.00x"):
        choose_threshold(curve, target_speedup=5)
    for bad in ({"target_speedup": 0.5}, {"max_drop": -0.1}, {"max_drop": float("nan")}, {}):
        with pytest.raises(FrugalError):
            choose_threshold(curve, **bad)


def _train(capsys, args):
    status, _, err = run_cli(["train", *args], capsys)
    assert status == 0, err


def test_evaluate_static_from_other_runs_equals_their_accuracies(tiny_dir, tmp_path, capsys):
    common = ["--task", "mr", "--model", tiny_dir, "--train-size", 48, "--epochs", 1, "--max-length", 24]
    _train(capsys, [*common, "--method", "sweet", "--exit-layers", "1,2,4", "--output", tmp_path / "sweet"])
    _train(capsys, [*common, "--method", "multi-model", "--exit-layers", "1,4", "--output", tmp_path / "mm"])
    _train(capsys, [*common, "--method", "plain", "--num-layers", 2, "--output", tmp_path / "plain2"])
    status, out, err = run_cli(["evaluate", tmp_path / "sweet", "--static", tmp_path / "mm", "--static",
                                tmp_path / "plain2", "--thresholds", 5, "--target-speedup", 2], capsys)
    assert status == 0, err
    result = json.loads((tmp_path / "sweet" / "eval-test-confidence" / "curve.json").read_text())
    mm = json.loads((tmp_path / "mm" / "metrics.json").read_text())["test"]
    plain = json.loads((tmp_path / "plain2" / "metrics.json").read_text())["test"]
    static = result["baselines"]["static"]
    assert [p["layers"] for p in static] == [1, 2, 4]
    expected = [mm["exits"][0]["accuracy"], plain["accuracy"], mm["exits"][1]["accuracy"]]
    assert [p["accuracy"] for p in static] == expected
    for p, acc in zip(static, expected):
        assert static_frontier(static, p["speedup_layers"]) == pytest.approx(acc)
    rows = {r["speedup"]: r for r in result["comparison"]}
    assert set(rows) == {1.5, 2.0, 3.0, 4.0}
    four = rows[4.0]
    assert four["fixed_exit"] == result["baselines"]["fixed_exits"][0]["accuracy"]
    if four["adaptive"] is not None:
        assert four["gain_over_static"] == pytest.approx(100 * (four["adaptive"] - four["static"]))
    assert all(r["oracle"] >= r["adaptive"] for r in rows.values() if r["adaptive"] is not None)
    point = result["operating_point"]
    assert point["chosen_on"] == "dev" and point["dev"]["speedup_layers"] >= 2
    assert "| sweet | 2.00x |" in out and "operating point chosen on dev" in out
    # A multi-model run is its own static frontier; a joint run is not a static baseline.
    status, _, err = run_cli(["evaluate", tmp_path / "mm", "--thresholds", 3], capsys)
    assert status == 0, err
    own = json.loads((tmp_path / "mm" / "eval-test-confidence" / "curve.json").read_text())["baselines"]["static"]
    assert [p["accuracy"] for p in own] == [e["accuracy"] for e in mm["exits"]]
    status, _, err = run_cli(["evaluate", tmp_path / "mm", "--static", tmp_path / "sweet", "--output",
                              tmp_path / "e"], capsys)
    assert status == 2 and "sweet run" in err and not (tmp_path / "e").exists()


def test_train_flags_for_recipes_are_checked_before_work(tiny_dir, tmp_path, capsys):
    common = ["train", "--task", "mr", "--model", tiny_dir, "--train-size", 48, "--epochs", 1]
    for extra, message in [(["--method", "plain", "--boundary-grad", "0.5"], "--boundary-grad"),
                           (["--method", "joint", "--boundary-grad", "2"], "outside [0, 1]"),
                           (["--method", "sweet", "--num-layers", "2"], "--num-layers"),
                           (["--method", "plain", "--num-layers", "9"], "out of range"),
                           (["--method", "joint", "--distill", "teacher"], "--teacher RUN"),
                           (["--method", "two-stage", "--boundary-grad", "0.5"], "frozen")]:
        status, _, err = run_cli([*common, *extra, "--output", tmp_path / "o"], capsys)
        assert status == 2 and message in err, (extra, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_teacher_distillation_run(tiny_dir, tmp_path, capsys):
    common = ["--task", "mr", "--model", tiny_dir, "--train-size", 48, "--epochs", 1, "--max-length", 24]
    _train(capsys, [*common, "--method", "plain", "--output", tmp_path / "teacher"])
    _train(capsys, [*common, "--method", "sweet", "--exit-layers", "1,2,4", "--teacher", tmp_path / "teacher",
                    "--boundary-grad", "0.25", "--exit-weights", "depth", "--output", tmp_path / "student"])
    config = json.loads((tmp_path / "student" / "model" / "config.json").read_text())
    assert (config["distill"], config["boundary_grad"], config["exit_weights"]) == ("teacher", 0.25, "depth")
    spec = json.loads((tmp_path / "student" / "config.json").read_text())["spec"]
    assert spec["teacher"] == str(tmp_path / "teacher")
    status, _, err = run_cli(["train", *common, "--method", "joint", "--teacher", tmp_path / "student" / "model",
                              "--output", tmp_path / "x"], capsys)
    assert status == 2 and "not a frugalnlp run directory" in err


def test_numpy_scores_equal_sklearn():
    from sklearn.metrics import accuracy_score, f1_score

    from frugalnlp.curves import scores

    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        for t in range(30):
            gold, predicted = rng.integers(0, k, 40), rng.integers(0, k, 40)
            if t % 3 == 0:
                predicted[:] = 0  # classes never predicted
            if t % 5 == 0:
                gold = rng.integers(0, max(1, k - 1), 40)  # a class never in gold
            got = scores(predicted, gold, k)
            assert got["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
            assert got["macro_f1"] == pytest.approx(
                f1_score(gold, predicted, average="macro", labels=list(range(k)), zero_division=0), abs=1e-12)


def test_the_dev_choice_can_be_no_and_names_the_static_model_instead():
    from frugalnlp.demo_choice import select_on_dev

    def row(speedup, adaptive, static, fixed=None, cross_fitted=None):
        return {"speedup": speedup, "adaptive": [adaptive, 0.0], "static": [static, 0.0],
                "adaptive_cross_fitted": [adaptive if cross_fitted is None else cross_fitted, 0.0],
                "fixed_exit": None if fixed is None else [fixed, 0.0],
                "gain_over_static": [100 * (adaptive - static), 0.0]}

    # the static frontier (dev and test alike here): 0.80 at 1.5x, 0.765 at 2x, 0.73 at 3x
    static = [{"layers": k, "speedup_layers": 6 / k, "layers_share": k / 6, "accuracy": a}
              for k, a in ((1, 0.6), (2, 0.73), (4, 0.8), (6, 0.82))]
    loses_at_1_5 = {"dev_comparison": [row(1.5, 0.79, 0.80, fixed=0.80), row(2.0, 0.79, 0.77), row(3.0, 0.74, 0.73, 0.75)],
                    "dev_last_exit_vs_plain_points": [0.0, 0.0]}
    selected = select_on_dev({"joint": loses_at_1_5}, static, static)
    choices = {c["speedup"]: (c["choice"], c["deploy"]) for c in selected["per_target"]}
    assert choices[2.0][0] == "adaptive"
    assert choices[1.5][0] in ("static", "fixed exit") and choices[3.0][0] == "fixed exit"
    assert "an adaptive candidate on dev at 2x only" in selected["verdict"]
    # at each target every eligible candidate competes: another pair wins at 1.5x and 3x, on dev; its test
    # gain over the static frontier at the target is what the recommendation reports
    wins = {"dev_comparison": [row(1.5, 0.81, 0.80), row(2.0, 0.70, 0.77), row(3.0, 0.76, 0.73)],
            "comparison": [row(1.5, 0.79, 0.78), row(2.0, 0.70, 0.77), row(3.0, 0.70, 0.73)],
            "dev_last_exit_vs_plain_points": [0.0, 0.0]}
    late = {"dev_comparison": wins["dev_comparison"], "dev_last_exit_vs_plain_points": [-1.0, 0.0]}  # not eligible
    selected = select_on_dev({"joint": loses_at_1_5, "two-stage [per-exit]": wins, "sweet": late}, static, static)
    chosen = {c["speedup"]: (c["choice"], c["candidate"]) for c in selected["per_target"]}
    assert chosen == {1.5: ("adaptive", "two-stage [per-exit]"), 2.0: ("adaptive", "joint"),
                      3.0: ("adaptive", "two-stage [per-exit]")}
    at = {c["speedup"]: c for c in selected["per_target"]}
    assert at[1.5]["test_gain_over_static"] == pytest.approx(-1.0) and at[1.5]["test_accuracy"] == 0.79
    assert at[3.0]["test_gain_over_static"] == pytest.approx(-3.0) and at[3.0]["dev_gain_over_static"] == pytest.approx(3.0)
    assert selected["eligible"] == ["joint", "two-stage [per-exit]"]
    never = {"dev_comparison": [row(1.5, 0.70, 0.80), row(2.0, 0.70, 0.77), row(3.0, 0.70, 0.73)],
             "dev_last_exit_vs_plain_points": [0.0, 0.0]}
    selected = select_on_dev({"sweet": never}, static, static)
    assert all(c["choice"] == "static" for c in selected["per_target"])
    assert selected["verdict"].startswith("no adaptive candidate beats the static frontier on dev")
    deploy = {c["speedup"]: c["deploy"] for c in selected["per_target"]}
    assert "static 4-layer model" in deploy[1.5] and "--num-layers 4" in deploy[1.5]
    assert "static 2-layer model" in deploy[3.0] and "static 2- and 4-layer models" in deploy[2.0]
    # tuned on all of dev the adaptive point beats the static frontier at 2x (0.79 against 0.765); read on the
    # dev half it was not tuned on it does not (0.76): the static models are recommended, the point beside them
    tuned = {"dev_comparison": [row(1.5, 0.79, 0.80), row(2.0, 0.79, 0.77, cross_fitted=0.76), row(3.0, 0.70, 0.73)],
             "comparison": [row(1.5, 0.78, 0.80), row(2.0, 0.77, 0.77), row(3.0, 0.70, 0.73)],
             "dev_last_exit_vs_plain_points": [0.0, 0.0]}
    at_2x = next(c for c in select_on_dev({"joint": tuned}, static, static)["per_target"] if c["speedup"] == 2.0)
    assert at_2x["choice"] == "static" and "static 2- and 4-layer models" in at_2x["deploy"]
    assert at_2x["adaptive_beside"] == {"candidate": "joint", "dev_accuracy": 0.76, "dev_accuracy_in_sample": 0.79,
                                        "test_accuracy": 0.77, "dev_gain_over_static": pytest.approx(-0.5),
                                        "test_gain_over_static": pytest.approx(0.5)}


def test_cross_fitted_dev_accuracy_reads_thresholds_on_the_dev_half_they_were_not_tuned_on(tiny_bert):
    """Exits whose confidence says nothing about being right: thresholds tuned on all of dev look better there
    than they are; `cross_fitted_accuracy` tunes on one half (`split_dev`), reads on the other, both ways."""
    from transformers import BertModel

    from frugalnlp import EarlyExitModel
    from frugalnlp.certify import split_dev
    from frugalnlp.curves import SplitScores
    from frugalnlp.dev_choice import cross_fitted_accuracy, search_per_exit

    model = EarlyExitModel.from_backbone(BertModel(tiny_bert.config), method="joint", exit_layers=[1, 2, 4],
                                         num_labels=2).eval()
    g = torch.Generator().manual_seed(0)
    gold = np.arange(400) % 2
    logits = torch.randn(3, 400, 2, generator=g) * 2.0  # confident at random, right at random
    dev, grid = SplitScores(model, logits, gold, np.full(400, 12)), np.linspace(0, 1, 51).round(6).tolist()

    def choose_on(part, curve, target):
        if target > 4.0:  # as a split that never gets that fast
            raise FrugalError("no threshold reaches it")
        return "per-exit", search_per_exit(part, curve, target_speedup=target, grid=21).threshold

    got = cross_fitted_accuracy(dev, "per-exit", [2.0, 8.0], choose_on, grid)
    right = 0.0
    for fit, read in (split_dev(400), split_dev(400)[::-1]):
        part = dev.subset(fit)
        thresholds = choose_on(part, [part.point("per-exit", t) for t in grid], 2.0)[1]
        right += dev.subset(read).point("per-exit", thresholds).accuracy * len(read)
    assert got == [pytest.approx(right / 400), None]
    in_sample = search_per_exit(dev, [dev.point("per-exit", t) for t in grid], target_speedup=2.0, grid=21).accuracy
    assert in_sample > got[0] + 0.02  # the optimism the cross-fitting takes out
    learned = cross_fitted_accuracy(dev, "learned", [2.0], lambda part, curve, target: (
        "learned", choose_threshold(curve, target_speedup=target).threshold), grid)
    assert 0.0 < learned[0] < 1.0  # a router fitted on the choosing half scores the other


def test_a_deployed_point_is_never_below_its_own_fixed_exit_on_dev(tiny_bert):
    """Exit 1 is overconfident and always wrong, exit 2 right but unsure: no confidence threshold reaches 2x
    without sending rows to exit 1, so the fixed exit 2 (2x, every row) is what is deployed, as per-exit
    thresholds [1, 0] that skip exit 1's head."""
    from transformers import BertModel

    from frugalnlp import EarlyExitModel
    from frugalnlp.curves import SplitScores
    from frugalnlp.dev_choice import OperatingTarget, choose_operating_point, fixed_exit_thresholds
    from frugalnlp.operating import operating_point

    backbone = BertModel(tiny_bert.config)
    model = EarlyExitModel.from_backbone(backbone, method="joint", exit_layers=[1, 2, 4], num_labels=2).eval()
    gold = np.arange(200) % 2
    right = torch.nn.functional.one_hot(torch.as_tensor(gold), 2).float()
    logits = torch.stack([(1 - right) * 8.0, right * 0.5, right * 3.0])  # [exits, n, labels]
    dev = SplitScores(model, logits, gold, np.full(200, 12))
    curve = [dev.point("confidence", t) for t in np.linspace(0, 1, 101).round(6).tolist()]
    assert max(p.accuracy for p in curve if p.speedup_layers >= 2.0) < 0.5
    for target, drop in ((2.0, None), (None, 0.0)):
        chosen = choose_operating_point(curve, dev, OperatingTarget(speedup=target, max_drop=drop))
        assert chosen.policy == "per-exit" and chosen.point.threshold == fixed_exit_thresholds(3, 1) == [1.0, 0.0]
        assert chosen.point.accuracy == 1.0 and chosen.point.speedup_layers == 2.0
        assert chosen.point.exit_histogram == [0, 200, 0]
    point = operating_point(None, dev, chosen, OperatingTarget(max_drop=0.0))
    assert point.policy == "per-exit" and "fixed exit 2 (layer 2) beats the confidence policy" in point.chosen_by
    # at equal accuracy the fixed exit wins (over threshold 1 at 1x, and over threshold 0, which is the fixed
    # exit 1 at 4x): `choose`'s tie rule, the simpler first
    assert choose_operating_point(curve, dev, OperatingTarget(speedup=1.0)).policy == "per-exit"
    tied = choose_operating_point(curve, dev, OperatingTarget(speedup=4.0))
    assert tied.policy == "per-exit" and tied.point.threshold == fixed_exit_thresholds(3, 0)


def test_one_choice_with_one_tie_rule_static_then_fixed_exit_then_adaptive():
    from frugalnlp.dev_choice import Candidate, choose

    adaptive, fixed, static = (Candidate("adaptive", "joint", 0.80, 2.1), Candidate("fixed exit", "exit 2", 0.80, 2.0),
                               Candidate("static", "static 3-layer", 0.80, 2.0))
    for order in ([adaptive, fixed, static], [static, adaptive, fixed], [fixed, static, adaptive]):
        assert choose(order, target_speedup=2.0) is static
        assert choose([c for c in order if c is not static], target_speedup=2.0) is fixed
        assert choose(order, max_drop=0.0, reference=0.80) is adaptive  # faster first with a drop target
    better = Candidate("adaptive", "joint", 0.81, 2.0)
    assert choose([static, fixed, better], target_speedup=2.0) is better  # accuracy decides before the tie rule
    assert choose([static, Candidate("static", "slow", 0.9, 1.5)], target_speedup=2.0) is static  # too slow: out
    assert choose([Candidate("static", "slow", 0.9, 1.5)], target_speedup=2.0) is None
    tied = [Candidate("adaptive", "joint", 0.78, 2.0), Candidate("fixed exit", "exit 1", 0.78, 2.0)]
    assert choose(tied, max_drop=0.02, reference=0.80).kind == "fixed exit"  # equally fast: the simpler


def test_with_segment_times_the_target_is_in_measured_time_not_layers(tiny_bert):
    """Exits at layers 1, 2, 4 whose segments cost 0.02, 0.9 and 0.08 s per text (say, a slow layer 2 on this
    runtime): half the layers is not half the time, and the dev choice at 2x follows the time. Exit 1 is wrong
    and more or less sure, exits 2 and 3 right and sure: 2x in layers is every row at exit 2 (accuracy 1), which
    is 1.09x in time; 2x in time needs about half the rows at exit 1."""
    from transformers import BertModel

    from frugalnlp import EarlyExitModel
    from frugalnlp.curves import SplitScores
    from frugalnlp.dev_choice import OperatingTarget, choose_operating_point
    from frugalnlp.timing import SegmentTimes

    backbone = BertModel(tiny_bert.config)
    model = EarlyExitModel.from_backbone(backbone, method="joint", exit_layers=[1, 2, 4], num_labels=2).eval()
    gold = np.arange(300) % 2
    right = torch.nn.functional.one_hot(torch.as_tensor(gold), 2).float()
    sure = torch.linspace(0.1, 3.0, 300)[:, None]
    logits = torch.stack([(1 - right) * sure, right * 4.0, right * 4.0])  # [exits, n, labels]
    dev = SplitScores(model, logits, gold, np.full(300, 12))
    layers_curve = [dev.point("confidence", t) for t in np.linspace(0, 1, 101).round(6).tolist()]
    # a call on n rows costs n times the per-text time: linear in rows, as if batches never thinned
    dev.times = SegmentTimes(rows=[32], call_seconds=[[0.02 * 32], [0.9 * 32], [0.08 * 32]], plain=1.0,
                             batch_size=32, runtime="torch fp32")
    assert dev.times.share(np.full(300, 2), model.layers_to_exit()) == pytest.approx(1.0)
    assert dev.times.share(np.full(300, 1), model.layers_to_exit()) == pytest.approx(0.92)
    assert dev.times.share(np.full(300, 2), [1, 1, 3]) == pytest.approx(0.1)  # a cascade's skipped member
    # a call costs in proportion to its padded length (its longest row) over the timed calls': the long text that
    # goes on makes every call it is in dearer; texts of the timed length cost what was timed
    timed = SegmentTimes(rows=[1, 2], call_seconds=[[1.0, 2.0]] * 3, plain=3.0, batch_size=2, runtime="onnx int8",
                         tokens=[10.0, 10.0])
    assert timed.share(np.array([0, 2]), [1, 2, 4]) == pytest.approx(4 / 6)
    assert timed.share(np.array([0, 2]), [1, 2, 4], np.array([10, 10])) == pytest.approx(4 / 6)
    assert timed.share(np.array([0, 2]), [1, 2, 4], np.array([10, 30])) == pytest.approx((6 + 3 + 3) / 6)
    assert timed.share(np.array([2, 0]), [1, 2, 4], np.array([10, 30])) == pytest.approx((6 + 1 + 1) / 6)
    curve = [dev.point("confidence", t) for t in np.linspace(0, 1, 101).round(6).tolist()]
    for p in curve:
        exits = np.repeat([0.02, 0.92, 1.0], p.exit_histogram)
        assert p.time_share == pytest.approx(exits.mean()) and p.speedup == pytest.approx(1 / exits.mean())
    chosen = choose_operating_point(curve, dev, OperatingTarget(speedup=2.0))
    in_layers = choose_operating_point(layers_curve, dev, OperatingTarget(speedup=2.0))
    assert chosen.point.speedup >= 2.0 - 1e-9 and in_layers.point.speedup_layers >= 2.0 - 1e-9
    timed_layers_choice = curve[layers_curve.index(in_layers.point)]
    assert in_layers.point.accuracy == 1.0 and in_layers.point.exit_histogram == [0, 300, 0]
    assert timed_layers_choice.speedup == pytest.approx(1 / 0.92)  # 2x in layers, 1.09x in time
    assert chosen.point.accuracy < 0.54 and chosen.point.exit_histogram[0] >= 0.46 * 300
    record = chosen.point.to_dict()
    assert record["speedup_time"] == chosen.point.speedup and CurvePoint.from_dict(record) == chosen.point
    assert "time_share" not in layers_curve[0].to_dict()  # without segment times the JSON record is as before


def test_segment_times_count_thin_batches_and_each_call():
    """Rows that go on past an exit run in a thinner batch: with a call costing 0.5 s on 1 row and 1 s on 32, one
    row per batch of 32 continuing costs half a full batch's segment, not 1/32 of it, and no row costs nothing."""
    from frugalnlp.timing import SegmentTimes, row_counts

    assert row_counts(32) == [1, 2, 4, 8, 16, 32] and row_counts(24) == [1, 2, 4, 8, 16, 24] and row_counts(1) == [1]
    times = SegmentTimes(rows=[1, 32], call_seconds=[[0.5, 1.0], [0.5, 1.0]], plain=2.0 / 32, batch_size=32,
                         runtime="ONNX int8")
    everyone_on = np.ones(64, dtype=int)
    one_on = np.zeros(64, dtype=int)
    one_on[[5, 40]] = 1  # one row of each batch of 32 goes on
    assert times.share(everyone_on, [1, 2]) == pytest.approx(1.0)
    assert times.share(one_on, [1, 2]) == pytest.approx((1.0 + 0.5) / 2.0)  # a per-text model would say 0.52
    assert times.share(np.zeros(64, dtype=int), [1, 2]) == pytest.approx(0.5)
    # 16 rows in a batch: linear between the measured 1 and 32 rows; a last batch of 8 texts is cut as served
    half_on = (np.arange(40) % 2).astype(int)  # batches of 32 and 8: 16 and 4 rows go on
    expected = (1.0 + np.interp(16, [1, 32], [0.5, 1.0]) + np.interp(8, [1, 32], [0.5, 1.0])
                + np.interp(4, [1, 32], [0.5, 1.0])) / (40 * 2.0 / 32)
    assert times.share(half_on, [1, 2]) == pytest.approx(expected)


def test_the_operating_target_is_one_frozen_value_checked_once():
    import dataclasses

    from frugalnlp.dev_choice import OperatingTarget

    target = OperatingTarget(speedup=2.0, policy="per-exit", cost="time", cost_batch_size=8)
    assert target.describe() == "dev: target speedup 2" and OperatingTarget(max_drop=0.01).describe() == "dev: max drop 0.01"
    with pytest.raises(dataclasses.FrozenInstanceError):
        target.speedup = 3.0
    for bad, message in (({}, "exactly one"), ({"speedup": 2.0, "max_drop": 0.1}, "exactly one"),
                         ({"speedup": 0.5}, "at least 1"), ({"max_drop": 2.0}, "outside [0, 1]"),
                         ({"speedup": 2.0, "risk": 0.1}, "--risk"), ({"speedup": 2.0, "policy": "nope"}, "nope"),
                         ({"speedup": 2.0, "cost": "joules"}, "--cost"),
                         ({"speedup": 2.0, "cost_batch_size": 0}, "--cost-batch-size")):
        with pytest.raises(FrugalError, match=re.escape(message)):
            OperatingTarget(**bad)
