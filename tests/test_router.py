"""The learned router: cross-fitted on dev (no example scored by a router that saw it), deployed as fitted
on all of dev, and a learnable ceiling reported beside the oracle."""

import json

import numpy as np
import torch

from conftest import run_cli


def simulated(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Three exits on a binary task; exit 0 is right when its confidence is high *and* exit 1 agrees."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    logits = torch.tensor(rng.normal(0, 1, (3, n, 2)), dtype=torch.float32)
    logits[2, np.arange(n), gold] += 3.0
    return logits, gold


def test_cross_fitting_holds_out_every_example_once_and_no_router_sees_its_fold(monkeypatch):
    import frugalnlp.early_exit.router as router_module

    logits, gold = simulated(500)
    sizes = []
    real = router_module.fit_exit_router

    def recording(logits, gold, **kwargs):
        sizes.append(len(gold))
        return real(logits, gold, **kwargs)

    monkeypatch.setattr(router_module, "fit_exit_router", recording)
    routes = router_module.cross_fit(logits, gold, folds=5)
    held = np.concatenate([rows for _, rows in routes])
    assert sorted(held.tolist()) == list(range(500))  # each example held out exactly once
    assert sizes == [500 - len(rows) for _, rows in routes]  # each router fitted on the other folds alone
    scores = routes[0][0].score(0, logits[:1].log_softmax(-1).transpose(0, 1))
    assert scores.shape == (500,) and bool(((scores > 0) & (scores < 1)).all())


def test_the_router_learns_when_an_exit_is_right():
    from frugalnlp.early_exit.router import fit_exit_router

    rng = np.random.default_rng(1)
    n = 4000
    gold = rng.integers(0, 2, n)
    right = rng.random(n) < 0.7
    early = np.where(right, gold, 1 - gold)
    margin = np.where(right, 2.0, 0.2)  # a right early answer is confident, a wrong one is not
    logits = torch.zeros(2, n, 2)
    logits[0, np.arange(n), early] = torch.tensor(margin, dtype=torch.float32)
    logits[1, np.arange(n), gold] = 1.0
    router = fit_exit_router(logits[:, :2000], gold[:2000])
    p = router.score(0, logits[:1, 2000:].log_softmax(-1).transpose(0, 1))
    assert float(p[right[2000:]].mean()) > 0.9 > 0.3 > float(p[~right[2000:]].mean())


def test_evaluate_learned_reports_the_ceiling_and_the_dev_corrected_frontier(tiny_run, tmp_path, capsys):
    status, _, err = run_cli(["evaluate", tiny_run, "--policy", "learned", "--thresholds", 3,
                              "--target-speedup", 1.5, "--output", tmp_path / "e"], capsys)
    assert status == 0, err
    result = json.loads((tmp_path / "e" / "curve.json").read_text())
    ceiling = [p["accuracy"] for p in result["baselines"]["ceiling"] if p["accuracy"] is not None]
    oracle = [p["accuracy"] for p in result["baselines"]["oracle"] if p["accuracy"] is not None]
    assert ceiling and max(ceiling) <= max(oracle) + 1e-9  # no router beats the oracle
    assert len(result["baselines"]["fixed_exits_corrected"]) == len(result["baselines"]["fixed_exits"])
    row = result["comparison"][0]
    assert {"ceiling", "fixed_exit_corrected", "static_corrected", "gain_over_corrected_static"} <= set(row)
    assert result["operating_point"]["threshold"] is not None
