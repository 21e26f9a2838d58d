"""The demo's answer in measured seconds (``demo --cost time``): on the runtime asked (``--runtime onnx
--precision int8``, or torch fp32), every candidate run and every static model exported once (into the run,
``RUN/onnx-int8``, so what is deployed is what was timed); each candidate's segments and each static model timed
on dev on this machine at the cost batch size; one choice per target among all of them
(`frugalnlp.dev_choice.choose`, in that cost); then the chosen configurations and the static models timed on
test, interleaved (`frugalnlp.frontier.run_frontier` over every candidate at once); and each choice handed over
as ``OUTPUT/deploy/<target>x`` (`frugalnlp.deploy.deploy_dir`) with what was measured on its card."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from frugalnlp.atomic import write_bytes, write_json
from frugalnlp.deploy import deploy_dir
from frugalnlp.export import export_dir
from frugalnlp.frontier import FrontierSettings, format_frontier, plot_frontier, run_frontier
from frugalnlp.run import load_run_config

SECONDS = "seconds"  # OUTPUT/seconds: frontier.json, frontier.md, frontier.png


def answer_in_seconds(out: Path, candidates: dict[str, Path], static: list[str], settings: FrontierSettings,
                      facts: dict, progress: Callable[[str], None]) -> tuple[dict, list[dict]]:
    """Time, choose per target and deploy (see the module); ``candidates``: the variant runs of one seed by
    candidate name, ``static``: that seed's static runs, ``facts``: what every card records (seed, command...).
    Returns the frontier's results (also written to ``OUTPUT/seconds``) and each deploy card's summary."""
    if settings.runtime == "onnx":
        quantize = None if settings.precision == "fp32" else settings.precision
        for run in dict.fromkeys([*map(str, candidates.values()), *static]):
            export_dir(run, quantize, progress=progress)
    results = run_frontier({name: str(run) for name, run in candidates.items()}, static, settings, progress)
    table = format_frontier(results)
    (out / SECONDS).mkdir(exist_ok=True)
    write_json(out / SECONDS / "frontier.json", results)
    write_bytes(out / SECONDS / "frontier.md", (table + "\n").encode())
    plot_frontier(results, out / SECONDS / "frontier.png")
    batch = str(settings.cost_batch_size)
    deployed = []
    for choice in results["dev_choices"]:
        if choice["choice"] is None:
            continue
        row = next(r for r in results["rows"] if r["name"] == choice["choice"])
        target, folder = choice["target_speedup"], out / "deploy" / f"{choice['target_speedup']:g}x"
        shutil.rmtree(folder, ignore_errors=True)  # what a resumed demo writes again
        runtime = f"{'ONNX Runtime' if settings.runtime == 'onnx' else 'torch'} {settings.precision}"
        measured = {"runtime": runtime, "batch_size": settings.cost_batch_size,
                    "speedup": choice["measured_speedup"][batch], "texts_per_second": row["texts_per_second"][batch]}
        # the gain is the card's own test accuracy (predict's path) over the static models at the measured speed
        card_facts = {**facts, "cost": "time", "measured": measured, "choice": row["kind"], "candidate": choice["choice"],
                      "static_on_test": row.get("static_at_measured_speed", {}).get(batch)}
        progress(f"deploying {choice['choice']} at {target:g}x to {folder}")
        if row["kind"] == "static":
            runtime_run = Path(row["run"])
            torch_run = runtime_run.parent if settings.runtime == "onnx" else runtime_run
            member = row["layers"] if load_run_config(torch_run)["spec"]["method"] == "multi-model" else None
            what = f"the static {row['layers']}-layer model" + (" (distilled)" if row["distilled"] else "")
            card = deploy_dir(folder, torch_run if member is not None else runtime_run, target, member=member,
                              precision=settings.precision if settings.runtime == "onnx" else None,
                              facts={**card_facts, "deploy": what})
        else:
            policy, _, ensemble = row["policy"].partition("+")
            chosen = {"policy": row["deployed_policy"], "threshold": row["threshold"],
                      "dev": {"accuracy": row["dev_accuracy"], "speedup_time": row["dev_speedup"]},
                      "chosen_by": f"dev: target speedup {target:g} in time measured on {runtime} at batch {batch}"}
            card = deploy_dir(folder, Path(row["run"]), target, policy, bool(ensemble), chosen=chosen,
                              facts={**card_facts, "deploy": f"{row['candidate']} [{row['policy']}]"})
        deployed.append({"target_speedup": target, "path": str(folder.relative_to(out)), "deploy": card["deploy"],
                         "policy": card["policy"], "test_accuracy": card["test"]["accuracy"],
                         "test_speedup_layers": card["test"]["speedup_layers"], "measured_speedup": measured["speedup"],
                         "test_gain_over_static": card["test_gain_over_static"]})
    return results, deployed
