"""Run under ``torchrun --standalone --nproc_per_node 2``: a few SWEET steps; each rank saves the weights it ends with.

Usage: torchrun --standalone --nproc_per_node 2 tests/torchrun_sweet.py TINY_MODEL_DIR OUTPUT_DIR
"""

import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

from frugalnlp.training import RunSpec, train_run


class SaveRankWeights(TrainerCallback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, args, state, control, model=None, **kwargs):
        weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, self.folder / f"rank-{os.environ['RANK']}.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, output = sys.argv[1], Path(sys.argv[2])
    spec = RunSpec(output=str(output / "run"), task="mr", model=model_dir, method="sweet", exit_layers=[1, 2, 4],
                   train_size=64, epochs=1, batch_size=8, max_length=24, eval_batch_size=32)
    train_run(spec, callbacks=[SaveRankWeights(output)])
