"""Re-time each deploy directory of a `demo --cost time` output in a fresh process, on the test texts the demo
timed (the first 512, batch 32, medians of 3 interleaved repeats, tokenisation not counted) beside the plain int8
model (the joint run's export at threshold 1), against what its card says.

    .venv/bin/python benchmarks/retime_deploy.py demo
"""
import json
import sys
from pathlib import Path

import torch

from frugalnlp.early_exit.registry import make_policy
from frugalnlp.encoding import encode_split, unsorted_batches
from frugalnlp.predict import Predictor
from frugalnlp.run import load_run, load_spec_task
from frugalnlp.timing import median_times

demo = Path(sys.argv[1])
plain = load_run(demo / "seed-0" / "joint" / "onnx-int8")
test = load_spec_task(plain.spec).test
timed = test.take(range(512))
data = encode_split(timed, plain.tokenizer, plain.spec.max_length)
batches = unsorted_batches(data, plain.tokenizer, 32)
at_threshold_1 = make_policy("confidence", 1.0, plain.model.num_exits)
configs = {"plain": (lambda: [plain.model.predict(**b, policy=at_threshold_1) for b in batches])}
for folder in sorted((demo / "deploy").iterdir()):
    p = Predictor(folder)
    configs[folder.name] = (lambda p=p: [p.model.predict(**b, policy=p.policy) for b in batches])
with torch.inference_mode():
    seconds = median_times(configs, 3)
for folder in sorted((demo / "deploy").iterdir()):
    card = json.loads((folder / "deploy.json").read_text())["measured"]
    tps = 512 / seconds[folder.name]
    print(f"{folder.name}: re-timed {tps:.0f} texts/s ({seconds['plain'] / seconds[folder.name]:.2f}x plain int8 "
          f"{512 / seconds['plain']:.0f}) against the card's {card['texts_per_second']:.0f} ({card['speedup']:.2f}x): "
          f"{100 * (tps / card['texts_per_second'] - 1):+.1f}%")
