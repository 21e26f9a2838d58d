"""A frozen encoder's hidden states, computed once and shared by every probe trained on them.

In the probe setting the encoder never trains and runs without dropout, so its hidden states on an
example are the same in every epoch and for every seed: only the probe learns. A sweep computes them once
per number of constant heads and trains each seed's probe from them, one encoder pass instead of
(epochs + evaluation) x seeds of them, which is what makes 12-layer models affordable on a CPU.

The states live in a scratch memory map (raw float16 by default, [examples, layers + 1, n, hidden]), so a
split larger than memory still works; the sweep deletes it when its runs are done. It is a cache, not a
result: nothing in it is read back by another command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from frugalnlp.encoding import EncodedSplit, batches
from frugalnlp.papa.modeling import PapaModel


class FrozenStates:
    """Hidden states [examples, layers + 1, n, hidden] of a frozen PAPA encoder, one row per example id."""

    def __init__(self, states: torch.Tensor, ids: list[str], constant_heads: list[list[int]]) -> None:
        self.states = states
        self.row = {example: i for i, example in enumerate(ids)}
        self.constant_heads = sorted(map(list, constant_heads))

    @classmethod
    @torch.inference_mode()
    def compute(cls, model: PapaModel, data: EncodedSplit, ids: list[str], tokenizer: PreTrainedTokenizerBase,
                path: Path, batch_size: int = 64, dtype: torch.dtype = torch.float16,
                desc: str = "encoder states") -> FrozenStates:
        """Run ``model``'s encoder once over ``data`` (fixed layout, example ``i`` has id ``ids[i]``) and
        store its hidden states in a memory map at ``path``."""
        config = model.config
        shape = (len(data), model.probe.position_scores.shape[0], config.length, model.backbone.config.hidden_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a scratch file an interrupted sweep left behind
        states = torch.from_file(str(path), shared=True, size=int(np.prod(shape)), dtype=dtype).view(shape)
        model.eval()
        total = -(-len(data) // batch_size)
        for index, batch in tqdm(batches(data, tokenizer, batch_size, model.device), total=total, desc=desc,
                                 unit="batch"):
            hidden, _ = model.encode(**{k: v for k, v in batch.items() if k != "labels"})
            states[torch.as_tensor(index)] = hidden.to(dtype).cpu()
        return cls(states, ids, config.constant_heads)

    def rows(self, ids: list[str]) -> list[int]:
        """Row of each example id."""
        return [self.row[example] for example in ids]

    def states_of(self, ids: list[str]) -> torch.Tensor:
        """The stored states of these examples: [len(ids), layers + 1, n, hidden]."""
        return self.states[self.rows(ids)]

    def dataset(self, data: EncodedSplit, ids: list[str]) -> StatesDataset:
        """``data`` (example ``i`` has id ``ids[i]``) with each item's hidden states under ``hidden_states``."""
        return StatesDataset(data, self.states, self.rows(ids))


class StatesDataset(torch.utils.data.Dataset):
    """An `EncodedSplit` whose items also carry their precomputed ``hidden_states`` [layers + 1, n, hidden]."""

    def __init__(self, data: EncodedSplit, states: torch.Tensor, rows: list[int]) -> None:
        self.data = data
        self.states = states
        self.rows = rows

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "hidden_states": self.states[self.rows[i]]}
