"""experiments.data: loading (trees, archives, official layout), cache, errors, splits, augmentation, loader."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import ImageFile
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST
from torchvision.datasets import utils as tv_utils

from experiments import data
from experiments.data import (ArrayDataset, DeviceLoader, augment_batch, class_balanced_subset, load_dataset,
                              sample_augmentation, split_train_val)
from experiments.errors import DataError, UserError
from experiments.config import load_recipe
from tests.helpers import (CIFAR10_CLASSES, DIGITS, REPO, class_colour, digit_images, label_from_gray, label_from_image,
                           make_idx_release, make_image_folder, pack_archive, write_idx, write_svhn_mat)

REAL_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CNN_ZOO_CACHE", str(cache))
    return cache


def tree(root: Path, fmt: str = "png", classes=CIFAR10_CLASSES, n_train: int = 3, n_test: int = 2,
         size: int = 32) -> Path:
    return make_image_folder(root, n_train, n_test, classes, fmt=fmt, size=size)


def check_bundle(bundle, n_train: int = 3, n_test: int = 2) -> None:
    assert bundle.name == "cifar10" and bundle.num_classes == 10
    assert bundle.classes == tuple(sorted(CIFAR10_CLASSES))
    for ds, n in ((bundle.train, n_train), (bundle.test, n_test)):
        assert ds.images.shape == (10 * n, 32, 32, 3) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int64 and len(ds) == 10 * n
        assert [label_from_image(im) for im in ds.images] == ds.labels.tolist()
        assert ds.labels.tolist() == sorted(ds.labels.tolist())  # ordered by class
    assert len(bundle.digest) == 64
    pixels = bundle.train.images.reshape(-1, 3) / 255
    np.testing.assert_allclose(bundle.mean, pixels.mean(axis=0), atol=1e-12)
    std = pixels.std(axis=0)
    # These flat-colour images have a constant channel: the loader gives it std 1 instead of dividing by 0.
    np.testing.assert_allclose(bundle.std, np.where(std < 1e-9, 1.0, std), atol=1e-12)


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("fmt", ["png", "jpg"])
@pytest.mark.parametrize("layout", ["tree", "child-tree", "tar.gz", "tar.xz", "zip", "tgz-wrapped", "tar-as-dir"])
def test_loads_image_folders_and_archives(tmp_path: Path, layout: str, fmt: str) -> None:
    src = tree(tmp_path / "src", fmt)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if layout == "tree":
        data_dir, source = src, src
    elif layout == "child-tree":
        source = shutil.copytree(src, data_dir / "cifar-10-images" / "wrapped")
    elif layout == "tgz-wrapped":
        source = pack_archive(src, data_dir / "cifar10-jpeg.tgz", wrapper="cifar10-jpeg")
    elif layout == "tar-as-dir":
        data_dir = source = pack_archive(src, tmp_path / "anything.tar")
    else:
        source = pack_archive(src, data_dir / f"cifar10.{layout}")
    bundle = load_dataset("cifar10", data_dir)
    check_bundle(bundle)
    assert bundle.source == str(source)
    if fmt == "png":  # lossless: the exact pixels come back
        assert tuple(bundle.train.images[4, 0, 0]) == class_colour(1, 1, "train")  # class 1, image 1


def test_shared_tiny_archive_fixture(tiny_image_folder_archive: Path) -> None:
    by_dir = load_dataset("cifar10", tiny_image_folder_archive.parent)
    check_bundle(by_dir, n_train=20, n_test=5)
    assert load_dataset("cifar10", tiny_image_folder_archive).digest == by_dir.digest


def test_tree_and_archive_give_equal_arrays_and_archive_digest_is_file_sha256(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    (tmp_path / "data").mkdir()
    archive = pack_archive(src, tmp_path / "data" / "cifar10.zip")
    a, b = load_dataset("cifar10", src), load_dataset("cifar10", archive.parent)
    for x, y in ((a.train, b.train), (a.test, b.test)):
        np.testing.assert_array_equal(x.images, y.images)
        np.testing.assert_array_equal(x.labels, y.labels)
    assert b.digest == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert a.mean == b.mean and a.std == b.std


def test_dataset_name_selects_matching_child(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    pack_archive(tree(tmp_path / "c10"), tmp_path / "data" / "cifar-10.tar")
    pack_archive(tree(tmp_path / "c100", classes=[f"k{i:02d}" for i in range(100)], n_train=1, n_test=1),
                 tmp_path / "data" / "cifar100.zip")
    assert load_dataset("cifar10", tmp_path / "data").source.endswith("cifar-10.tar")
    c100 = load_dataset("cifar100", tmp_path / "data")
    assert c100.source.endswith("cifar100.zip") and c100.num_classes == 100
    assert [label_from_image(im) for im in c100.train.images] == list(range(100))


def test_digest_follows_content(tmp_path: Path) -> None:
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    digest_a = load_dataset("cifar10", a).digest
    assert load_dataset("cifar10", b).digest == digest_a  # same files written twice
    make_image_folder(tmp_path / "other", 1, 0, ["cat"])
    shutil.copy(tmp_path / "other" / "train" / "cat" / "0000.png", b / "train" / "dog" / "0001.png")
    changed = load_dataset("cifar10", b)
    assert changed.digest != digest_a
    assert changed.train.images[5 * 3 + 1, 0, 0, 0] != load_dataset("cifar10", a).train.images[5 * 3 + 1, 0, 0, 0]


def test_second_load_hits_cache(tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    pack_archive(tree(tmp_path / "src"), data_dir / "cifar10.tar.xz")
    first = load_dataset("cifar10", data_dir)
    entry = isolated_cache / data.CACHE_FORMAT / first.digest
    assert sorted(p.name for p in entry.iterdir()) == ["meta.json", "test_x.npy", "test_y.npy", "train_x.npy",
                                                       "train_y.npy"]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["classes"] == list(first.classes) and meta["name"] == "cifar10"
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # temp folder removed

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode", no_decoding)
    second = load_dataset("cifar10", data_dir)
    np.testing.assert_array_equal(second.train.images, first.train.images)
    np.testing.assert_array_equal(second.test.labels, first.test.labels)
    assert (second.classes, second.mean, second.std, second.digest) == (first.classes, first.mean, first.std,
                                                                        first.digest)
    # An explicit cache_dir is a different, empty cache: it decodes again.
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset("cifar10", data_dir, cache_dir=tmp_path / "elsewhere")


def test_damaged_cache_entry_is_rebuilt(tmp_path: Path, isolated_cache: Path) -> None:
    src = tree(tmp_path / "src")
    first = load_dataset("cifar10", src)
    (isolated_cache / data.CACHE_FORMAT / first.digest / "train_x.npy").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="damaged dataset cache"):
        again = load_dataset("cifar10", src)
    np.testing.assert_array_equal(again.train.images, first.train.images)
    assert (isolated_cache / data.CACHE_FORMAT / first.digest / "train_x.npy").stat().st_size > 100


def test_channel_stats_are_exact() -> None:
    images = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    mean, std = data._channel_stats(images)
    x = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(axis=(0, 1, 2)), rtol=1e-12)


# ------------------------------------------------------------------------------------- official layout


def write_official(root: Path, cls, images: dict[str, np.ndarray], labels: dict[str, list[int]],
                   classes: list[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """Pickles in the official python-release format; the md5 lists point at these fake files."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    label_key = "labels" if cls is CIFAR10 else "fine_labels"
    for name, x in images.items():  # x: (N, 32, 32, 3) -> rows of 3072 bytes, channel-planar like the release
        entry = {b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), label_key.encode(): labels[name]}
        (folder / name).write_bytes(pickle.dumps({k.decode(): v for k, v in entry.items()}))
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({cls.meta["key"]: classes}))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(cls, "train_list", [[n, md5[n]] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5[n]] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})
    return folder


