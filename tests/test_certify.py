"""Learn-then-Test: the certified operating point keeps its promise on simulated exits, the dev point does not."""

import math

import numpy as np
import pytest
import torch

from frugalnlp.certify import certify_threshold, learn_then_test, p_value
from frugalnlp.curves import CurvePoint, replay
from frugalnlp.dev_choice import choose_threshold
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.errors import FrugalError

EPSILON, DELTA, DRAWS, DEV = 0.02, 0.1, 500, 2000
CANDIDATES = np.linspace(0.5, 1.0, 26).round(6).tolist()


def simulated_exits(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """Two exits on a binary task. The early exit is calibrated: its confidence c ~ U(0.5, 1) and it is right
    with probability c; the last exit is right with probability 0.9. Returns raw logits [2, n, 2] and gold [n]."""
    gold = rng.integers(0, 2, n)
    confidence = rng.uniform(0.5, 1.0, n)
    early = np.where(rng.random(n) < confidence, gold, 1 - gold)
    last = np.where(rng.random(n) < 0.9, gold, 1 - gold)

    def logits(predicted: np.ndarray, p: np.ndarray) -> torch.Tensor:
        probs = np.where(predicted[:, None] == np.arange(2)[None], p[:, None], 1 - p[:, None])
        return torch.tensor(np.log(np.clip(probs, 1e-9, 1)), dtype=torch.float32)

    return torch.stack([logits(early, confidence), logits(last, np.full(n, 0.95))]), gold


def drops(exit_logits: torch.Tensor, gold: np.ndarray) -> dict[float, float]:
    """Each candidate's accuracy drop against the last exit on these examples."""
    gold_t = torch.as_tensor(gold)
    last = float((exit_logits[-1].argmax(-1) == gold_t).double().mean())
    return {t: last - float((replay(exit_logits, [1.0, 1.0], make_policy("confidence", t, 2))[1] == gold_t)
                            .double().mean()) for t in CANDIDATES}


def dev_curve(exit_logits: torch.Tensor, gold: np.ndarray) -> list[CurvePoint]:
    gold_t = torch.as_tensor(gold)
    points = []
    for t in CANDIDATES:
        exit_index, labels = replay(exit_logits, [1.0, 1.0], make_policy("confidence", t, 2))
        layers = float(torch.tensor([1.0, 2.0])[exit_index].mean())
        accuracy = float((labels == gold_t).double().mean())
        points.append(CurvePoint(threshold=t, accuracy=accuracy, macro_f1=accuracy, layers_share=layers / 2.0,
                                 flops_share=layers / 2.0, exit_histogram=torch.bincount(exit_index, minlength=2).tolist()))
    return points


def test_the_certified_drop_exceeds_epsilon_in_at_most_delta_of_the_draws_and_the_dev_choice_more_often():
    rng = np.random.default_rng(0)
    population = drops(*simulated_exits(400_000, rng))  # the population drop of every candidate
    assert min(population.values()) < EPSILON < max(population.values())  # the question is not trivial
    certified_over = dev_over = 0
    deployed = []
    for _ in range(DRAWS):
        logits, gold = simulated_exits(DEV, rng)
        certificate = certify_threshold(logits, gold, [1.0, 1.0], [1, 2], EPSILON, DELTA, candidates=CANDIDATES,
                                        seed=int(rng.integers(1 << 30)))
        certified_over += population[certificate.threshold] > EPSILON
        deployed.append(certificate.threshold)
        dev_over += population[choose_threshold(dev_curve(logits, gold), max_drop=EPSILON).threshold] > EPSILON
    tolerance = 3 * math.sqrt(DELTA * (1 - DELTA) / DRAWS)  # three binomial standard deviations: 0.040
    assert certified_over / DRAWS <= DELTA + tolerance, certified_over
    assert dev_over / DRAWS > DELTA + tolerance and dev_over > certified_over, (dev_over, certified_over)
    assert np.mean(np.array(deployed) < 1.0) > 0.9  # it certifies real savings, not only the last exit


def test_fixed_sequence_testing_stops_at_the_first_failure_and_deploys_the_cheapest_certified():
    cost = np.array([1.0, 3.0, 2.0, 1.5])  # tested in order 1, 2, 3, 0
    losses = np.zeros((4, 400), dtype=np.int64)
    losses[3, :40] = 1  # 10% loss: never certified at epsilon 0.05
    chosen, tested = learn_then_test(cost, losses, epsilon=0.05, delta=0.1)
    assert [c for c, _ in tested] == [1, 2, 3] and chosen == 2  # 0 is cheaper but comes after a failure
    assert p_value(np.zeros(400), 0.05) == pytest.approx(0.95 ** 400)
    chosen, _ = learn_then_test(cost, np.ones((4, 10), dtype=np.int64), epsilon=0.05, delta=0.1)
    assert chosen is None


def test_nothing_certified_runs_to_the_last_exit_and_says_so():
    logits, gold = simulated_exits(60, np.random.default_rng(1))  # 30 calibration examples: (1 - 0.01)^30 > 0.1
    certificate = certify_threshold(logits, gold, [1.0, 1.0], [1, 2], 0.01, 0.1, candidates=CANDIDATES)
    assert not certificate.certified and certificate.threshold == 1.0
    # candidates that save nothing on the fit part are not tested: the first tested is the most conservative
    # one that does, and it fails
    first = certificate.tested[0]
    assert len(certificate.tested) == 1 and first["fit_layers"] < 2.0 and first["p_value"] > 0.1
    with pytest.raises(FrugalError, match="--risk"):
        certify_threshold(logits, gold, [1.0, 1.0], [1, 2], 0.01, 1.5)


def test_a_cascade_is_certified_against_its_last_model_alone():
    """A cascade's fallback (threshold 1) runs its last model alone; candidates that recompute more than that
    on the fit part are never tested, so a certified cascade point is always faster than the fallback."""
    logits, gold = simulated_exits(DEV, np.random.default_rng(2))
    from frugalnlp.early_exit.cascade import cascade_layers_to_exit

    def layers(threshold):  # members of 1 and 6 layers: the first is skipped at threshold 1
        return cascade_layers_to_exit([1, 6], [make_policy("confidence", threshold, 2).uses_exit(0), True])

    assert layers(1.0) == [0, 6] and layers(0.9) == [1, 7]
    certificate = certify_threshold(logits, gold, [1.0, 1.0], layers, EPSILON, DELTA, candidates=CANDIDATES)
    assert certificate.certified and certificate.tested
    assert all(t["fit_layers"] < 6.0 for t in certificate.tested)  # the high thresholds recompute: never tested
    assert certificate.tested[0]["threshold"] < max(t for t in CANDIDATES if t < 1.0)


def test_the_reference_is_the_last_exit_as_the_policy_answers_there():
    """An exit ensemble answers at the last exit with its own mix: the drop is certified against that answer
    (what running to the last exit deploys), not the raw exit's, so the fallback loses nothing."""
    logits, gold = simulated_exits(DEV, np.random.default_rng(3))
    mixed = torch.as_tensor(1 - gold)  # the policy's answers, the same at every exit and all wrong

    def decide(threshold):  # threshold < 1: every row at the first exit; 1: every row at the last
        return torch.full((DEV,), 0 if threshold < 1.0 else 1), mixed

    certificate = certify_threshold(logits, gold, [1.0, 1.0], [1, 2], EPSILON, DELTA, candidates=[0.5, 1.0],
                                    decide=decide)
    assert certificate.certified and certificate.threshold == 0.5  # no loss against its own last exit
    assert certificate.tested[0]["calibration_risk"] == 0.0


def test_evaluate_and_predict_deploy_the_certified_point(tiny_run, tmp_path, capsys):
    import json

    from conftest import run_cli
    from test_cli_errors import assert_clean_error

    status, out, err = run_cli(["evaluate", tiny_run, "--max-drop", 0.02, "--risk", 0.1, "--thresholds", 3,
                                "--output", tmp_path / "e"], capsys)
    assert status == 0, err
    point = json.loads((tmp_path / "e" / "curve.json").read_text())["operating_point"]
    certificate = point["certificate"]
    assert point["risk"] == 0.1 and certificate["epsilon"] == 0.02 and point["certified"] == certificate["certified"]
    assert certificate["fit_examples"] + certificate["calibration_examples"] == 852  # MR's dev split
    assert point["threshold"] == certificate["threshold"] and "test_drop" in point
    assert all(row["p_value"] <= 0.1 for row in certificate["tested"][:-1])  # testing stopped at its first failure
    assert ("certified (Learn-then-Test" in out) == certificate["certified"]
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    status, _, err = run_cli(["predict", tiny_run, "--input", data, "--output", tmp_path / "p.jsonl",
                              "--max-drop", 0.02, "--risk", 0.1], capsys)
    assert status == 0 and f"threshold {point['threshold']:.4f} chosen on dev" in err, err
    status, _, err = run_cli(["predict", tiny_run, "--input", data, "--output", tmp_path / "q.jsonl", "--risk", 0.1],
                             capsys)
    assert_clean_error(status, err, "--risk", "--max-drop")


def test_per_exit_thresholds_are_searched_on_dev_and_never_below_the_single_threshold(tiny_run, tmp_path, capsys):
    import json

    from conftest import run_cli

    results = {}
    for policy in ("confidence", "per-exit"):
        status, _, err = run_cli(["evaluate", tiny_run, "--policy", policy, "--target-speedup", 1.5, "--thresholds", 3,
                                  "--output", tmp_path / policy], capsys)
        assert status == 0, err
        results[policy] = json.loads((tmp_path / policy / "curve.json").read_text())
    single, per_exit = (results[p]["operating_point"] for p in ("confidence", "per-exit"))
    assert isinstance(per_exit["threshold"], list) and len(per_exit["threshold"]) == 2  # exits 1 and 2
    assert per_exit["dev"]["speedup_layers"] >= 1.5 - 1e-9
    assert per_exit["dev"]["accuracy"] >= single["dev"]["accuracy"]  # coordinate descent starts from it
    rows = {r["speedup"]: r for r in results["per-exit"]["dev_comparison"]}
    singles = {r["speedup"]: r for r in results["confidence"]["dev_comparison"]}
    assert all(rows[s]["adaptive"] >= singles[s]["adaptive"] for s in rows if singles[s]["adaptive"] is not None)


@pytest.mark.parametrize("policy", ["confidence", "learned"])
def test_a_certified_ensemble_and_router_never_see_the_calibration_half(tiny_run, policy):
    """Under --risk the exit ensemble (and the learned router) deployed are fitted on dev's fit half alone:
    relabelling the calibration half changes neither, while the ensemble fitted on all of dev does change."""
    from frugalnlp.certify import split_dev
    from frugalnlp.curves import dev_scores
    from frugalnlp.defaults import OPERATING_GRID
    from frugalnlp.dev_choice import OperatingTarget, choose_operating_point
    from frugalnlp.early_exit.ensemble import fit_exit_ensemble
    from frugalnlp.run import load_run

    trained = load_run(tiny_run)
    dev = dev_scores(trained, True, policy)
    _, calibration = split_dev(len(dev.gold))
    relabelled = dev.subset()
    gold = np.asarray(relabelled.gold).copy()
    gold[calibration] = 1 - gold[calibration]
    relabelled.gold = gold
    relabelled.ensemble = fit_exit_ensemble(dev.exit_logits, trained.model.temperatures, gold)
    assert not torch.equal(relabelled.ensemble.bias, dev.ensemble.bias)  # the all-dev fit sees those labels
    if policy == "learned":
        relabelled.fit_router()
    chosen = [choose_operating_point([d.point(policy, t) for t in OPERATING_GRID], d,
                                     OperatingTarget(max_drop=0.02, risk=0.1, policy=policy))
              for d in (dev, relabelled)]
    assert chosen[0].ensemble is not None and chosen[0].ensemble is not dev.ensemble
    assert torch.equal(chosen[0].ensemble.maps, chosen[1].ensemble.maps)
    assert torch.equal(chosen[0].ensemble.bias, chosen[1].ensemble.bias)
    if policy == "learned":
        assert all(torch.equal(a, b) for a, b in zip(chosen[0].router.tensors().values(),
                                                      chosen[1].router.tensors().values()))
