"""Exit decisions run in NumPy on whatever a runtime gives: an ONNX export decides exactly as the torch model on
every policy (exit ensembles and learned routers included), batched as one row at a time and as the replay of
cached logits, with no torch op between its graphs."""

import numpy as np
import pytest
import torch
from test_backbones import make_backbone, padded_batch

from frugalnlp import EarlyExitModel
from frugalnlp.curves import replay
from frugalnlp.early_exit.ensemble import fit_exit_ensemble
from frugalnlp.early_exit.policies import exit_step
from frugalnlp.early_exit.registry import POLICY_NAMES, make_policy
from frugalnlp.early_exit.router import fit_exit_router
from frugalnlp.export import export_model
from frugalnlp.onnx_model import OnnxModel

EXITS = [1, 2, 4]
GRID = [round(float(t), 3) for t in np.linspace(0.05, 0.95, 10)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT with confident, varied heads and unequal temperatures, and its fp32 export."""
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(make_backbone("bert"), exit_layers=EXITS, num_labels=3).eval()
    with torch.no_grad():
        for head in model.heads:
            head.dense.weight.normal_(0, 3.0)
            head.classifier.weight.normal_(0, 1.0)
    model.temperatures = [1.7, 0.8, 1.2]
    folder = tmp_path_factory.mktemp("export")
    export_model(model, folder, optimize=False)
    return model, OnnxModel(folder)


@pytest.fixture(scope="module")
def fitted(models):
    """What the fitted policies deploy, fitted on a "dev" batch with random gold labels: an exit ensemble, and a
    router for the policy alone and one for the policy on the ensemble (fitted on the logits it decides on)."""
    model, _ = models
    ids, mask, types = padded_batch(n=64, seq=16, pad=0, seed=9)
    with torch.no_grad():
        logits = torch.stack(model.exit_logits(ids, mask, types))
    gold = logits[-1].argmax(-1).numpy()  # the last exit's answers, one in four replaced at random
    noisy = np.random.default_rng(0).random(64) < 0.25
    gold[noisy] = np.random.default_rng(1).integers(0, 3, int(noisy.sum()))
    temperatures = torch.tensor(model.temperatures)[:, None, None]
    ensemble = fit_exit_ensemble(logits, model.temperatures, gold)
    return {None: (None, fit_exit_router(logits / temperatures, gold)),
            "ensemble": (ensemble, fit_exit_router(ensemble.apply(logits, model.temperatures), gold))}


def policies(models, fitted, ensembled):
    """Every registered policy at thresholds of `GRID` (per-exit: one pair per grid value), on the ensemble or not."""
    ensemble, router = fitted["ensemble" if ensembled else None]
    for name in POLICY_NAMES:
        for t in GRID:
            threshold = [t, round(1 - t / 2, 3)] if name == "per-exit" else t
            yield name, threshold, make_policy(name, threshold, len(EXITS), ensemble,
                                               router if name == "learned" else None)


def decisions(prediction):
    return prediction.exit_index.tolist(), prediction.labels.tolist()


@pytest.mark.parametrize("ensembled", [False, True], ids=["alone", "ensemble"])
def test_an_export_decides_as_the_torch_model_on_every_policy(models, fitted, ensembled):
    model, exported = models
    ids, mask, types = padded_batch(n=32, seq=16, pad=0, seed=4)
    with torch.no_grad():
        cached = torch.stack(model.exit_logits(ids, mask, types))
    mixed = set()
    for name, threshold, policy in policies(models, fitted, ensembled):
        with torch.no_grad():
            reference = model.predict(ids, mask, types, policy=policy)
        got = exported.predict(ids, mask, types, policy=policy)
        assert decisions(got) == decisions(reference), (name, threshold)
        assert torch.allclose(got.confidence, reference.confidence, atol=1e-5)
        packed = exported.predict(ids, mask, types, policy=policy, max_tokens=90)  # thinner, re-packed batches
        assert decisions(packed) == decisions(reference), (name, threshold)
        exit_index, labels = replay(cached, model.temperatures, policy)  # evaluation's replay of cached logits
        assert (exit_index.tolist(), labels.tolist()) == decisions(reference), (name, threshold)
        if len(set(reference.exit_index.tolist())) > 1:
            mixed.add(name)
            for i in (0, 7, 19):  # a row alone decides as in the batch
                n = int(mask[i].sum())
                alone = exported.predict(ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n], policy=policy)
                assert decisions(alone) == ([reference.exit_index[i].item()], [reference.labels[i].item()])
    # an ensemble makes neighbouring exits agree on these rows: patience lets them all leave at the same exit
    wanted = set(POLICY_NAMES) - ({"patience"} if ensembled else set())
    assert mixed >= wanted, f"no threshold sent rows to different exits for {wanted - mixed}"


def test_an_export_runs_no_torch_op_between_its_graphs(models, fitted, monkeypatch):
    """The export's segments hand NumPy to the decisions: a torch op on [rows, labels] between the graphs would
    wake torch's thread pool beside ONNX Runtime's."""
    _, exported = models
    ids, mask, types = padded_batch(n=16, seq=16, pad=0, seed=5)
    state, logits = exported.advance(0, exported.start(ids, mask, types))
    assert isinstance(logits, np.ndarray) and isinstance(state.hidden, np.ndarray)

    def refuse(*args, **kwargs):
        raise AssertionError("a torch op ran in the export's hot path")

    for name in ("softmax", "log_softmax", "amax", "argmax", "nonzero", "index_select", "__truediv__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for name in ("cat", "stack", "where", "softmax"):
        monkeypatch.setattr(torch, name, refuse)
    ensemble, router = fitted["ensemble"]
    for policy in (make_policy("per-exit", [0.6, 0.5], 3, ensemble), make_policy("learned", 0.5, 3, ensemble, router)):
        prediction = exported.predict(ids, mask, types, policy=policy, max_tokens=90)
        assert len(prediction.labels) == 16


def test_one_softmax_per_exit_serves_the_decision_and_the_answer(models):
    """`exit_step` gives the probabilities it decided on; the answer's confidence is their max, not a second
    softmax of other logits."""
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]], dtype=np.float32)
    step = exit_step(make_policy("confidence", 0.6, 3), 0, 3, logits, 2.0, None)
    expected = torch.softmax(torch.from_numpy(logits) / 2.0, -1)
    assert np.allclose(step.probs, expected.numpy(), atol=1e-6)
    assert step.leave.tolist() == (expected.amax(-1) >= 0.6).tolist() == [False, False]
    step = exit_step(make_policy("confidence", 0.5, 3), 0, 3, logits, 1.0, None)
    assert step.leave.tolist() == [True, False] and step.probs.dtype == np.float32