def fake_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict, dict]:
    rng = np.random.default_rng(1)
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list]
    images = {n: rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for n in names}
    labels = {n: [int(v) for v in rng.integers(0, 10, 4)] for n in names}
    classes = ["zebra", "apple"] + [f"class{i}" for i in range(8)]  # official order is not sorted order
    return write_official(root, CIFAR10, images, labels, classes, monkeypatch), images, labels


def test_official_cifar10_layout_read_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, images, labels = fake_cifar10(tmp_path, monkeypatch)
    bundle = load_dataset("cifar10", tmp_path)
    train_names = [n for n, _ in CIFAR10.train_list]
    np.testing.assert_array_equal(bundle.train.images, np.concatenate([images[n] for n in train_names]))
    assert bundle.train.labels.tolist() == sum((labels[n] for n in train_names), [])
    np.testing.assert_array_equal(bundle.test.images, images["test_batch"])
    assert bundle.classes[:2] == ("zebra", "apple") and bundle.source == str(folder)
    assert load_dataset("cifar10", folder).digest == bundle.digest  # pointing at the folder itself works too

    (folder / "data_batch_3").write_bytes(b"damaged")
    with pytest.raises(DataError, match="cifar-10-batches-py is incomplete or corrupt"):
        load_dataset("cifar10", tmp_path)


def test_official_cifar100_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    images = {n: rng.integers(0, 256, (k, 32, 32, 3), dtype=np.uint8) for n, k in (("train", 6), ("test", 3))}
    labels = {"train": [0, 99, 5, 5, 42, 1], "test": [7, 8, 9]}
    write_official(tmp_path, CIFAR100, images, labels, [f"c{i}" for i in range(100)], monkeypatch)
    bundle = load_dataset("cifar100", tmp_path)
    assert bundle.num_classes == 100 and bundle.train.labels.tolist() == labels["train"]
    np.testing.assert_array_equal(bundle.test.images, images["test"])


def test_download_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(self) -> None:  # what torchvision's download() leaves behind, without the network
        calls.append(self.root)
        if not (Path(self.root) / CIFAR10.base_folder).exists():
            fake_cifar10(Path(self.root), monkeypatch)

    monkeypatch.setattr(CIFAR10, "download", fake_download)
    bundle = load_dataset("cifar10", tmp_path / "new" / "dir", download=True)
    assert len(bundle.train) == 20 and calls

    def offline(self) -> None:
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"could not download cifar10 .*--data-dir"):
        load_dataset("cifar10", tmp_path / "offline", download=True)


