"""Exit policies by name. A new policy is an `ExitPolicy` subclass in the module of what it builds on (a fitted
router, an ensemble) and one line here, as training methods are in `frugalnlp.methods`."""

from __future__ import annotations

from collections.abc import Sequence

from frugalnlp.early_exit.ensemble import EnsembledPolicy, ExitEnsemble
from frugalnlp.early_exit.policies import ConfidencePolicy, EntropyPolicy, ExitPolicy, PatiencePolicy, PerExitPolicy
from frugalnlp.early_exit.router import ExitRouter, LearnedPolicy
from frugalnlp.errors import FrugalError

POLICIES: dict[str, type[ExitPolicy]] = {"confidence": ConfidencePolicy, "entropy": EntropyPolicy,
                                         "patience": PatiencePolicy, "per-exit": PerExitPolicy,
                                         "learned": LearnedPolicy}  # learned: fitted on dev
POLICY_NAMES = tuple(POLICIES)


def check_policy(name: str) -> str:
    """FrugalError unless ``name`` is a policy (checked before any model loads)."""
    if name not in POLICIES:
        raise FrugalError(f"unknown exit policy '{name}'; choose one of {', '.join(POLICY_NAMES)}")
    return name


def make_policy(name: str, threshold: float | Sequence[float], num_exits: int,
                ensemble: ExitEnsemble | None = None, router: ExitRouter | None = None) -> ExitPolicy:
    """A policy by name (each class's `ExitPolicy.create` checks its thresholds: patience is counted in exits,
    ``per-exit`` takes one threshold per early exit or one for all, ``learned`` needs its `ExitRouter`). With an
    `ExitEnsemble` the policy decides on its logits (`frugalnlp.early_exit.ensemble.EnsembledPolicy`)."""
    policy = POLICIES[check_policy(name)].create(name, threshold, num_exits, router=router)
    return policy if ensemble is None else EnsembledPolicy(policy, ensemble)
