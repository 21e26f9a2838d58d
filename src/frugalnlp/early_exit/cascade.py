"""Multi-Model: independent models of increasing depth run as a cascade.

Model k is its own encoder truncated to exit_layers[k] layers, fine-tuned alone. At inference the
rows that model k is not confident about go to model k+1, which recomputes from the input: an
example that leaves at model k has run exit_layers[0] + ... + exit_layers[k] layers, and that
overhead is what `layers_to_exit` reports (a model whose exit the policy never uses is skipped, and
costs nothing: a fixed exit k runs model k alone).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from frugalnlp.atomic import write_json
from frugalnlp.backbones.base import used_length
from frugalnlp.defaults import THRESHOLD
from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.early_exit.policies import ConfidencePolicy, ExitPolicy
from frugalnlp.early_exit.runner import Prediction, adaptive_predict
from frugalnlp.errors import FrugalError

MANIFEST = "cascade.json"


def cascade_layers_to_exit(exit_layers: Sequence[int], heads: Sequence[bool] | None = None) -> list[int]:
    """Layers an example of a cascade has run when it leaves at each exit: every earlier model that ran
    included (all of them, or those whose head ``heads`` says runs: a skipped model costs nothing)."""
    run = [True] * len(exit_layers) if heads is None else heads
    return np.cumsum([k if h else 0 for k, h in zip(exit_layers, run)]).tolist()


class Tokens(NamedTuple):
    """A cascade's state between models: the rows' tokens, [batch, seq] each (token types may be None)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None


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

    def layers_to_exit(self, heads: Sequence[bool] | None = None) -> list[int]:
        """Layers an example has run when it leaves at each exit: `cascade_layers_to_exit`."""
        return cascade_layers_to_exit(self.exit_layers, heads)

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
    def device(self) -> torch.device:
        return self.models[0].device

    @property
    def autocast(self) -> torch.dtype | None:
        return self.models[0].autocast

    @autocast.setter
    def autocast(self, dtype: torch.dtype | None) -> None:
        for model in self.models:
            model.autocast = dtype

    def inference_context(self) -> nullcontext:
        """Members run as they are (the `SegmentRunner` interface)."""
        return nullcontext()

    @property
    def cost_model(self) -> EarlyExitModel:
        """The first member: members share an architecture, so its layer and head cost what any member's do."""
        return self.models[0]

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

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> Tokens:
        """The state before the first model: the tokens themselves, since every model starts from them."""
        return Tokens(input_ids, attention_mask, token_type_ids)

    def advance(self, exit_index: int, tokens: Tokens, head: bool = True) -> tuple[Tokens, torch.Tensor | None]:
        """Run model ``exit_index`` on the rows still going; without ``head`` it is skipped altogether
        (a later model recomputes from the tokens). Returns the tokens and its raw logits (`exit_step` scales them)."""
        if not head:
            return tokens, None
        model = self.models[exit_index]
        logits = model(tokens.input_ids, tokens.attention_mask, tokens.token_type_ids).exit_logits[0].float()
        return tokens, logits

    def keep_rows(self, tokens: Tokens, rows: torch.Tensor | np.ndarray) -> Tokens:
        """Only ``rows`` of the batch, cut to the columns they use."""
        rows = torch.as_tensor(rows, device=tokens.input_ids.device)
        length = used_length(tokens.attention_mask.index_select(0, rows))
        return Tokens(*(None if t is None else t.index_select(0, rows)[:, :length] for t in tokens))

    def merge(self, parts: list[Tokens]) -> Tokens:
        """One batch of several batches' rows, right-padded to the longest."""
        length = max(p.input_ids.shape[1] for p in parts)
        pad = self.config.backbone_config.get("pad_token_id") or 0
        fill = {"input_ids": pad, "attention_mask": 0, "token_type_ids": 0}
        merged = {name: torch.cat([F.pad(getattr(p, name), (0, length - getattr(p, name).shape[1]), value=value)
                                   for p in parts])
                  for name, value in fill.items() if getattr(parts[0], name) is not None}
        return Tokens(**{"token_type_ids": None, **merged})

    @torch.inference_mode()
    def predict(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, threshold: float = THRESHOLD,
                policy: ExitPolicy | None = None, max_tokens: int | None = None) -> Prediction:
        """Cascade inference: each model runs only on the rows that earlier models passed on."""
        return adaptive_predict(self, input_ids, attention_mask, token_type_ids, policy or ConfidencePolicy(threshold),
                                max_tokens)

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

