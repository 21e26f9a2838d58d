"""`frugalnlp demo`: adaptive methods and recipes against the static frontier, on the same data and seeds.

Each (seed, variant) is an ordinary training run under ``OUTPUT/seed-S/VARIANT`` followed by a test
curve; rerunning with ``--resume`` skips the runs already finished. Every seed also trains the
static models: the Multi-Model run (its members alone are static models at the exit depths, its last member
the plain full-depth model, which teaches the variants and static models that distil from a teacher) and a
plain ``--num-layers K`` run at every other depth of ``--static-layers`` (every depth on encoders of up to 6
layers), each also distilled with ``--static-distill``. The static frontier is their upper envelope.

Every (variant, policy) pair is a candidate (``--policies``, each ``POLICY`` or ``POLICY+ensemble``),
chosen on dev together; ``--certify`` adds each candidate's Learn-then-Test points with their test drops.
What dev chooses at each target is written, from the first seed's runs, as ``OUTPUT/deploy/<target>x``
(`frugalnlp.deploy`), which ``predict`` and ``serve`` run with no other flags.

A variant is ``METHOD[:key=value...]`` with METHOD one of joint, sweet, two-stage, multi-model and
keys boundary-grad, distill (self or teacher), distill-alpha, distill-temperature, exit-weights,
e.g. ``joint:boundary-grad=0.5:distill=self``.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from transformers import AutoConfig

from frugalnlp.assets import resolve_model
from frugalnlp.atomic import write_bytes, write_json
from frugalnlp.baselines import static_frontier, static_points, table_speedups
from frugalnlp.curves import CurvePoint, accuracy_at_speedup
from frugalnlp.defaults import DEMO_MAX_LENGTH, DEMO_METHODS, DEMO_POLICIES, DEMO_TRAIN_SIZE, default_static_layers
from frugalnlp.demo_seconds import answer_in_seconds
from frugalnlp.demo_choice import STATIC, select_on_dev
from frugalnlp.deploy import deploy_dir, format_deploy
from frugalnlp.dev_choice import Candidate, OperatingTarget, choose
from frugalnlp.early_exit.config import ExitRecipe
from frugalnlp.early_exit.registry import check_policy
from frugalnlp.encoding import load_tokenizer
from frugalnlp.errors import FrugalError, check_seed
from frugalnlp.evaluation import certified_point, evaluate_run, evaluation_dir
from frugalnlp.frontier import FrontierSettings, check_settings, format_frontier
from frugalnlp.manifest import verify_manifest, write_manifest
from frugalnlp.methods import METHODS
from frugalnlp.report import command_line, format_comparison, plot_curves
from frugalnlp.run import RunSpec, load_run_config, load_spec_task, spec_inputs
from frugalnlp.rundir import RunDir
from frugalnlp.training import check_spec, check_teacher, train_run

SPEEDUPS = (1.5, 2.0, 3.0)
RECIPE_KEYS = {ExitRecipe.flag(f.name)[2:]: f for f in fields(ExitRecipe)}  # boundary-grad -> its field


@dataclass
class DemoSpec:
    """One `frugalnlp demo`: every variant (``METHOD[:key=value...]``) trained with every seed on ``base``'s
    data, model and recipe, beside the static frontier and the oracle."""

    output: str = "demo"
    base: RunSpec = field(default_factory=lambda: RunSpec(output="", train_size=DEMO_TRAIN_SIZE,
                                                           max_length=DEMO_MAX_LENGTH))
    methods: list[str] = field(default_factory=lambda: list(DEMO_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    # exit policies, each as POLICY or POLICY+ensemble; every (variant, policy) pair is a candidate on dev
    policies: list[str] = field(default_factory=lambda: list(DEMO_POLICIES))
    certify: list[float] = field(default_factory=list)  # max drops ε certified (Learn-then-Test) for each candidate
    risk: float = 0.1  # δ of those certificates
    # depths of the static models trained beside the multi-model run's members: a list, "all", or None for
    # `default_static_layers`
    static_layers: list[int] | str | None = None
    static_distill: bool = False  # each static model shallower than the encoder also distilled from the full one
    # `timed`: choose and deploy in measured seconds on this runtime (`frugalnlp.demo_seconds`), else in layers
    timed: FrontierSettings | None = None


def parse_variant(variant: str, base: RunSpec) -> RunSpec:
    """``METHOD[:key=value...]`` -> the run spec of that variant (``base`` gives everything else).

    Recipe fields the method does not take are left at their defaults, whatever the demo-wide ``base`` says.
    """
    name, *options = variant.split(":")
    if name not in METHODS:
        raise FrugalError(f"demo variant '{variant}': unknown method '{name}'; choose one of {', '.join(METHODS)}")
    method = METHODS[name]
    values: dict = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in RECIPE_KEYS:
            raise FrugalError(f"demo variant '{variant}': '{option}' is not KEY=VALUE with KEY one of "
                              f"{', '.join(RECIPE_KEYS)}")
        try:
            values[RECIPE_KEYS[key].name] = RECIPE_KEYS[key].metadata["type"](value)
        except ValueError:
            raise FrugalError(f"demo variant '{variant}': {key} needs a number, not '{value}'")
    refused = [ExitRecipe.flag(k)[2:] for k in values if k not in method.recipe_fields]
    if refused and not method.recipe_fields:
        *most, last = [n for n, m in METHODS.items() if m.recipe_fields]
        raise FrugalError(f"demo variant '{variant}': recipe options need {', '.join(most)} or {last}")
    if refused:
        raise FrugalError(f"demo variant '{variant}': {name} takes no {', '.join(refused)}")
    defaults = ExitRecipe()
    recipe = replace(base.recipe, **{f: getattr(defaults, f) for f in asdict(defaults) if f not in method.recipe_fields},
                     **values)
    teacher = base.teacher if "distill" in method.recipe_fields else None
    if teacher and recipe.distill is None:
        recipe = replace(recipe, distill="teacher")
    return replace(base, method=name, recipe=recipe, teacher=teacher)


def static_runs(spec: DemoSpec, num_layers: int, exit_layers: list[int]) -> dict[str, RunSpec]:
    """The static models trained beside the multi-model run (whose members are static models at the exit depths):
    a plain ``--num-layers K`` run at every other depth of ``spec.static_layers``, and with ``static_distill``
    every depth below the encoder's distilled from the full model (``--teacher``: the multi-model run's last
    member unless the demo names one), with the recipe's distillation settings. Run name -> spec (no seed:
    set per seed)."""
    depths = spec.static_layers
    if depths is None:
        depths = default_static_layers(num_layers, exit_layers)
    elif depths == "all":
        depths = list(range(1, num_layers + 1))
    for k in depths:
        if not 1 <= k <= num_layers:
            raise FrugalError(f"--static-layers {k} is out of range: this model has layers 1..{num_layers}")
    base = replace(spec.base, method="plain", exit_layers=None, recipe=ExitRecipe(), teacher=None)
    runs = {f"static-{k}": replace(base, num_layers=k) for k in sorted(set(depths)) if k not in exit_layers}
    if spec.static_distill:
        recipe = ExitRecipe(distill="teacher", distill_alpha=spec.base.recipe.distill_alpha,
                            distill_temperature=spec.base.recipe.distill_temperature)
        runs.update({f"static-{k}-distilled": replace(base, num_layers=k, recipe=recipe, teacher=spec.base.teacher)
                     for k in sorted(set(depths)) if k < num_layers})
    return runs


def _run_name(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", variant.replace("=", "-"))


def _mean_std(values: list[float | None]) -> list[float] | None:
    if not values or any(v is None for v in values):
        return None
    return [float(np.mean(values)), float(np.std(values))]


def _fmt(ms: list[float] | None, seeds: int) -> str:
    if ms is None:
        return "—"
    return f"{ms[0]:.3f}" + (f" ± {ms[1]:.3f}" if seeds > 1 else "")


@dataclass
class _Variant:
    """What every seed's run of one variant gave: test exits, curves and comparisons (dev and test)."""

    spec: RunSpec
    exits: list[list[float]] = field(default_factory=list)
    curves: list[list[CurvePoint]] = field(default_factory=list)
    comparisons: list[list[dict]] = field(default_factory=list)
    dev_comparisons: list[list[dict]] = field(default_factory=list)
    last_vs_plain: list[float] = field(default_factory=list)
    dev_last_vs_plain: list[float] = field(default_factory=list)

    def add(self, metrics: dict, plain: dict, evaluation: dict) -> None:
        self.exits.append([e["accuracy"] for e in metrics["test"]["exits"]])
        self.curves.append([CurvePoint.from_dict(p) for p in evaluation["points"]])
        self.comparisons.append(evaluation["comparison"])
        self.dev_comparisons.append(evaluation["dev_comparison"])
        self.last_vs_plain.append(100 * (metrics["test"]["accuracy"] - plain["test"]["accuracy"]))
        self.dev_last_vs_plain.append(100 * (metrics["dev"]["accuracy"] - plain["dev"]["accuracy"]))

    def summary(self) -> dict:
        exits = np.array(self.exits)
        recipe = {"method": self.spec.method, **asdict(self.spec.recipe)}
        return {
            "spec": recipe,
            "exit_accuracy_mean": exits.mean(0).tolist(), "exit_accuracy_std": exits.std(0).tolist(),
            "exit_accuracy_per_seed": exits.tolist(),
            "last_exit_vs_plain_points": _mean_std(self.last_vs_plain),
            "accuracy_at_speedup": {str(s): _mean_std([accuracy_at_speedup(c, s) for c in self.curves])
                                    for s in SPEEDUPS},
            "comparison": _mean_comparison(self.comparisons),
            "comparison_per_seed": self.comparisons,
            "dev_comparison": _mean_comparison(self.dev_comparisons),
            "dev_last_exit_vs_plain_points": _mean_std(self.dev_last_vs_plain),
            "mean_curve": _mean_curve(self.curves),
        }


