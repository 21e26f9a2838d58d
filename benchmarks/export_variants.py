"""Which ONNX export runs the plain MiniLM fastest on ONNX Runtime: the measurement behind `frugalnlp.export.OPSET`.

Side by side in one process (interleaved medians, `frugalnlp.timing.median_times`), on MR test sentences at
the demo's 64 tokens, texts/s of the plain 6-layer classifier as
- torch fp32 (the reference every ratio is to),
- ONNX opset 18: attention as MatMul/Softmax (what frugalnlp exported before),
- ONNX opset 23: attention as one ONNX `Attention` op per layer (what frugalnlp exports now),
- opset 18 after onnxscript's ORT fusions (contrib Attention, SkipLayerNormalization, BiasGelu),
each in fp32 and dynamically quantized to int8 the way `frugalnlp export --quantize int8` does, and torch
with bf16 autocast and `torch.compile` (``--torch-variants``). With ``--run`` the weights are a trained run's
(its backbone and last head: the plain classifier) and every configuration's accuracy on the whole test split
is reported; without, the embedded encoder with a random head (speed does not depend on the weights).

    .venv/bin/python benchmarks/export_variants.py --run runs/mr-seed0/joint --torch-variants \
        --json benchmarks/export-variants.json
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
from frugalnlp.bench import plain_forward, plain_view
from frugalnlp.encoding import load_tokenizer
from frugalnlp.export import _quantize, export_model, fused_ops
from frugalnlp.onnx_model import OnnxModel
from frugalnlp.run import load_run
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
    parser.add_argument("--run", default=None, help="a trained joint/plain run whose plain classifier to time")
    parser.add_argument("--torch-variants", action="store_true", help="also torch bf16 autocast and torch.compile")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.run:
        trained = load_run(args.run)
        model, tokenizer, max_length = plain_view(trained.model), trained.tokenizer, trained.spec.max_length
    else:
        model = EarlyExitModel.from_backbone("minilm", exit_layers=[6], num_labels=2).eval()
        tokenizer, max_length = load_tokenizer(resolve_model("minilm")), 64
    test = load_task("mr").test
    texts = test.texts[:args.examples]
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
    plain = plain_forward(model)
    forwards = {"torch fp32": plain}
    if args.torch_variants:
        def bf16(batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain(batch).float()

        compiled = torch.compile(plain, dynamic=True)
        forwards.update({"torch bf16 autocast": bf16, "torch.compile": compiled})
    for name, path in variants.items():
        onnx = OnnxModel(path)
        forwards[name] = lambda batch, m=onnx: m.exit_logits(batch["input_ids"], batch["attention_mask"],
                                                               batch.get("token_type_ids"))[-1]
    results = {"machine": machine(), "run": args.run, "examples": len(texts), "repeats": args.repeats,
               "batch_sizes": {}, "accuracy": {}}
    results["fused_ops"] = {name: fused_ops(path / "segment.onnx") for name, path in variants.items()}

    def encode(some: list[str], batch_size: int) -> list[dict]:
        return [dict(tokenizer(some[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")) for i in range(0, len(some), batch_size)]

    with torch.inference_mode():
        everything = encode(test.texts, 64)
        for name, forward in forwards.items():  # accuracy on the whole test split (and a warm-up for compile)
            predicted = torch.cat([forward(b).argmax(-1) for b in everything]).numpy()
            results["accuracy"][name] = float((predicted == test.labels).mean())
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            batches = encode(texts, batch_size)
            reference = torch.cat([plain(b) for b in batches])
            configs = {name: (lambda f=forward: [f(b) for b in batches]) for name, forward in forwards.items()}
            times = median_times(configs, args.repeats)
            rows = {}
            for name, seconds in times.items():
                logits = torch.cat(configs[name]()).float()
                rows[name] = {"texts_per_second": len(texts) / seconds, "vs_torch": times["torch fp32"] / seconds,
                              "max_abs_diff_vs_torch": float((logits - reference).abs().max())}
            results["batch_sizes"][str(batch_size)] = rows
    shutil.rmtree(folder)
    print(f"machine: {describe_machine(results['machine'])}; {len(texts)} MR test sentences, medians of {args.repeats}")
    print("\n| batch | configuration | texts/s | vs torch fp32 | test accuracy | max abs logit diff | fused ops |\n"
          "|---|---|---|---|---|---|---|")
    for batch_size, rows in results["batch_sizes"].items():
        for name, row in rows.items():
            ops = ", ".join(f"{n} {op}" for op, n in results["fused_ops"].get(name, {}).items()) or "—"
            print(f"| {batch_size} | {name} | {row['texts_per_second']:.0f} | {row['vs_torch']:.2f}x | "
                  f"{results['accuracy'][name]:.4f} | {row['max_abs_diff_vs_torch']:.1e} | {ops} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
