"""Plain helpers shared by tests: tiny CIFAR-like image-folder trees and archives of them, small files in the
official SVHN (.mat) and MNIST (idx-ubyte) formats, and what a test does when a service it needs (PostgreSQL,
Chromium) is missing."""
from __future__ import annotations

import gzip
import os
import struct
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
DIGITS = tuple(str(d) for d in range(10))  # SVHN's and MNIST's class folders

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


def gray_level(k: int, i: int, split: str) -> int:
    """Gray value of image ``i`` of class ``k`` (up to 10 classes) in ``split``: classes 24 apart, images
    within 3 of their class's value."""
    return _BASE + _STEP * k + (i + (2 if split == "test" else 0)) % 4


def label_from_gray(image: np.ndarray) -> int:
    """Class index of a gray image by ``gray_level``: (28, 28), or (32, 32, 3) as the loader pads it."""
    centre = image[image.shape[0] // 2, image.shape[1] // 2]
    return round((float(np.mean(centre)) - _BASE) / _STEP)


def make_image_folder(root: str | Path, n_train_per_class: int, n_test_per_class: int, classes: Sequence[str],
                      fmt: str = "png", size: int = 32, gray: bool = False) -> Path:
    """Write ``root/{train,test}/<class>/NNNN.<fmt>`` (fmt "png" or "jpg"), flat ``size`` x ``size`` images
    with k = the class's index in ``sorted(classes)``: RGB coloured by ``class_colour``, or with ``gray``
    single-channel at ``gray_level``. Returns root."""
    root = Path(root)
    index = {c: k for k, c in enumerate(sorted(classes))}
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                value = gray_level(index[cls], i, split) if gray else class_colour(index[cls], i, split)
                pixels = np.full((size, size) if gray else (size, size, 3), value, np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
    return root


def digit_images(n_per_class: int, split: str, gray: bool) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) with the 10 digit classes interleaved as in the official files: flat (N, 28, 28)
    images at ``gray_level``, or (N, 32, 32, 3) coloured by ``class_colour``; labels uint8 0..9."""
    labels = np.tile(np.arange(10, dtype=np.uint8), n_per_class)
    shape = (28, 28) if gray else (32, 32, 3)
    images = np.stack([np.full(shape, gray_level(k, i, split) if gray else class_colour(k, i, split), np.uint8)
                       for i, k in enumerate(labels)])
    return images, labels


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """``array`` as an idx-ubyte file (MNIST's format), gzipped when ``path`` ends in .gz."""
    path = Path(path)
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def make_idx_release(folder: str | Path, n_train_per_class: int, n_test_per_class: int,
                     suffixes: Sequence[str] = (".gz",)) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST's four idx-ubyte files in ``folder``, once per suffix ("" plain, ".gz"), as torchvision's
    download leaves both; the images are ``digit_images(..., gray=True)``. Returns {split: (images, labels)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train_per_class), ("test", "t10k", n_test_per_class)):
        arrays[split] = images, labels = digit_images(n, split, gray=True)
        for suffix in suffixes:
            write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
            write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return arrays


def write_svhn_mat(path: str | Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """SVHN's cropped-digit format: X (32, 32, 3, N) uint8 and y (N, 1) uint8, the digit 0 labelled 10."""
    from scipy.io import savemat

    savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": np.where(labels == 0, 10, labels).reshape(-1, 1)})
    return Path(path)


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
