"""The wall-clock frontier over seeds: each configuration's measured speedup and its gain over the static frontier
at that measured speed, and what dev chose to deploy at each target (adaptive or static), mean ± std over several
`frugalnlp frontier` runs (one per seed, same settings).

    .venv/bin/python benchmarks/frontier_seeds.py benchmarks/frontier-int8-mr-s{0,1,2}.json \
        --json benchmarks/frontier-int8-mr-seeds.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from frugalnlp.rundir import write_json


def mean_std(values: list[float], fmt: str) -> str:
    return f"{fmt.format(np.mean(values))} ± {fmt.replace('+', '').format(np.std(values))}"


def summarise(results: list[dict]) -> dict:
    """Per configuration present in every run: accuracy, measured speedup and (adaptive) gain over the static
    frontier at its measured speed, per batch size timed in every run, listed over the runs."""
    names = [r["name"] for r in results[0]["rows"]]
    sizes = [str(b) for b in results[0]["settings"]["batch_sizes"]
             if all(b in res["settings"]["batch_sizes"] for res in results)]  # timed in every run
    rows = []
    for name in names:
        per_run = [next((r for r in res["rows"] if r["name"] == name), None) for res in results]
        if any(r is None for r in per_run):
            continue  # a target dev could not reach on some seed
        row = {"name": name, "kind": per_run[0]["kind"], "accuracy": [r["accuracy"] for r in per_run],
               "dev_speedup": [r.get("dev_speedup") for r in per_run], "batch": {}}
        for b in sizes:
            row["batch"][b] = {"measured_speedup": [r["measured_speedup"][b] for r in per_run],
                               "vs_torch_fp32": [r["vs_torch_fp32"][b] for r in per_run],
                               "gain_over_static": [r.get("gain_over_static", {}).get(b) for r in per_run]}
        rows.append(row)
    choices = []
    for k, first in enumerate(results[0].get("dev_choices", [])):
        per_run = [res["dev_choices"][k] for res in results]
        reached = [c for c in per_run if c["choice"] is not None]
        choices.append({"target_speedup": first["target_speedup"], "cost": first["cost"],
                        "choice": [c["choice"] for c in per_run],
                        "accuracy": [c["accuracy"] for c in reached],
                        "batch": {b: {"measured_speedup": [c["measured_speedup"][b] for c in reached],
                                      "gain_over_static": [c["gain_over_static"][b] for c in reached]}
                                  for b in sizes}})
    return {"runs": [res["run"] for res in results], "commands": [res.get("command") for res in results],
            "settings": results[0]["settings"], "machine": results[0]["machine"], "rows": rows,
            "dev_choices": choices}


def format_summary(summary: dict) -> str:
    sizes = list(summary["rows"][0]["batch"])
    head = "| configuration | test accuracy | " + " | ".join(
        f"batch {b}: measured speedup | batch {b}: vs plain torch fp32 | batch {b}: gain over static (pts)"
        for b in sizes)
    lines = [head + " |", "|---|---|" + "---|---|---|" * len(sizes)]
    for row in summary["rows"]:
        cells = []
        for b in sizes:
            cell = row["batch"][b]
            gains = cell["gain_over_static"]
            cells += [mean_std(cell["measured_speedup"], "{:.2f}x"), mean_std(cell["vs_torch_fp32"], "{:.2f}x"),
                      "—" if None in gains else mean_std(gains, "{:+.1f}")]
        lines.append(f"| {row['name']} | {mean_std(row['accuracy'], '{:.3f}')} | " + " | ".join(cells) + " |")
    if summary.get("dev_choices"):
        lines += ["", "| target | chosen on dev, per run | test accuracy | " + " | ".join(
            f"batch {b}: measured speedup | batch {b}: gain over static (pts)" for b in sizes) + " |",
            "|---|---|---|" + "---|---|" * len(sizes)]
        for c in summary["dev_choices"]:
            cells = []
            for b in sizes:
                gains = c["batch"][b]["gain_over_static"]
                cells += [mean_std(c["batch"][b]["measured_speedup"], "{:.2f}x") if gains else "—",
                          "—" if not gains or None in gains else mean_std(gains, "{:+.1f}")]
            picked = "; ".join(name or "nothing reaches it" for name in c["choice"])
            accuracy = mean_std(c["accuracy"], "{:.3f}") if c["accuracy"] else "—"
            lines.append(f"| {c['target_speedup']:g}x {c['cost']} | {picked} | {accuracy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("frontiers", nargs="+", help="frontier.json files, one per seed")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    summary = summarise([json.loads(Path(p).read_text()) for p in args.frontiers])
    print(f"{len(args.frontiers)} runs, mean ± std over them")
    print(format_summary(summary))
    if args.json:
        write_json(Path(args.json), summary)


if __name__ == "__main__":
    main()