def run_demo(spec: DemoSpec, overwrite: bool = False, resume: bool = False) -> dict:
    """Train and evaluate every variant for every seed; print and write the comparison (``results.json``,
    ``report.md``, ``curves.png``); returns the summary."""
    started = time.perf_counter()
    base, seeds = spec.base, spec.seeds
    if not seeds:
        raise FrugalError("--seeds is empty; give e.g. --seeds 0,1,2")
    for seed in seeds:
        check_seed(seed, "--seeds")
    names = list(dict.fromkeys([*spec.methods, STATIC]))  # the static frontier is always trained
    policies = [_policy(p) for p in spec.policies or ["confidence"]]
    for eps in spec.certify:
        OperatingTarget(max_drop=eps, risk=spec.risk)  # checked before any training
    if spec.timed is not None:
        check_settings(spec.timed)
        if spec.timed.runtime == "torch" and spec.timed.precision != "fp32":
            raise FrugalError("demo --cost time on torch deploys in fp32: give --precision fp32 (or --runtime onnx)")
    specs = {v: parse_variant(v, base) for v in names}
    specs[STATIC] = replace(specs[STATIC], recipe=ExitRecipe(), teacher=None)  # trained on labels: it teaches
    # one candidate per (variant, policy); with the confidence policy alone, named by the variant
    candidates = {_candidate(v, p, len(policies)): (v, p) for v in names for p in policies}
    variants = {c: _Variant(specs[v]) for c, (v, _) in candidates.items()}
    certified: dict[str, dict[str, list[dict]]] = {c: {f"{eps:g}": [] for eps in spec.certify} for c in candidates}
    for v, variant_spec in specs.items():
        if variant_spec.method == "plain":
            raise FrugalError(f"demo variant '{v}': plain has no exits (the static frontier is trained anyway)")
        check_spec(replace(variant_spec, teacher=variant_spec.teacher
                           or ("static" if variant_spec.recipe.distill == "teacher" else None)))
    num_layers = AutoConfig.from_pretrained(resolve_model(base.model)).num_hidden_layers  # a bad model fails here
    exit_layers = METHODS[STATIC].exit_layers(base, num_layers)  # the multi-model members' depths
    statics = static_runs(spec, num_layers, exit_layers)
    task = load_spec_task(base)  # and a bad task, file or column here: before the output is created
    if base.teacher:
        check_teacher(base.teacher, task, load_tokenizer(resolve_model(base.model)))
    out = RunDir(spec.output, overwrite=overwrite, resume=resume, kind="demo", inputs=spec_inputs(base))
    out.open(spec={k: v for k, v in asdict(spec).items() if k != "output"})  # --resume with other settings: refused
    static_by_seed, static_corrected_by_seed, dev_static_by_seed, oracles, layers = {}, {}, {}, [], None
    static_paths: dict[int, list[str]] = {}
    for seed in seeds:
        static_run = out.path / f"seed-{seed}" / _run_name(STATIC)

        def train(name: str, run_spec: RunSpec, run: Path) -> None:
            if not (run / "metrics.json").exists():
                teacher = run_spec.teacher or str(static_run)  # default teacher: the plain full-depth member
                print(f"== seed {seed}: training {name}", file=sys.stderr)
                train_run(replace(run_spec, output=str(run), seed=seed,
                                  teacher=teacher if run_spec.recipe.distill == "teacher" else None),
                          resume=run.with_name(run.name + ".partial").exists())

        train(STATIC, specs[STATIC], static_run)
        static = static_paths[seed] = [str(static_run)]
        for name, static_spec in statics.items():
            train(name, static_spec, out.path / f"seed-{seed}" / name)
            static.append(str(out.path / f"seed-{seed}" / name))
        for v in names:
            run = out.path / f"seed-{seed}" / _run_name(v)
            train(v, specs[v], run)
            metrics = json.loads((run / "metrics.json").read_text())
            layers = [e["layer"] for e in metrics["test"]["exits"]]
            for policy in policies:
                evaluation = _evaluation(run, static, *policy)
                variants[_candidate(v, policy, len(policies))].add(
                    metrics, json.loads((static_run / "metrics.json").read_text()), evaluation)
                oracles.append(evaluation["baselines"]["oracle"])
                if v == STATIC and policy == policies[0]:
                    static_by_seed[seed] = evaluation["baselines"]["static"]
                    dev_static_by_seed[seed] = static_points(static, "dev", load_run_config(static_run), layers[-1])
                    static_corrected_by_seed[seed] = evaluation["baselines"]["static_corrected"]
                for eps in spec.certify:
                    certified[_candidate(v, policy, len(policies))][f"{eps:g}"].append(
                        _certified(run, *policy, eps, spec.risk))

    summary = {"task": base.task or Path(base.train_file).stem, "model": base.model, "seeds": list(seeds),
               "train_size": base.train_size, "epochs": base.epochs, "max_length": base.max_length,
               "exit_layers": layers, "speedups": table_speedups(layers),
               "static_runs": {"multi-model members": layers, **{n: s.num_layers for n, s in statics.items()}},
               "static_distill": spec.static_distill,
               "static": _mean_static(list(static_by_seed.values())),
               "static_corrected": _mean_static(list(static_corrected_by_seed.values())),
               "dev_static": _mean_static(list(dev_static_by_seed.values())),
               "oracle": _best_oracle(oracles, len(seeds)), "policies": list(spec.policies),
               "methods": {c: {**variant.summary(), "variant": candidates[c][0], "policy": _policy_name(candidates[c][1])}
                           for c, variant in variants.items()},
               "certified": {"risk": spec.risk, "per_candidate": certified} if spec.certify else None}
    summary["selected_on_dev"] = select_on_dev(summary["methods"], summary["static"], summary["dev_static"])
    summary["command"] = command_line()
    table = format_table(summary)
    if spec.timed is None:
        summary["deploy"] = deploy_choices(out.path, summary, seeds[0], static_by_seed[seeds[0]],
                                           dev_static_by_seed[seeds[0]])
    else:  # the answer in measured seconds, on seed 0's runs: what a user deploys is one trained model
        runs = {v: out.path / f"seed-{seeds[0]}" / _run_name(v) for v in names}
        facts = {"seed": seeds[0], "full_depth": layers[-1], "command": summary["command"]}
        timed, summary["deploy"] = answer_in_seconds(out.path, runs, static_paths[seeds[0]], spec.timed, facts,
                                                     progress=lambda message: print(message, file=sys.stderr))
        summary["in_seconds"] = {k: timed[k] for k in ("settings", "machine", "dev_choices")}
        table += "\n\nIn measured seconds, seed " + f"{seeds[0]}'s runs:\n\n" + format_frontier(timed)
    summary["seconds"] = time.perf_counter() - started
    table += "\n\n" + format_deploy(summary["deploy"], seeds[0])
    print(table)
    write_json(out.path / "results.json", summary)
    plot_curves({m: (s["mean_curve"]["mean"], s["mean_curve"]["std"]) for m, s in summary["methods"].items()},
                out.path / "curves.png",
                title=f"{summary['task']}, {base.model}, train size {base.train_size}, seeds {list(seeds)}",
                baselines={"static": summary["static"], "oracle": summary["oracle"]})
    write_bytes(out.path / "report.md", (f"# frugalnlp demo: {summary['task']}\n\n{table}\n\n![curves](curves.png)\n").encode())
    out.commit()
    return summary


