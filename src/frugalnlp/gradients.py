"""The SWEET paper's explanation, measured: do different exits' losses pull shared layers apart?

For each backbone layer, the gradients that each exit's loss sends into it (through the shared,
undetached backbone) are compared by cosine similarity. Values near zero or below mean the exits
compete for that layer, which is what SWEET's separation avoids.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from frugalnlp.early_exit.modeling import EarlyExitModel
from frugalnlp.encoding import EncodedSplit, batches, encode_split
from frugalnlp.errors import FrugalError


def gradient_cosines(model: EarlyExitModel, data: EncodedSplit, tokenizer, num_batches: int = 8,
                     batch_size: int = 16, seed: int = 0) -> dict:
    """Cosine similarity of exit i's and exit j's loss gradients in every layer both reach.

    Gradients are summed over ``num_batches`` random training batches (dropout off) before comparing.
    Returns {"exit_layers", "pairs": [[i, j], ...], "cosine": [layers][pairs] (None where a pair
    does not share the layer)}.
    """
    if num_batches < 1:
        raise FrugalError(f"--batches {num_batches} must be at least 1")
    if model.num_exits < 2:
        raise FrugalError("gradient analysis needs a model with at least two exits (joint or sweet)")
    adapter = model.adapter
    layers = list(adapter.layers)
    boundary_grad = model.config.boundary_grad
    model.config.boundary_grad = 1.0  # measure what a shared backbone receives, whatever the training recipe
    model.eval()
    chosen = np.random.default_rng(seed).permutation(len(data))[: num_batches * batch_size]
    subset = EncodedSplit({k: [v[i] for i in chosen] for k, v in data.features.items()}, data.labels[chosen])
    sums = [[torch.zeros(sum(p.numel() for p in layer.parameters())) for layer in layers]
            for _ in range(model.num_exits)]
    try:
        for index, batch in batches(subset, tokenizer, batch_size, model.device):
            labels = torch.as_tensor(subset.labels[index], device=model.device)
            out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            for e, logits in enumerate(out.exit_logits):
                reached = layers[: model.config.exit_layers[e]]
                grads = torch.autograd.grad(F.cross_entropy(logits, labels),
                                            [p for layer in reached for p in layer.parameters()], retain_graph=True)
                offset = 0
                for li, layer in enumerate(reached):
                    n = len(list(layer.parameters()))
                    sums[e][li] += torch.cat([g.flatten() for g in grads[offset:offset + n]]).cpu()
                    offset += n
    finally:
        model.config.boundary_grad = boundary_grad
    pairs = list(combinations(range(model.num_exits), 2))
    cosine = [[float(F.cosine_similarity(sums[i][li], sums[j][li], dim=0))
               if li < model.config.exit_layers[i] else None for i, j in pairs] for li in range(len(layers))]
    return {"exit_layers": model.config.exit_layers, "pairs": [list(p) for p in pairs], "cosine": cosine}


def plot_gradient_cosines(result: dict, path: str | Path, title: str = "") -> None:
    """Heatmap: layers (rows) x exit pairs (columns), cosine similarity, blank where not shared."""
    from frugalnlp.report import new_figure, save_figure

    values = np.array([[np.nan if v is None else v for v in row] for row in result["cosine"]])
    layers = result["exit_layers"]
    fig, ax = new_figure(figsize=(1.2 + 0.9 * values.shape[1], 1.0 + 0.45 * values.shape[0]), dpi=120)
    image = ax.imshow(values, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(values.shape[1]), [f"L{layers[i]}·L{layers[j]}" for i, j in result["pairs"]], rotation=45)
    ax.set_yticks(range(values.shape[0]), [f"layer {k + 1}" for k in range(values.shape[0])])
    for (r, c), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="cosine of exit gradients")
    ax.set_title(title or "gradient agreement between exits")
    save_figure(fig, path)


def analyze_run(run: str | Path, num_batches: int = 8, output: str | Path | None = None,
                overwrite: bool = False) -> tuple[Path, dict]:
    """`gradient_cosines` on a joint or SWEET run's training data: writes gradients.json and gradients.png.

    Returns the output directory (default ``RUN/gradients``) and the result.
    """
    from frugalnlp.run import load_run, load_spec_task
    from frugalnlp.atomic import write_json
    from frugalnlp.rundir import RunDir

    out = RunDir(output or Path(run) / "gradients", overwrite=overwrite, kind="gradients", inputs=[run])
    trained = load_run(run)
    if not isinstance(trained.model, EarlyExitModel):
        raise FrugalError("gradient analysis needs a joint or sweet run (one backbone with several exits)")
    spec = trained.spec
    train = encode_split(load_spec_task(spec).train, trained.tokenizer, spec.max_length)
    result = gradient_cosines(trained.model, train, trained.tokenizer, num_batches=num_batches, seed=spec.seed)
    out.open()
    write_json(out.path / "gradients.json", {"run": str(run), "method": spec.method, **result})
    plot_gradient_cosines(result, out.path / "gradients.png", title=f"{spec.method} on {spec.task}")
    return out.commit(), result
