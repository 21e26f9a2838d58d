"""The wall-clock frontier: is adaptive inference worth it in seconds, on the runtime a user deploys?

On one runtime (torch fp32, ONNX Runtime fp32 or int8), `run_frontier` measures texts/s against test accuracy
for the plain model (the adaptive run at threshold 1: every layer, no early head), every static model (a
multi-model run's members, each alone, and plain ``--num-layers K`` runs) and the adaptive run at the points
its dev split chooses for each target speedup and policy (exit ensembles and routers run beside the graphs).
Every configuration is timed in one process, interleaved (`frugalnlp.timing.median_times`), on the same test
texts in their own order, so the speeds compare; the static frontier in seconds joins the static models
linearly in time per text (a random share of texts to each of two models costs that) and each adaptive point
is set against it at its own measured speed. At each target, `dev_choices` then picks what to deploy the way a
user would, on dev alone: the most accurate of the adaptive points and the static models at that speed or faster
on dev (in layers, or with ``cost="time"`` in time on this runtime), so the answer can be a static model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from frugalnlp.baselines import best_per_depth, is_distilled, static_frontier
from frugalnlp.curves import COSTS, CurvePoint, SplitScores, dev_scores, exit_scores, split_scores, time_split
from frugalnlp.dev_choice import (Candidate, OperatingTarget, choose, choose_operating_point, cross_fitted_accuracy,
                                  fixed_exit_thresholds, operating_threshold)
from frugalnlp.early_exit.policies import ExitPolicy
from frugalnlp.early_exit.registry import check_policy, make_policy
from frugalnlp.encoding import EncodedSplit, encode_split, unsorted_batches
from frugalnlp.errors import FrugalError
from frugalnlp.report import command_line
from frugalnlp.run import RUNTIMES, TrainedRun, load_run, load_run_config, load_spec_task
from frugalnlp.timing import SegmentTimes, describe_machine, machine, median_times

PRECISIONS = {"torch": ("fp32", "bf16"), "onnx": ("fp32", "int8")}  # bf16: torch.autocast; int8: dynamic


@dataclass
class FrontierSettings:
    runtime: str = "onnx"
    precision: str = "int8"  # ONNX: fp32 or int8 (the linear layers quantized dynamically); torch: fp32 or bf16
    batch_sizes: tuple[int, ...] = (1, 32)
    examples: int = 512  # test texts timed (accuracy is on the whole test split)
    repeats: int = 3
    targets: tuple[float, ...] = (1.5, 2.0, 3.0)  # speedups the dev choice aims at, in `cost`
    policies: tuple[str, ...] = ("confidence", "per-exit+ensemble")
    cost: str = "layers"  # what the targets are in: layers, or time measured on this runtime (`time_split`)
    cost_batch_size: int = 32  # cost "time": the batch size the dev choice's segments are timed at


@dataclass
class Config:
    """One configuration on the frontier: how it answers (``policy``) and what it scores on test."""

    name: str
    kind: str  # plain, static or adaptive
    trained: TrainedRun
    policy: ExitPolicy
    accuracy: float
    speedup_layers: float
    details: dict


def check_settings(settings: FrontierSettings) -> None:
    """FrugalError for a runtime, precision, policy or number out of range (before any model loads)."""
    if settings.runtime not in RUNTIMES:
        raise FrugalError(f"unknown --runtime '{settings.runtime}'; choose one of {', '.join(RUNTIMES)}")
    if settings.precision not in PRECISIONS[settings.runtime]:
        other = {"int8": "--runtime onnx", "bf16": "--runtime torch"}.get(settings.precision)
        raise FrugalError(f"--precision {settings.precision} is not one of {settings.runtime}'s "
                          f"({', '.join(PRECISIONS[settings.runtime])})" + (f"; it needs {other}" if other else ""))
    for flag, values in (("--batch-sizes", settings.batch_sizes), ("--examples", (settings.examples,)),
                         ("--repeats", (settings.repeats,))):
        if not values or min(values) < 1:
            raise FrugalError(f"{flag} must be at least 1")
    if settings.cost not in COSTS:
        raise FrugalError(f"unknown --cost '{settings.cost}'; choose one of {', '.join(COSTS)}")
    if settings.cost_batch_size < 1:
        raise FrugalError("--cost-batch-size must be at least 1")
    if not settings.targets or min(settings.targets) < 1.0:
        raise FrugalError("--targets are speedups of at least 1 (e.g. 1.5,2,3)")
    for policy in settings.policies:
        check_policy(policy.partition("+")[0])
        if policy.partition("+")[2] not in ("", "ensemble"):
            raise FrugalError(f"policy '{policy}': write POLICY or POLICY+ensemble")


def _on_runtime(run: str, settings: FrontierSettings, folder: Path, progress: Callable[[str], None]) -> TrainedRun:
    if settings.runtime == "torch":
        trained = load_run(run)
        trained.model.autocast = torch.bfloat16 if settings.precision == "bf16" else None
        return trained
    from frugalnlp.export import export_dir

    return load_run(export_dir(run, None if settings.precision == "fp32" else settings.precision, folder, progress))


def _configs(candidates: dict[str, TrainedRun], statics: list[TrainedRun], settings: FrontierSettings,
             reference: TrainedRun | None) -> tuple[list[Config], dict[str, SegmentTimes]]:
    """The configurations to time, and per candidate the dev segment times its adaptive points were chosen by
    (cost "time"); ``candidates``: the adaptive runs by name ("" for one run alone: its rows are named by policy
    only); ``reference``: the first run in torch fp32, timed at threshold 1 beside the others (what every
    runtime is sold against)."""
    adaptive = next(iter(candidates.values()))  # its plain model (threshold 1) is the one every speed is over
    model = adaptive.model
    depth = model.exit_layers[-1]
    test = split_scores(adaptive, "test")
    configs = [Config("plain (threshold 1)", "plain", adaptive, make_policy("confidence", 1.0, model.num_exits),
                      test.point("confidence", 1.0).accuracy, 1.0, {"layers": depth})]
    for trained in statics:  # a plain run is one model; a multi-model run's members are each one
        members, scored = trained.model, split_scores(trained, "test")
        n = members.num_exits
        on_dev = split_scores(trained, "dev")
        for k, (exit_score, dev_score) in enumerate(zip(exit_scores(members, scored.exit_logits, scored.gold),
                                                        exit_scores(members, on_dev.exit_logits, on_dev.gold))):
            # a cascade at a fixed exit runs that member alone (the others' exits are never used)
            policy = (make_policy("per-exit", fixed_exit_thresholds(n, k), n) if k < n - 1
                      else make_policy("confidence", 1.0, n))
            layer, distilled = exit_score["layer"], is_distilled(trained.config)
            name = f"static {layer}-layer" + (" distilled" if distilled else "")
            if any(c.name == name for c in configs):  # a second run of that kind: named by its directory
                name += f" ({trained.path.name})"
            configs.append(Config(name, "static", trained, policy, exit_score["accuracy"],
                                  depth / layer, {"layers": layer, "distilled": distilled, "run": str(trained.path),
                                                  "dev_accuracy": dev_score["accuracy"], "dev_speedup": depth / layer}))
    times = {}
    for candidate, trained in candidates.items():
        times[candidate] = time_split(trained, "dev", settings.cost_batch_size) if settings.cost == "time" else None
        configs += _adaptive_configs(candidate, trained, times[candidate], settings)
    if reference is not None:
        n = reference.model.num_exits
        configs.append(Config("plain, torch fp32 (reference)", "reference", reference, make_policy("confidence", 1.0, n),
                              split_scores(reference, "test").point("confidence", 1.0).accuracy, 1.0, {"layers": depth}))
    if settings.cost == "time":
        _time_statics_on_dev(configs, settings)
    return configs, times


def _adaptive_configs(candidate: str, trained: TrainedRun, times: SegmentTimes | None,
                      settings: FrontierSettings) -> list[Config]:
    """One candidate run's dev choice per policy and target (in ``settings.cost``; ``times``: its dev segments')."""
    configs = []
    for name in settings.policies:
        policy_name, _, ensemble = name.partition("+")
        dev = dev_scores(trained, bool(ensemble), policy_name)
        dev.times = times
        reported = split_scores(trained, "test", dev.ensemble)
        reported.use_router(dev.router)

        def choose_on(part: SplitScores, curve: list[CurvePoint], target: float) -> tuple[str, float | list[float]]:
            chosen = choose_operating_point(curve, part, OperatingTarget(speedup=target, policy=policy_name,
                                                                         cost=settings.cost))
            return chosen.policy, chosen.point.threshold

        cross_fitted = cross_fitted_accuracy(dev, policy_name, settings.targets, choose_on)
        for target, honest in zip(settings.targets, cross_fitted):
            try:
                chosen = operating_threshold(dev, OperatingTarget(speedup=target, policy=policy_name,
                                                                  cost=settings.cost))
            except FrugalError:  # dev never gets that fast
                continue
            point = reported.point(chosen.policy, chosen.point.threshold)
            policy = make_policy(chosen.policy, chosen.point.threshold, trained.model.num_exits, dev.ensemble,
                                 chosen.router)
            details = {"policy": name, "deployed_policy": chosen.policy, "target_speedup": target,
                       "threshold": chosen.point.threshold, "dev_accuracy": chosen.point.accuracy,
                       "dev_accuracy_cross_fitted": honest,
                       "dev_speedup": chosen.point.speedup, "candidate": candidate, "run": str(trained.path)}
            label = f"{candidate} [{name}]" if candidate else name
            configs.append(Config(f"adaptive {label} @ {target:g}x {settings.cost}", "adaptive", trained, policy,
                                  point.accuracy, point.speedup_layers, details))
    return configs


def _time_configs(configs: list[Config], data: EncodedSplit, batch_size: int, repeats: int) -> dict[str, float]:
    """Median seconds of each configuration predicting ``data`` in batches of ``batch_size`` in its own order,
    interleaved across ``repeats`` (`median_times`)."""
    tokenizer = configs[0].trained.tokenizer  # every configuration is of one task and model
    batches = unsorted_batches(data, tokenizer, batch_size)
    with torch.inference_mode():
        return median_times({c.name: (lambda c=c: [c.trained.model.predict(**b, policy=c.policy) for b in batches])
                             for c in configs}, repeats)


def _time_statics_on_dev(configs: list[Config], settings: FrontierSettings, examples: int = 256) -> None:
    """Cost "time": each static model's dev speedup measured on this runtime, as its time per text over the plain
    model's on the first ``examples`` dev texts at the cost batch size (interleaved medians), so static models
    compete with the adaptive points (whose dev speedups the segment times model) in the same unit."""
    plain = next(c for c in configs if c.kind == "plain")
    statics = [c for c in configs if c.kind == "static"]
    if not statics:
        return
    split = load_spec_task(plain.trained.spec).dev
    data = encode_split(split.take(range(min(examples, len(split)))), plain.trained.tokenizer,
                        plain.trained.spec.max_length)
    seconds = _time_configs([plain, *statics], data, settings.cost_batch_size, settings.repeats)
    for c in statics:
        c.details["dev_speedup"] = seconds[plain.name] / seconds[c.name]


def run_frontier(run: str | dict[str, str], static: list[str], settings: FrontierSettings | None = None,
                 progress: Callable[[str], None] = print) -> dict:
    """Texts/s at each batch size and test accuracy of the plain model, every static model and the adaptive dev
    choices of ``run``, on ``settings.runtime``; JSON-ready. ``run``: one run, or several candidate runs by name
    (the demo's variants: their adaptive points compete in one choice; the first's plain model is the reference).
    ``static``: multi-model runs (every member alone) or plain ``--num-layers K`` runs of the same task and model
    (default: ``run`` itself if it is a multi-model run)."""
    settings = settings or FrontierSettings()
    check_settings(settings)
    runs = {"": run} if isinstance(run, (str, Path)) else dict(run)
    run = next(iter(runs.values()))
    config = load_run_config(run)
    static = static or ([run] if len(runs) == 1 and config["spec"]["method"] == "multi-model" else [])
    for other in static:
        method = load_run_config(other)["spec"]["method"]
        if method not in ("multi-model", "plain"):
            raise FrugalError(f"--static {other} is a {method} run; give a multi-model run or plain --num-layers runs")
    with tempfile.TemporaryDirectory(prefix="frugalnlp-frontier-") as tmp:
        candidates = {name: _on_runtime(path, settings, Path(tmp), progress) for name, path in runs.items()}
        adaptive = next(iter(candidates.values()))
        statics = [_on_runtime(other, settings, Path(tmp), progress) for other in static]
        torch_fp32 = settings.runtime == "torch" and settings.precision == "fp32"
        configs, times = _configs(candidates, statics, settings, None if torch_fp32 else load_run(run))
        split = load_spec_task(adaptive.spec).test
        timed = split.take(range(min(settings.examples, len(split))))
        segment_times = {name: None if t is None else t.to_dict() for name, t in times.items()}
        results = {"run": str(run), "static": list(static), "settings": asdict(settings), "command": command_line(),
                   "machine": machine(), "candidates": {name: str(path) for name, path in runs.items()},
                   "dev_segment_times": segment_times[""] if len(runs) == 1 else segment_times,
                   "examples_timed": len(timed), "test_examples": len(split), "batch_sizes": {}, "rows": []}
        data = encode_split(timed, adaptive.tokenizer, adaptive.spec.max_length)
        measured = {}
        for batch_size in settings.batch_sizes:
            progress(f"timing {len(configs)} configurations at batch size {batch_size}")
            measured[batch_size] = _time_configs(configs, data, batch_size, settings.repeats)
    for c in configs:
        speeds = {str(b): len(timed) / measured[b][c.name] for b in settings.batch_sizes}
        results["rows"].append({"name": c.name, "kind": c.kind, "accuracy": c.accuracy,
                                "speedup_layers": c.speedup_layers, **c.details, "texts_per_second": speeds})
    _compare(results)
    results["dev_choices"] = dev_choices(results)
    return results


def dev_choices(results: dict) -> list[dict]:
    """At each target speedup, what to deploy chosen on dev alone: of the adaptive points and the static models
    whose dev speedup (in the settings' cost) is at least the target, the most accurate on dev
    (`frugalnlp.dev_choice.choose`: a tie goes to the static model, one graph with nothing to tune), an adaptive
    point by its cross-fitted dev accuracy (`frugalnlp.dev_choice.cross_fitted_accuracy`), since a static model
    has nothing to tune on dev; beside a static choice, the best adaptive point (``adaptive_beside``). Each
    choice is read on test: its accuracy, measured speedup and
    gain over the static frontier at its measured speed, per batch size (a static model's own gain is 0 unless
    another static model beats it in measured time). None where nothing reaches the target on dev."""
    candidates = [Candidate(r["kind"], r["name"], r.get("dev_accuracy_cross_fitted", r["dev_accuracy"]),
                            r["dev_speedup"], r) for r in results["rows"] if r["kind"] in ("static", "adaptive")]
    candidates = [c for c in candidates if c.dev_accuracy is not None]  # a dev half never got that fast
    choices = []
    for target in results["settings"]["targets"]:
        chosen = choose(candidates, target_speedup=target)
        choice = {"target_speedup": target, "cost": results["settings"]["cost"], "choice": None}

        def read(c: Candidate) -> dict:
            r = c.item
            return {"choice": r["name"], "kind": r["kind"], "dev_accuracy": c.dev_accuracy,
                    "dev_accuracy_in_sample": r["dev_accuracy"], "dev_speedup": r["dev_speedup"],
                    "accuracy": r["accuracy"], "measured_speedup": r["measured_speedup"],
                    "gain_over_static": r["gain_over_static"]}

        if chosen is not None:
            choice.update(read(chosen))
            beside = choose([c for c in candidates if c.kind == "adaptive"], target_speedup=target)
            if chosen.kind != "adaptive" and beside is not None:
                choice["adaptive_beside"] = read(beside)  # what the static model was preferred to
        choices.append(choice)
    return choices


def _compare(results: dict) -> None:
    """Per batch size: each row's measured speedup over plain and, for adaptive and static rows, the static
    frontier in measured time at that speed and the gain over it (points; a static model on the frontier: 0)."""
    rows = results["rows"]
    plain = next(r for r in rows if r["kind"] == "plain")
    reference = next((r for r in rows if r["kind"] == "reference"), plain)  # plain in torch fp32
    for b in map(str, results["settings"]["batch_sizes"]):
        base = plain["texts_per_second"][b]
        # the static frontier in seconds: cost = time per text relative to plain's
        static = [{"layers": r["layers"], "layers_share": base / r["texts_per_second"][b], "accuracy": r["accuracy"]}
                  for r in rows if r["kind"] == "static"]
        for r in rows:
            speedup = r["texts_per_second"][b] / base
            r.setdefault("measured_speedup", {})[b] = speedup
            r.setdefault("vs_torch_fp32", {})[b] = r["texts_per_second"][b] / reference["texts_per_second"][b]
            if r["kind"] in ("adaptive", "static"):
                frontier = static_frontier(static, speedup) if static else None
                r.setdefault("static_at_measured_speed", {})[b] = frontier
                r.setdefault("gain_over_static", {})[b] = None if frontier is None else 100 * (r["accuracy"] - frontier)


def format_frontier(results: dict) -> str:
    s = results["settings"]
    runtime = f"{'torch' if s['runtime'] == 'torch' else 'ONNX Runtime'} {s['precision']}"
    sizes = [str(b) for b in s["batch_sizes"]]
    lines = [f"{runtime}: {results['examples_timed']} test texts timed in their own order (medians of {s['repeats']} "
             f"interleaved repeats, tokenisation not counted); accuracy on all {results['test_examples']} test texts; "
             "speedups are measured texts/s over plain's in this run; the static frontier is read at each row's "
             "measured speed (linear in time per text between static models); dev speedup: what the choice on dev "
             "sees, in layers, or (`--cost time`, batch " f"{s['cost_batch_size']}) in time: an adaptive point's "
             "modelled from its segments' timings on dev, a static model's measured on dev",
             f"machine: {describe_machine(results.get('machine'))}", ""]
    head = "| configuration | test accuracy | layers speedup | dev speedup | " + " | ".join(
        f"batch {b}: texts/s (measured speedup; vs plain torch fp32) | batch {b}: static at that speed | "
        f"batch {b}: gain (pts)" for b in sizes)
    lines += [head + " |", "|---|---|---|---|" + "---|---|---|" * len(sizes)]

    def cell(value, fmt):
        return "—" if value is None else fmt.format(value)

    for r in results["rows"]:
        cells = []
        for b in sizes:
            cells += [f"{r['texts_per_second'][b]:.0f} ({r['measured_speedup'][b]:.2f}x; {r['vs_torch_fp32'][b]:.2f}x)",
                      cell(r.get("static_at_measured_speed", {}).get(b), "{:.3f}"),
                      cell(r.get("gain_over_static", {}).get(b), "{:+.1f}")]
        dev_speedup = cell(r.get("dev_speedup"), "{:.2f}x " + s["cost"])
        lines.append(f"| {r['name']} | {r['accuracy']:.3f} | {r['speedup_layers']:.2f}x | {dev_speedup} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"What to deploy at each target, chosen on dev (`dev_choices`): the most accurate on dev of the "
              f"adaptive points and static models at that speed or faster on dev, in {s['cost']} (an adaptive "
              "point's dev accuracy cross-fitted: thresholds tuned on one half of dev, read on the other); where a "
              "static model wins, the best adaptive point is shown beside it", "",
              "| target | chosen on dev | dev accuracy | dev speedup | test accuracy | "
              + " | ".join(f"batch {b}: measured speedup | batch {b}: gain over static (pts)" for b in sizes) + " |",
              "|---|---|---|---|---|" + "---|---|" * len(sizes)]
    for c in results.get("dev_choices", []):
        if c["choice"] is None:
            lines.append(f"| {c['target_speedup']:g}x | nothing reaches it on dev |" + " — |" * (3 + 2 * len(sizes)))
            continue
        for label, d in ((f"{c['target_speedup']:g}x", c), ("", c.get("adaptive_beside"))):
            if d is None:
                continue
            cells = [f"{d['measured_speedup'][b]:.2f}x | {cell(d['gain_over_static'][b], '{:+.1f}')}" for b in sizes]
            name = d["choice"] if label else f"beside it: {d['choice']}"
            lines.append(f"| {label} | {name} | {d['dev_accuracy']:.3f} | {d['dev_speedup']:.2f}x | "
                         f"{d['accuracy']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(results: dict, path: str | Path) -> None:
    """Test accuracy against measured texts/s, one panel per batch size: the static models joined (the frontier),
    plain, each policy's adaptive points joined across targets, and what dev chose at each target ringed."""
    from frugalnlp.report import new_figure, save_figure

    sizes = [str(b) for b in results["settings"]["batch_sizes"]]
    fig, axes = new_figure(ncols=len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
    rows = results["rows"]
    for ax, b in zip(axes[0], sizes):
        static = [r for r in rows if r["kind"] == "static"]
        envelope = sorted(best_per_depth(static), key=lambda r: r["texts_per_second"][b])
        if envelope:
            ax.plot([r["texts_per_second"][b] for r in envelope], [r["accuracy"] for r in envelope], "s-", color="0.3",
                    label="static models (envelope)")
            others = [r for r in static if r not in envelope]
            if others:
                ax.plot([r["texts_per_second"][b] for r in others], [r["accuracy"] for r in others], "s",
                        color="0.6", markerfacecolor="none", label="static models below it")
            for r in static:
                ax.annotate(f"{r['layers']}L" + (" d" if r.get("distilled") else ""),
                            (r["texts_per_second"][b], r["accuracy"]), fontsize=7, textcoords="offset points",
                            xytext=(3, -9))
        plain = next(r for r in rows if r["kind"] == "plain")
        ax.plot([plain["texts_per_second"][b]], [plain["accuracy"]], "k*", markersize=10, label="plain (threshold 1)")
        for k, policy in enumerate(dict.fromkeys(r["policy"] for r in rows if r["kind"] == "adaptive")):
            points = sorted((r for r in rows if r["kind"] == "adaptive" and r["policy"] == policy),
                            key=lambda r: r["texts_per_second"][b])
            ax.plot([r["texts_per_second"][b] for r in points], [r["accuracy"] for r in points],
                    ["o", "^", "v", "D"][k % 4] + "--", label=f"adaptive {policy} (dev choice)")
        chosen = [next(r for r in rows if r["name"] == c["choice"]) for c in results.get("dev_choices", [])
                  if c["choice"] is not None]
        if chosen:
            ax.plot([r["texts_per_second"][b] for r in chosen], [r["accuracy"] for r in chosen], "o", markersize=13,
                    markerfacecolor="none", markeredgecolor="crimson", label="deployed per target (chosen on dev)")
        ax.set_xlabel(f"measured texts/s, batch {b}")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    s = results["settings"]
    runtime = f"{'torch' if s['runtime'] == 'torch' else 'ONNX Runtime'} {s['precision']}"
    fig.suptitle(f"{Path(results['run']).name}: accuracy against measured speed, {runtime}", fontsize=10)
    save_figure(fig, path)
