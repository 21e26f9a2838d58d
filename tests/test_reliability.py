"""No lost runs, no silent wrong answers, no pickle through the back door (real processes where it matters)."""

import json
import os
import signal
import time
from pathlib import Path

import torch

from conftest import cli_process, run_cli
from frugalnlp.rundir import RunDir
from test_cli_errors import assert_clean_error


def tiny_train(tiny_dir, output, *extra):
    return ["train", "--task", "mr", "--model", tiny_dir, "--train-size", 64, "--epochs", 2, "--max-length", 24,
            "--output", output, *extra]


def test_two_writers_of_one_output_one_wins_the_other_exits_2(tiny_dir, tmp_path):
    out = tmp_path / "o"
    procs = [cli_process(*tiny_train(tiny_dir, out, "--seed", seed)) for seed in (0, 1)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert "another process" in loser or "already exists" in loser
    assert loser.strip().count("\n") == 0 and "Traceback" not in loser
    winner_seed = next(seed for seed, (code, _, _) in zip((0, 1), results) if code == 0)
    assert json.loads((out / "config.json").read_text())["spec"]["seed"] == winner_seed
    assert not (tmp_path / "o.partial").exists()


def test_a_held_output_is_refused_naming_the_holder(tiny_dir, tmp_path):
    run = RunDir(tmp_path / "o")
    run.open()
    (run.path / "checkpoints").mkdir()  # saved work: the holder's run is resumable
    proc = cli_process(*tiny_train(tiny_dir, tmp_path / "o", "--resume"))
    code, _, err = proc.wait(timeout=120), *proc.communicate()
    assert code == 2 and f"being written by another process (pid {os.getpid()})" in err, err
    assert (run.path / "checkpoints").is_dir()


def test_resume_with_other_settings_after_sigkill_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "o"
    proc = cli_process(*tiny_train(tiny_dir, out, "--method", "sweet", "--exit-layers", "1,2,4", "--save-steps", 2))
    checkpoints = tmp_path / "o.partial" / "checkpoints"
    deadline = time.time() + 240
    while not any(checkpoints.glob("*/checkpoint-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(checkpoints.glob("*/checkpoint-*"))
    status = cli_process(*tiny_train(tiny_dir, out, "--method", "joint", "--exit-layers", "1,2,4", "--seed", 1,
                                     "--lr", "1e-4", "--save-steps", 2, "--resume"))
    code, _, err = status.wait(timeout=120), *status.communicate()
    assert code == 2 and "--resume with other settings" in err, err
    for field in ("method: 'sweet' -> 'joint'", "seed: 0 -> 1", "lr: 5e-05 -> 0.0001"):
        assert field in err
    same = cli_process(*tiny_train(tiny_dir, out, "--method", "sweet", "--exit-layers", "1,2,4", "--save-steps", 2,
                                   "--resume"))
    code, _, err = same.wait(timeout=300), *same.communicate()
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["spec"]["method"] == "sweet"


class _Payload:
    """Unpickling this creates a file: what an attacker's weights could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def _poison(folder: Path, marker: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save({**weights, "payload": _Payload(marker)}, folder / "weights.data")
    index = {"metadata": {}, "weight_map": {name: "weights.data" for name in weights}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_pickle_through_a_shard_index_is_refused(tiny_run, tiny_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    _poison(run / "model", marker)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    status, _, err = run_cli(["predict", run, "--input", data, "--output", tmp_path / "p.jsonl"], capsys)
    assert_clean_error(status, err, "weights.data", "pytorch_model.bin.index.json", "not safetensors")
    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_dir, encoder)
    _poison(encoder, marker)
    status, _, err = run_cli(["papa", "constants", "--model", encoder, "--output", tmp_path / "c"], capsys)
    assert_clean_error(status, err, "weights.data")
    status, _, err = run_cli(["train", "--model", encoder, "--output", tmp_path / "t"], capsys)
    assert_clean_error(status, err, "weights.data")
    assert "--trust-pickle" not in err.split("(")[0]  # train has no such flag: the hint names predict
    assert not marker.exists() and not (tmp_path / "p.jsonl").exists() and not (tmp_path / "c").exists()


def test_odd_rows_are_reported_by_line_and_the_rest_predicted(tiny_run, tmp_path, capsys):
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "a fine film"}\n{"text": "\\ud83d x"}\n{"text": "dull and long"}\n')
    status, out, err = run_cli(["predict", tiny_run, "--input", jsonl, "--output", tmp_path / "a.jsonl"], capsys)
    assert status == 0, err
    assert [json.loads(line)["line"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == [1, 3]
    assert "in.jsonl:2: column 'text' holds a lone surrogate" in err
    csv = tmp_path / "in.csv"
    csv.write_text("text\nfine\n" + "x" * 140_000 + "\nlast one\n")
    status, out, err = run_cli(["predict", tiny_run, "--input", csv, "--output", tmp_path / "b.jsonl"], capsys)
    assert status == 0, err
    assert [json.loads(line)["line"] for line in (tmp_path / "b.jsonl").read_text().splitlines()] == [2, 4]
    assert "in.csv:3: unreadable row" in err and "field larger than field limit" in err
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_numeric_label_spellings_are_one_class(tmp_path):
    from frugalnlp.tasks import load_files

    rows = [json.dumps({"text": f"t{i}", "label": [1, 1.0, "1", 0, "0.0", 0][i % 6]}) for i in range(60)]
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    assert load_files(str(tmp_path / "d.jsonl")).label_names == ["0", "1"]
