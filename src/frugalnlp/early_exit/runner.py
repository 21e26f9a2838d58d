"""Segment runners and batched adaptive inference over any of them.

A *segment runner* is a model cut at its exits: `start` a batch, `advance` it one segment (the layers up
to the next exit, then that exit's head) at a time, `keep_rows` to shrink it to the rows that go on. The
torch `EarlyExitModel`, the Multi-Model `Cascade` and an ONNX export (`frugalnlp.onnx_model.OnnxModel`)
implement it; `adaptive_predict`, the evaluation, the costs and the server know this interface alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from frugalnlp.early_exit.policies import ExitPolicy, exit_step, heads_run, needs_head


class SegmentRunner(Protocol):
    """What every runtime of an adaptive model offers. ``State`` is the runner's own (a torch `State`, the
    tokens of a cascade, NumPy arrays in an export) and has an ``attention_mask`` [rows, seq]."""

    exit_layers: list[int]  # 1-based layer of each exit (a cascade: each member's depth)
    temperatures: list[float]  # per exit, fitted on dev
    device: torch.device

    @property
    def num_exits(self) -> int: ...

    @property
    def config(self) -> Any:
        """The (deepest) model's `EarlyExitConfig`: labels, exit layers, backbone config."""

    @property
    def cost_model(self) -> nn.Module:
        """The torch `EarlyExitModel` one layer and one head of which cost what this runner's do (a cascade: its
        first member; an export: its architecture): what `frugalnlp.cost.FlopCost` counts."""

    def layers_to_exit(self, heads: Sequence[bool] | None = None) -> list[int]:
        """Layers an example has run when it leaves at each exit, given which heads run (default all)."""

    def exit_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Every exit's raw logits on the whole batch: one [batch, labels] per exit."""

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> Any:
        """The state before the first segment ([batch, seq] tokens in)."""

    def advance(self, exit_index: int, state: Any, head: bool = True) -> tuple[Any, torch.Tensor | np.ndarray | None]:
        """Run segment ``exit_index``; returns the state after it and the exit's raw logits [rows, labels]
        (None without ``head``): a torch tensor, or an export's NumPy array (the decisions take either)."""

    def keep_rows(self, state: Any, rows: np.ndarray | torch.Tensor) -> Any:
        """Only ``rows`` ([k] positions) of the batch, cut to the columns they use."""

    def merge(self, states: list[Any]) -> Any:
        """One batch of the rows of several states standing at the same exit, right-padded."""

    def inference_context(self) -> AbstractContextManager:
        """What a run of segments (and the torch decisions between them) goes inside: nothing for torch; for an
        ONNX export, torch's own thread pool off (`frugalnlp.onnx_model.torch_threads`)."""

    def eval(self) -> SegmentRunner: ...

    def to(self, device: torch.device | str) -> SegmentRunner: ...


@dataclass
class Prediction:
    """Per-example result of adaptive inference (all tensors [batch]; ``logits`` [batch, labels]).

    ``logits`` are the temperature-scaled logits of the exit each example left at.
    """

    labels: torch.Tensor
    exit_index: torch.Tensor
    layers_run: torch.Tensor
    confidence: torch.Tensor
    logits: torch.Tensor


class Departures:
    """Bookkeeping of batched adaptive inference, shared by early exit and the cascade.

    Tracks which original rows are still running and the policy's per-row state, in NumPy (`exit_step`). It
    records the rows that leave at each exit and assembles the `Prediction` once at the end, so the hot loop
    does a few array ops per exit and none per example.
    """

    def __init__(self, policy: ExitPolicy, batch: int, temperatures: list[float]) -> None:
        self.policy, self.temperatures = policy, temperatures
        self.num_exits = len(temperatures)
        self.rows = np.arange(batch)  # original row of each row still running
        self.state = policy.start(batch)
        # (original rows, calibrated logits, their probabilities, exit) of the rows that left at each exit
        self.left: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self.dropped = False  # whether the last `decide` let some rows go and kept others

    def skips(self, exit_index: int) -> bool:
        """Whether this exit's head can be skipped altogether (no row can leave before the last exit)."""
        return not needs_head(self.policy, exit_index, self.num_exits)

    def decide(self, exit_index: int, logits: np.ndarray | torch.Tensor) -> np.ndarray | None:
        """Record who leaves at this exit given their raw logits [rows, labels] (`exit_step` decides).

        Returns the positions (in the current batch) of the rows that go on, or None when none do;
        ``self.dropped`` says whether the batch must shrink to them.
        """
        step = exit_step(self.policy, exit_index, self.num_exits, logits, self.temperatures[exit_index], self.state)
        self.state = step.state
        self.left.append((self.rows[step.leave], step.logits[step.leave], step.probs[step.leave], exit_index))
        stay = np.flatnonzero(~step.leave)
        self.dropped = 0 < len(stay) < len(self.rows)
        if len(stay) == 0:
            return None
        if self.dropped:
            self.rows = self.rows[stay]
            self.state = None if self.state is None else self.state[stay]
        return stay

    def reorder(self, order: np.ndarray) -> None:
        """The running rows now stand in ``order`` ([rows] positions in the current batch)."""
        self.rows = self.rows[order]
        self.state = None if self.state is None else self.state[order]

    def prediction(self, layers_to_exit: list[int]) -> Prediction:
        rows = np.concatenate([r for r, _, _, _ in self.left])
        order = np.empty_like(rows)
        order[rows] = np.arange(len(rows))
        logits = np.concatenate([l for _, l, _, _ in self.left])[order]
        probs = np.concatenate([p for _, _, p, _ in self.left])[order]
        exits = np.concatenate([np.full(len(r), e) for r, _, _, e in self.left])[order]
        return Prediction(labels=torch.from_numpy(logits.argmax(-1)), exit_index=torch.from_numpy(exits),
                          layers_run=torch.from_numpy(np.asarray(layers_to_exit)[exits]),
                          confidence=torch.from_numpy(probs.max(-1)), logits=torch.from_numpy(logits))