FAILING_DOWNLOADS = {  # dataset: (owner, attribute torchvision downloads with, a file it writes under root)
    "cifar10": (CIFAR10, "download", "cifar-10-python.tar.gz"),
    "mnist": (MNIST, "download", "MNIST/raw/train-images-idx3-ubyte.gz"),
    "svhn": (tv_utils, "download_url", "train_32x32.mat"),
}


@pytest.mark.parametrize("name", sorted(FAILING_DOWNLOADS))
def test_failed_download_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Offline, the quickstart's --download must not leave an empty data/ (or half a file) behind."""
    owner, attribute, written = FAILING_DOWNLOADS[name]

    def offline(*args) -> None:  # (self) of a dataset class, or download_url's (url, root, filename, md5)
        root = Path(args[1] if owner is tv_utils else args[0].root)
        (root / written).parent.mkdir(parents=True, exist_ok=True)
        (root / written).write_bytes(b"the first bytes of the release")
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(owner, attribute, offline)
    with pytest.raises(DataError, match=f"could not download {name} into .*Temporary failure .*--data-dir") as e:
        load_dataset(name, tmp_path / "data" / "new", download=True)
    assert "\n" not in str(e.value) and not (tmp_path / "data").exists()

    kept = tmp_path / "mine"  # an existing folder keeps exactly what it held
    (kept / "MNIST" / "raw").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    (kept / "MNIST" / "raw" / "README").write_text("mine")
    with pytest.raises(DataError, match="could not download"):
        load_dataset(name, kept, download=True)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*")) == ["MNIST", "MNIST/raw", "MNIST/raw/README",
                                                                                "notes.txt"]


def test_download_of_svhn_and_mnist_goes_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = []

    def fake_download_url(url: str, root: str, filename: str, md5: str) -> None:  # what the real one leaves
        fetched.append(filename)
        split = filename.split("_")[0]
        write_svhn_mat(Path(root) / filename, *digit_images(2 if split != "test" else 1, split, gray=False))

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    bundle = load_dataset("svhn-extra", tmp_path / "svhn", download=True)
    assert fetched == ["train_32x32.mat", "test_32x32.mat", "extra_32x32.mat"] and len(bundle.train) == 40

    def fake_mnist_download(self) -> None:  # torchvision keeps the .gz files and their extracted copies
        make_idx_release(Path(self.raw_folder), 3, 1, suffixes=("", ".gz"))

    monkeypatch.setattr(MNIST, "download", fake_mnist_download)
    bundle = load_dataset("mnist", tmp_path / "mnist", download=True)
    assert (len(bundle.train), len(bundle.test)) == (30, 10)
    assert bundle.source == str(tmp_path / "mnist" / "MNIST" / "raw")


# -------------------------------------------------------------------------------------------------- errors


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere does not exist .*cifar-10-batches-py.*--download.*--data-dir"):
        load_dataset("cifar10", tmp_path / "nowhere")


def test_empty_data_dir_lists_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "cifar-100.zip").write_bytes(b"")  # the other dataset's archive is not a candidate
    with pytest.raises(DataError, match=r"no cifar10 data in .*cifar-10-batches-py/.*train/ \+ test/.*\.tar\.xz"):
        load_dataset("cifar10", tmp_path)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError, match="official release: extract it"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.xz", ".zip", ".tar"])
def test_corrupt_archive_is_named(tmp_path: Path, suffix: str) -> None:
    archive = tmp_path / f"cifar10{suffix}"
    archive.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError, match=f"archive {archive} is corrupt or truncated"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".zip", ".tar"])
