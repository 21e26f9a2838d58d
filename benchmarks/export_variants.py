"""Which ONNX export runs the plain MiniLM fastest on ONNX Runtime: the measurement behind `frugalnlp.export.OPSET`.

Side by side in one process (interleaved medians, `frugalnlp.timing.median_times`), on MR test sentences at
the demo's 64 tokens, texts/s of the plain 6-layer classifier as
- torch fp32 (the reference every ratio is to),
- ONNX opset 18: attention as MatMul/Softmax (what frugalnlp exported before),
- ONNX opset 23: attention as one ONNX `Attention` op per layer (what frugalnlp exports now),
- opset 18 after onnxscript's ORT fusions (contrib Attention, SkipLayerNormalization, BiasGelu),
each in fp32 and dynamically quantized to int8 the way `frugalnlp export --quantize int8` does. Weights are
the embedded encoder's with a random head: speed does not depend on them; agreement with torch is printed.

    .venv/bin/python benchmarks/export_variants.py --json benchmarks/export-variants.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from frugalnlp import EarlyExitModel
from frugalnlp.assets import resolve_model
from frugalnlp.encoding import load_tokenizer
from frugalnlp.export import _quantize, export_model, fused_ops
from frugalnlp.onnx_model import OnnxModel
from frugalnlp.tasks import load_task
from frugalnlp.timing import describe_machine, machine, median_times


def ort_fused(source: Path, target: Path) -> None:
    """``source``'s export with every graph rewritten by onnxscript's ORT fusions."""
    import onnx_ir
    from onnxscript.rewriter import ort_fusions

    shutil.copytree(source, target)
    for graph in json.loads((source / "export.json").read_text())["graphs"]:
        model, _ = ort_fusions.optimize_for_ort(onnx_ir.load(source / graph))
        onnx_ir.save(model, target / graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone("minilm", exit_layers=[6], num_labels=2).eval()
    tokenizer = load_tokenizer(resolve_model("minilm"))
    texts = load_task("mr").test.texts[:args.examples]
    folder = Path(tempfile.mkdtemp(prefix="export-variants-"))
    variants = {}
    for name, opset, fuse in (("opset 18", 18, False), ("opset 23", 23, False), ("opset 18 + ORT fusions", 18, True)):
        fp32 = folder / f"{opset}{'-fused' if fuse else ''}"
        if fuse:
            export_model(model, folder / "plain-18", opset=18)
            ort_fused(folder / "plain-18", fp32)
        else:
            export_model(model, fp32, opset=opset)
        int8 = Path(f"{fp32}-int8")
        shutil.copytree(fp32, int8)
        _quantize(int8, ["segment.onnx"])
        variants[f"ONNX fp32, {name}"], variants[f"ONNX int8, {name}"] = fp32, int8
    runners = {name: OnnxModel(path) for name, path in variants.items()}
    results = {"machine": machine(), "examples": len(texts), "repeats": args.repeats, "batch_sizes": {}}
    results["fused_ops"] = {name: fused_ops(path / "segment.onnx") for name, path in variants.items()}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        batches = [tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
                   for i in range(0, len(texts), batch_size)]

        def run(m):
            return lambda: [m.exit_logits(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for b in batches]

        with torch.inference_mode():
            reference = torch.cat([run(model)()[i][0] for i in range(len(batches))])
            configs = {"torch fp32": run(model), **{name: run(m) for name, m in runners.items()}}
            times = median_times(configs, args.repeats)
        rows = {}
        for name, seconds in times.items():
            logits = reference if name == "torch fp32" else torch.cat([out[0] for out in configs[name]()])
            rows[name] = {"texts_per_second": len(texts) / seconds, "vs_torch": times["torch fp32"] / seconds,
                          "max_abs_diff_vs_torch": float((logits - reference).abs().max())}
        results["batch_sizes"][str(batch_size)] = rows
    shutil.rmtree(folder)
    print(f"machine: {describe_machine(results['machine'])}; {len(texts)} MR test sentences, medians of {args.repeats}")
    print("\n| batch | configuration | texts/s | vs torch fp32 | max abs logit diff | fused ops |\n|---|---|---|---|---|---|")
    for batch_size, rows in results["batch_sizes"].items():
        for name, row in rows.items():
            ops = ", ".join(f"{n} {op}" for op, n in results["fused_ops"].get(name, {}).items()) or "—"
            print(f"| {batch_size} | {name} | {row['texts_per_second']:.0f} | {row['vs_torch']:.2f}x | "
                  f"{row['max_abs_diff_vs_torch']:.1e} | {ops} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