def deploy_choices(out: Path, summary: dict, seed: int, test_static: list[dict], dev_static: list[dict]) -> list[dict]:
    """Per target, the dev choice (``summary["selected_on_dev"]``) handed over as ``OUTPUT/deploy/<target>x``
    (`frugalnlp.deploy.deploy_dir`), from seed ``seed``'s runs: a static choice deploys that seed's best static
    model on dev at the target (`frugalnlp.dev_choice.choose`), an adaptive or fixed-exit choice the candidate's
    run at its own dev-chosen point for the target. Returns each card's summary."""
    depth = summary["exit_layers"][-1]
    written = []
    for choice in summary["selected_on_dev"]["per_target"]:
        target, folder = choice["speedup"], out / "deploy" / f"{choice['speedup']:g}x"
        shutil.rmtree(folder, ignore_errors=True)  # what a resumed demo writes again
        method = summary["methods"].get(choice["candidate"], {})
        member = None
        member_alone = choice["choice"] == "fixed exit" and method.get("variant") == STATIC  # a static model
        if choice["choice"] == "static" or member_alone:
            best = choose([Candidate("static", p["run"], p["accuracy"], p["speedup_layers"], p) for p in dev_static],
                          target)
            if best is None:
                continue
            point = best.item
            run, policy, ensemble = Path(point["run"]), "confidence", False
            member = point["layers"] if load_run_config(run)["spec"]["method"] == STATIC else None
            what = f"the static {point['layers']}-layer model" + (" (distilled)" if point["distilled"] else "")
        else:
            run = out / f"seed-{seed}" / _run_name(method["variant"])
            (policy, ensemble), what = _policy(method["policy"]), choice["deploy"]
        print(f"== deploying {what} at {target:g}x to {folder}", file=sys.stderr)
        card = deploy_dir(folder, run, target, policy, ensemble, member, facts={
            "choice": choice["choice"], "candidate": choice["candidate"], "deploy": what, "seed": seed,
            "source_run": str(run.relative_to(out)), "full_depth": depth,
            "static_on_test": static_frontier(test_static, target), "command": summary["command"]})
        written.append({"target_speedup": target, "path": str(folder.relative_to(out)), "deploy": what,
                        "policy": card["policy"], "test_accuracy": card["test"]["accuracy"],
                        "test_speedup_layers": card["test"]["speedup_layers"],
                        "test_gain_over_static": card["test_gain_over_static"]})
    return written


