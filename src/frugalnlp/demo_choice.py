"""The demo's answer to "what should I deploy?", chosen on dev over seeds' means (`select_on_dev`): at each target
speedup the static frontier, a candidate's fixed exit or a candidate's adaptive point, an adaptive point judged
by its cross-fitted dev accuracy, so that tuning thresholds on the rows it is scored on does not beat a static
model that has nothing to tune."""

from __future__ import annotations

from frugalnlp.baselines import static_envelope, static_frontier
from frugalnlp.dev_choice import Candidate, choose

STATIC = "multi-model"  # the variant whose members are the static frontier


def select_on_dev(methods: dict[str, dict], static: list[dict] | None = None, dev_static: list[dict] | None = None,
                  low: float = 1.5, high: float = 3.0, tolerance: float = 0.5) -> dict:
    """What to deploy, chosen on dev only (means over seeds); test figures are read at the choice, never used.

    An adaptive point's dev accuracy here is its cross-fitted one (``adaptive_cross_fitted``: thresholds tuned
    on one half of dev, read on the other), since a static model has nothing to tune on the dev rows it is
    scored on. Eligible candidates ((recipe, policy) pairs): those whose last exit is within ``tolerance``
    points of the plain model on dev (all if none is). ``variant``: the one recipe and policy for every target,
    with the largest worst-case dev gain over the static frontier at the target speedups in [low, high]. Then at each
    target speedup (a budget: anything at least that fast will do) the answer may be no: among every
    eligible candidate's adaptive point, its fixed exit at that cost (where it has one) and the static
    frontier at the target (``dev_static``/``static``: the truncated models alone, on dev and test), the most
    accurate on dev is recommended (on a tie the simpler: static, then a fixed exit), so nothing deployed is
    below a static model or a fixed exit of the same cost on dev; where the static frontier wins, the static
    model to train is named, and the best adaptive candidate on dev is reported beside it (``adaptive_beside``).
    Each target reports the recommendation's dev and test gain over the static frontier at the target.
    """
    def in_range(row: dict) -> bool:
        return low - 1e-9 <= row["speedup"] <= high + 1e-9

    def worst_gain(m: dict) -> float:  # by the cross-fitted dev accuracy, as the choice at each target
        gains = [100 * (row["adaptive_cross_fitted"][0] - row["static"][0])
                 if row.get("adaptive_cross_fitted") and row["static"] else float("-inf")
                 for row in m["dev_comparison"] if in_range(row)]
        return min(gains) if gains else float("-inf")

    def last_ok(m: dict) -> bool:
        last = m["dev_last_exit_vs_plain_points"]
        return last is not None and last[0] >= -tolerance

    candidates = [v for v, m in methods.items() if last_ok(m)] or list(methods)
    best = max(candidates, key=lambda v: worst_gain(methods[v]))
    targets = [row["speedup"] for row in methods[best]["dev_comparison"] if in_range(row)]
    per_target = [_choice_at(speedup, {c: methods[c] for c in candidates}, static, dev_static) for speedup in targets]
    adaptive = [c["speedup"] for c in per_target if c["choice"] == "adaptive"]
    if len(adaptive) == len(per_target):
        verdict = "an adaptive candidate beats the static frontier and its fixed exits on dev at every target"
    elif not adaptive:
        verdict = "no adaptive candidate beats the static frontier on dev at any target: use the models named below"
    else:
        verdict = (f"an adaptive candidate on dev at {', '.join(f'{s:g}x' for s in adaptive)} only; elsewhere the "
                   "models named below")
    return {"variant": best, "criterion": f"max over variants of min over target speedups {low:g}x-{high:g}x of the "
                                         f"mean cross-fitted dev gain over static; last exit within {tolerance:g} pt "
                                         "of plain on dev",
            "dev_worst_gain_points": {v: worst_gain(methods[v]) for v in methods},
            "eligible": candidates, "per_target": per_target, "verdict": verdict}


