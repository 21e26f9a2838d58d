"""Static int8 (activations calibrated on dev) against the dynamic int8 that `frugalnlp export --quantize int8` writes.

From an fp32 export, each segment graph is quantized statically with ONNX Runtime's `quantize_static` (QDQ,
per-channel s8 weights, u8 activations, weight matmuls only, as the dynamic export), calibrated on 16 dev batches
of 32 padded to the run's max length, with MinMax and with the 99.99th percentile. Each static export is scored on
test (every exit, temperatures fitted on dev), checked for batch independence (one row alone against the same
row in a batch of 32), and timed at threshold 1 beside the dynamic and fp32 exports (512 test texts, batch 32
and 1, medians of 3 interleaved repeats).

    frugalnlp export runs/make-demo/seed-0/joint --output /tmp/fp32
    frugalnlp export runs/make-demo/seed-0/joint --quantize int8 --output /tmp/int8
    .venv/bin/python benchmarks/static_quantization.py /tmp/fp32 /tmp/int8        # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from frugalnlp.atomic import write_json
from frugalnlp.curves import collect_exit_logits, exit_scores
from frugalnlp.early_exit.registry import make_policy
from frugalnlp.encoding import encode_split, unsorted_batches
from frugalnlp.onnx_model import OnnxModel
from frugalnlp.run import load_run, load_spec_task
from frugalnlp.timing import describe_machine, machine, median_times


def quantize_statically(fp32: Path, output: Path, method: str, calibration: list[dict]) -> None:
    """``fp32``'s export folder quantized statically into ``output``: each graph calibrated on its own inputs."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self, graph: int) -> None:
            self.feeds = iter(batch[graph] for batch in calibration)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    shutil.copytree(fp32 / "model", output)
    record = json.loads((fp32 / "model" / "export.json").read_text())
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing hints
    for g, graph in enumerate(record["graphs"]):
        quantize_static(str(fp32 / "model" / graph), str(output / graph), Reader(g), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["MatMul"], calibrate_method=getattr(CalibrationMethod, method),
                        extra_options={"MatMulConstBOnly": True, "CalibPercentile": 99.99})
    (output / "export.json").write_text(json.dumps({**record, "precision": "int8"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fp32", type=Path, help="an fp32 export directory")
    parser.add_argument("dynamic", type=Path, help="the same run's int8 export (dynamic quantization)")
    args = parser.parse_args()
    run = load_run(args.fp32)
    task = load_spec_task(run.spec)
    encoded = {s: encode_split(task.split(s), run.tokenizer, run.spec.max_length) for s in ("dev", "test")}
    dynamic = OnnxModel(args.dynamic / "model")  # loaded first: the process's thread pool is the one it was timed with
    fp32 = OnnxModel(args.fp32 / "model")
    length = run.spec.max_length

    def padded(t: torch.Tensor | None) -> torch.Tensor | None:  # the calibrators stack equal shapes only
        return None if t is None else torch.nn.functional.pad(t, (0, length - t.shape[1]))

    calibration = [fp32.feeds(*(padded(b.get(k)) for k in ("input_ids", "attention_mask", "token_type_ids")))
                   for b in unsorted_batches(encoded["dev"], run.tokenizer, 32)[:16]]
    rows, models = {}, {"fp32": fp32, "dynamic int8": dynamic}
    with tempfile.TemporaryDirectory() as scratch:
        for method in ("MinMax", "Percentile"):
            folder = Path(scratch) / method
            quantize_statically(args.fp32, folder, method, calibration)
            models[f"static int8 ({method})"] = OnnxModel(folder)
        first = unsorted_batches(encoded["test"], run.tokenizer, 32)[0]
        for name, model in models.items():
            logits = {s: collect_exit_logits(model, encoded[s], run.tokenizer, 64) for s in ("dev", "test")}
            together = model.exit_logits(first["input_ids"], first["attention_mask"])[-1]
            drift = 0.0
            for i in range(len(together)):
                n = int(first["attention_mask"][i].sum())
                alone = model.exit_logits(first["input_ids"][i:i + 1, :n], first["attention_mask"][i:i + 1, :n])[-1]
                drift = max(drift, float((alone[0] - together[i]).abs().max()))
            rows[name] = {"test_exit_accuracy": [e["accuracy"] for e in exit_scores(model, logits["test"], task.test.labels)],
                          "max_abs_logit_change_alone_vs_in_batch": drift}
        never = make_policy("confidence", 1.0, fp32.num_exits)
        test = encode_split(task.test.take(range(512)), run.tokenizer, length)
        for batch_size in (32, 1):
            batches = unsorted_batches(test, run.tokenizer, batch_size)
            configs = {n: (lambda m=m: [m.predict(**b, policy=never) for b in batches]) for n, m in models.items()}
            with torch.inference_mode():
                seconds = median_times(configs, 3)
            for name in models:
                rows[name][f"texts_per_second_batch_{batch_size}"] = 512 / seconds[name]
    print(f"machine: {describe_machine(machine())}\n")
    print("| export | test accuracy per exit | texts/s at batch 32 (vs dynamic) | at batch 1 (vs dynamic) | "
          "max logit change, a row alone vs in its batch |")
    print("|---|---|---|---|---|")
    dynamic = rows["dynamic int8"]
    for name, row in rows.items():
        print(f"| {name} | {' / '.join(f'{a:.3f}' for a in row['test_exit_accuracy'])} | "
              f"{row['texts_per_second_batch_32']:.0f} ({row['texts_per_second_batch_32'] / dynamic['texts_per_second_batch_32']:.2f}x) | "
              f"{row['texts_per_second_batch_1']:.0f} ({row['texts_per_second_batch_1'] / dynamic['texts_per_second_batch_1']:.2f}x) | "
              f"{row['max_abs_logit_change_alone_vs_in_batch']:.1e} |")
    target = Path(__file__).with_name("static-quantization.json")
    write_json(target, {"machine": machine(), "fp32": str(args.fp32), "dynamic": str(args.dynamic), "rows": rows})
    print(f"\nJSON: {target}")


if __name__ == "__main__":
    main()