def _policy(text: str) -> tuple[str, bool]:
    """``POLICY`` or ``POLICY+ensemble`` -> (policy, ensemble)."""
    name, plus, extra = text.partition("+")
    if plus and extra != "ensemble":
        raise FrugalError(f"demo policy '{text}': write POLICY or POLICY+ensemble")
    check_policy(name)
    return name, bool(plus)


def _policy_name(policy: tuple[str, bool]) -> str:
    return policy[0] + ("+ensemble" if policy[1] else "")


def _candidate(variant: str, policy: tuple[str, bool], policies: int) -> str:
    return variant if policies == 1 and policy == ("confidence", False) else f"{variant} [{_policy_name(policy)}]"


def _evaluation(run: Path, static: list[str], policy: str = "confidence", ensemble: bool = False) -> dict:
    """The run's test curve beside its baselines (``static``: the static runs of its seed): evaluated now, or as
    an earlier pass of this demo left it against the same static runs."""
    saved = evaluation_dir(run, "test", policy + ("-ensemble" if ensemble else "")) / "curve.json"
    evaluation = json.loads(saved.read_text()) if saved.exists() and _verified(saved.parent) else {}
    if (evaluation.get("static_runs") != static or "ceiling" not in evaluation.get("baselines", {})
            or "adaptive_cross_fitted" not in evaluation["dev_comparison"][0]):  # written by an older version
        evaluation = evaluate_run(run, split="test", static=static, overwrite=True, policy=policy,
                                  output=saved.parent, ensemble=ensemble)[1]
    return evaluation


