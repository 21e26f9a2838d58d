"""What runs is what was verified (#38): every output lists its files with their sha256, checked on load; an
operating point's JSON and tensors are checked as one unit and bound to every file that decides an answer."""

import json
import shutil

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save
from test_cli_errors import assert_clean_error

from frugalnlp.errors import FrugalError
from frugalnlp.export import export_run
from frugalnlp.manifest import MANIFEST, sha256_file, verify_manifest, write_manifest
from frugalnlp.operating import OPERATING_POINT, load_operating_point, point_lock, record_sha256


@pytest.fixture(scope="module")
def calibrated(tiny_run, tmp_path_factory):
    """A copy of the tiny run with an operating point that has fitted tensors (an exit ensemble)."""
    from frugalnlp.cli import main

    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["calibrate", str(run), "--ensemble", "--target-speedup", "1.2"]) == 0
    return run


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("exported") / "onnx"
    export_run(tiny_run, output=path)
    return path


def _predict(run, tmp_path, capsys, *flags):
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    status, _, err = run_cli(["predict", run, "--input", data, "--output", out, *flags], capsys)
    assert "Traceback" not in err
    if status == 0:
        out.unlink()
    return status, err


def test_a_run_and_an_export_list_every_file_and_a_changed_one_is_refused(tiny_run, exported, tmp_path, capsys):
    listed = json.loads((tiny_run / MANIFEST).read_text())["files"]
    assert {"config.json", "metrics.json", "model/model.safetensors", "model/config.json"} <= set(listed)
    assert "model/export.json" in json.loads((exported / MANIFEST).read_text())["files"]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert _predict(run, tmp_path, capsys, "--threshold", 0.9)[0] == 0
    metrics = run / "metrics.json"
    metrics.write_text(metrics.read_text().replace("accuracy", "accuracY", 1))
    status, err = _predict(run, tmp_path, capsys, "--threshold", 0.9)
    assert_clean_error(status, err, "metrics.json has changed since it was written", "train the run again")
    shutil.copy(tiny_run / "metrics.json", metrics)
    (run / "model" / "tokenizer.json").unlink()
    assert_clean_error(*_predict(run, tmp_path, capsys, "--threshold", 0.9), "tokenizer.json is missing")
    shutil.copy(tiny_run / "model" / "tokenizer.json", run / "model" / "tokenizer.json")
    (run / MANIFEST).unlink()
    assert_clean_error(*_predict(run, tmp_path, capsys, "--threshold", 0.9), "has no manifest.json")


def test_a_graph_swapped_for_another_exports_and_a_linked_file_are_refused(exported, tiny_dir, tmp_path, capsys):
    """A segment of another run with the same shapes would run silently without its hash."""
    export = tmp_path / "export"
    shutil.copytree(exported, export)
    graphs = json.loads((export / "model" / "export.json").read_text())["graphs"]
    other = tmp_path / "other"
    run_cli(["train", "--task", "mr", "--model", tiny_dir, "--method", "joint", "--exit-layers", "1,2,4",
             "--train-size", "24", "--epochs", "1", "--max-length", "24", "--seed", "7", "--output", other], capsys)
    export_run(other, output=tmp_path / "other-onnx")
    shutil.copy(tmp_path / "other-onnx" / "model" / graphs[1], export / "model" / graphs[1])
    assert_clean_error(*_predict(export, tmp_path, capsys, "--threshold", 0.9), graphs[1], "has changed",
                       "export the run again")
    shutil.copy(exported / "model" / graphs[1], export / "model" / graphs[1])
    (export / "model" / graphs[2]).unlink()
    (export / "model" / graphs[2]).symlink_to(exported / "model" / graphs[2])
    assert_clean_error(*_predict(export, tmp_path, capsys, "--threshold", 0.9), "not a file inside")
    with pytest.raises(FrugalError, match="symbolic link"):
        write_manifest(export)


def _edits(value):
    """Wrong values for a field holding ``value``: of another type, of the same type but changed, and dropped."""
    if isinstance(value, bool):
        return [not value, "yes"]
    if isinstance(value, (int, float)):
        return [value + 1, -1, "1", None]
    if isinstance(value, str):
        return [value + "x", "/etc/passwd", 3]
    if isinstance(value, list):
        return [value[:-1] or [1], value[::-1] + value[:1], "x", []]
    if isinstance(value, dict):
        return [{}, {**value, "extra": 1}, [1]]
    return [1, "x"]


_DROPPED = object()


def _manifests(tiny_run, exported, calibrated):
    return {"run manifest.json": (tiny_run, MANIFEST), "export manifest.json": (exported, MANIFEST),
            "export.json": (exported, "model/export.json"), "operating-point.json": (calibrated, OPERATING_POINT)}


