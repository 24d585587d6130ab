"""Shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_image_folder, pack_archive

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="session")
def tiny_image_folder_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10-shaped ``cifar10-tiny.tar.gz`` (PNG, 20 train + 5 test images per class, labels readable
    with ``tests.helpers.label_from_image``), alone in its folder: pass it, or its parent as data_dir, to
    ``experiments.data.load_dataset("cifar10", ...)`` (give cache_dir a tmp_path to keep ~/.cache clean)."""
    tree = make_image_folder(tmp_path_factory.mktemp("tiny_tree"), 20, 5, CIFAR10_CLASSES)
    return pack_archive(tree, tmp_path_factory.mktemp("tiny_data") / "cifar10-tiny.tar.gz")
