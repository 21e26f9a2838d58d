"""Exit-training recipes on a tiny random BERT: boundary gradient, distillation, exit weights, two-stage."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import run_cli
from frugalnlp import EarlyExitModel
from frugalnlp.errors import FrugalError
from test_early_exit import EXITS, batch, make


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def exit_grads(model, ids, mask, labels):
    """The gradient of each exit's own loss alone: one {name: grad} per exit."""
    return [grads(model, F.cross_entropy(model(ids, mask).exit_logits[k], labels)) for k in range(len(EXITS))]


@pytest.mark.parametrize("method,a", [("sweet", 0.0), ("joint", 1.0)])
def test_boundary_grad_endpoints_equal_sweet_and_joint(tiny_bert, method, a):
    ids, mask, labels = batch(8)
    reference = make(tiny_bert, method).train()
    torch.manual_seed(5)
    expected = grads(reference, reference(ids, mask, labels=labels).loss)
    other = make(tiny_bert, "sweet" if method == "joint" else "joint", boundary_grad=a).train()
    torch.manual_seed(5)
    got = grads(other, other(ids, mask, labels=labels).loss)
    assert other.config.boundary_grad == a
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_boundary_grad_scales_a_loss_by_a_per_boundary(tiny_bert):
    """Exit 3's loss crosses two boundaries to reach layer 1 (below exit 1): scaled by 0.5^2."""
    ids, mask, labels = batch(8)
    full = exit_grads(make(tiny_bert, "joint").eval(), ids, mask, labels)
    half = exit_grads(make(tiny_bert, "joint", boundary_grad=0.5).eval(), ids, mask, labels)
    layer1 = "backbone.encoder.layer.0.output.dense.weight"  # segment of exit 1
    layer2 = "backbone.encoder.layer.1.output.dense.weight"  # segment of exit 2
    layer4 = "backbone.encoder.layer.3.output.dense.weight"  # segment of exit 3
    torch.testing.assert_close(half[2][layer1], 0.25 * full[2][layer1], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(half[2][layer2], 0.5 * full[2][layer2], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(half[2][layer4], full[2][layer4], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(half[1][layer1], 0.5 * full[1][layer1], rtol=1e-5, atol=1e-9)
    assert full[2][layer1].abs().sum() > 0


@pytest.mark.parametrize("distill", ["self", "teacher"])
def test_distillation_gradient_reaches_early_exits(tiny_bert, distill):
    ids, mask, labels = batch(8)
    model = make(tiny_bert, "sweet", distill=distill, distill_alpha=1.0).eval()  # KL only: no label signal
    teacher = torch.randn(8, 3) * 3 if distill == "teacher" else None
    g = grads(model, model(ids, mask, labels=labels, teacher_logits=teacher).loss)
    for k in range(len(EXITS) - (distill == "self")):
        assert g[f"heads.{k}.classifier.weight"].abs().sum() > 0, k
    if distill == "self":  # the last exit teaches and is not taught: with alpha 1 its loss is plain CE
        out = model(ids, mask)
        torch.testing.assert_close(g["heads.2.classifier.weight"],
                                   grads(model, F.cross_entropy(out.exit_logits[-1], labels))["heads.2.classifier.weight"])


def test_distillation_loss_matches_its_formula(tiny_bert):
    ids, mask, labels = batch(8)
    model = make(tiny_bert, "joint", distill="teacher", distill_alpha=0.3, distill_temperature=2.0).eval()
    teacher = torch.randn(8, 3)
    out = model(ids, mask, labels=labels, teacher_logits=teacher)
    expected = 0.0
    for logits in out.exit_logits:
        kl = (F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(logits / 2, -1))).sum(-1).mean()
        expected = expected + 0.7 * F.cross_entropy(logits, labels) + 0.3 * 4 * kl
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(FrugalError, match="teacher_logits"):
        model(ids, mask, labels=labels)


def test_depth_exit_weights(tiny_bert):
    ids, mask, labels = batch(8)
    model = make(tiny_bert, "joint", exit_weights="depth").eval()
    assert model.exit_loss_weights() == pytest.approx([3 * 1 / 7, 3 * 2 / 7, 3 * 4 / 7])
    out = model(ids, mask, labels=labels)
    ce = [F.cross_entropy(logits, labels) for logits in out.exit_logits]
    torch.testing.assert_close(out.loss, sum(w * c for w, c in zip(model.exit_loss_weights(), ce)))


def test_recipe_is_saved_and_reloaded(tiny_bert, tmp_path):
    model = make(tiny_bert, "joint", boundary_grad=0.3, distill="self", distill_alpha=0.7, distill_temperature=3.0,
                 exit_weights="depth")
    model.save_pretrained(tmp_path / "m")
    config = EarlyExitModel.from_pretrained(tmp_path / "m").config
    assert (config.boundary_grad, config.distill, config.distill_alpha, config.distill_temperature,
            config.exit_weights) == (0.3, "self", 0.7, 3.0, "depth")


@pytest.mark.parametrize("kwargs,field", [({"boundary_grad": 1.5}, "--boundary-grad"), ({"distill": "moon"}, "--distill"),
                                          ({"exit_weights": "x"}, "--exit-weights"),
                                          ({"distill_alpha": float("nan")}, "--distill-alpha")])
def test_bad_recipe_is_refused(tiny_bert, kwargs, field):
    with pytest.raises(FrugalError, match=field):
        make(tiny_bert, "joint", **kwargs)


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def test_two_stage_keeps_the_plain_backbone_bit_identical(tiny_dir, tmp_path, capsys):
    common = ["--task", "mr", "--model", tiny_dir, "--train-size", 48, "--epochs", 1, "--max-length", 24, "--seed", 3]
    status, _, err = run_cli(["train", *common, "--method", "plain", "--output", tmp_path / "plain"], capsys)
    assert status == 0, err
    status, _, err = run_cli(["train", *common, "--method", "two-stage", "--exit-layers", "1,2,4",
                              "--output", tmp_path / "two"], capsys)
    assert status == 0, err
    plain, two = _weights(tmp_path / "plain"), _weights(tmp_path / "two")
    backbone = [k for k in plain if k.startswith("backbone.")]
    assert backbone and all(torch.equal(plain[k], two[k]) for k in backbone)
    for part in ("dense.weight", "classifier.weight", "classifier.bias"):  # its last exit is the plain head
        assert torch.equal(plain[f"heads.0.{part}"], two[f"heads.2.{part}"])
    metrics = {name: json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "two")}
    assert metrics["two"]["test"]["exits"][-1]["accuracy"] == metrics["plain"]["test"]["accuracy"]
    config = json.loads((tmp_path / "two" / "model" / "config.json").read_text())
    assert config["method"] == "two-stage" and config["exit_layers"] == [1, 2, 4]
