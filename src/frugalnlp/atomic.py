"""Writing a file atomically: a temporary file in the same directory, then a rename, so a reader (or a crash)
never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically."""
    write_bytes(path, (json.dumps(obj, indent=2, default=jsonable) + "\n").encode())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically: a temporary file in the same directory, then rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonable(value: Any) -> Any:
    """``json.dumps``'s ``default``: arrays and tensors as lists, paths as strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
