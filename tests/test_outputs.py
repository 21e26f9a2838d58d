"""Nothing destroyed: no command's --output may be its own input, hold it or replace part of it, and --overwrite
only replaces an earlier output of the same command's kind (never a run with an export, an export with a demo)."""

import hashlib
import shutil

import pytest

from conftest import run_cli
from frugalnlp.errors import FrugalError
from frugalnlp.rundir import RunDir, output_kind


def _fingerprint(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(tiny_run, path)
    return path


def test_an_output_that_is_the_input_or_another_artefact_is_refused_and_both_stay_whole(run_copy, tiny_dir, tmp_path,
                                                                                         capsys):
    other = tmp_path / "other"
    shutil.copytree(run_copy, other)
    before = {path: _fingerprint(path) for path in (run_copy, other)}
    cases = [
        (["export", run_copy, "--output", run_copy, "--overwrite"], "is the input"),
        (["export", run_copy, "--output", tmp_path, "--overwrite"], "is the input"),  # the input's folder
        (["export", run_copy, "--output", run_copy / "model", "--overwrite"], "part of the input"),
        (["export", run_copy, "--output", other, "--overwrite"], "another command (run)"),
        (["evaluate", run_copy, "--output", other, "--overwrite"], "another command (run)"),
        (["evaluate", run_copy, "--static", other, "--output", other / "model", "--overwrite"], "part of the input"),
        (["frontier", run_copy, "--runtime", "torch", "--output", run_copy, "--overwrite"], "is the input"),
    ]
    for args, message in cases:
        status, _, err = run_cli(args, capsys)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    # a training run may replace an earlier run, never its own teacher
    status, _, err = run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", "plain", "--output", run_copy,
                              "--overwrite", "--teacher", run_copy], capsys)
    assert status == 2 and "is the input" in err
    assert {path: _fingerprint(path) for path in (run_copy, other)} == before
    assert not list(tmp_path.glob("*.partial")) and not list(run_copy.glob("*.partial"))


def test_overwrite_replaces_only_an_output_of_the_same_kind(run_copy, tmp_path):
    assert output_kind(run_copy) == "run"
    demo = tmp_path / "demo"
    written = RunDir(demo, kind="demo")
    written.open()
    (written.path / "results.json").write_text("{}")
    written.commit()
    assert output_kind(demo) == "demo"
    with pytest.raises(FrugalError, match=r"another command \(demo\)"):
        RunDir(demo, overwrite=True, kind="run")
    with pytest.raises(FrugalError, match="not an output of this command"):
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "mine.txt").write_text("keep me")
        RunDir(tmp_path / "notes", overwrite=True, kind="export")
    replaced = RunDir(demo, overwrite=True, kind="demo")  # the same kind: replaced once the new one is complete
    replaced.open()
    assert replaced.commit() == demo and output_kind(demo) == "demo"
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_an_evaluation_inside_its_run_is_still_written_and_replaced(run_copy, capsys):
    for args in (["evaluate", run_copy, "--thresholds", 3], ["evaluate", run_copy, "--thresholds", 3, "--overwrite"]):
        status, _, err = run_cli(args, capsys)
        assert status == 0, err
    assert output_kind(run_copy / "eval-test-confidence") == "evaluation"


def test_an_interrupted_output_names_only_flags_its_command_has(run_copy, tmp_path, capsys):
    (run_copy / "onnx.partial").mkdir()
    (run_copy / "onnx.partial" / "segment-1.onnx").write_bytes(b"half")
    status, _, err = run_cli(["export", run_copy], capsys)
    assert status == 2 and "pass --overwrite to discard it" in err and "--resume" not in err, err
    (tmp_path / "t.partial").mkdir()
    (tmp_path / "t.partial" / "checkpoints").mkdir()
    with pytest.raises(FrugalError, match="pass --resume to continue it"):
        RunDir(tmp_path / "t")


def test_demo_resume_with_other_settings_is_refused(tiny_dir, tmp_path, capsys):
    from dataclasses import asdict

    from frugalnlp.demo import DemoSpec
    from frugalnlp.run import RunSpec

    out = tmp_path / "demo"
    spec = DemoSpec(output=str(out), base=RunSpec(output="", model=str(tiny_dir), train_size=48, max_length=24))
    started = RunDir(out, kind="demo")
    started.open(spec={k: v for k, v in asdict(spec).items() if k != "output"})
    (started.path / "seed-0").mkdir()  # some work saved: then the first demo died
    started._release()
    status, _, err = run_cli(["demo", "--model", tiny_dir, "--train-size", 48, "--max-length", 24, "--seeds", "0,1",
                              "--output", out, "--resume"], capsys)
    assert status == 2 and "--resume with other settings" in err and "seeds: [0] -> [0, 1]" in err, err


def test_an_edited_resume_spec_is_refused_in_one_line(tmp_path):
    started = RunDir(tmp_path / "run")
    started.open(spec={"seed": 0})
    (started.path / "model").mkdir()  # some work saved
    started._release()
    (started.path / ".spec.json").write_text("{not json")
    with pytest.raises(FrugalError, match="not the settings the interrupted run recorded"):
        RunDir(tmp_path / "run", resume=True).open(spec={"seed": 0})
