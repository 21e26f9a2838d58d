"""What to deploy, handed over: per target a self-contained directory (``OUTPUT/deploy/<target>x/`` of a demo)
that ``frugalnlp predict DIR`` and ``frugalnlp serve DIR`` run with no other flags.

A deploy directory is run-shaped (``config.json``, ``model/`` with the weights and tokenizer) with the operating
point to answer at (`frugalnlp.operating`: policy, thresholds, ensemble or router tensors) and a card:
``deploy.json`` (data and labels, target, dev and test figures, the static comparison, the machine, the
command) and a short ``README.md``. The card's test figures are measured through ``predict``'s own path on the
deployed directory itself, so ``predict DIR`` on the test split gives exactly them (at predict's default batch
size: an int8 export's dynamic activation scales depend on which texts share a batch). Like every output it carries a
manifest, verified on load (`frugalnlp.manifest`); a static model is deployed as a plain run of its depth.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from frugalnlp.atomic import write_bytes, write_json
from frugalnlp.dev_choice import OperatingTarget
from frugalnlp.manifest import verify_manifest, write_manifest
from frugalnlp.operating import calibrate_run, save_chosen_point, speedup_text
from frugalnlp.tasks import Columns, Split
from frugalnlp.timing import describe_machine, machine

CARD = "deploy.json"
KIND = "frugalnlp-deploy"


def deploy_dir(folder: Path, run: str | Path, target: float, policy: str = "confidence", ensemble: bool = False,
               member: int | None = None, facts: dict | None = None, precision: str | None = None,
               chosen: dict | None = None) -> dict:
    """Write ``folder`` from the finished run (or export) ``run`` for ``target``: answering at the point chosen on
    its dev split in layers with ``policy`` (`frugalnlp.dev_choice.choose` may deploy a fixed exit instead), or at
    ``chosen`` (``policy``, ``threshold``, ``dev``, ``chosen_by``: a point chosen elsewhere, e.g. in measured
    seconds on this export, saved as it was chosen). A plain run, or with ``member`` the multi-model run's
    ``member``-layer model alone, is a static model (one exit, nothing to choose); ``precision`` (fp32 or int8)
    exports a member to ONNX as it is deployed. ``facts`` go into the card as given (what was chosen and why,
    ``full_depth``, ``static_on_test``: the best static models on test at the target, what was measured, the
    command). Returns the card."""
    from frugalnlp.run import load_run_config, load_spec_task, spec_from_config, verify_run

    run, facts = Path(run), facts or {}
    verify_run(run)
    if member is None:
        _copy_run(run, folder)
    elif precision is None:
        _copy_member(run, member, folder)
    else:  # the member alone as a plain run, then exported as the rows it was timed with
        from frugalnlp.export import export_run

        stage = folder.with_name(folder.name + ".torch")
        _copy_member(run, member, stage)
        write_manifest(stage)
        export_run(stage, output=folder, quantize=None if precision == "fp32" else precision)
        shutil.rmtree(stage)
    write_manifest(folder)  # the operating point binds to the files it lists
    config = load_run_config(folder)
    static = len(config["spec"]["exit_layers"]) == 1  # one exit: nothing to choose
    if chosen is not None and not static:
        point = save_chosen_point(folder, OperatingTarget(speedup=target, policy=policy, cost="time"), ensemble,
                                  chosen)
    else:
        chosen_for = OperatingTarget(speedup=1.0) if static else OperatingTarget(speedup=target, policy=policy)
        point = calibrate_run(folder, chosen_for, ensemble=ensemble and not static)
    test = load_spec_task(spec_from_config(config)).test
    predictions = _predict_as_the_cli(folder, test)
    names = [str(name) for name in config["task"]["labels"]]
    accuracy = float(np.mean([p["label"] == names[g] for p, g in zip(predictions, test.labels)]))
    layers_run = float(np.mean([p["layers_run"] for p in predictions]))
    envelope = facts.get("static_on_test")
    card = {"kind": KIND, "target_speedup": target, "cost": "layers", "source_run": str(run), **facts,
            "data": config["task"], "labels": names, "policy": point.policy, "threshold": point.threshold,
            "chosen_by": point.chosen_by, "dev": point.dev,
            "test": {"accuracy": accuracy, "examples": len(predictions), "mean_layers_run": layers_run,
                     "speedup_layers": facts["full_depth"] / layers_run if "full_depth" in facts else None},
            "test_gain_over_static": None if envelope is None else 100 * (accuracy - envelope),
            "machine": machine()}
    write_json(folder / CARD, card)
    write_bytes(folder / "README.md", card_readme(card, folder.name).encode())
    write_manifest(folder)
    return card


def format_deploy(deployed: list[dict], seed: int) -> str:
    """The deploy directories as a table: what each holds and what it gave on test."""
    lines = [f"What to deploy, handed over (seed {seed}'s runs; `frugalnlp predict DIR` and `frugalnlp serve DIR` "
             "run each with no other flags):", "",
             "| target | directory | what | policy | test accuracy | test speedup (layers) | measured speedup | "
             "gain over static |", "|---|---|---|---|---|---|---|---|"]

    def measured(d: dict) -> str:
        return "not timed (--cost layers)" if d.get("measured_speedup") is None else f"{d['measured_speedup']:.2f}x"

    for d in deployed:
        gain = "n/a" if d["test_gain_over_static"] is None else f"{d['test_gain_over_static']:+.1f}"
        speed = "n/a" if d["test_speedup_layers"] is None else f"{d['test_speedup_layers']:.2f}x"
        lines.append(f"| {d['target_speedup']:g}x | {d['path']} | {d['deploy']} | {d['policy']} | "
                     f"{d['test_accuracy']:.4f} | {speed} | {measured(d)} | {gain} |")
    return "\n".join(lines)


def _predict_as_the_cli(folder: Path, test: Split) -> list[dict]:
    """The test split's predictions exactly as ``frugalnlp predict DIR --input TEST.jsonl`` makes them (its
    defaults: chunks of 256 rows, batches of 32): int8's dynamic activation scales depend on which texts share a
    batch, so the card is measured through the very path a user checks it with."""
    from frugalnlp.predict import Predictor, predict_file

    pair = test.pairs is not None
    with tempfile.TemporaryDirectory(prefix="frugalnlp-card-") as tmp:
        source, out = Path(tmp) / "test.jsonl", Path(tmp) / "predictions.jsonl"
        rows = ({"text": t, **({"text_pair": q} if pair else {})} for t, q in zip(test.texts, test.pairs or test.texts))
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
        predict_file(Predictor(folder), source, out, Columns(text_pair="text_pair" if pair else None), strict=True)
        return [json.loads(line) for line in out.read_text().splitlines()]


def _copy_run(run: Path, folder: Path) -> None:
    """The run's files its manifest lists (not the evaluations and exports written into it later)."""
    for name in json.loads((run / "manifest.json").read_text())["files"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / name, folder / name)


