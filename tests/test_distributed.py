"""Data-parallel training through the HF Trainer: two CPU processes (gloo) end with the same weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from frugalnlp.early_exit.modeling import EarlyExitModel


def test_torchrun_two_processes_sweet(tiny_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(__file__).with_name("torchrun_sweet.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_dir), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    rank0, rank1 = load_file(tmp_path / "rank-0.safetensors"), load_file(tmp_path / "rank-1.safetensors")
    assert rank0.keys() == rank1.keys()
    assert all((rank0[k] == rank1[k]).all() for k in rank0)
    initial = EarlyExitModel.from_backbone(str(tiny_dir), exit_layers=[1, 2, 4], method="sweet", num_labels=2)
    assert any(not (initial.state_dict()[k] == rank0[k]).all() for k in rank0), "training changed nothing"

    run = tmp_path / "run"
    assert json.loads((run / "metrics.json").read_text())["processes"] == 2
    assert (run / "metrics.json").exists() and not (tmp_path / "run.partial").exists()
    saved = EarlyExitModel.from_pretrained(run / "model")
    assert saved.config.method == "sweet" and saved.exit_layers == [1, 2, 4]
    assert all((saved.state_dict()[k] == rank0[k]).all() for k in rank0)
