"""Image-classification datasets loaded into uint8 arrays, splits, and a device-resident batch loader.

Datasets: CIFAR-10/100, SVHN (``svhn-extra``: with its 531,131 extra training images), MNIST and
Fashion-MNIST. Sources, tried in order inside ``data_dir``: the official release in torchvision's layout
(``cifar-10-batches-py/`` / ``cifar-100-python/``; SVHN's ``train_32x32.mat`` + ``test_32x32.mat`` (+
``extra_32x32.mat``); the four idx-ubyte files of MNIST / Fashion-MNIST, plain or ``.gz``, in ``MNIST/raw/`` /
``FashionMNIST/raw/`` or ``data_dir`` itself); an image-folder tree ``train/<class>/*`` + ``test/<class>/*``
(PNG or JPEG), either ``data_dir`` itself or a child folder or archive named after the dataset; and finally,
with ``download=True``, torchvision's download, which removes what it wrote if it fails. Gray 28x28 images
(MNIST, Fashion-MNIST) become 3x32x32 (channel replicated, zero-padded by 2) so every model runs unchanged.
Decoded arrays are cached under a content digest so only the first run pays for decoding.
"""
from __future__ import annotations

import abc
import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import shutil
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, MNIST, SVHN, FashionMNIST
from torchvision.datasets import utils as tv_utils

from experiments.config import NUM_CLASSES
from experiments.errors import DataError, UserError
from experiments.zoo_names import cache_root

IMAGE_SIZE = 32
GRAY_SIZE = 28  # MNIST and Fashion-MNIST, padded to IMAGE_SIZE
GRAY_DATASETS = frozenset({"mnist", "fashion-mnist"})
GRAY_PREPROCESS = "gray 28x28 to 3x32x32: channel replicated, zero-padded by 2 on each side"
NO_PREPROCESS = "none"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".zip")
# How a child folder or archive holding a dataset's image folders may be named (lower-case prefixes).
SPELLINGS = {"cifar10": ("cifar10", "cifar-10"), "cifar100": ("cifar100", "cifar-100"), "svhn": ("svhn",),
             "svhn-extra": ("svhn",), "mnist": ("mnist",),
             "fashion-mnist": ("fashion-mnist", "fashion_mnist", "fashionmnist")}
DIGITS = tuple(str(d) for d in range(10))
# Bump when the cached arrays' meaning changes (decoder, ordering), so stale caches are never read.
CACHE_FORMAT = "datasets-v1"
# Everything tarfile, zipfile and their decompressors raise for a damaged or truncated archive.
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, EOFError, OSError)


@dataclass(frozen=True)
class ArrayDataset:
    images: np.ndarray  # (N, H, W, 3) uint8, NHWC
    labels: np.ndarray  # (N,) int64

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if self.labels.dtype != np.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> ArrayDataset:
        return ArrayDataset(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class DatasetBundle:
    name: str  # a key of NUM_CLASSES
    train: ArrayDataset
    test: ArrayDataset
    classes: tuple[str, ...]
    digest: str  # sha256 hex of the source content
    source: str  # the path the data was read from
    mean: tuple[float, float, float]  # per-channel mean of the train images in [0, 1]
    std: tuple[float, float, float]
    preprocess: str = NO_PREPROCESS  # what was done to the stored images (GRAY_PREPROCESS for gray datasets)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------- loading


def load_dataset(name: str, data_dir: str | Path, download: bool = False,
                 cache_dir: str | Path | None = None) -> DatasetBundle:
    """Find ``name`` (a key of NUM_CLASSES) in ``data_dir`` (see the module docstring), decode it once into
    the cache (``cache_dir``, default ``$CNN_ZOO_CACHE`` or ``~/.cache/cnn-zoo``) and return it."""
    if name not in NUM_CLASSES:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(NUM_CLASSES)}")
    data_dir = Path(data_dir).expanduser()
    gray = name in GRAY_DATASETS
    source = _find_source(name, data_dir, download)
    if isinstance(source, _Official):
        release = RELEASES[name]
        if download and source.root is not None:
            _download(name, release, source.root)  # torchvision skips files that pass their md5 check
        digest = release.digest(source)
        decode = partial(release.read, source.folder)
        where = source.folder
    elif source.is_dir():
        raws = _read_tree(source)  # the digest needs every byte anyway; keep them for a cache miss
        digest = _digest_entries((rel, data) for _, _, rel, _, data in raws)
        decode = partial(_assemble, raws, str(source), gray)
        where = source
    else:
        digest = _digest_file(source)
        decode = partial(_read_archive, source, gray)
        where = source

    cache, preprocess = _cache_root(cache_dir), GRAY_PREPROCESS if gray else NO_PREPROCESS
    # The same image folder read as a gray dataset gives other arrays: keep those apart in the cache.
    key = f"{digest}-gray" if gray else digest
    cached = _cache_read(cache, key)
    if cached is None:
        classes, train, test = decode()
        _check_classes(name, classes, where)
        mean, std = _channel_stats(train.images)
        cached = (classes, train, test, mean, std)
        _cache_write(cache, key, {"name": name, "preprocess": preprocess}, cached)
    classes, train, test, mean, std = cached
    _check_classes(name, classes, where)  # a cache entry can be reached under another dataset name
    return DatasetBundle(name=name, train=train, test=test, classes=tuple(classes), digest=digest,
                         source=str(where), mean=mean, std=std, preprocess=preprocess)