@pytest.mark.parametrize("which", ["run manifest.json", "export manifest.json", "export.json", "operating-point.json"])
def test_every_field_of_each_manifest_edited_is_refused_in_one_line(tiny_run, exported, calibrated, tmp_path, capsys,
                                                                     which):
    """Every top-level field and every file entry, changed to another value, another type or dropped: exit 2 with
    one line naming the file, never a traceback and never an answer."""
    source, name = _manifests(tiny_run, exported, calibrated)[which]
    record = json.loads((source / name).read_text())
    edits = [(k, v) for k, value in record.items() for v in [*_edits(value), _DROPPED]]
    if name == MANIFEST:  # each file entry too: another hash, a path outside, a path that climbs, a missing file
        edits += [("files", {**record["files"], f: "0" * 64}) for f in record["files"]]
        edits += [("files", {**record["files"], p: "0" * 64}) for p in ("/etc/passwd", "../x", "nothing.json")]
    assert len(edits) > 10
    for key, value in edits:
        target = tmp_path / "edited"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        edited = {k: v for k, v in record.items() if k != key} if value is _DROPPED else {**record, key: value}
        if edited == record:
            continue
        (target / name).write_text(json.dumps(edited))
        status, err = _predict(target, tmp_path, capsys, *(() if name == OPERATING_POINT else ("--threshold", 0.9)))
        assert status == 2, (key, value)
        assert_clean_error(status, err, name.split("/")[-1])


def test_foreign_truncated_and_incomplete_point_tensors_are_refused(calibrated, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    point = json.loads((run / OPERATING_POINT).read_text())
    tensors = run / point["tensors"]
    good = tensors.read_bytes()
    tensors.write_bytes(good[: len(good) // 2])
    assert_clean_error(*_predict(run, tmp_path, capsys), OPERATING_POINT, "not the file it was saved with")
    tensors.write_bytes(good)
    assert load_operating_point(run).ensemble is not None
    # another point's tensors under this name, with the JSON's hashes rewritten to match: their shapes are checked
    foreign = save({"ensemble.maps": torch.zeros(2, 2, 4), "ensemble.bias": torch.zeros(2, 2)})
    tensors.write_bytes(foreign)
    digest = sha256_file(tensors)
    renamed = run / f"operating-point.{digest[:16]}.safetensors"
    tensors.rename(renamed)
    record = {k: v for k, v in point.items() if k != "sha256"}
    record.update(tensors=renamed.name, tensors_sha256=digest)
    (run / OPERATING_POINT).write_text(json.dumps({**record, "sha256": record_sha256(record)}))
    assert_clean_error(*_predict(run, tmp_path, capsys), "it belongs to another point")
    # a learned policy without its router would fit a new one on the spot and print the saved figures
    record.update(policy="learned", threshold=0.5, ensemble=False, router=False, tensors=None, tensors_sha256=None)
    (run / OPERATING_POINT).write_text(json.dumps({**record, "sha256": record_sha256(record)}))
    assert_clean_error(*_predict(run, tmp_path, capsys), "has no router")


def test_a_crash_between_the_tensors_and_the_json_leaves_the_old_point(calibrated, tmp_path, monkeypatch):
    import frugalnlp.operating as operating

    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    before = (run / OPERATING_POINT).read_text()
    old = load_operating_point(run)
    old.ensemble.bias = old.ensemble.bias + 1.0  # a new point: other tensors

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(operating, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        old.save(run, overwrite=True)
    monkeypatch.undo()
    assert (run / OPERATING_POINT).read_text() == before
    reloaded = load_operating_point(run)  # the old JSON with its own tensors, never the new ones
    assert (reloaded.ensemble.bias + 1.0).equal(old.ensemble.bias)
    old.save(run, overwrite=True)
    assert load_operating_point(run).ensemble.bias.equal(old.ensemble.bias)
    assert len(list(run.glob("operating-point.*.safetensors"))) == 1  # the replaced tensors are gone


def test_calibrate_takes_the_lock_before_computing(calibrated, tmp_path, capsys, monkeypatch):
    import frugalnlp.curves as curves

    run = tmp_path / "run"
    shutil.copytree(calibrated, run)
    monkeypatch.setattr(curves, "dev_scores", lambda *a, **k: pytest.fail("computed while another held the lock"))
    with point_lock(run):
        status, _, err = run_cli(["calibrate", run, "--target-speedup", 1.5, "--overwrite"], capsys)
    assert_clean_error(status, err, "being calibrated by another process")


def test_a_demo_lists_its_files_but_leaves_its_runs_to_their_own_manifests(tiny_run, tmp_path):
    demo = tmp_path / "demo"
    shutil.copytree(tiny_run, demo / "seed-0" / "joint")
    (demo / "results.json").write_text("{}")
    listed = write_manifest(demo)
    assert set(listed) == {"results.json"}
    verify_manifest(demo / "seed-0" / "joint", "fix")
    assert verify_manifest(demo, "fix") == listed
