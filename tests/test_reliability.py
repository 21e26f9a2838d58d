"""No lost runs, no silent wrong answers, no pickle through the back door (real processes where it matters)."""

import json
import os
import signal
import time
from pathlib import Path

import torch

from conftest import cli_process, run_cli
from frugalnlp.manifest import write_manifest
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
    assert_clean_error(status, err, "model.safetensors is missing", "manifest.json")
    write_manifest(run)  # with the manifest rewritten to match, the weights' own check still refuses the pickle
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
    """Within one JSON kind: 1 and 1.0 are one class, and so are "1" and "1.0"; a file that mixes numbers and
    strings is refused (test_tasks: labels of odd kinds)."""
    from frugalnlp.tasks import load_files

    for name, spellings in (("n", [1, 1.0, 0, 0.0]), ("s", ["1", "1.0", "0", "0.0"])):
        rows = [json.dumps({"text": f"t{i}", "label": spellings[i % 4]}) for i in range(60)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        assert load_files(str(tmp_path / f"{name}.jsonl")).label_names == ["0", "1"]


def _predicted_lines(path: Path) -> list[int]:
    return [json.loads(line)["line"] for line in path.read_text().splitlines()]


def test_an_unclosed_quote_is_one_bad_row_and_the_rows_it_swallowed_are_predicted(tiny_run, tmp_path, capsys):
    data = tmp_path / "q.csv"
    data.write_text('text\ngood one\n\n"unclosed quote here\nlast good\nanother good\n')
    status, out, err = run_cli(["predict", tiny_run, "--input", data, "--output", tmp_path / "p.jsonl"], capsys)
    assert status == 0, err
    assert _predicted_lines(tmp_path / "p.jsonl") == [2, 5, 6]
    assert "q.csv:4: unreadable row (a quoted field is never closed" in err and "1 bad row(s)" in out
    # Past the csv module's size bound, the same: the swallowed lines are read again.
    data.write_text('text\n"opens ' + "word " * 30_000 + '\nafter\n')
    status, out, err = run_cli(["predict", tiny_run, "--input", data, "--output", tmp_path / "b.jsonl"], capsys)
    assert status == 0, err
    assert _predicted_lines(tmp_path / "b.jsonl") == [3] and "q.csv:2: unreadable row" in err


def test_csv_line_numbers_are_the_files_own_after_blank_lines(tiny_run, tmp_path, capsys):
    data = tmp_path / "b.csv"
    data.write_text("text\ngood one\n\n\nfifth line\n\nseventh, with a comma,x\n")
    status, out, err = run_cli(["predict", tiny_run, "--input", data, "--output", tmp_path / "p.jsonl"], capsys)
    assert status == 0, err
    assert _predicted_lines(tmp_path / "p.jsonl") == [2, 5]
    assert "b.csv:7: 2 more field(s) than the header" in err


def test_jsonl_text_that_is_not_a_string_is_a_bad_row(tiny_run, tmp_path, capsys):
    data = tmp_path / "n.jsonl"
    data.write_text('{"text": 42}\n{"text": "a fine film"}\n{"text": ["a", "list"]}\n{"text": true}\n')
    status, out, err = run_cli(["predict", tiny_run, "--input", data, "--output", tmp_path / "p.jsonl"], capsys)
    assert status == 0, err
    assert _predicted_lines(tmp_path / "p.jsonl") == [2]
    assert "n.jsonl:1: column 'text' holds a JSON number (42)" in err
    assert "n.jsonl:3: column 'text' holds a JSON list" in err and "n.jsonl:4: column 'text' holds a JSON boolean" in err


def test_label_spellings_that_differ_by_surrounding_white_space_are_one_class(tmp_path):
    from frugalnlp.tasks import load_files

    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"t{i},{['positive', 'positive ', ' negative'][i % 3]}\n"
                                                           for i in range(60)))
    assert load_files(str(tmp_path / "d.csv")).label_names == ["negative", "positive"]


def test_resume_passes_over_a_checkpoint_whose_weights_are_cut_short(tiny_dir, tmp_path, capsys):
    """trainer_state.json intact, model.safetensors truncated: resume from the checkpoint before it."""
    from transformers import TrainerCallback

    from frugalnlp.training import RunSpec, train_run

    class StopAfter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= 4:
                raise KeyboardInterrupt

    out = tmp_path / "o"
    spec = dict(output=str(out), task="mr", model=str(tiny_dir), train_size=64, epochs=2, max_length=24,
                save_steps=2)
    try:
        train_run(RunSpec(**spec), callbacks=[StopAfter()])
        raise AssertionError("the callback should have stopped training")
    except KeyboardInterrupt:
        pass
    checkpoints = next((tmp_path / "o.partial" / "checkpoints").iterdir())
    (newest,) = checkpoints.glob("checkpoint-*")  # the Trainer keeps one
    assert newest.name == "checkpoint-4" and (newest / "trainer_state.json").exists()
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status, _, err = run_cli(tiny_train(tiny_dir, out, "--save-steps", 2, "--resume"), capsys)
    assert status == 0, err  # no checkpoint before it: training starts again
    assert json.loads((out / "metrics.json").read_text())["training"][0]["steps"] == 8