@dataclass(frozen=True)
class _Official:
    root: Path | None  # torchvision's ``root`` for the release; None where the files are not in its layout
    folder: Path  # the folder holding the release's files


def _find_source(name: str, data_dir: Path, download: bool) -> _Official | Path:
    release = RELEASES[name]
    looked_for = release.looked_for
    if not release.official_only:
        named = " or ".join(f"{s}*" for s in SPELLINGS[name])
        looked_for += f", train/ + test/ folders, or a folder or {'/'.join(ARCHIVE_SUFFIXES)} archive named {named}"
    fetched = _Official(data_dir, data_dir.joinpath(*release.subdir))  # where --download puts the release
    if not data_dir.exists():
        if download:
            return fetched
        raise DataError(f"data directory {data_dir} does not exist (looked for {looked_for} in it); "
                        f"pass --download to fetch {name} there, or --data-dir pointing at your copy")
    official = release.locate(data_dir) if data_dir.is_dir() else None
    if official is not None:
        return official
    images = None if release.official_only else _image_source(name, data_dir, release.tarball)
    if images is not None:
        return images
    if download:
        return fetched
    hint = (f"; {data_dir / release.tarball} is the official release: extract it there (tar -xzf) or pass "
            f"--download" if release.tarball and (data_dir / release.tarball).is_file() else "")
    raise DataError(f"no {name} data in {data_dir}: looked for {looked_for}{hint}; "
                    f"pass --download to fetch the official release, or --data-dir pointing at your copy")