def _copy_member(run: Path, member: int, folder: Path) -> None:
    """A multi-model run's ``member``-layer model as a plain run of that depth: its weights and config under
    ``model/`` with the run's tokenizer, and the run's config.json with the spec of a plain K-layer run."""
    config = json.loads((run / "config.json").read_text())
    (folder / "model").mkdir(parents=True)
    for path in (run / "model").iterdir():
        if path.is_file() and path.name != "cascade.json":  # the tokenizer
            shutil.copy2(path, folder / "model" / path.name)
    for path in (run / "model" / f"layers-{member}").iterdir():
        shutil.copy2(path, folder / "model" / path.name)
    config["spec"].update(method="plain", num_layers=member, exit_layers=[member])
    config["deployed_from"] = {"run": str(run), "member_layers": member}
    write_json(folder / "config.json", config)
    shutil.copy2(run / ".kind", folder / ".kind")


def card_readme(card: dict, name: str) -> str:
    """The card's short human version."""
    dev, test, gain = card["dev"], card["test"], card["test_gain_over_static"]
    speed = f", {test['speedup_layers']:.2f}x in layers" if test["speedup_layers"] else ""
    timed = card.get("measured")
    measured = "" if not timed else (
        f"- measured on test here: {timed['speedup']:.2f}x the plain model's texts/s on {timed['runtime']} at batch "
        f"{timed['batch_size']} ({timed['texts_per_second']:.0f} texts/s)\n")
    where = "at that measured speed" if timed else f"at {card['target_speedup']:g}x"
    static = ("" if card.get("static_on_test") is None else
              f"- the best static models {where} on test: {card['static_on_test']:.4f} (this is {gain:+.1f} points)\n")
    return (f"# Deploy: {card['data']['name']} at {card['target_speedup']:g}x\n\n"
            f"**What:** {card.get('deploy', card['source_run'])}; policy `{card['policy']}`, threshold "
            f"{card['threshold']}.\n\n"
            f"- labels: {', '.join(card['labels'])}\n"
            f"- dev: accuracy {dev['accuracy']:.4f} at {speedup_text(dev)}"
            f"\n- test: accuracy {test['accuracy']:.4f} on {test['examples']} examples{speed}\n{static}{measured}"
            f"- chosen: {card['chosen_by']}\n"
            f"- measured on: {describe_machine(card['machine'])}\n\n"
            f"Run it with no other flags (DIR: this directory, `{name}`):\n\n"
            "```bash\nfrugalnlp predict DIR --input TEXTS.jsonl --output PREDICTIONS.jsonl\nfrugalnlp serve DIR\n```\n\n"
            f"Made by: `{card.get('command', '')}`\n")


def machine_note(folder: str | Path) -> str | None:
    """One line when ``folder`` is a deploy directory whose card was measured on a CPU with other features than
    this one (its speed may not hold here); None otherwise."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    verify_manifest(folder, "write the deploy directory again (frugalnlp demo)", complete=(CARD,))
    recorded = json.loads(path.read_text()).get("machine") or {}
    here = machine()
    if recorded.get("cpu_features") == here["cpu_features"]:
        return None
    return (f"note: {folder} was measured on another CPU ({describe_machine(recorded)}); its speed may not hold on "
            f"this one ({describe_machine(here)})")
