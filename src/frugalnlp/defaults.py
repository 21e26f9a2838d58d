"""Defaults that several commands share, written once: the CLI, `Predictor`, the models' ``predict`` and
the demo read them from here."""

from __future__ import annotations

import numpy as np

THRESHOLD = 0.9  # confidence an example needs to leave at an early exit
MAX_LENGTH = 128  # tokens per input when training (train)
DEMO_MAX_LENGTH = 64  # the demo's tokens per input (the published frontier uses it)
PAPA_LENGTH = 64  # n of PAPA's fixed-position layout
DEMO_TRAIN_SIZE = 2000  # the demo's low-resource training set
DEMO_METHODS = ("joint", "sweet", "multi-model")
# The demo's policies by default: one confidence threshold, and per-exit thresholds on an exit ensemble, the
# rule that wins on dev where adaptive inference wins at all (results/frontier.md)
DEMO_POLICIES = ("confidence", "per-exit+ensemble")
OPERATING_GRID = np.linspace(0.0, 1.0, 401).round(6).tolist()  # thresholds tried when choosing one on dev


def default_exit_layers(num_layers: int) -> list[int]:
    """The paper's exits 1,4,6,12 on 12 layers; 1,2,4,6 on the 6-layer MiniLM; else 1, n/3, n/2, n."""
    return {6: [1, 2, 4, 6], 12: [1, 4, 6, 12]}.get(num_layers, sorted({1, num_layers // 3, num_layers // 2, num_layers}))


# Encoders up to this depth get a static model at every depth in the demo; a deeper one only at its exit depths
# (on 12 layers a model per depth is 78 layer-epochs of training against 23 for the exits' members).
STATIC_EVERY_DEPTH_UP_TO = 6


def default_static_layers(num_layers: int, exit_layers: list[int]) -> list[int]:
    """The demo's static model depths: every depth 1..L for encoders of up to 6 layers, else the exit depths."""
    return list(range(1, num_layers + 1)) if num_layers <= STATIC_EVERY_DEPTH_UP_TO else list(exit_layers)