def _image_source(name: str, data_dir: Path, tarball: str | None) -> Path | None:
    """An image-folder tree or archive of ``name``: ``data_dir`` itself, or a child named after the dataset."""
    if data_dir.is_file():
        if _is_archive(data_dir):
            return data_dir
        raise DataError(f"--data-dir {data_dir} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    if _has_splits(data_dir):
        return data_dir
    # Extracted folders before archives (an extracted copy usually sits beside its archive), then by name.
    candidates = sorted((p for p in data_dir.iterdir() if _matches_name(name, p.name)),
                        key=lambda p: (not p.is_dir(), p.name))
    for path in candidates:
        if path.is_dir():
            root = _tree_root(path)
            if root is not None:
                return root
        elif _is_archive(path) and path.name != tarball:
            return path
    return None


def _matches_name(name: str, filename: str) -> bool:
    """Whether ``filename`` starts with a spelling of ``name`` and no longer one of another dataset's
    (cifar-100.zip is not CIFAR-10's)."""
    lower = filename.lower()
    longest = {other: max((len(s) for s in spellings if lower.startswith(s)), default=0)
               for other, spellings in SPELLINGS.items()}
    return longest[name] > 0 and longest[name] == max(longest.values())


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _has_splits(path: Path) -> bool:
    return all((path / split).is_dir() for split in SPLITS)


def _tree_root(path: Path) -> Path | None:
    """``path`` if it holds train/ and test/, else its single visible subfolder that does."""
    if _has_splits(path):
        return path
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subdirs[0] if len(subdirs) == 1 and _has_splits(subdirs[0]) else None


def _image_key(parts: Sequence[str]) -> tuple[str, str] | None:
    """(split, class) for a path ``split/class/file.png`` relative to the tree root; None for anything else."""
    if len(parts) != 3 or parts[0] not in SPLITS or any(p.startswith(".") for p in parts):
        return None
    return (parts[0], parts[1]) if parts[2].lower().endswith(IMAGE_SUFFIXES) else None


# Raw images before decoding: (split, class, relative path, where-for-messages, bytes).
_Raw = tuple[str, str, str, str, bytes]


def _read_tree(root: Path) -> list[_Raw]:
    """The tree's images, sorted by relative path."""
    rels = sorted(p.relative_to(root).as_posix() for split in SPLITS for p in (root / split).glob("*/*")
                  if p.is_file())
    raws = []
    for rel in rels:
        key = _image_key(PurePosixPath(rel).parts)
        if key is not None:
            try:
                raws.append((*key, rel, str(root / rel), (root / rel).read_bytes()))
            except OSError as e:
                raise DataError(f"cannot read {root / rel}: {e.strerror}") from None
    return raws


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile silently ends an archive at a missing, truncated or damaged header; make those errors, so a
    cut-short download cannot pass for a smaller dataset."""

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tf)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            raise tarfile.ReadError(f"no valid header or end-of-archive marker at byte {tf.offset}: {e}") from None


def _open_decompressed(path: Path) -> BinaryIO:
    """The tar stream inside ``path``, by magic number. gzip/lzma/bz2 file objects, unlike tarfile's own
    stream decompression, raise on a truncated stream and check the trailing checksum."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(path, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _read_archive(path: Path, gray: bool) -> tuple[list[str], ArrayDataset, ArrayDataset]:
    """Read every image straight out of the archive; contents may be wrapped in one top-level folder."""
    raws: list[_Raw] = []
    wrappers: set[str] = set()

    def add(member: str, read: Callable[[], bytes]) -> None:
        parts = PurePosixPath(member).parts
        if parts and parts[0] == "/":
            parts = parts[1:]
        wrapper = ""
        if len(parts) == 4 and parts[1] in SPLITS and not parts[0].startswith((".", "__MACOSX")):
            wrapper, parts = parts[0], parts[1:]
        key = _image_key(parts)
        if key is not None:
            wrappers.add(wrapper)
            raws.append((*key, "/".join(parts), f"{member} in archive {path}", read()))

    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        add(info.filename, lambda: zf.read(info))
        else:
            with _open_decompressed(path) as stream:
                # Stream mode reads the file once, front to back: far faster than random access.
                with tarfile.open(fileobj=stream, mode="r|", tarinfo=_StrictTarInfo) as tf:
                    for member in tf:
                        if member.isfile():
                            add(member.name, lambda: tf.extractfile(member).read())
                # Read the padding after the end marker too, so the decompressor verifies its checksum.
                while stream.read(1 << 20):
                    pass
    except _ARCHIVE_ERRORS as e:
        raise DataError(f"archive {path} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if len(wrappers) > 1:
        tops = ", ".join(sorted(f"{w}/" if w else "(top level)" for w in wrappers))
        raise DataError(f"archive {path} holds more than one train/ + test/ tree: {tops}")
    return _assemble(raws, f"archive {path}", gray)


def _decode(data: bytes, where: str, gray: bool = False) -> np.ndarray:
    """(32, 32, 3) RGB, or (28, 28) luminance for a gray dataset."""
    size = GRAY_SIZE if gray else IMAGE_SIZE
    try:
        with Image.open(io.BytesIO(data)) as im:
            # load() decodes fully, so a truncated file raises here (PIL's LOAD_TRUNCATED_IMAGES is False).
            im.load()
            if im.size != (size, size):
                raise DataError(f"image {where} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
            return np.asarray(im.convert("L" if gray else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {where}: {e}") from None


def _assemble(raws: list[_Raw], where: str, gray: bool) -> tuple[list[str], ArrayDataset, ArrayDataset]:
    """Decode into per-split arrays ordered by (class, path), so a tree and its archive give equal arrays."""
    per_split = {split: sorted({cls for s, cls, *_ in raws if s == split}) for split in SPLITS}
    if not per_split["train"] or not per_split["test"]:
        raise DataError(f"no PNG or JPEG images under train/<class>/ and test/<class>/ in {where}")
    if per_split["train"] != per_split["test"]:
        only = sorted(set(per_split["train"]) ^ set(per_split["test"]))
        raise DataError(f"train/ and test/ have different class folders in {where}: "
                        f"{', '.join(only[:5])}{' ...' if len(only) > 5 else ''} only in one")
    classes = per_split["train"]
    index = {cls: i for i, cls in enumerate(classes)}
    datasets = []
    for split in SPLITS:
        items = sorted((index[cls], rel, w, data) for s, cls, rel, w, data in raws if s == split)
        shape = (GRAY_SIZE, GRAY_SIZE) if gray else (IMAGE_SIZE, IMAGE_SIZE, 3)
        images = np.empty((len(items), *shape), np.uint8)
        for i, (_, _, w, data) in enumerate(items):
            images[i] = _decode(data, w, gray)
        labels = np.array([label for label, *_ in items], np.int64)
        datasets.append(ArrayDataset(_gray_to_rgb32(images) if gray else images, labels))
    return classes, datasets[0], datasets[1]


def _gray_to_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) gray to (N, 32, 32, 3): the channel replicated, zero-padded by 2 on each side, so every
    zoo model (built for 3x32x32) runs unchanged."""
    pad = (IMAGE_SIZE - GRAY_SIZE) // 2
    out = np.zeros((len(images), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    out[:, pad:pad + GRAY_SIZE, pad:pad + GRAY_SIZE] = images[..., None]
    return out


def _check_classes(name: str, classes: Sequence[str], where: Path) -> None:
    if len(classes) != NUM_CLASSES[name]:
        raise DataError(f"{where} has {len(classes)} classes but {name} has {NUM_CLASSES[name]}; "
                        f"check --dataset and --data-dir")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())  # torchvision's download errors span lines


# ------------------------------------------------------------------------------------- official releases


class _Release(abc.ABC):
    """An official release as torchvision keeps it: ``files`` in ``root / *subdir``."""

    subdir: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    looked_for = ""  # for messages
    tarball: str | None = None  # the release archive itself: to extract, never an image-folder archive
    official_only = False  # True: image folders cannot hold this dataset
    refetch = "rerun with --download to fetch them"  # what to do about missing files in torchvision's layout
    loose = True  # the files may also sit directly in data_dir, outside torchvision's layout

    def locate(self, data_dir: Path) -> _Official | None:
        """The release in or at ``data_dir``: its torchvision folder (even if incomplete), or loose files."""
        n = len(self.subdir)
        if n and data_dir.parts[-n:] == self.subdir:  # pointed at the folder itself
            return _Official(data_dir.parents[n - 1], data_dir)
        if n and data_dir.joinpath(*self.subdir).is_dir():
            return _Official(data_dir, data_dir.joinpath(*self.subdir))
        if self.loose and any(self.find(data_dir, f) for f in self.files):
            return _Official(None if n else data_dir, data_dir)
        return None

    def find(self, folder: Path, file: str) -> Path | None:
        return folder / file if (folder / file).is_file() else None

    def content(self, path: Path) -> bytes:
        """What the digest covers: the file's bytes."""
        try:
            return path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None

    def digest(self, source: _Official) -> str:
        missing = [f for f in self.files if self.find(source.folder, f) is None]
        if missing:
            fix = self.refetch if source.root else "add them, or pass --data-dir pointing at a complete copy"
            raise DataError(f"{source.folder} lacks {', '.join(missing)}; {fix}")
        return _digest_entries((f, self.content(self.find(source.folder, f))) for f in self.files)

    @abc.abstractmethod
    def read(self, folder: Path) -> tuple[list[str], ArrayDataset, ArrayDataset]:
        """(class names, train, test) from the release's files in ``folder``."""

    @abc.abstractmethod
    def download(self, root: Path) -> None:
        """Fetch the release into torchvision's ``root`` (skipping files that pass their checksum)."""


class _CifarRelease(_Release):
    """The python release (pickled batches), read through torchvision, which checks the files' md5."""

    loose = False
    refetch = "delete it and rerun with --download"

    def __init__(self, cls: type[CIFAR10]) -> None:
        self.cls = cls
        self.subdir = (cls.base_folder,)
        self.tarball = cls.filename
        self.looked_for = f"{cls.base_folder}/"

    @property
    def files(self) -> tuple[str, ...]:  # read when needed: tests substitute torchvision's file lists
        return tuple(n for n, _ in self.cls.train_list + self.cls.test_list) + (self.cls.meta["filename"],)

    def read(self, folder: Path) -> tuple[list[str], ArrayDataset, ArrayDataset]:
        try:
            splits = [self.cls(folder.parent, train=train) for train in (True, False)]
        except RuntimeError as e:  # torchvision's md5 check failed
            raise DataError(f"{folder} is incomplete or corrupt ({e}); delete it and rerun with --download") from None
        datasets = [ArrayDataset(np.ascontiguousarray(ds.data, np.uint8), np.asarray(ds.targets, np.int64))
                    for ds in splits]
        return list(splits[0].classes), datasets[0], datasets[1]

    def download(self, root: Path) -> None:
        self.cls(root, train=True, download=True)


class _SvhnRelease(_Release):
    """SVHN's cropped digits (format 2): one MATLAB file per split."""

    def __init__(self, extra: bool) -> None:
        self.splits = ("train", "test", "extra") if extra else ("train", "test")
        self.files = tuple(SVHN.split_list[s][1] for s in self.splits)
        self.official_only = extra
        self.looked_for = " + ".join(self.files)
        if extra:
            self.looked_for += (" (image folders have no extra split: merge its images into train/ and use "
                                "--dataset svhn)")

    def read(self, folder: Path) -> tuple[list[str], ArrayDataset, ArrayDataset]:
        train, test, *extra = (_read_mat(folder / f) for f in self.files)
        if extra:
            train = ArrayDataset(np.concatenate([train.images, extra[0].images]),
                                 np.concatenate([train.labels, extra[0].labels]))
        return list(DIGITS), train, test

    def download(self, root: Path) -> None:
        for split in self.splits:
            url, filename, md5 = SVHN.split_list[split]
            tv_utils.download_url(url, str(root), filename, md5)


class _IdxRelease(_Release):
    """MNIST's idx-ubyte files (Fashion-MNIST uses the same names and format), plain or gzipped."""

    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")

    def __init__(self, cls: type[MNIST], classes: Sequence[str]) -> None:
        self.cls = cls
        self.classes = list(classes)
        self.subdir = (cls.__name__, "raw")
        self.looked_for = f"{cls.__name__}/raw/ or the idx-ubyte files ({self.files[0]}[.gz], ...)"

    def find(self, folder: Path, file: str) -> Path | None:
        return super().find(folder, file) or super().find(folder, f"{file}.gz")

    def content(self, path: Path) -> bytes:
        """The decompressed bytes, so a gzipped and a plain copy have one digest."""
        data = super().content(path)
        if path.suffix != ".gz":
            return data
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}: {e})") from None

    def read(self, folder: Path) -> tuple[list[str], ArrayDataset, ArrayDataset]:
        datasets = []
        for images_file, labels_file in (self.files[:2], self.files[2:]):
            x_path, y_path = self.find(folder, images_file), self.find(folder, labels_file)
            images = _parse_idx(self.content(x_path), x_path, (None, GRAY_SIZE, GRAY_SIZE))
            labels = _parse_idx(self.content(y_path), y_path, (len(images),))
            if len(labels) and labels.max() >= len(self.classes):
                raise DataError(f"{y_path} has label {labels.max()}; {self.cls.__name__} labels are 0..9")
            datasets.append(ArrayDataset(_gray_to_rgb32(images), labels.astype(np.int64)))
        return self.classes, datasets[0], datasets[1]

    def download(self, root: Path) -> None:
        self.cls(root, train=True, download=True)


RELEASES: dict[str, _Release] = {
    "cifar10": _CifarRelease(CIFAR10), "cifar100": _CifarRelease(CIFAR100),
    "svhn": _SvhnRelease(extra=False), "svhn-extra": _SvhnRelease(extra=True),
    "mnist": _IdxRelease(MNIST, DIGITS), "fashion-mnist": _IdxRelease(FashionMNIST, FashionMNIST.classes),
}


def _read_mat(path: Path) -> ArrayDataset:
    """One SVHN split: X (32, 32, 3, N) uint8 and y (N, 1) in 1..10, where 10 is the digit 0."""
    from scipy.io import loadmat  # scipy is slow to import and only SVHN needs it
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (MatReadError, ValueError, OSError, IndexError, EOFError, NotImplementedError, zlib.error) as e:
        raise DataError(f"cannot read {path}: truncated or not a MATLAB v5 file ({type(e).__name__}: "
                        f"{_one_line(e)})") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise DataError(f"{path} lacks the X and y arrays of SVHN's cropped digits")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise DataError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
    n = x.shape[3]
    if y.shape not in ((n, 1), (n,)) or y.dtype.kind not in "uif":
        raise DataError(f"{path}: y is {y.dtype} {y.shape}, expected numbers ({n}, 1) for the {n} images in X")
    labels = y.reshape(n)
    if n and (labels.min() < 1 or labels.max() > 10 or (labels != np.round(labels)).any()):
        raise DataError(f"{path}: labels must be the integers 1..10 (10 is the digit 0)")
    # SVHN labels the digit 0 as 10; torchvision maps it to 0 the same way.
    return ArrayDataset(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels.astype(np.int64) % 10)


def _parse_idx(data: bytes, path: Path, shape: tuple[int | None, ...]) -> np.ndarray:
    """An idx file of unsigned bytes (two zero bytes, type 0x08, the number of dimensions, the sizes as
    big-endian uint32, the data) whose sizes match ``shape`` (None: any size)."""
    ndim, head = len(shape), 4 + 4 * len(shape)
    if len(data) < head:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than its header")
    if data[:3] != b"\0\0\x08" or data[3] != ndim:
        raise DataError(f"{path} is not a {ndim}-dimensional idx-ubyte file (magic number 0x{data[:4].hex()})")
    sizes = struct.unpack(f">{ndim}I", data[4:head])
    if any(want is not None and got != want for got, want in zip(sizes, shape)):
        raise DataError(f"{path} holds {'x'.join(map(str, sizes))} values, expected "
                        f"{'x'.join('N' if w is None else str(w) for w in shape)}")
    if len(data) != head + math.prod(sizes):
        raise DataError(f"{path} is {len(data)} bytes but its header says {head + math.prod(sizes)}: truncated "
                        f"or damaged")
    return np.frombuffer(data, np.uint8, offset=head).reshape(sizes)


def _download(name: str, release: _Release, root: Path) -> None:
    folders = [root.joinpath(*release.subdir[:i]) for i in range(len(release.subdir) + 1)]
    try:
        with _removed_on_failure(folders):
            root.mkdir(parents=True, exist_ok=True)
            release.download(root)
    except Exception as e:  # URLError, HTTPError, timeouts, checksum RuntimeError, disk errors
        raise DataError(f"could not download {name} into {root} ({type(e).__name__}: {_one_line(e)}); without "
                        f"internet, pass --data-dir pointing at a copy (official release or image-folder "
                        f"archive)") from None


@contextlib.contextmanager
def _removed_on_failure(folders: Sequence[Path]) -> Iterator[None]:
    """If the block raises, remove what it created: new entries in each of ``folders`` (outermost first)
    and the missing parents of the outermost, so a failed download leaves the disk as it found it."""
    missing = [p for p in (folders[0], *folders[0].parents) if not p.exists()]
    before = {f: set(f.iterdir()) for f in folders if f.is_dir()}
    try:
        yield
    except BaseException:
        for folder in reversed(folders):
            if folder in before and folder.is_dir():
                for path in set(folder.iterdir()) - before[folder]:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ digests


def _digest_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    return h.hexdigest()


def _digest_entries(entries: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (name, content) pairs, length-prefixed so no two different listings collide."""
    h = hashlib.sha256()
    for name, data in entries:
        encoded = name.encode()
        h.update(len(encoded).to_bytes(8, "little") + encoded + len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- cache

_Cached = tuple[list[str], ArrayDataset, ArrayDataset, tuple[float, float, float], tuple[float, float, float]]
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _cache_root(cache_dir: str | Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else cache_root()) / CACHE_FORMAT


def _cache_read(cache: Path, digest: str) -> _Cached | None:
    entry = cache / digest
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = [np.load(entry / f"{a}.npy", mmap_mode=None, allow_pickle=False) for a in _ARRAYS]
        train, test = ArrayDataset(arrays[0], arrays[1]), ArrayDataset(arrays[2], arrays[3])
        return list(meta["classes"]), train, test, tuple(meta["mean"]), tuple(meta["std"])
    except (OSError, ValueError, KeyError) as e:
        # Entries appear by rename, so this is outside damage: drop the entry and decode again.
        warnings.warn(f"ignoring damaged dataset cache {entry} ({type(e).__name__}: {e})", stacklevel=3)
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _cache_write(cache: Path, digest: str, about: dict[str, str], cached: _Cached) -> None:
    """Write into a temporary folder and rename it into place, so readers never see a partial entry.
    ``about`` (dataset name, preprocessing) goes into meta.json for people reading the cache."""
    classes, train, test, mean, std = cached
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache))
    except OSError as e:
        warnings.warn(f"cannot write the dataset cache in {cache} ({e}); set CNN_ZOO_CACHE to a writable "
                      f"folder to skip decoding next time", stacklevel=3)
        return
    try:
        for a, array in zip(_ARRAYS, (train.images, train.labels, test.images, test.labels)):
            np.save(tmp / f"{a}.npy", array, allow_pickle=False)
        meta = {**about, "classes": list(classes), "mean": list(mean), "std": list(std),
                "train_size": len(train), "test_size": len(test)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(tmp, cache / digest)
    except OSError as e:
        # Either a concurrent process renamed its identical entry first, or the disk is full.
        if not (cache / digest).is_dir():
            warnings.warn(f"cannot write the dataset cache {cache / digest} ({e})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and (population) std in [0, 1], from 256-bin histograms with integer sums."""
    values = np.arange(256, dtype=np.int64)
    n = images.shape[0] * images.shape[1] * images.shape[2]
    mean, std = [], []
    for c in range(3):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.int64)
        s1, s2 = int(hist @ values), int(hist @ (values * values))
        mean.append(s1 / n / 255)
        # A constant channel carries no information; std 1 keeps it finite instead of dividing by zero.
        std.append(((s2 * n - s1 * s1) ** 0.5) / n / 255 or 1.0)
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


# ---------------------------------------------------------------------------------------- splits, subsets


def split_train_val(train: ArrayDataset, val_size: int, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """Hold out ``val_size`` images, stratified by class (largest-remainder rounding of each class's share),
    chosen by a numpy Generator seeded with ``seed``. Both parts keep dataset order."""
    n = len(train)
    if val_size < 0 or val_size >= n:
        raise DataError(f"val_size must be in [0, {n - 1}] for a training set of {n} images, got {val_size}")
    if val_size == 0:
        return train, train.take(np.arange(0, dtype=np.int64))
    classes, counts = np.unique(train.labels, return_counts=True)
    # Integer floors of each class's share val_size * count / n; the largest remainders get the leftover
    # images (the stable sort breaks ties by class index).
    take, remainders = np.divmod(val_size * counts, n)
    take[np.argsort(-remainders, kind="stable")[: val_size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(train.labels == c))[:k] for c, k in zip(classes, take)])
    is_val = np.zeros(n, bool)
    is_val[val_idx] = True
    return train.take(np.flatnonzero(~is_val)), train.take(np.flatnonzero(is_val))


def class_balanced_subset(ds: ArrayDataset, n: int) -> ArrayDataset:
    """The first ``n // C`` images of each of the C classes in dataset order, one more for each of the first
    ``n % C`` classes; the result keeps dataset order."""
    classes = np.unique(ds.labels)
    if n < 0 or n > len(ds):
        raise DataError(f"subset size must be in [0, {len(ds)}], got {n}")
    base, extra = divmod(n, len(classes)) if len(classes) else (0, 0)
    picked = []
    for i, c in enumerate(classes):
        want = base + (i < extra)
        idx = np.flatnonzero(ds.labels == c)
        if len(idx) < want:
            raise DataError(f"a class-balanced subset of {n} needs {want} images of class {c}, which has {len(idx)}")
        picked.append(idx[:want])
    return ds.take(np.sort(np.concatenate(picked)) if picked else np.arange(0, dtype=np.int64))


# ------------------------------------------------------------------------------------------- augmentation


def augment_batch(x: torch.Tensor, offsets_y: torch.Tensor, offsets_x: torch.Tensor, flips: torch.Tensor,
                  padding: int, size: int | None = None) -> torch.Tensor:
    """Per-image random crop with zero padding, then horizontal flip, on NHWC images (uint8, or float from
    ``resize_batch``).

    Image i is ``crop(pad(x[i], padding), top=offsets_y[i], left=offsets_x[i])`` at the original size (or
    ``size`` x ``size``), mirrored left-right where ``flips[i]``: exactly torchvision's RandomCrop(size,
    padding) followed by RandomHorizontalFlip for those parameters. One pad and one gather for the batch.
    """
    b, h, w, _ = x.shape
    if size is not None:
        h = w = size
    padded = F.pad(x, (0, 0, padding, padding, padding, padding)) if padding else x
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    rows = offsets_y[:, None] + ys  # (B, H)
    # A flip reads the crop's columns right to left; folding it into the index keeps a single gather.
    cols = offsets_x[:, None] + torch.where(flips[:, None].bool(), w - 1 - xs, xs)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def sample_augmentation(n: int, padding: int, hflip: bool, generator: torch.Generator,
                        span: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offsets_y, offsets_x, flips) for n images: offsets uniform on [0, span] (default 2*padding), flips
    Bernoulli(0.5), all independent, drawn from ``generator`` on its device."""
    kw = {"generator": generator, "device": generator.device}
    high = (2 * padding if span is None else span) + 1
    offsets_y = torch.randint(0, high, (n,), **kw)
    offsets_x = torch.randint(0, high, (n,), **kw)
    flips = torch.randint(0, 2, (n,), **kw).bool() if hflip else torch.zeros(n, dtype=torch.bool, device=kw["device"])
    return offsets_y, offsets_x, flips


def resize_batch(x: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 NHWC images bilinearly resized to ``side`` x ``side``: float NHWC (a view of NCHW memory) on the
    0-255 scale, as torchvision's Resize((side, side)). Every dataset here is 32x32 and only ever upsampled,
    where antialiasing changes nothing."""
    nchw = x.permute(0, 3, 1, 2).float()
    return F.interpolate(nchw, size=(side, side), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def sample_mixup(steps: int, batch: int, alpha: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp draws for ``steps`` batches: lambda ~ Beta(alpha, alpha) per batch (on the host: numpy's Beta
    sampler seeded by one draw from ``generator``, which has no Beta of its own) and a permutation of the batch
    per batch (on the generator's device)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=steps))
    perms = torch.rand(steps, batch, generator=generator, device=generator.device).argsort(dim=1)
    return lam, perms


def mixup_batch(x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018) of one batch with itself in ``perm`` order: ``lam * x + (1 - lam) * x[perm]``
    and the same mixture of one-hot targets, whose cross-entropy is BiT's mixup_criterion."""
    target = F.one_hot(y, num_classes).float()
    return x * lam + x[perm] * (1 - lam), target * lam + target[perm] * (1 - lam)


class DeviceLoader:
    """Device-resident batches: the uint8 images live on ``device``; each epoch reshuffles with
    ``generator`` and applies per-image random crop (zero padding) + horizontal flip + normalisation on
    the device in whole batches; no DataLoader, no worker processes.

    Train mode (``train=True``) yields ``(x, y)``: x float32 NCHW normalised, y int64, both on ``device``.
    All of an epoch's random numbers (permutation, crop offsets, flips) are drawn from ``generator`` when
    iteration starts, so its state between epochs (saved in checkpoints) determines the next epoch exactly.
    ``drop_last`` defaults to True so every batch has the same shape and torch.compile never recompiles.
    ``crop_padding=0`` disables the crop, ``hflip=False`` the flip. ``shard=(rank, world)`` (torchrun) yields
    rank's ``batch_size // world`` slice of every global batch; all ranks must share the generator's seed.
    Transfer options (BiT-HyperRule), each off by default and drawing nothing from ``generator`` when off:
    ``resize=(precrop, crop)`` resizes to precrop and crops a random crop x crop square (replacing the padded
    crop) in training, and resizes to crop in evaluation; ``mixup_alpha`` > 0 mixes each training batch with
    itself (``sample_mixup``) and yields one-hot-mixed float targets of width ``num_classes``; ``epoch_size``
    samples per epoch are drawn as back-to-back permutations (a training set smaller than a batch repeats).

    Eval mode (``train=False``) yields ``(x, y, valid)``: every sample exactly once in dataset order, no
    augmentation. The last batch is padded to ``batch_size`` by repeating samples from the start, again
    for fixed shapes; ``valid`` is the number of real samples at the front of the batch (``batch_size``
    except in the last batch), so metrics must use ``x[:valid]`` / ``y[:valid]``.
    """

    def __init__(self, ds: ArrayDataset, batch_size: int, device: torch.device, mean: Sequence[float],
                 std: Sequence[float], *, train: bool, crop_padding: int = 4, hflip: bool = True,
                 generator: torch.Generator | None = None, channels_last: bool = False,
                 drop_last: bool | None = None, shard: tuple[int, int] = (0, 1),
                 resize: tuple[int, int] | None = None, mixup_alpha: float = 0.0, num_classes: int | None = None,
                 epoch_size: int | None = None) -> None:
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        rank, world = shard
        if train and batch_size % world:
            raise UserError(f"batch size {batch_size} must be divisible by the {world} processes (global batch "
                            f"= the recipe's batch size)")
        if drop_last is None:
            drop_last = train
        if train and world > 1 and not drop_last:
            raise ValueError("a sharded training loader needs drop_last: a short last batch has no equal slices")
        if drop_last and not train:
            raise ValueError("eval mode yields every sample once; drop_last must be False or None")
        if train and drop_last and (epoch_size or len(ds)) < batch_size:
            raise UserError(f"batch size {batch_size} exceeds the {len(ds)} training images")
        if mixup_alpha and not num_classes:
            raise ValueError("MixUp mixes one-hot targets: give num_classes")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.channels_last = channels_last
        self.drop_last = drop_last
        self.shard = shard
        self.resize, self.mixup_alpha, self.num_classes, self.epoch_size = resize, mixup_alpha, num_classes, epoch_size
        if generator is None:
            # Seeded from the global RNG so torch.manual_seed governs data order too.
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(torch.randint(0, 2**62, (1,))))
        self.generator = generator
        self.images = torch.from_numpy(np.ascontiguousarray(ds.images)).to(self.device)
        self.labels = torch.from_numpy(np.ascontiguousarray(ds.labels)).to(self.device)
        # x / 255 normalised == x * scale - shift; one multiply-subtract per batch.
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t

    def __len__(self) -> int:
        n = self.epoch_size or len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, int]]:
        return self._train_batches() if self.train else self._eval_batches()

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC permuted to NCHW is already channels_last in memory; copy the uint8 (cheaper than float) if
        # the caller wants plain contiguous NCHW.
        x = x.permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x.float().mul_(self._scale).sub_(self._shift)

    def _order(self, size: int) -> torch.Tensor:
        """``size`` sample indices: back-to-back permutations of the dataset (one when ``size`` is its length)."""
        n, g = len(self.labels), self.generator
        perms = [torch.randperm(n, generator=g, device=g.device) for _ in range(-(-size // n))]
        return (perms[0] if len(perms) == 1 else torch.cat(perms)[:size]).to(self.device)

    def _train_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        size = self.epoch_size or len(self.labels)
        perm = self._order(size)
        span = self.resize[0] - self.resize[1] if self.resize else None
        oy, ox, flips = (t.to(self.device) for t in
                         sample_augmentation(size, self.crop_padding, self.hflip, self.generator, span))
        augment = self.crop_padding > 0 or self.hflip
        # Every rank draws the same permutation and augmentation; each takes its slice of every global batch.
        rank, world = self.shard
        local = self.batch_size // world
        mix = sample_mixup(len(self), local, self.mixup_alpha, self.generator) if self.mixup_alpha else None
        for b in range(len(self)):
            start = b * self.batch_size + rank * local
            pos = slice(start, start + local)
            idx = perm[pos]
            x = self.images[idx]
            if self.resize:
                x = augment_batch(resize_batch(x, self.resize[0]), oy[pos], ox[pos], flips[pos], 0, self.resize[1])
            elif augment:
                x = augment_batch(x, oy[pos], ox[pos], flips[pos], self.crop_padding)
            x, y = self._normalise(x), self.labels[idx]
            if mix is not None:
                x, y = mixup_batch(x, y, float(mix[0][b]), mix[1][b].to(self.device), self.num_classes)
            yield x, y

    def _eval_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        n = len(self.labels)
        for b in range(len(self)):
            start = b * self.batch_size
            idx = torch.arange(start, start + self.batch_size, device=self.device) % n
            x = self.images[idx] if self.resize is None else resize_batch(self.images[idx], self.resize[1])
            yield self._normalise(x), self.labels[idx], min(self.batch_size, n - start)
