"""What runs is what was verified: every output we write lists its files with their sha256 in ``manifest.json``
(written by `frugalnlp.rundir.RunDir.commit`), and loading one checks every listed file against it first.

A directory committed inside another (a demo's runs) carries its own manifest and is left out of its
parent's. Files added after the commit (``RUN/onnx``, an operating point) are outside the run's manifest: each
is its own artefact, verified on its own. The manifest guards against files that changed, went missing,
were swapped for another run's or point outside the folder; it is not a signature against someone who
rewrites the manifest too, which is why what loads after it still validates every field it reads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path

from frugalnlp.atomic import write_json
from frugalnlp.errors import FrugalError

MANIFEST = "manifest.json"
KIND = "frugalnlp-manifest"
_CONTROL = (".writer", ".spec.json")  # a writer's pid and resume state: gone once the output is committed
_HEX64 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 of one file's bytes (cached on its path, size and modification time)."""
    stat = os.stat(path)
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: str | os.PathLike) -> dict[str, str]:
    """List every file under ``root`` with its sha256 in ``root/manifest.json`` (atomically); returns the listing.

    Directories holding their own manifest (outputs committed inside this one) are left to it. A symbolic
    link is refused: nothing we write is one, and it could point anywhere."""
    root = Path(root)
    files: dict[str, str] = {}
    for folder, dirs, names in os.walk(root):
        folder = Path(folder)
        link = next((folder / n for n in dirs + names if (folder / n).is_symlink()), None)
        if link is not None:
            raise FrugalError(f"{link} is a symbolic link; an output holds only real files")
        dirs[:] = sorted(d for d in dirs if not (folder / d / MANIFEST).is_file())
        for name in sorted(names):
            path = folder / name
            if folder == root and (name in (MANIFEST, *_CONTROL) or name.startswith(".") and name.endswith(".lock")) \
                    or name.startswith(f".{MANIFEST}.tmp"):
                continue
            files[path.relative_to(root).as_posix()] = sha256_file(path)
    write_json(root / MANIFEST, {"kind": KIND, "files": files})
    return files


def verify_manifest(root: str | os.PathLike, fix: str, complete: tuple[str, ...] = ()) -> dict[str, str]:
    """Check every file ``root/manifest.json`` lists against its sha256; the listing ({relative name: sha256}).
    ``complete``: files and folders (relative to ``root``) every file of which must be listed: what loads.

    FrugalError in one line naming the file and what is wrong (no manifest, a manifest that is not one, a
    name outside the folder or through a symbolic link, a file missing, changed or not listed), ending with
    ``fix``."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FrugalError(f"{root} has no {MANIFEST} (its files cannot be verified: not written by this version of "
                          f"frugalnlp, or not completely); {fix}")
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FrugalError(f"{path} cannot be read as JSON ({str(error).splitlines()[0]}); {fix}") from None
    files = recorded.get("files") if isinstance(recorded, dict) and recorded.get("kind") == KIND else None
    if not isinstance(files, dict) or set(recorded) != {"kind", "files"}:
        raise FrugalError(f"{path} is not a frugalnlp manifest (kind and files, nothing else); {fix}")
    real = root.resolve()
    for name, digest in files.items():
        where = root / name
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise FrugalError(f"{path}: the entry for {name!r} is not a sha256 (64 hex digits); {fix}")
        if (not name or Path(name).is_absolute() or ".." in Path(name).parts or name == MANIFEST
                or real not in where.resolve().parents or _through_link(root, name)):
            raise FrugalError(f"{path} lists {name!r}, which is not a file inside {root}; {fix}")
        if not where.is_file():
            raise FrugalError(f"{where} is missing (listed in {path}); {fix}")
        if sha256_file(where) != digest:
            raise FrugalError(f"{where} has changed since it was written (its sha256 is not the one {path} lists); "
                              f"{fix}")
    for part in complete:
        target = root / part
        found = ([Path(f) / n for f, _, names in os.walk(target) for n in names] if target.is_dir()
                 else [target] if target.exists() else [])
        unlisted = next((f for f in found if f.relative_to(root).as_posix() not in files), None)
        if unlisted is not None:
            raise FrugalError(f"{unlisted} is not listed in {path} (added or renamed after it was written); {fix}")
    return files


def _through_link(root: Path, name: str) -> bool:
    """Whether any part of ``root/name`` below ``root`` is a symbolic link."""
    path = root
    for part in Path(name).parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


def listing_sha256(files: dict[str, str], under: str = "") -> str:
    """One sha256 over the listed files whose names start with ``under`` (names and hashes, in name order):
    what an operating point binds to (``model/``: every graph, config, tokenizer file and export.json)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in files if n.startswith(under)):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()