def test_truncated_archive_is_named(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "data").mkdir()
    archive = pack_archive(tree(tmp_path / "src"), tmp_path / "data" / f"cifar10{suffix}")
    content = archive.read_bytes()
    # Compressed formats must also notice a missing trailer; a plain tar's last 30 bytes are only padding.
    for cut in (len(content) // 2,) + ((len(content) - 30,) if suffix != ".tar" else ()):
        archive.write_bytes(content[:cut])
        with pytest.raises(DataError, match=f"cifar10{suffix} is corrupt or truncated"):
            load_dataset("cifar10", archive.parent)


def test_tar_cut_or_damaged_at_a_header_is_an_error(tmp_path: Path) -> None:
    """tarfile itself would end the archive there without complaint, silently dropping the rest."""
    (tmp_path / "data").mkdir()
    archive = pack_archive(tree(tmp_path / "src"), tmp_path / "data" / "cifar10.tar")
    with tarfile.open(archive) as tf:
        header = tf.getmembers()[-5].offset  # a member of test/, so both splits still have images
    content = archive.read_bytes()
    for damaged in (content[:header], content[:header] + b"x" + content[header + 1:]):
        archive.write_bytes(damaged)
        with pytest.raises(DataError, match=f"archive {archive} is corrupt or truncated .*at byte {header}"):
            load_dataset("cifar10", archive.parent)


@pytest.mark.parametrize("fmt,suffix", [("jpg", ".tar.gz"), ("png", ".zip")])
def test_truncated_image_in_archive_names_member(tmp_path: Path, fmt: str, suffix: str) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    src = tree(tmp_path / "src", fmt)
    victim = src / "test" / "frog" / f"0001.{fmt}"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (tmp_path / "data").mkdir()
    archive = pack_archive(src, tmp_path / "data" / f"cifar10{suffix}", wrapper="top")
    with pytest.raises(DataError, match=f"cannot decode image top/test/frog/0001.{fmt} in archive {archive}"):
        load_dataset("cifar10", tmp_path / "data")


def test_undecodable_file_in_tree_names_path(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    (src / "train" / "cat" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"cannot decode image {src / 'train' / 'cat' / '0000.png'}"):
        load_dataset("cifar10", src)


def test_wrong_class_count_for_dataset(tmp_path: Path) -> None:
    five = tree(tmp_path / "five", classes=CIFAR10_CLASSES[:5])
    with pytest.raises(DataError, match="has 5 classes but cifar10 has 10"):
        load_dataset("cifar10", five)
    ten = tree(tmp_path / "ten")
    load_dataset("cifar10", ten)
    with pytest.raises(DataError, match="has 10 classes but cifar100 has 100"):  # also when served from cache
        load_dataset("cifar100", ten)


def test_train_and_test_classes_must_match(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    shutil.rmtree(src / "test" / "ship")
    with pytest.raises(DataError, match="different class folders .*ship only in one"):
        load_dataset("cifar10", src)


def test_image_must_be_32x32(tmp_path: Path) -> None:
    src = tree(tmp_path / "src")
    make_image_folder(tmp_path / "big", 1, 0, ["cat"], size=40)
    shutil.copy(tmp_path / "big" / "train" / "cat" / "0000.png", src / "train" / "cat" / "0002.png")
    with pytest.raises(DataError, match=f"image {src / 'train' / 'cat' / '0002.png'} is 40x40, expected 32x32"):
        load_dataset("cifar10", src)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


# ------------------------------------------------------------------------------- SVHN, MNIST, Fashion-MNIST


def svhn_files(folder: Path, n_train: int = 3, n_test: int = 2, n_extra: int | None = None) -> dict:
    """SVHN's .mat files in ``folder``; returns {split: (images NHWC, labels 0..9)}."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "test": n_test} | ({"extra": n_extra} if n_extra else {})
    arrays = {split: digit_images(n, split, gray=False) for split, n in sizes.items()}
    for split, (images, labels) in arrays.items():
        write_svhn_mat(folder / f"{split}_32x32.mat", images, labels)
    return arrays


def test_svhn_official_mat_files(tmp_path: Path) -> None:
    arrays = svhn_files(tmp_path)
    bundle = load_dataset("svhn", tmp_path)
    assert bundle.classes == DIGITS and bundle.source == str(tmp_path) and bundle.preprocess == "none"
    for ds, (images, labels) in ((bundle.train, arrays["train"]), (bundle.test, arrays["test"])):
        np.testing.assert_array_equal(ds.images, images)
        assert ds.labels.tolist() == labels.tolist() == [label_from_image(im) for im in ds.images]
    assert 0 in bundle.train.labels.tolist()  # stored as 10
    np.testing.assert_allclose(bundle.mean, (arrays["train"][0].reshape(-1, 3) / 255).mean(axis=0), atol=1e-12)


def test_svhn_extra_joins_the_training_set(tmp_path: Path) -> None:
    arrays = svhn_files(tmp_path, n_extra=4)
    plain, extra = load_dataset("svhn", tmp_path), load_dataset("svhn-extra", tmp_path)
    np.testing.assert_array_equal(extra.train.images, np.concatenate([arrays["train"][0], arrays["extra"][0]]))
    assert extra.train.labels.tolist() == arrays["train"][1].tolist() + arrays["extra"][1].tolist()
    np.testing.assert_array_equal(extra.test.images, plain.test.images)
    assert len(plain.train) == 30 and extra.digest != plain.digest

    (tmp_path / "extra_32x32.mat").unlink()
    with pytest.raises(DataError, match="lacks extra_32x32.mat; rerun with --download"):
        load_dataset("svhn-extra", tmp_path)
    folders = make_image_folder(tmp_path / "folders", 1, 1, DIGITS)
    with pytest.raises(DataError, match="no svhn-extra data in .*image folders have no extra split"):
        load_dataset("svhn-extra", folders)


@pytest.mark.parametrize("name,where", [("mnist", "MNIST/raw"), ("mnist", "."), ("mnist", "pointed-at"),
                                        ("fashion-mnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("suffixes", [(".gz",), ("",), ("", ".gz")])
def test_idx_releases_become_padded_rgb(tmp_path: Path, name: str, where: str, suffixes: tuple[str, ...]) -> None:
    folder = tmp_path / ("some/raw" if where == "pointed-at" else where)
    arrays = make_idx_release(folder, 3, 2, suffixes)
    bundle = load_dataset(name, folder if where == "pointed-at" else tmp_path)
    assert bundle.source == str(folder) and bundle.preprocess == data.GRAY_PREPROCESS
    assert bundle.classes == (DIGITS if name == "mnist" else tuple(FashionMNIST.classes))
    for ds, (images, labels) in ((bundle.train, arrays["train"]), (bundle.test, arrays["test"])):
        assert ds.images.shape == (len(images), 32, 32, 3) and ds.labels.tolist() == labels.tolist()
        np.testing.assert_array_equal(ds.images[:, 2:30, 2:30], np.repeat(images[..., None], 3, axis=-1))
        border = ds.images.copy()
        border[:, 2:30, 2:30] = 0
        assert not border.any()  # zero padding
    gz_and_plain = load_dataset(name, folder if where == "pointed-at" else tmp_path, cache_dir=tmp_path / "c2")
    assert gz_and_plain.digest == bundle.digest  # the digest covers the decompressed bytes


def test_mnist_and_fashion_mnist_side_by_side(tmp_path: Path) -> None:
    make_idx_release(tmp_path / "MNIST" / "raw", 1, 1)
    make_idx_release(tmp_path / "FashionMNIST" / "raw", 2, 1)
    assert len(load_dataset("mnist", tmp_path).train) == 10
    fashion = load_dataset("fashion-mnist", tmp_path)
    assert len(fashion.train) == 20 and fashion.classes[0] == "T-shirt/top"


@pytest.mark.parametrize("archive", [None, "mnist-png.zip", "fashion-mnist.tar.gz"])
def test_gray_image_folders(tmp_path: Path, archive: str | None) -> None:
    src = make_image_folder(tmp_path / "src", 3, 2, DIGITS, size=28, gray=True)
    if archive:  # beside the other dataset's archive, which is not a candidate
        (tmp_path / "data").mkdir()
        pack_archive(src, tmp_path / "data" / archive)
        other = "fashion-mnist.zip" if archive.startswith("mnist") else "mnist.zip"
        pack_archive(make_image_folder(tmp_path / "other", 1, 1, DIGITS[:3], size=28, gray=True),
                     tmp_path / "data" / other)
    name = "fashion-mnist" if archive and archive.startswith("fashion") else "mnist"
    bundle = load_dataset(name, tmp_path / "data" if archive else src)
    assert bundle.preprocess == data.GRAY_PREPROCESS and bundle.train.images.shape == (30, 32, 32, 3)
    assert [label_from_gray(im) for im in bundle.train.images] == bundle.train.labels.tolist()
    assert not bundle.train.images[:, :2].any() and not bundle.test.images[:, :, 30:].any()


def test_gray_and_colour_reads_of_one_folder_are_cached_apart(tmp_path: Path, isolated_cache: Path) -> None:
    """The same files read as MNIST (28x28, padded) and as SVHN (32x32 expected) must not share a cache entry."""
    src = make_image_folder(tmp_path / "src", 2, 1, DIGITS, size=28, gray=True)
    mnist = load_dataset("mnist", src)
    assert (isolated_cache / data.CACHE_FORMAT / f"{mnist.digest}-gray").is_dir()
    with pytest.raises(DataError, match="is 28x28, expected 32x32"):
        load_dataset("svhn", src)
    big = make_image_folder(tmp_path / "big", 1, 1, DIGITS, size=32, gray=True)
    with pytest.raises(DataError, match="is 32x32, expected 28x28"):
        load_dataset("mnist", big)


def _mnist_damage(folder: Path, how: str) -> str:
    """Damage an MNIST release in ``folder`` and return the error the loader must give."""
    images = folder / "train-images-idx3-ubyte.gz"
    if how == "wrong shape":
        write_idx(images, np.zeros((20, 32, 32), np.uint8))
        return r"train-images-idx3-ubyte.gz holds 20x32x32 values, expected Nx28x28"
    if how == "label count":
        write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
        return r"t10k-labels-idx1-ubyte.gz holds 7 values, expected 10"
    if how == "missing split":
        for f in folder.glob("t10k-*"):
            f.unlink()
        return r"lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; rerun with --download"
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:-20])
        return r"train-images-idx3-ubyte.gz is corrupt or truncated \(EOFError"
    raw = gzip.decompress(images.read_bytes())  # truncated plain file
    images.unlink()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[:-100])
    return rf"train-images-idx3-ubyte is {len(raw) - 100} bytes but its header says {len(raw)}: truncated"


def _svhn_damage(folder: Path, how: str) -> str:
    train = folder / "train_32x32.mat"
    if how == "wrong shape":
        write_svhn_mat(train, np.zeros((5, 28, 28, 3), np.uint8), np.ones(5, np.uint8))
        return r"train_32x32.mat: X is uint8 \(28, 28, 3, 5\), expected uint8 \(32, 32, 3, N\)"
    if how == "label count":
        from scipy.io import savemat
        savemat(train, {"X": np.zeros((32, 32, 3, 5), np.uint8), "y": np.ones((4, 1), np.uint8)})
        return r"y is uint8 \(4, 1\), expected numbers \(5, 1\)"
    if how == "missing split":
        (folder / "test_32x32.mat").unlink()
        return r"lacks test_32x32.mat; rerun with --download"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    return r"cannot read .*train_32x32.mat: truncated or not a MATLAB v5 file"


DAMAGE = ("wrong shape", "label count", "missing split", "truncated")


@pytest.mark.parametrize("name,how", [("svhn", h) for h in DAMAGE] +
                         [("mnist", h) for h in (*DAMAGE, "truncated plain")])
def test_damaged_release_is_one_line_naming_the_file(tmp_path: Path, name: str, how: str) -> None:
    if name == "mnist":
        make_idx_release(tmp_path / "MNIST" / "raw", 2, 1)
        message = _mnist_damage(tmp_path / "MNIST" / "raw", how)
    else:
        svhn_files(tmp_path)
        message = _svhn_damage(tmp_path, how)
    with pytest.raises(DataError, match=message) as e:
        load_dataset(name, tmp_path)
    assert "\n" not in str(e.value)


def test_image_folder_missing_a_split_or_truncated(tmp_path: Path) -> None:
    src = make_image_folder(tmp_path / "src", 2, 1, DIGITS, size=28, gray=True)
    (tmp_path / "data").mkdir()
    archive = pack_archive(src, tmp_path / "data" / "mnist.tar.gz")
    archive.write_bytes(archive.read_bytes()[:-30])
    with pytest.raises(DataError, match="mnist.tar.gz is corrupt or truncated"):
        load_dataset("mnist", tmp_path / "data")
    shutil.rmtree(src / "test")
    pack_archive(src, archive)
    with pytest.raises(DataError, match=r"no PNG or JPEG images under train/<class>/ and test/<class>/ in archive"):
        load_dataset("mnist", tmp_path / "data")
    with pytest.raises(DataError, match=r"no mnist data in .*MNIST/raw/ or the idx-ubyte files"):
        load_dataset("mnist", src)


def test_loose_idx_files_are_not_downloaded_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files directly in --data-dir are the user's copy: --download leaves them alone, and a missing one is
    reported rather than fetched into another folder."""
    make_idx_release(tmp_path, 1, 1)
    monkeypatch.setattr(MNIST, "download", lambda self: pytest.fail("downloaded"))
    assert len(load_dataset("mnist", tmp_path, download=True).train) == 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte; add them, or pass --data-dir"):
        load_dataset("mnist", tmp_path, download=True)


def test_dataset_names_pick_their_own_children() -> None:
    cases = {"cifar-100.zip": {"cifar100"}, "cifar10-jpeg.tgz": {"cifar10"}, "mnist.zip": {"mnist"},
             "Fashion-MNIST.tar": {"fashion-mnist"}, "fashion_mnist": {"fashion-mnist"},
             "svhn.zip": {"svhn", "svhn-extra"}}
    for filename, names in cases.items():
        assert {n for n in data.NUM_CLASSES if data._matches_name(n, filename)} == names, filename


def test_svhn_paper_recipe_and_flag(capsys: pytest.CaptureFixture) -> None:
    """Huang et al. 2017, 4.1-4.2: batch 64, 40 epochs, lr 0.1 / 10 at 50% and 75%, weight decay 1e-4, Nesterov
    0.9, no augmentation, 6,000 validation images; --svhn-extra selects train + extra."""
    from experiments.run import main

    r = load_recipe("densenet-paper-svhn")
    assert (r.batch_size, r.epochs, r.optimizer.lr, r.optimizer.weight_decay, r.val_size) == (64, 40, 0.1, 1e-4, 6000)
    assert (r.optimizer.name, r.optimizer.momentum, r.optimizer.nesterov) == ("sgd", 0.9, True)
    assert (r.schedule.name, r.schedule.milestones, r.schedule.gamma) == ("multistep", (0.5, 0.75), 0.1)
    assert not (r.augment.random_crop or r.augment.hflip) and "drop_rate=0.2" in r.description
    assert main(["--arch", "densenet", "--dataset", "svhn", "--svhn-extra", "--recipe", "densenet-paper-svhn",
                 "--model-arg", "drop_rate=0.2", "--dry-run"]) == 0
    assert "dataset: svhn-extra" in capsys.readouterr().out
    assert main(["--arch", "resnet20", "--dataset", "cifar10", "--svhn-extra", "--dry-run"]) == 2
    assert "--svhn-extra adds SVHN's extra images" in capsys.readouterr().err


@pytest.mark.slow
def test_mnist_end_to_end_and_exit_2(tmp_path: Path) -> None:
    """run.py trains resnet20 on a tiny MNIST release; a truncated file ends with one line and exit 2."""
    make_idx_release(tmp_path / "data" / "MNIST" / "raw", 8, 2)
    cmd = [sys.executable, str(REPO / "experiments" / "run.py"), "--arch", "resnet20", "--recipe", "smoke",
           "--epochs", "1", "--no-tracking", "--no-progress", "--dataset", "mnist",
           "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")]
    env = {**os.environ, "CNN_ZOO_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "out" / "checkpoints").glob("*/last.pt"))
    labels = tmp_path / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-10])
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith("error: ") and "train-labels-idx1-ubyte.gz is corrupt or truncated" in failed.stderr


# -------------------------------------------------------------------------------------- splits, subsets


def labelled(counts: list[int]) -> ArrayDataset:
    """Images whose first pixel is their dataset index (mod 256), classes interleaved."""
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    labels = labels[np.random.default_rng(3).permutation(len(labels))]
    images = np.zeros((len(labels), 2, 2, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels)) % 256
    return ArrayDataset(images, labels)


def test_split_is_stratified_disjoint_covering_and_seeded() -> None:
    ds = labelled([30, 20, 10, 7])
    train, val = split_train_val(ds, 10, seed=0)
    assert len(val) == 10 and len(train) == len(ds) - 10
    # shares 30/67*10=4.48, 2.99, 1.49, 1.04 -> floors 4,2,1,1 (8), largest remainders 0.99 and 0.49 get the rest
    assert np.bincount(val.labels, minlength=4).tolist() == [4, 3, 2, 1]
    ids = lambda d: d.images[:, 0, 0, 0].tolist()  # noqa: E731 - fewer than 256 images, so ids are unique
    assert sorted(ids(train) + ids(val)) == list(range(len(ds)))
    assert ids(val) == sorted(ids(val)) and ids(train) == sorted(ids(train))  # dataset order kept
    np.testing.assert_array_equal(split_train_val(ds, 10, seed=0)[1].images, val.images)
    assert ids(split_train_val(ds, 10, seed=1)[1]) != ids(val)


def test_split_edge_cases() -> None:
    ds = labelled([5, 5])
    train, val = split_train_val(ds, 0, seed=0)
    assert train is ds and len(val) == 0 and val.images.shape == (0, 2, 2, 3)
    assert len(split_train_val(ds, 9, seed=0)[0]) == 1
    for bad in (10, 11, -1):
        with pytest.raises(DataError, match="val_size must be in"):
            split_train_val(ds, bad, seed=0)


def test_class_balanced_subset() -> None:
    ds = labelled([6, 6, 6])
    sub = class_balanced_subset(ds, 8)  # 8 // 3 = 2 each, the remainder 2 goes to classes 0 and 1
    assert np.bincount(sub.labels).tolist() == [3, 3, 2]
    expected = np.sort(np.concatenate([np.flatnonzero(ds.labels == c)[:k] for c, k in ((0, 3), (1, 3), (2, 2))]))
    np.testing.assert_array_equal(sub.images[:, 0, 0, 0], ds.images[expected, 0, 0, 0])
    assert len(class_balanced_subset(ds, 0)) == 0
    with pytest.raises(DataError, match="needs 3 images of class 1, which has 2"):
        class_balanced_subset(labelled([4, 2]), 6)


# ------------------------------------------------------------------------------------------- augmentation


def test_augment_batch_matches_torchvision_for_every_offset_and_flip(device: str) -> None:
    pad = 4
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    params = [(i, oy, ox, f) for i in range(3) for oy in range(2 * pad + 1) for ox in range(2 * pad + 1)
              for f in (False, True)]
    idx, oy, ox, flips = (torch.tensor(col, device=device) for col in zip(*params))
    out = augment_batch(images.to(device)[idx], oy, ox, flips, pad).cpu()
    assert out.dtype == torch.uint8 and out.shape == (len(params), 32, 32, 3)
    for k, (i, top, left, flip) in enumerate(params):
        ref = TF.crop(TF.pad(images[i].permute(2, 0, 1), [pad]), top, left, 32, 32)
        if flip:
            ref = TF.horizontal_flip(ref)
        assert torch.equal(out[k], ref.permute(1, 2, 0)), (i, top, left, flip)


def test_augmentation_parameters_are_uniform_and_independent() -> None:
    n, pad = 200_000, 4
    oy, ox, flips = sample_augmentation(n, pad, True, torch.Generator().manual_seed(5))
    assert oy.min() == 0 and oy.max() == 2 * pad and ox.max() == 2 * pad
    cell = (oy * 9 + ox) * 2 + flips.long()
    counts = torch.bincount(cell, minlength=162).double()
    expected = n / 162
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 161 degrees of freedom: mean 161, sd 18; 300 is ~7.7 sd, while any real bias at n=200k lands far above.
    assert chi2 < 300, chi2
    assert abs(float(flips.double().mean()) - 0.5) < 0.005
    no_flip = sample_augmentation(1000, 0, False, torch.Generator().manual_seed(5))
    assert all(not t.any() for t in no_flip)


# ------------------------------------------------------------------------------------------- DeviceLoader


def ids_dataset(n: int) -> ArrayDataset:
    """Label = dataset index, so batches identify their samples."""
    images = np.random.default_rng(4).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return ArrayDataset(images, np.arange(n, dtype=np.int64))


MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def test_train_epochs_cover_samples_reshuffle_and_replay_from_generator_state() -> None:
    ds = ids_dataset(103)
    gen = torch.Generator().manual_seed(0)
    loader = DeviceLoader(ds, 10, torch.device("cpu"), MEAN, STD, train=True, generator=gen)
    assert len(loader) == 10
    state = gen.get_state()
    epoch1 = list(loader)
    assert len(epoch1) == 10 and all(len(b) == 2 for b in epoch1)
    assert all(x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in epoch1)
    seen = torch.cat([y for _, y in epoch1])
    assert len(set(seen.tolist())) == 100
    epoch2 = list(loader)
    assert torch.cat([y for _, y in epoch2]).tolist() != seen.tolist()
    gen.set_state(state)
    replay = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch1, replay))

    # The batches are exactly: permutation, then augment_batch with sample_augmentation's draws, then normalise.
    gen.set_state(state)
    perm = torch.randperm(103, generator=gen)
    oy, ox, flips = sample_augmentation(103, 4, True, gen)
    raw = augment_batch(torch.from_numpy(ds.images[perm[:10].numpy()]), oy[:10], ox[:10], flips[:10], 4)
    expected = (raw.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / \
        torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(epoch1[0][0], expected, rtol=0, atol=1e-5)


def test_rank_shards_together_are_the_single_process_batches() -> None:
    """torchrun: each rank's slice of every global batch, drawn with the same generator seed, concatenates
    to exactly the batch one process would train on (pixels and labels)."""
    ds = ids_dataset(50)
    single = list(DeviceLoader(ds, 12, torch.device("cpu"), MEAN, STD, train=True,
                               generator=torch.Generator().manual_seed(3)))
    shards = [list(DeviceLoader(ds, 12, torch.device("cpu"), MEAN, STD, train=True, shard=(rank, 3),
                                generator=torch.Generator().manual_seed(3))) for rank in range(3)]
    assert [len(s) for s in shards] == [len(single)] * 3
    for b, (x, y) in enumerate(single):
        assert all(len(s[b][1]) == 4 for s in shards)
        torch.testing.assert_close(torch.cat([s[b][0] for s in shards]), x, rtol=0, atol=0)
        assert torch.cat([s[b][1] for s in shards]).tolist() == y.tolist()
    with pytest.raises(UserError, match="must be divisible by the 5 processes"):
        DeviceLoader(ds, 12, torch.device("cpu"), MEAN, STD, train=True, shard=(0, 5))
    with pytest.raises(ValueError, match="needs drop_last"):
        DeviceLoader(ds, 12, torch.device("cpu"), MEAN, STD, train=True, shard=(0, 3), drop_last=False)


def test_train_without_drop_last_and_without_augmentation() -> None:
    ds = ids_dataset(25)
    loader = DeviceLoader(ds, 10, torch.device("cpu"), MEAN, STD, train=True, crop_padding=0, hflip=False,
                          drop_last=False, generator=torch.Generator().manual_seed(1))
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [10, 10, 5]
    x, y = batches[0]
    expected = (torch.from_numpy(ds.images[y.numpy()]).permute(0, 3, 1, 2).float() / 255 -
                torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="exceeds the 25 training images"):
        DeviceLoader(ds, 32, torch.device("cpu"), MEAN, STD, train=True)


def test_eval_yields_every_sample_once_padded_with_valid_count(device: str) -> None:
    ds = ids_dataset(23)
    loader = DeviceLoader(ds, 10, torch.device(device), MEAN, STD, train=False)
    batches = [(x.cpu(), y.cpu(), v) for x, y, v in loader]
    assert len(loader) == 3 and [v for _, _, v in batches] == [10, 10, 3]
    assert all(x.shape == (10, 3, 32, 32) for x, _, _ in batches)
    assert torch.cat([y[:v] for _, y, v in batches]).tolist() == list(range(23))
    assert batches[-1][1].tolist() == [20, 21, 22] + list(range(7))
    x = batches[1][0]
    expected = (torch.from_numpy(ds.images[10:20]).permute(0, 3, 1, 2).float() / 255 -
                torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-5)
    assert torch.equal(list(loader)[0][0].cpu(), batches[0][0])  # fixed order, no augmentation
    tiny = list(DeviceLoader(ids_dataset(3), 8, torch.device("cpu"), MEAN, STD, train=False))
    assert len(tiny) == 1 and tiny[0][2] == 3 and tiny[0][1].tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    with pytest.raises(ValueError, match="drop_last"):
        DeviceLoader(ds, 10, torch.device("cpu"), MEAN, STD, train=False, drop_last=True)


@pytest.mark.parametrize("train", [True, False])
def test_channels_last_flag(train: bool) -> None:
    ds = ids_dataset(20)
    for channels_last in (False, True):
        x = next(iter(DeviceLoader(ds, 10, torch.device("cpu"), MEAN, STD, train=train,
                                   channels_last=channels_last)))[0]
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_default_generator_follows_global_seed() -> None:
    ds = ids_dataset(20)
    orders = []
    for _ in range(2):
        torch.manual_seed(7)
        orders.append([y.tolist() for _, y in DeviceLoader(ds, 5, torch.device("cpu"), MEAN, STD, train=True)])
    assert orders[0] == orders[1]


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not REAL_ARCHIVE.is_file(), reason=f"{REAL_ARCHIVE} not present")
def test_real_cifar10_jpeg_archive(isolated_cache: Path) -> None:
    start = time.perf_counter()
    bundle = load_dataset("cifar10", REAL_ARCHIVE.parent)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    warm = load_dataset("cifar10", REAL_ARCHIVE.parent)
    warm_s = time.perf_counter() - start
    print(f"cold load {cold:.1f} s, warm load {warm_s:.2f} s")
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (50000, 10000, 10)
    assert bundle.classes[0] == "airplane" and bundle.classes[-1] == "truck"
    assert np.bincount(bundle.train.labels).tolist() == [5000] * 10
    assert bundle.digest == "c20cedc58b2083a1705642fc443e86740d29ba7e569a5f488435c732980006ca"
    np.testing.assert_allclose(bundle.mean, (0.490, 0.480, 0.444), atol=0.005)
    np.testing.assert_allclose(bundle.std, (0.245, 0.243, 0.261), atol=0.005)
    np.testing.assert_array_equal(warm.train.images, bundle.train.images)