def _verified(output: Path) -> bool:
    """Whether an earlier output's files are still the ones its manifest lists (else it is computed again)."""
    try:
        verify_manifest(output, "")
        return True
    except FrugalError:
        return False


def _certified(run: Path, policy: str, ensemble: bool, epsilon: float, risk: float) -> dict:
    """The run's Learn-then-Test point for ``policy`` at max drop ``epsilon``: dev and test speedups and the drop
    the test split realises against the last exit (computed once, then read from the run's evaluations)."""
    out = evaluation_dir(run, "test", f"{policy}{'+ensemble' if ensemble else ''}-certified-{epsilon:g}-{risk:g}")
    saved, earlier = out / "certified.json", out / "curve.json"  # curve.json: a demo that ran a full evaluation
    if saved.exists() and _verified(out):
        point = json.loads(saved.read_text())
    elif earlier.exists() and _verified(out):
        point = json.loads(earlier.read_text())["operating_point"]
    else:
        point = certified_point(run, policy, ensemble, epsilon, risk)
        out.mkdir(parents=True, exist_ok=True)
        write_json(saved, point)
        write_manifest(out)
    return {"certified": point["certified"], "threshold": point["threshold"],
            "dev_speedup": point["dev"]["speedup_layers"], "test_speedup": point["test"]["speedup_layers"],
            "test_accuracy": point["test"]["accuracy"], "test_drop_points": 100 * point["test_drop"]}