def length_runs(attention_mask: torch.Tensor | np.ndarray, max_rows: int | None = None,
                max_tokens: int | None = None) -> list[np.ndarray]:
    """The rows of a [batch, seq] mask sorted by length and cut into runs: a padded run costs its longest row.

    Runs hold at most ``max_rows`` rows, or with ``max_tokens`` as many as fit in that many padded tokens
    (rows x the run's longest row; a row longer than the budget runs alone). Returns [k] row index arrays.
    """
    mask = attention_mask if isinstance(attention_mask, np.ndarray) else attention_mask.cpu().numpy()
    lengths = mask.sum(1)
    order = np.argsort(lengths, kind="stable")
    if max_tokens is None:
        size = max_rows or len(order)
        return [order[i:i + size] for i in range(0, len(order), size)]
    ordered = lengths[order]
    runs, start = [], 0
    while start < len(order):
        # sorted lengths make the padded cost of a growing run nondecreasing: the fitting rows are a prefix
        cost = np.arange(1, len(order) - start + 1) * ordered[start:]
        size = max(1, int((cost <= max_tokens).sum()))
        runs.append(order[start:start + size])
        start += size
    return runs


def concat(parts: list[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
    """Arrays of one runtime (NumPy or torch) joined along the rows."""
    return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else torch.cat(parts)


def adaptive_predict(model: SegmentRunner, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     token_type_ids: torch.Tensor | None, policy: ExitPolicy,
                     max_tokens: int | None = None) -> Prediction:
    """Batched adaptive inference for any `SegmentRunner`.

    ``start`` the batch, then ``advance`` it one segment (the layers up to the next exit and its
    head) at a time; at each exit the rows the policy lets go leave and ``keep_rows`` shrinks the
    batch to the others. With ``max_tokens``, every segment runs the rows still going sorted by length
    in runs of at most that many padded tokens (`length_runs`), so the rows that continue past an exit
    are packed into full runs again. Decisions do not depend on the batch: a row decides on its own
    logits alone.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with model.inference_context():
        departures = Departures(policy, input_ids.shape[0], model.temperatures)
        state = model.start(input_ids, attention_mask, token_type_ids)
        for e in range(model.num_exits):
            head = not departures.skips(e)
            if max_tokens is None:
                state, logits = model.advance(e, state, head=head)
            else:
                state, logits = _advance_packed(model, e, state, head, max_tokens, departures)
            if logits is None:
                continue
            stay = departures.decide(e, logits)
            if stay is None:
                break
            if departures.dropped:
                state = model.keep_rows(state, stay)
        return departures.prediction(model.layers_to_exit(heads_run(policy, model.num_exits)))


def _advance_packed(model: SegmentRunner, exit_index: int, state, head: bool, max_tokens: int,
                    departures: Departures) -> tuple[Any, np.ndarray | torch.Tensor | None]:
    """`advance` in runs of at most ``max_tokens`` padded tokens; the rows come back in run order."""
    runs = length_runs(state.attention_mask, max_tokens=max_tokens)
    if len(runs) == 1:
        return model.advance(exit_index, state, head=head)
    parts = [model.advance(exit_index, model.keep_rows(state, rows), head=head) for rows in runs]
    departures.reorder(np.concatenate(runs))
    logits = None if parts[0][1] is None else concat([out for _, out in parts])
    return model.merge([part for part, _ in parts]), logits