def _choice_at(speedup: float, methods: dict[str, dict], static: list[dict] | None,
               dev_static: list[dict] | None) -> dict:
    """At one target speedup: the static frontier there, a candidate's fixed exit or a candidate's adaptive point
    (at that speed or faster, by its cross-fitted dev accuracy), whichever `frugalnlp.dev_choice.choose` takes
    on dev (a tie goes to the simpler), with its dev and test gain over the static frontier at the target; where
    that is not an adaptive point, the best adaptive one beside it."""
    def cell(m: dict, key: str, split: str = "dev_comparison") -> float | None:
        row = next((r for r in m.get(split, []) if abs(r["speedup"] - speedup) < 1e-9), None)
        return None if row is None or row.get(key) is None else row[key][0]

    frontier = {split: static_frontier(points, speedup) if points else None
                for split, points in (("dev", dev_static), ("test", static))}
    options = [("static", "static", _static_models(dev_static or static, speedup), frontier["dev"], frontier["test"])]
    for c, m in methods.items():
        if cell(m, "fixed_exit") is not None:
            is_static = m.get("variant", c) == STATIC  # a cascade's member alone is a static model
            options.append(("fixed exit", c, _static_models(dev_static or static, speedup) if is_static
                            else f"{c}'s exit at {speedup:g}x, every example", cell(m, "fixed_exit"),
                            cell(m, "fixed_exit", "comparison")))
    adaptive = [("adaptive", c, f"{c} (threshold chosen on dev)", cell(m, "adaptive_cross_fitted"),
                 cell(m, "adaptive", "comparison"), cell(m, "adaptive")) for c, m in methods.items()]
    options += adaptive
    chosen = choose([Candidate(o[0], o[1], o[3], speedup, o) for o in options if o[3] is not None], speedup)
    choice, candidate, what, accuracy, test, *tuned = options[0] if chosen is None else chosen.item

    def gain(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else 100 * (a - b)

    record = {"speedup": speedup, "choice": choice, "candidate": candidate, "deploy": what, "dev_accuracy": accuracy,
              "dev_accuracy_in_sample": tuned[0] if tuned else accuracy, "test_accuracy": test,
              "dev_gain_over_static": gain(accuracy, frontier["dev"]),
              "test_gain_over_static": gain(test, frontier["test"])}
    beside = choose([Candidate(*o[:2], o[3], speedup, o) for o in adaptive if o[3] is not None], speedup)
    if choice != "adaptive" and beside is not None:
        _, candidate, _, accuracy, test, tuned = beside.item
        record["adaptive_beside"] = {"candidate": candidate, "dev_accuracy": accuracy, "dev_accuracy_in_sample": tuned,
                                     "test_accuracy": test, "dev_gain_over_static": gain(accuracy, frontier["dev"]),
                                     "test_gain_over_static": gain(test, frontier["test"])}
    return record


def _static_models(static: list[dict] | None, speedup: float) -> str:
    """The static model(s) the envelope ``static`` stands on at ``speedup``: one K-layer model (the most accurate
    at that depth, distilled or not), or a random split between the two depths around it."""
    if not static:
        return "the static frontier"
    _, used = static_envelope(static, speedup)
    if not used:  # slower than the target: only reported, never chosen (its dev accuracy is None)
        return f"the static {min(static, key=lambda p: p['layers'])['layers']}-layer model"

    def distilled(p: dict) -> tuple[int, int]:
        """In how many of how many seeds the model standing for this depth was the distilled one."""
        return p.get("distilled_seeds", int(bool(p.get("distilled")))), p.get("seeds", 1)

    def name(p: dict) -> str:
        d, seeds = distilled(p)
        how = "" if not d else " distilled from the full model" if d == seeds else f" (distilled in {d} of {seeds} seeds)"
        return f"{p['layers']}-layer model{how}"

    if len(used) == 1:
        p = used[0]
        d, seeds = distilled(p)
        how = ("" if not d else " --teacher FULL_RUN" if d == seeds
               else ", with and without --teacher FULL_RUN, keeping the better on dev")
        return f"the static {name(p)} (train --method plain --num-layers {p['layers']}{how})"
    both = (f"{used[0]['layers']}- and {used[1]['layers']}-layer models" if name(used[0]).endswith("-layer model")
            and name(used[1]).endswith("-layer model") else f"{name(used[0])} and {name(used[1])}")
    return f"the static {both}, each text sent to one at random in the shares that give this cost"