def _best_oracle(oracles: list[list[dict]], seeds: int) -> list[dict]:
    """The oracle to draw beside every variant: at each speedup, the best variant's mean over seeds.

    ``oracles`` holds one oracle curve per (seed, variant), seed-major, all at the same speedups.
    """
    per_variant = len(oracles) // seeds
    points = []
    for i, first in enumerate(oracles[0]):
        means = []
        for v in range(per_variant):
            values = [oracles[s * per_variant + v][i]["accuracy"] for s in range(seeds)]
            if all(a is not None for a in values):
                means.append(float(np.mean(values)))
        points.append({"speedup_layers": first["speedup_layers"], "accuracy": max(means) if means else None})
    return points


def _mean_static(per_seed: list[list[dict]]) -> list[dict]:
    """The static envelope's points averaged over seeds (same depths in every seed): each seed's best model at
    each depth, and in how many seeds that was a distilled one."""
    return [{"layers": pts[0]["layers"], "layers_share": pts[0]["layers_share"], "speedup_layers": pts[0]["speedup_layers"],
             "accuracy": float(np.mean([p["accuracy"] for p in pts])), "accuracy_std": float(np.std([p["accuracy"] for p in pts])),
             "distilled_seeds": sum(bool(p.get("distilled")) for p in pts), "seeds": len(pts),
             **{kind: _mean_std([max((m["accuracy"] for m in p.get("models", []) if m["distilled"] == distilled),
                                     default=None) for p in pts])
                for kind, distilled in (("alone_accuracy", False), ("distilled_accuracy", True))}}
            for pts in zip(*per_seed)]


def _mean_comparison(per_seed: list[list[dict]]) -> list[dict]:
    """Comparison rows with [mean, std] over seeds for every numeric column (None if any seed lacks it)."""
    keys = ("test_speedup", "adaptive", "adaptive_best_on_test", "adaptive_cross_fitted", "fixed_exit",
            "fixed_exit_corrected", "static",
            "static_corrected", "oracle", "ceiling", "gain_over_static", "gain_over_corrected_static", "gap_closed")
    return [{"speedup": rows[0]["speedup"], **{k: _mean_std([r.get(k) for r in rows]) for k in keys}}
            for rows in zip(*per_seed)]


def _mean_curve(curves: list[list[CurvePoint]]) -> dict:
    """Point-wise mean and std over seeds (same thresholds in every curve)."""
    keys = ("accuracy", "speedup_layers", "speedup_flops", "layers_share")
    return {name: [{"threshold": pts[0].threshold, **{k: float(stat([getattr(p, k) for p in pts])) for k in keys}}
                   for pts in zip(*curves)]
            for name, stat in (("mean", np.mean), ("std", np.std))}


def _dev_and_test(choice: dict, kind: str | None = None) -> str:
    """``dev accuracy 0.812 cross-fitted, 0.820 tuned on all of dev; on test +1.2 points over static`` (an
    adaptive ``choice``, or any with ``kind="adaptive"``; others give their dev accuracy alone)."""
    text = f"dev accuracy {choice['dev_accuracy']:.3f}"
    if (kind or choice.get("choice")) == "adaptive" and choice.get("dev_accuracy_in_sample") is not None:
        text += f" cross-fitted, {choice['dev_accuracy_in_sample']:.3f} tuned on all of dev"
    gain = choice.get("test_gain_over_static")
    return text + ("" if gain is None else f"; on test {gain:+.1f} points over static")


