"""Between the graphs: an ONNX export's exit decisions in NumPy (this checkout) against the torch decisions of an
earlier checkout, side by side in one run. Each checkout times, in its own fresh process, the plain int8 model
(the joint run's export at threshold 1) and every deploy directory of a `demo --cost time` output, on the first
512 test texts at batch 32 and the first 128 at batch 1 (tokenisation not counted), and the share of that time
spent outside ONNX Runtime's calls (decisions, dropping rows, conversions). Processes alternate, 3 rounds, medians.

    git worktree add --detach /tmp/before <commit before the change>
    .venv/bin/python benchmarks/decisions.py runs/make-demo /tmp/before/src      # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROUNDS = 3


class TimedSession:
    """An ONNX Runtime session whose ``run`` calls add up their seconds in ``spent``."""

    def __init__(self, session, spent: list[float]) -> None:
        self.session, self.spent = session, spent

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.spent[0] += time.perf_counter() - start

    def __getattr__(self, name: str):
        return getattr(self.session, name)


def child(demo: Path) -> dict:
    """Time every configuration once in this process (the checkout on sys.path): {name: {batch: [s, s in ORT]}}."""
    import torch

    from frugalnlp.early_exit.registry import make_policy
    from frugalnlp.encoding import encode_split, unsorted_batches
    from frugalnlp.predict import Predictor
    from frugalnlp.run import load_run, load_spec_task

    plain = load_run(demo / "seed-0" / "joint" / "onnx-int8")
    test = load_spec_task(plain.spec).test
    configs = {"plain int8": (plain.model, make_policy("confidence", 1.0, plain.model.num_exits))}
    for folder in sorted((demo / "deploy").iterdir()):
        p = Predictor(folder)
        configs[folder.name] = (p.model, p.policy)
    out: dict[str, dict] = {}
    for batch_size, count in ((32, 512), (1, 128)):
        data = encode_split(test.take(range(count)), plain.tokenizer, plain.spec.max_length)
        batches = unsorted_batches(data, plain.tokenizer, batch_size)
        for name, (model, policy) in configs.items():
            spent = [0.0]
            model.sessions = [TimedSession(getattr(s, "session", s), spent) for s in model.sessions]
            with torch.inference_mode():
                for b in batches[:4]:  # warm-up
                    model.predict(**b, policy=policy)
                spent[0] = 0.0
                start = time.perf_counter()
                for b in batches:
                    model.predict(**b, policy=policy)
                total = time.perf_counter() - start
            out.setdefault(name, {})[str(batch_size)] = [total, spent[0], count]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="a `demo --cost time` output (its seed-0 joint int8 export and deploy/)")
    parser.add_argument("before", type=Path, help="the src/ folder of the earlier checkout")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.demo)))
        return
    here = Path(__file__).resolve().parents[1] / "src"
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(ROUNDS):
        for label, src in (("before", args.before.resolve()), ("after", here)):
            done = subprocess.run([sys.executable, __file__, str(args.demo), str(args.before), "--child"],
                                  capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(src)})
            results[label].append(json.loads(done.stdout.strip().splitlines()[-1]))
    from frugalnlp.atomic import write_json
    from frugalnlp.timing import describe_machine, machine

    print(f"machine: {describe_machine(machine())}\n")
    print("| configuration | batch | texts/s before | texts/s after | after / before | outside ONNX Runtime before | after |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for name in results["after"][0]:
        for batch in ("32", "1"):
            cell = {}
            for label in ("before", "after"):
                runs = [r[name][batch] for r in results[label]]
                total = statistics.median(r[0] for r in runs)
                outside = statistics.median((r[0] - r[1]) / r[0] for r in runs)
                cell[label] = (runs[0][2] / total, outside)
            rows.append({"configuration": name, "batch_size": int(batch), "texts_per_second_before": cell["before"][0],
                         "texts_per_second_after": cell["after"][0], "outside_share_before": cell["before"][1],
                         "outside_share_after": cell["after"][1]})
            print(f"| {name} | {batch} | {cell['before'][0]:.0f} | {cell['after'][0]:.0f} | "
                  f"{cell['after'][0] / cell['before'][0]:.2f}x | {100 * cell['before'][1]:.1f}% | "
                  f"{100 * cell['after'][1]:.1f}% |")
    target = Path(__file__).with_name("decisions.json")
    write_json(target, {"machine": machine(), "rounds": ROUNDS, "rows": rows})
    print(f"\nJSON: {target}")


if __name__ == "__main__":
    main()
