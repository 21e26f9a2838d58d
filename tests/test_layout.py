"""Where things live: a method is one file plus one registry line, serving does not import the training
stack, and a probe-setting PAPA run saves what it adds, not another copy of its frozen encoder."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_cli
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.errors import FrugalError
from frugalnlp.methods import METHODS, Method, head_args


class FrozenProbe(Method):
    """A toy method: one classifier on the last layer of a frozen encoder (a linear probe)."""

    name = "frozen-probe"
    kind = "plain"

    def exit_layers(self, spec, num_layers):
        return [num_layers]

    def build(self, spec, model_path, task):
        model = EarlyExitModel.from_backbone(model_path, method="joint", **head_args(spec, task))
        model.backbone.requires_grad_(False)
        return [model]


def test_a_method_added_through_the_registry_alone_trains_through_the_cli(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(METHODS, FrozenProbe.name, FrozenProbe())
    out = tmp_path / "probe"
    status, stdout, err = run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", "frozen-probe",
                                   "--train-size", 48, "--epochs", 1, "--max-length", 24, "--output", out], capsys)
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["spec"]["method"] == "frozen-probe"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"][0]["stage"] == "layers-4" and metrics["training"][0]["steps"] == 3
    weights = load_file(str(out / "model" / "model.safetensors"))
    encoder = load_file(str(tiny_dir / "model.safetensors"))
    backbone = [k for k in weights if k.startswith("backbone.")]
    assert backbone and all(torch.equal(weights[k], encoder[k[len("backbone."):]]) for k in backbone)  # frozen
    status, _, err = run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", "frozen-probe",
                              "--boundary-grad", "0.5", "--output", tmp_path / "x"], capsys)
    assert status == 2 and "--boundary-grad" in err  # it takes no exit recipe


def test_serving_does_not_import_the_training_stack():
    """Nothing beyond what transformers' own model classes import (accelerate, when it is installed)."""
    code = ("import sys; from transformers import AutoModel, PreTrainedModel; before = set(sys.modules); "
            "import frugalnlp.serving, frugalnlp.predict; "
            "print(sorted(m for m in set(sys.modules) - before "
            "if m == 'accelerate' or m.startswith(('accelerate.', 'transformers.trainer', 'frugalnlp.training'))))")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "[]", imported
    code = "import sys, frugalnlp.serving; print('transformers.trainer' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_a_probe_run_saves_what_it_adds_and_refuses_a_changed_encoder(tiny_dir, tmp_path):
    from frugalnlp.papa.modeling import ADDED_WEIGHTS, PapaModel

    encoder = tmp_path / "encoder"
    encoder.mkdir()
    for file in tiny_dir.iterdir():
        (encoder / file.name).write_bytes(file.read_bytes())
    constant = torch.rand(4, 4, 16, 16)
    torch.manual_seed(0)
    papa = PapaModel.from_encoder(str(encoder), constant, constant_heads=[[0, 1], [3, 0], [3, 1], [3, 2], [3, 3]],
                                  num_labels=3).eval()
    with torch.no_grad():
        papa.probe.dense.weight.normal_()  # as if trained
    papa.save_pretrained(tmp_path / "run")
    saved = load_file(str(tmp_path / "run" / ADDED_WEIGHTS))
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert saved and all(k.startswith("probe.") or ".papa." in k for k in saved)  # no encoder weight
    ids = torch.randint(1000, 2000, (3, 16))
    mask = torch.ones_like(ids)
    again = PapaModel.from_pretrained(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(papa(ids, mask).logits, again(ids, mask).logits)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in papa.state_dict().items()}
    weights = load_file(str(encoder / "model.safetensors"))
    weights = {k: v + 0.01 if k.endswith("query.weight") else v for k, v in weights.items()}
    save_file(weights, str(encoder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FrugalError, match="now holds"):
        PapaModel.from_pretrained(tmp_path / "run")
    finetuned = PapaModel.from_encoder(str(encoder), constant, setting="finetune")
    finetuned.save_pretrained(tmp_path / "finetuned")  # the encoder trains: saved whole
    assert (tmp_path / "finetuned" / "model.safetensors").exists()
