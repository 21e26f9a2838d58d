"""Evaluating a finished run: its speed-accuracy curve on a split beside every baseline, the dev comparison
recipes are chosen by, and the operating point chosen on dev (`evaluate_run`, written as ``RUN/eval-*``);
`certified_point` is its Learn-then-Test point alone. The concepts live in `frugalnlp.curves` (replaying cached
exit logits), `frugalnlp.baselines` and `frugalnlp.dev_choice`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from frugalnlp.baselines import (Oracle, compare, corrected_logits, corrected_static_points, learnable_ceiling,
                                 oracle_speedups, static_points, table_speedups)
from frugalnlp.atomic import write_bytes, write_json
from frugalnlp.curves import CurvePoint, SplitScores, accuracy_at_speedup, dev_scores, exit_scores, split_scores
from frugalnlp.defaults import OPERATING_GRID
from frugalnlp.dev_choice import (OperatingTarget, choose_threshold, cross_fitted_accuracy, operating_record,
                                  search_per_exit)
from frugalnlp.early_exit.ensemble import fit_class_bias
from frugalnlp.early_exit.registry import check_policy
from frugalnlp.errors import FrugalError
from frugalnlp.report import curve_csv, plot_curves
from frugalnlp.run import load_run
from frugalnlp.rundir import RunDir


def evaluation_dir(run: str | Path, split: str = "test", policy: str = "confidence") -> Path:
    """Where `evaluate_run` writes by default: ``RUN/eval-SPLIT-POLICY``."""
    return Path(run) / f"eval-{split}-{policy}"


def evaluate_run(run: str | Path, split: str = "test", thresholds: int = 21, policy: str = "confidence",
                 output: str | Path | None = None, overwrite: bool = False, static: list[str] | None = None,
                 target: OperatingTarget | None = None, ensemble: bool = False) -> tuple[Path, dict]:
    """Curve of a trained run on ``split`` beside its baselines; writes curve.json, curve.csv, exits.json, curve.png.

    Baselines: the fixed exits, the static frontier (``static``: multi-model or ``plain --num-layers``
    runs; a multi-model run's own members by default), both also with a class bias fitted on dev (the
    *dev-corrected* frontier: what an ensemble fitted on dev is fairly measured against), the oracle and
    the learnable ceiling (the learned router cross-fitted on ``split`` itself: reported, never used to
    choose). A ``target`` (`OperatingTarget`, for ``policy``) chooses a threshold on the dev curve and reports
    ``split`` at it (with its ``risk``: certified by Learn-then-Test, with the drop ``split`` realises). With ``ensemble`` an
    `ExitEnsemble` is fitted on dev and every policy decides on its logits (the ensembled exits'
    fixed-exit scores are reported too). The learned policy's dev curve is cross-fitted (each dev example
    scored by a router that did not see it); ``split`` is scored by the router fitted on all of dev.
    Returns the output directory (default ``RUN/eval-SPLIT-POLICY[-ensemble]``) and the curve.json content.
    """
    if thresholds < 2:
        raise FrugalError("--thresholds must be at least 2 (evenly spaced in [0, 1])")
    check_policy(policy)  # an unknown policy fails now, not after the forward passes
    if target is not None and target.policy != policy:
        raise FrugalError(f"the operating target is for the {target.policy} policy, the curve for {policy}")
    out = RunDir(output or evaluation_dir(run, split, policy + ("-ensemble" if ensemble else "")), overwrite=overwrite,
                 kind="evaluation", inputs=[run, *(static or [])])
    trained = load_run(run)
    spec, model = trained.spec, trained.model
    depth = model.exit_layers[-1]
    static_runs = static or ([str(run)] if spec.method == "multi-model" else None)
    # Thresholds are chosen on dev and read on the reported split, on one fine grid.
    grid = np.linspace(0.0, 1.0, thresholds).round(6).tolist()
    fine = sorted({*OPERATING_GRID, *grid})
    dev = dev_scores(trained, ensemble, policy)
    reported_split = split_scores(trained, split, dev.ensemble)  # an ensemble fitted on dev alone
    reported_split.use_router(dev.router)
    fitted = dev.ensemble
    dev_curve = [dev.point(policy, threshold) for threshold in fine]
    full_curve = [reported_split.point(policy, threshold) for threshold in fine]
    dev_logits, dev_gold, logits, gold = dev.exit_logits, dev.gold, reported_split.exit_logits, reported_split.gold
    shown = set(grid)
    curve = [p for p in full_curve if p.threshold in shown]
    fixed = exit_scores(model, logits, gold)
    bias = fit_class_bias(dev_logits, model.temperatures, dev_gold)
    operating = None
    if target is not None:
        operating = operating_record(dev, dev_curve, reported_split, split, target)
    # over the exits the policy decides on: an ensemble's mixed exits answer differently from the raw ones
    oracle = Oracle(reported_split.decision_logits(), gold, model.layers_to_exit(), depth)
    ceiling_curve = learnable_ceiling(reported_split)

    def per_exit(scored: SplitScores) -> Callable[[float], CurvePoint] | None:
        """Per-exit thresholds searched on dev for each target speedup, read on ``scored`` (other policies: None)."""
        if policy != "per-exit":
            return None
        return lambda target: scored.point(policy, searched(target))

    def choose_on(part: SplitScores, part_curve: list[CurvePoint], target: float) -> tuple[str, float | list[float]]:
        """The thresholds the comparison's dev choice takes on ``part`` of dev (all of it, or a half to cross-fit)."""
        if policy == "per-exit":
            return policy, search_per_exit(part, part_curve, target_speedup=target).threshold
        return policy, choose_threshold(part_curve, target_speedup=target).threshold

    @functools.lru_cache(maxsize=None)
    def searched(target: float) -> list[float]:  # one search per target serves the dev and the test table
        return choose_on(dev, dev_curve, target)[1]

    # each static model's dev class bias is fitted once, for both splits
    static_corrected = (corrected_static_points(static_runs, ["dev", split], trained.config, depth)
                        if static_runs else {})

    def baselines(on: str, scored: SplitScores) -> dict:
        """Fixed exits and static frontier on ``on``, as trained and with a class bias fitted on dev."""
        return {"fixed_corrected": exit_scores(model, corrected_logits(scored.exit_logits, model.temperatures, bias),
                                               scored.gold),
                "static": static_points(static_runs, on, trained.config, depth) if static_runs else None,
                "static_corrected": static_corrected.get(on)}

    speedups = table_speedups(model.exit_layers)
    test_base, dev_base = baselines(split, reported_split), baselines("dev", dev)
    cross_fitted = dict(zip(speedups, cross_fitted_accuracy(dev, policy, speedups, choose_on, fine)))
    result = {"run": str(run), "split": split, "policy": policy, "method": spec.method, "examples": len(gold),
              "points": [p.to_dict() for p in curve], "static_runs": static_runs,
              "baselines": {"fixed_exits": fixed, "fixed_exits_corrected": test_base["fixed_corrected"],
                            "static": test_base["static"], "static_corrected": test_base["static_corrected"],
                            "oracle_best": oracle.best,
                            "oracle": [{"speedup_layers": s, "accuracy": oracle.accuracy(s)}
                                       for s in oracle_speedups(model.exit_layers)],
                            "ceiling": [{"speedup_layers": s, "accuracy": accuracy_at_speedup(ceiling_curve, s)}
                                        for s in oracle_speedups(model.exit_layers)]},
              "comparison": compare(full_curve, dev_curve, fixed, test_base["static"], oracle, speedups,
                                    per_exit(reported_split), test_base["fixed_corrected"],
                                    test_base["static_corrected"],
                                    lambda s: accuracy_at_speedup(ceiling_curve, s)),
              # The same on dev, where recipes may be compared and chosen without touching test.
              "dev_comparison": compare(dev_curve, dev_curve, exit_scores(model, dev_logits, dev_gold), dev_base["static"],
                                        Oracle(dev.decision_logits(), dev_gold, model.layers_to_exit(), depth), speedups,
                                        per_exit(dev), dev_base["fixed_corrected"], dev_base["static_corrected"],
                                        cross_fitted=cross_fitted),
              "operating_point": operating,
              "ensemble": None if fitted is None else {
                  "maps": fitted.maps.tolist(), "bias": fitted.bias.tolist(), "forms": fitted.forms,
                  "fixed_exits": exit_scores(model, fitted.apply(logits, model.temperatures), gold),
                  "dev_fixed_exits": exit_scores(model, fitted.apply(dev_logits, model.temperatures), dev_gold)}}
    out.open()
    write_json(out.path / "curve.json", result)
    write_bytes(out.path / "curve.csv", curve_csv(result["points"]).encode())
    write_json(out.path / "exits.json", fixed)
    plot_curves({spec.method: result["points"]}, out.path / "curve.png", title=f"{spec.task} ({split})",
                baselines=result["baselines"])
    return out.commit(), result


def certified_point(run: str | Path, policy: str, ensemble: bool, max_drop: float, risk: float,
                    split: str = "test") -> dict:
    """The run's Learn-then-Test point for ``policy`` (on an exit ensemble fitted on dev, with ``ensemble``) at
    ``max_drop`` and ``risk``, read on ``split``: `operating_record` without the rest of `evaluate_run`."""
    target = OperatingTarget(max_drop=max_drop, risk=risk, policy=policy)
    trained = load_run(run)
    dev = dev_scores(trained, ensemble, policy)
    dev_curve = [dev.point(policy, threshold) for threshold in OPERATING_GRID]
    return operating_record(dev, dev_curve, split_scores(trained, split, dev.ensemble), split, target)
