"""Plain helpers shared by tests: tiny CIFAR-like image-folder trees and archives of them, and what a test
does when a service it needs (PostgreSQL, Chromium) is missing."""
from __future__ import annotations

import os
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent  # the checkout's root
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CI (.ci/run) sets CNN_ZOO_REQUIRE_SERVICES=1: a missing service is then a failure, never a skip.
REQUIRE_SERVICES_ENV = "CNN_ZOO_REQUIRE_SERVICES"
SERVICE_MARKERS = ("postgres", "browser")  # tests/conftest.py turns any skip of a test marked so into a failure


def services_required() -> bool:
    return os.environ.get(REQUIRE_SERVICES_ENV, "").strip().lower() in ("1", "true", "yes")


def required_message(reason: str) -> str:
    return (f"{reason} -- {REQUIRE_SERVICES_ENV}=1 (as in CI) requires this service: start it or install it "
            f"(.ci/run does both), or unset {REQUIRE_SERVICES_ENV} to skip")


def service_missing(reason: str) -> NoReturn:
    """Skip the test because a service is missing, or fail it with ``reason`` when services are required."""
    if services_required():
        pytest.fail(required_message(reason), pytrace=False)
    pytest.skip(reason)

# Class k is a flat colour with R, G = the digits of k in steps of 24: JPEG's few levels of error can
# never move a pixel to a neighbouring class.
_STEP, _BASE = 24, 8


def class_colour(k: int, i: int, split: str) -> tuple[int, int, int]:
    """Colour of image ``i`` of class index ``k`` in ``split``; B varies per image so files differ."""
    return _BASE + _STEP * (k % 10), _BASE + _STEP * (k // 10 % 10), (7 * i + (128 if split == "test" else 0)) % 256


def label_from_image(image: np.ndarray) -> int:
    """Class index of an (H, W, 3) uint8 image written by ``make_image_folder`` (up to 100 classes)."""
    r, g = (round((float(image[..., c].mean()) - _BASE) / _STEP) for c in (0, 1))
    return r + 10 * g


def make_image_folder(root: str | Path, n_train_per_class: int, n_test_per_class: int, classes: Sequence[str],
                      fmt: str = "png", size: int = 32) -> Path:
    """Write ``root/{train,test}/<class>/NNNN.<fmt>`` (fmt "png" or "jpg"), flat-colour ``size`` x ``size``
    RGB images coloured by ``class_colour`` with k = the class's index in ``sorted(classes)``. Returns root."""
    root = Path(root)
    index = {c: k for k, c in enumerate(sorted(classes))}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.empty((size, size, 3), np.uint8)
                pixels[:] = class_colour(index[cls], i, split)
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    return root


def pack_archive(tree: str | Path, archive: str | Path, wrapper: str | None = None) -> Path:
    """Pack the ``train/`` and ``test/`` of ``tree`` into ``archive`` (.tar, .tar.gz, .tgz, .tar.xz or .zip by
    name), optionally inside one top-level folder ``wrapper``. Members are written in sorted order."""
    tree, archive = Path(tree), Path(archive)
    files = sorted(p for split in ("train", "test") for p in (tree / split).rglob("*") if p.is_file())
    names = [(f"{wrapper}/" if wrapper else "") + p.relative_to(tree).as_posix() for p in files]
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for p, name in zip(files, names):
                zf.write(p, name)
    else:
        mode = {".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz"}.get(archive.suffix, "w")
        with tarfile.open(archive, mode) as tf:
            for p, name in zip(files, names):
                tf.add(p, name)
    return archive
