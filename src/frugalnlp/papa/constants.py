"""The constant attention matrices: a pretrained model's attention averaged over training inputs.

Inputs are in the fixed-position layout (`frugalnlp.encoding.encode_fixed_layout`), so cell (i, j) of
head h means the same pair of positions in every example. Each cell is averaged only over the
examples in which both positions hold real tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from frugalnlp.atomic import write_bytes
from frugalnlp.errors import FrugalError
from frugalnlp.manifest import verify_manifest

FILE = "constant_attention.safetensors"


@torch.inference_mode()
def compute_constant_attention(model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]],
                               progress: bool = False) -> torch.Tensor:
    """Average attention of ``model`` over ``batches``: [layers, heads, n, n] (float32).

    batches: dicts of [batch, n] tensors (``input_ids``, ``attention_mask``, optionally ``token_type_ids``
    and ``position_ids``), all of the same length n. Cell (l, h, i, j) is the sum of head (l, h)'s
    attention probability from i to j over the examples where i and j are both real tokens, divided
    by the number of such examples; 0 where there are none.
    """
    implementation = model.config._attn_implementation
    if implementation != "eager":
        model.set_attn_implementation("eager")  # the only implementation that returns probabilities
    was_training = model.training
    model.eval()
    total = count = None
    try:
        for batch in tqdm(batches, desc="constant attention", disable=not progress, leave=False):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            mask = batch["attention_mask"].double()
            if total is not None and mask.shape[1] != total.shape[-1]:
                raise FrugalError("constant attention needs every batch padded to the same length (fixed layout)")
            attentions = model(**batch, output_attentions=True).attentions  # layers x [batch, heads, n, n]
            both = mask[:, :, None] * mask[:, None, :]  # [batch, n, n]: both positions are real
            summed = torch.stack([torch.einsum("bhij,bij->hij", a.double(), both) for a in attentions])
            total = summed if total is None else total + summed
            count = both.sum(0) if count is None else count + both.sum(0)
    finally:
        if implementation != "eager":
            model.set_attn_implementation(implementation)
        model.train(was_training)
    if total is None:
        raise FrugalError("no training examples to average attention over")
    return torch.where(count > 0, total / count.clamp_min(1), 0.0).float()


def save_constant_attention(path: str | Path, constant_attention: torch.Tensor, metadata: dict) -> None:
    """Write ``constant_attention`` [layers, heads, n, n] with ``metadata`` (JSON) into one safetensors file."""
    write_bytes(path, save({"constant_attention": constant_attention.contiguous()},
                           metadata={"frugalnlp": json.dumps(metadata)}))


def load_constant_attention(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(constant attention [layers, heads, n, n], metadata) from a file or a directory holding ``FILE``."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.exists():
        raise FrugalError(f"no constant attention at {path}; make one with `frugalnlp papa constants`")
    verify_manifest(path.parent, "make it again with `frugalnlp papa constants`", complete=(path.name,))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    if "frugalnlp" not in metadata:
        raise FrugalError(f"{path} is not a frugalnlp constant-attention file")
    return load_file(str(path))["constant_attention"], json.loads(metadata["frugalnlp"])