def format_table(summary: dict) -> str:
    """Markdown tables: each exit's accuracy per variant, then every variant against the baselines."""
    n = len(summary["seeds"])
    layers = summary["exit_layers"]
    lines = [f"Task `{summary['task']}`, model `{summary['model']}`, train size {summary['train_size']}, "
             f"{summary['epochs']:g} epochs, seeds {summary['seeds']} (test accuracy" + (", mean ± std)" if n > 1 else ")"),
             "", "Each exit's accuracy (every example forced to that exit), and the last exit against the plain "
             "full-depth model (the multi-model run's last member), in points:", "",
             "| method | " + " | ".join(f"layer {k}" for k in layers) + " | last exit vs plain |",
             "|---" * (len(layers) + 2) + "|"]
    for method, m in summary["methods"].items():
        cells = [_fmt([mu, sd], n) for mu, sd in zip(m["exit_accuracy_mean"], m["exit_accuracy_std"])]
        last = m["last_exit_vs_plain_points"]
        cells.append("—" if last is None else f"{last[0]:+.1f}" + (f" ± {last[1]:.1f}" if n > 1 else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Against the baselines: thresholds chosen on dev for each target speedup (share of layers run, "
              "a cascade's recomputation counted), test accuracy at them; static frontier = the upper envelope of "
              "every static model (the multi-model members and the plain and distilled --num-layers K runs; at each "
              "depth the better), linear in cost between neighbouring depths; oracle = each example at its first "
              "right exit:", "",
              format_comparison({method: [{k: v if not isinstance(v, list) or n > 1 else [v[0], None]
                                           for k, v in row.items()} for row in m["comparison"]]
                                 for method, m in summary["methods"].items()})]
    static = summary.get("static") or []
    if any(p.get("distilled_accuracy") for p in static):
        lines += ["", "The static models (test accuracy; at each depth the envelope takes the better on the split it "
                      "is read on, per seed):", "", "| depth | trained alone | distilled | envelope |", "|---|---|---|---|"]
        lines += [f"| {p['layers']} | {_fmt(p['alone_accuracy'], n)} | {_fmt(p['distilled_accuracy'], n)} | "
                  f"{_fmt([p['accuracy'], p['accuracy_std']], n)} |" for p in static]
    selected = summary.get("selected_on_dev")
    if selected:
        gains = ", ".join(f"{v} {g:+.1f}" for v, g in selected["dev_worst_gain_points"].items())
        lines += ["", f"Selected on dev: **{selected['variant']}** ({selected['criterion']}). "
                      f"Worst dev gain over static per variant, points: {gains}.", "",
                  f"What to deploy, chosen on dev: {selected['verdict']}.", ""]
        lines += [f"- {c['speedup']:.2f}x: {c['choice']}: {c['deploy']} ({_dev_and_test(c)})"
                  + ("" if "adaptive_beside" not in c else
                     f"; the best adaptive candidate beside it: {c['adaptive_beside']['candidate']} "
                     f"({_dev_and_test(c['adaptive_beside'], 'adaptive')})")
                  for c in selected.get("per_target", []) if c["dev_accuracy"] is not None]
    if summary.get("certified"):
        risk = summary["certified"]["risk"]
        lines += ["", f"Certified operating points (Learn-then-Test on dev, risk {risk:g}): per candidate and max "
                      "drop, certified seeds, test speedup and the drop test realised against the last exit "
                      "(points), mean ± std over seeds:", "",
                  "| candidate | max drop | certified | test speedup | test drop (pts) | worst seed's drop |",
                  "|---|---|---|---|---|---|"]
        for v, by_eps in summary["certified"]["per_candidate"].items():
            for eps, points in by_eps.items():
                speed, drop = _mean_std([p["test_speedup"] for p in points]), _mean_std([p["test_drop_points"] for p in points])
                lines.append(f"| {v} | {eps} | {sum(p['certified'] for p in points)}/{len(points)} | "
                             f"{speed[0]:.2f}x ± {speed[1]:.2f} | {drop[0]:+.1f} ± {drop[1]:.1f} | "
                             f"{max(p['test_drop_points'] for p in points):+.1f} |")
    return "\n".join(lines)
