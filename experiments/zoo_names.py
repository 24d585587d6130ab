"""The zoo's variant names without importing the zoo when it has not changed: importing it imports torch,
torchvision and timm (seconds), too slow for `run.py --list`. The names are cached under $CNN_ZOO_CACHE
(default ~/.cache/cnn-zoo, as for the datasets), keyed by a hash of the zoo's source files; after an edit
to any of them the zoo is imported once to list its registry again."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

CACHE_FOLDER = "zoo-names-v1"


def cache_root() -> Path:
    """Where the commands keep derived data: $CNN_ZOO_CACHE, else ~/.cache/cnn-zoo."""
    return Path(os.environ.get("CNN_ZOO_CACHE") or Path.home() / ".cache" / "cnn-zoo").expanduser()


def registered_names() -> list[str]:
    """zoo.list_models(): read from the cache when the zoo's source is the one it was written for."""
    path = cache_root() / CACHE_FOLDER / f"{zoo_source_hash()}.json"
    try:
        names = json.loads(path.read_text())
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return names
    except (OSError, ValueError):  # not cached yet, or damaged: list the registry
        pass
    import zoo

    names = zoo.list_models()
    try:  # no rename needed: a reader that meets a half-written file lists the registry again
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(names))
    except OSError:  # a read-only cache: list it again next time
        pass
    return names


def zoo_source_hash() -> str:
    """sha256 over the zoo package's source files, names and bytes."""
    digest = hashlib.sha256()
    for path in sorted(zoo_dir().glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def zoo_dir() -> Path:
    """The zoo package's folder, found without running its __init__."""
    spec = importlib.util.find_spec("zoo")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the zoo package is not importable")
    return Path(next(iter(spec.submodule_search_locations)))

