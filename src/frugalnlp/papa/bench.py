"""Wall clock of constant heads: plain HF attention against PAPA with 0, half and all heads constant.

A constant head skips its query and key projections, its scores and its softmax; what remains is one
matmul of its fixed matrix with the values. The FLOPs that `torch.utils.flop_counter` counts predict
the saving; this benchmark measures it, interleaving every configuration in one process (medians of
repeats, warm-up first) on the encoder alone (the probe is the same in every configuration).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModel

from frugalnlp.assets import resolve_model, verify_checkpoint
from frugalnlp.backbones import backbone_for
from frugalnlp.cost import count_flops
from frugalnlp.errors import FrugalError
from frugalnlp.papa.experiment import resolve_heads
from frugalnlp.papa.families import check_family
from frugalnlp.papa.modeling import PapaModel
from frugalnlp.timing import describe_machine, machine, median_times


@dataclass
class PapaBenchSettings:
    model: str = "minilm"
    lengths: tuple[int, ...] = (64, 128, 256)
    batch_sizes: tuple[int, ...] = (1, 32)
    heads: tuple[str, ...] = ("0", "half", "all")  # constant heads, as `papa sweep --heads` counts them
    repeats: int = 5
    calls: int = 3  # forwards per timed sample (batch 1 is too short to time alone)


QUICK_PAPA = PapaBenchSettings(lengths=(32,), batch_sizes=(1, 8), repeats=2, calls=1)


def _spread_heads(layers: int, heads: int) -> list[list[int]]:
    """Every head, ordered so that any prefix spreads evenly over the layers (head 0 of each layer, then
    head 1, ...): without a ranking, what a count of constant heads costs does not depend on which."""
    return [[layer, head] for head in range(heads) for layer in range(layers)]


def run_papa_bench(settings: PapaBenchSettings | None = None, ranking: list[list[int]] | None = None,
                   progress: Callable[[str], None] = print) -> dict:
    """Time plain HF (sdpa and eager) and PAPA encoders; returns the JSON-ready results.

    ranking: ``[layer, head]`` pairs, most constant-leaning first (``papa rank``'s ``order``); without
    one, the constant heads are spread evenly over the layers.
    """
    settings = settings or PapaBenchSettings()
    path = resolve_model(settings.model)
    verify_checkpoint(path)
    plain = AutoModel.from_pretrained(path).eval()  # the family's default attention (sdpa where it has one)
    check_family(plain.config.model_type)
    if max(settings.lengths) > backbone_for(plain).max_length:
        raise FrugalError(f"length {max(settings.lengths)} is longer than {settings.model}'s "
                          f"{backbone_for(plain).max_length} positions")
    layers, num_heads = plain.config.num_hidden_layers, plain.config.num_attention_heads
    counts = resolve_heads(",".join(settings.heads), layers, num_heads)
    order = ranking or _spread_heads(layers, num_heads)
    # Constant matrices: any row-stochastic values cost the same; softmax of noise is one.
    length = max(settings.lengths)
    constant = torch.randn(layers, num_heads, length, length, generator=torch.Generator().manual_seed(0)).softmax(-1)
    models: dict[str, Callable] = {f"HF {plain.config._attn_implementation}": plain}
    if plain.config._attn_implementation != "eager":
        models["HF eager"] = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    for count in counts:
        papa = PapaModel.from_encoder(AutoModel.from_pretrained(path), constant,
                                      constant_heads=sorted(order[:count])).eval()
        models[f"PAPA {count} constant"] = papa.backbone
    results: dict = {"settings": settings.__dict__, "model": settings.model, "threads": torch.get_num_threads(),
                     "machine": machine(), "layers": layers, "heads_per_layer": num_heads, "constant_heads": counts, "rows": []}
    for seq in settings.lengths:
        for batch in settings.batch_sizes:
            progress(f"length {seq}, batch {batch}")
            ids = torch.randint(1000, 2000, (batch, seq), generator=torch.Generator().manual_seed(seq))
            mask = torch.ones_like(ids)

            def forward(model, ids=ids, mask=mask):
                return lambda: [model(input_ids=ids, attention_mask=mask) for _ in range(settings.calls)]

            with torch.inference_mode():
                times = median_times({name: forward(model) for name, model in models.items()}, settings.repeats)
                flops = {name: count_flops(lambda m=model: m(input_ids=ids, attention_mask=mask))
                         for name, model in models.items()}
            base = f"PAPA {counts[0]} constant"
            row = {"length": seq, "batch": batch, "configurations": []}
            for name in models:
                measured = times[base] / times[name]
                predicted = flops[base] / flops[name]
                row["configurations"].append({"name": name, "ms": times[name] / settings.calls * 1e3,
                                              "flops": flops[name], "measured_speedup": measured,
                                              "predicted_speedup": predicted, "efficiency": measured / predicted})
            results["rows"].append(row)
    return results


def format_papa_bench(results: dict) -> str:
    settings = results["settings"]
    lines = [f"{results['model']} encoder ({results['layers']} layers x {results['heads_per_layer']} heads), "
             f"{results['threads']} threads, medians of {settings['repeats']} interleaved repeats of "
             f"{settings['calls']} forwards; speedups against PAPA with {results['constant_heads'][0]} constant heads",
             f"machine: {describe_machine(results.get('machine'))}", "", "| length | batch | configuration | ms | FLOPs-predicted speedup | measured speedup | efficiency |",
             "|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for c in row["configurations"]:
            lines.append(f"| {row['length']} | {row['batch']} | {c['name']} | {c['ms']:.1f} | "
                         f"{c['predicted_speedup']:.3f} | {c['measured_speedup']:.3f} | {c['efficiency']:.2f} |")
    return "\n".join(lines)
