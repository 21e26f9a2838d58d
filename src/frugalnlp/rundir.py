"""The one writer of run directories: work happens in ``OUTPUT.partial``, renamed to ``OUTPUT`` when done.

A run never overwrites another run's output unless asked (``overwrite``); an interrupted run
leaves its ``.partial`` directory (with Trainer checkpoints) for ``resume``. Every file is written
atomically (temporary file + rename), so a reader never sees half a JSON file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from frugalnlp.errors import FrugalError


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class RunDir:
    """A run's output directory, checked before any work starts.

    ``open()`` creates ``path`` to write in, ``commit()`` publishes it. ``resume`` continues in an existing
    ``.partial``; ``overwrite`` replaces a finished output (only once the new one is complete).
    """

    def __init__(self, output: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.final = Path(output)
        self.path = self.final.with_name(self.final.name + ".partial")
        exists = self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir()))
        if exists and not overwrite:
            raise FrugalError(f"output {self.final} already exists and is not empty; "
                              "choose another --output or pass --overwrite")
        if resume:
            if not self.path.is_dir():
                raise FrugalError(f"nothing to resume: {self.path} does not exist; start the run without --resume")
        elif self.path.exists():
            if not overwrite:
                raise FrugalError(f"{self.path} holds an interrupted run; pass --resume to continue it, "
                                  "or --overwrite to discard it")
            shutil.rmtree(self.path)  # the user asked to discard the interrupted run
        self.resume = resume

    def open(self) -> Path:
        """Create the ``.partial`` directory once the inputs are known to be good."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def commit(self) -> Path:
        """Publish the finished run as ``output`` and return that path."""
        if self.final.exists():
            old = self.final.with_name(self.final.name + f".replaced-{os.getpid()}")
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.path, self.final)
        return self.final
