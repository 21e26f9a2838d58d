"""The one writer of run directories: work happens in ``OUTPUT.partial``, renamed to ``OUTPUT`` when done.

A run never overwrites another run's output unless asked (``overwrite``); an interrupted run
leaves its ``.partial`` directory (with Trainer checkpoints) for ``resume``. Every file is written
atomically (temporary file + rename), so a reader never sees half a JSON file. One process at a
time writes an output: it holds an OS lock on ``OUTPUT.partial`` (released by the OS if it dies).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from frugalnlp.atomic import jsonable, write_json
from frugalnlp.errors import FrugalError
from frugalnlp.manifest import write_manifest

WRITER = ".writer"  # pid of the process that holds the lock
SPEC = ".spec.json"  # what the run was started with, checked by --resume
KIND = ".kind"  # which command's output a directory is: only that command may --overwrite it
RESUMABLE = ("run", "demo", "papa-ranking", "papa-run")  # the kinds whose commands take --resume
# Outputs written before KIND existed, told apart by the file their command writes.
_KIND_FILES = (("frontier.json", "frontier"), ("curve.json", "evaluation"), ("results.json", "demo"),
               ("gradients.json", "gradients"), ("ranking.json", "papa-ranking"), ("constants.json", "papa-constants"),
               ("sweep.json", "papa-sweep"), ("compare.json", "papa-compare"))
_open: list[RunDir] = []  # this process's uncommitted runs, for `abandon_failed_starts`


def check_output_path(output: str | os.PathLike, flag: str = "--output") -> Path:
    """Refuse an output path that is a symbolic link or climbs with '..' (it could land anywhere)."""
    path = Path(output)
    if ".." in path.parts:
        raise FrugalError(f"{flag} {output} contains '..'; give a path without it")
    if path.is_symlink():
        raise FrugalError(f"{flag} {output} is a symbolic link; give the real path")
    return path


def check_output_file(output: str | os.PathLike, overwrite: bool = False, flag: str = "--output") -> Path:
    """An output file that can be written: not a directory, in an existing folder, new unless ``overwrite``."""
    output = check_output_path(output, flag)
    if output.is_dir():
        raise FrugalError(f"{flag} {output} is a directory; give a file path such as {output / 'predictions.jsonl'}")
    if not output.parent.is_dir():
        raise FrugalError(f"{flag} {output}: the folder {output.parent} does not exist; create it first")
    if output.exists() and not overwrite:
        raise FrugalError(f"output {output} already exists; choose another {flag} or pass --overwrite")
    return output


def output_kind(path: Path) -> str | None:
    """Which command's output the directory ``path`` is (``run``, ``export``, ``demo``, ...); None if none we know."""
    marker = path / KIND
    if marker.is_file():
        return marker.read_text().strip()
    config = path / "config.json"
    if config.is_file():
        try:
            recorded = json.loads(config.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(recorded, dict) and recorded.get("kind") == "frugalnlp-run":
            return "export" if "exported_from" in recorded else "run"
        if isinstance(recorded, dict) and recorded.get("kind") == "frugalnlp-papa-run":
            return "papa-run"
    return next((kind for name, kind in _KIND_FILES if (path / name).is_file()), None)


def check_inputs(output: Path, inputs: list[str | os.PathLike], kind: str) -> None:
    """FrugalError unless writing ``output`` leaves every input whole: the output is not an input, does not hold
    one, and inside one it is new or an earlier output of this command (``RUN/onnx``, ``RUN/eval-test-...``)."""
    out = output.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source or out in source.parents:
            raise FrugalError(f"--output {output} is the input {given}" + ("" if out == source else "'s folder")
                              + ": writing it would destroy the input; choose another --output")
        if source in out.parents and output.exists() and output_kind(output) != kind:
            raise FrugalError(f"--output {output} is part of the input {given}: writing it would destroy the input; "
                              "choose another --output")


class RunDir:
    """A run's output directory, checked before any work starts.

    ``open()`` creates ``path`` to write in and locks it, ``commit()`` publishes it. ``resume`` continues
    in an existing ``.partial``; ``overwrite`` replaces a finished output (only once the new one is complete)
    and only one that ``kind``'s command wrote (never a run with an export, an export with a demo, ...).
    ``inputs``: what the command reads, which the output may never be, hold or replace part of.
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False, resume: bool = False, kind: str = "run",
                 inputs: list[str | os.PathLike] = ()) -> None:
        self.final = check_output_path(output)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.overwrite = overwrite
        self.kind = kind
        check_inputs(self.final, list(inputs), kind)
        self._check_final()
        for existing in (self.final, self.path):
            self._check_kind(existing)
        if resume:
            if not self.path.is_dir():
                raise FrugalError(f"nothing to resume: {self.path} does not exist; start the run without --resume")
        elif self.path.exists() and not overwrite:
            if self._held():
                raise self._busy()
            if kind in RESUMABLE:
                raise FrugalError(f"{self.path} holds an interrupted run; pass --resume to continue it, "
                                  "or --overwrite to discard it")
            raise FrugalError(f"{self.path} holds an interrupted {kind} output; pass --overwrite to discard it "
                              "and start again")
        self.resume = resume
        self._lock: int | None = None

    def _check_kind(self, existing: Path) -> None:
        """Refuse to replace or continue in a directory another command wrote (a run, an export, a demo...)."""
        if not existing.is_dir() or not any(existing.iterdir()):
            return
        found = output_kind(existing)
        # a .partial from before kinds were recorded may not show one yet: only a known other kind is refused there
        if found != self.kind and (existing == self.final and self.overwrite or existing == self.path and found):
            what = f"the output of another command ({found})" if found else "not an output of this command"
            raise FrugalError(f"{existing} is {what}; --overwrite only replaces an earlier {self.kind} output: "
                              "choose another --output")

    def _check_final(self) -> None:
        exists = self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir()))
        if exists and not self.overwrite:
            raise FrugalError(f"output {self.final} already exists and is not empty; "
                              "choose another --output or pass --overwrite")

    def open(self, spec: dict | None = None) -> Path:
        """Create and lock the ``.partial`` directory once the inputs are known to be good.

        ``spec`` (JSON-able) is recorded; resuming with another spec is refused, naming the fields
        that differ. A second process writing the same output is refused, naming the holder's pid.
        """
        for earlier in [r for r in _open if r.path.resolve() == self.path.resolve()]:
            earlier.abandon_if_empty()  # a failed earlier attempt in this process (e.g. interrupted in a notebook)
        if not self.resume and self.path.exists() and self.overwrite:
            self._take_lock()  # the user asked to discard an interrupted run: not one still running
            shutil.rmtree(self.path)
            self._release()
        try:
            self.path.mkdir(parents=True, exist_ok=self.resume)
        except FileExistsError:
            raise FrugalError(f"{self.path} was just created by another process ({self._holder()}); "
                              "choose another --output")
        self._take_lock()
        self._check_final()  # another process may have published the output since the check
        (self.path / WRITER).write_text(f"{os.getpid()}\n")
        (self.path / KIND).write_text(f"{self.kind}\n")
        if spec is not None:
            self._check_spec(spec)
        _open.append(self)
        return self.path

    def _take_lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy()
        self._lock = fd

    def _busy(self) -> FrugalError:
        return FrugalError(f"{self.final} is being written by another process ({self._holder()}); "
                           "wait for it to finish or choose another --output")

    def _held(self) -> bool:
        """Whether a live process holds the lock on ``.partial`` (tried without taking it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases the lock if this call took it

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the lock
            self._lock = None

    def _holder(self) -> str:
        try:
            return f"pid {int((self.path / WRITER).read_text())}"
        except (OSError, ValueError):
            return "pid unknown"

    def _check_spec(self, spec: dict) -> None:
        file = self.path / SPEC
        if self.resume and file.exists():
            try:
                recorded = json.loads(file.read_text())
            except (OSError, ValueError):
                recorded = None
            if not isinstance(recorded, dict):
                self._release()
                raise FrugalError(f"{file} is not the settings the interrupted run recorded (not a JSON object); "
                                  "pass --overwrite to start again")
            current = json.loads(json.dumps(spec, default=jsonable))
            differ = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
            if differ:
                details = "; ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in differ)
                self._release()
                raise FrugalError(f"--resume with other settings than the interrupted run ({details}); "
                                  "resume with the same settings, or pass --overwrite to start again")
        else:
            write_json(file, spec)

    def commit(self) -> Path:
        """List its files with their sha256 (`frugalnlp.manifest`), publish the finished run as ``output`` and
        return that path."""
        for name in (WRITER, SPEC):
            (self.path / name).unlink(missing_ok=True)
        write_manifest(self.path)
        if self.final.exists():
            old = self.final.with_name(self.final.name + f".replaced-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.path, self.final)
        self._release()
        if self in _open:
            _open.remove(self)
        return self.final

    def abandon_if_empty(self) -> None:
        """After a failed start: remove the ``.partial`` this process created if nothing was saved in it."""
        if not self.resume and self.path.is_dir() and {p.name for p in self.path.iterdir()} <= {WRITER, SPEC, KIND}:
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()
        if self in _open:
            _open.remove(self)


def abandon_failed_starts() -> None:
    """Called when a command fails: failed starts leave nothing behind; runs with saved work stay for --resume."""
    while _open:
        _open[-1].abandon_if_empty()
