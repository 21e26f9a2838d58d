"""A run interrupted mid-training resumes from its last checkpoint and ends where an uninterrupted run ends."""

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from frugalnlp.training import RunSpec, train_run


class Interrupt(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["sweet", "multi-model"])
def test_resume_gives_the_same_weights(tiny_dir, tmp_path, method):
    def spec(name):
        return RunSpec(output=str(tmp_path / name), task="mr", model=str(tiny_dir), method=method,
                       exit_layers=[1, 2, 4], train_size=96, epochs=2, max_length=24, save_steps=3)

    straight = train_run(spec("straight"))
    with pytest.raises(KeyboardInterrupt):
        train_run(spec("resumed"), callbacks=[Interrupt(at_step=5)])  # checkpoint-3 is on disk
    partial = tmp_path / "resumed.partial"
    assert any(partial.rglob("checkpoint-3")) and not (tmp_path / "resumed").exists()
    resumed = train_run(spec("resumed"), resume=True)
    files = sorted(p.relative_to(straight) for p in straight.rglob("*.safetensors"))
    assert files
    for f in files:
        a, b = load_file(straight / f), load_file(resumed / f)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f
