"""Why an ONNX export runs its segments with torch on one thread: one int8 segment graph timed alone, with a small
torch op after each call (as the exit decisions do) on torch's threads, and the same with torch on one thread.

    .venv/bin/python benchmarks/torch_threads.py runs/mr/seed-0/joint/onnx-int8      # ~1 min
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from frugalnlp.onnx_model import OnnxModel, torch_threads
from frugalnlp.timing import describe_machine, machine


def call_ms(model: OnnxModel, rows: int, after: str, calls: int = 100) -> float:
    """Median ms of segment 1 on ``rows`` rows of 40 tokens, then ``after``: nothing, or a [rows, 2] softmax."""
    hidden = np.random.default_rng(0).standard_normal((rows, 40, model.config.backbone_config["hidden_size"]))
    feed = {"hidden": hidden.astype(np.float32), "attention_mask": np.ones((rows, 40), np.int64)}
    logits = torch.randn(rows, 2)

    def step() -> None:
        model.sessions[1].run(None, feed)
        if after == "softmax":
            logits.softmax(-1).amax(-1)

    for _ in range(20):
        step()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an int8 (or fp32) export of a shared-backbone run (RUN/onnx-int8)")
    args = parser.parse_args()
    model = OnnxModel(f"{args.export}/model")
    torch.set_num_threads(2)
    print(f"machine: {describe_machine(machine())}\n")
    print("| rows | segment alone (ms) | + softmax, torch on 2 threads | + softmax, torch on 1 thread |")
    print("|---|---|---|---|")
    for rows in (1, 2, 8, 32):
        alone, spinning = call_ms(model, rows, "none"), call_ms(model, rows, "softmax")
        with torch_threads(1):
            single = call_ms(model, rows, "softmax")
        print(f"| {rows} | {alone:.2f} | {spinning:.2f} | {single:.2f} |")


if __name__ == "__main__":
    main()
