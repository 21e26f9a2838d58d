"""Multi-Model: independent models of increasing depth run as a cascade.

Model k is its own encoder truncated to exit_layers[k] layers, fine-tuned alone. At inference the
rows that model k is not confident about go to model k+1, which recomputes from the input: an
example that leaves at model k has run exit_layers[0] + ... + exit_layers[k] layers, and that
overhead is what `layers_to_exit` reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from frugalnlp.backbones.base import used_length
from frugalnlp.early_exit.modeling import Departures, EarlyExitModel, Prediction
from frugalnlp.early_exit.policies import ConfidencePolicy, ExitPolicy
from frugalnlp.errors import FrugalError
from frugalnlp.rundir import write_json

MANIFEST = "cascade.json"


class Cascade:
    """A list of single-exit `EarlyExitModel`s of increasing depth, used as one adaptive model."""

    def __init__(self, models: list[EarlyExitModel]) -> None:
        depths = [m.config.exit_layers[-1] for m in models]
        if any(m.num_exits != 1 for m in models) or depths != sorted(set(depths)):
            raise FrugalError("a cascade needs single-exit models of strictly increasing depth")
        self.models = models

    @property
    def exit_layers(self) -> list[int]:
        return [m.config.exit_layers[-1] for m in self.models]

    @property
    def layers_to_exit(self) -> list[int]:
        """Layers an example has run when it leaves at each exit (earlier models included)."""
        return torch.tensor(self.exit_layers).cumsum(0).tolist()

    @property
    def temperatures(self) -> list[float]:
        return [m.config.temperatures[0] for m in self.models]

    @temperatures.setter
    def temperatures(self, values: list[float]) -> None:
        for model, t in zip(self.models, values):
            model.config.temperatures = [t]

    @property
    def num_exits(self) -> int:
        return len(self.models)

    @property
    def config(self):
        """The deepest model's config (labels, backbone); members share labels."""
        return self.models[-1].config

    def eval(self) -> Cascade:
        for m in self.models:
            m.eval()
        return self

    def to(self, device) -> Cascade:
        for m in self.models:
            m.to(device)
        return self

    def exit_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every model's logits on the whole batch: one [batch, labels] per exit."""
        return tuple(m(input_ids, attention_mask, token_type_ids).exit_logits[0] for m in self.models)

    @torch.inference_mode()
    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, threshold: float = 0.9,
                policy: ExitPolicy | None = None) -> Prediction:
        """Cascade inference: each model runs only on the rows that earlier models passed on."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        departures = Departures(policy or ConfidencePolicy(threshold), input_ids.shape[0], self.num_exits,
                                input_ids.device)
        inputs = [input_ids, attention_mask, token_type_ids]
        for e, model in enumerate(self.models):
            if departures.skips(e):
                continue  # threshold 1: only the last model answers
            logits = model(*inputs).exit_logits[0].float() / model.config.temperatures[0]
            stay = departures.decide(e, logits)
            if stay is None:
                break
            length = used_length(inputs[1].index_select(0, stay))  # the rows left may need fewer columns
            inputs = [None if t is None else t.index_select(0, stay)[:, :length] for t in inputs]
        return departures.prediction(self.layers_to_exit)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        members = []
        for model in self.models:
            name = f"layers-{model.config.exit_layers[-1]}"
            model.save_pretrained(directory / name)
            members.append(name)
        write_json(directory / MANIFEST, {"kind": "frugalnlp-cascade", "members": members})

    @classmethod
    def from_pretrained(cls, directory: str | Path, trust_pickle: bool = False) -> Cascade:
        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        return cls([EarlyExitModel.from_pretrained(directory / name, trust_pickle=trust_pickle)
                    for name in manifest["members"]])


def load_adaptive(directory: str | Path, trust_pickle: bool = False) -> EarlyExitModel | Cascade:
    """An early-exit model or a cascade, whichever the directory holds."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        return Cascade.from_pretrained(directory, trust_pickle=trust_pickle)
    return EarlyExitModel.from_pretrained(directory, trust_pickle=trust_pickle)
