"""In-memory datasets (``fashion-mnist``, ``digits``, ``cifar10``, ``cifar100``): every image of a split
as one uint8 ``N x C x S x S`` tensor, read from the dataset's own files (idx, scikit-learn, CIFAR
python pickles) and resized once when ``data.image_size`` differs from the native size."""

from __future__ import annotations

import functools
import gzip
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ftcl.config.types import Data
from ftcl.data.imagesets import (
    DATASETS,
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    FASHION_MNIST_DEFAULT_ROOT,
    Builder,
    DatasetNotFoundError,
    ImageSet,
    Reader,
    Stats,
    TensorImageSet,
    balanced_subset,
    channel_stats,
    data_root,
    not_found,
    resize_uint8,
)


def _in_memory(reader: Reader, num_classes: int, name: str) -> Builder:
    """A builder for a dataset ``reader(root, split) -> (uint8 N x C x H x W, int64 labels)``."""

    def build(
        data: Data, split: str, mode: str, crop_scale: tuple[float, float]
    ) -> ImageSet:
        root = data_root(data)
        images, labels = reader(root, split)
        size = data.image_size or images.shape[-1]
        resized = resize_uint8(torch.from_numpy(images), size)
        stats = channel_stats(resized) if split == "train" else _train_stats(name, root, size)
        keep = torch.from_numpy(balanced_subset(labels, getattr(data, f"{split}_subset")))
        return TensorImageSet(resized[keep], torch.from_numpy(labels)[keep], num_classes, stats)

    return build


@functools.lru_cache(maxsize=16)
def _train_stats(name: str, root: Path | None, size: int) -> Stats:
    """Mean/std of a dataset's whole training split at ``size``, so that a test split is
    normalised exactly like the training split."""
    return channel_stats(resize_uint8(torch.from_numpy(_READERS[name](root, "train")[0]), size))


def _read_idx(path: Path) -> np.ndarray:
    """An idx-format (MNIST) uint8 array from ``path`` (gzipped when its name ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {body.size} values, its header says {shape}")
    return body.reshape(shape).copy()


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)


def _read_fashion_mnist(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    base = root or FASHION_MNIST_DEFAULT_ROOT
    folders = [base, base / "FashionMNIST" / "raw"]
    for folder in folders:
        files = [_idx_file(folder, stem) for stem in stems]
        if all(files):
            images, labels = (_read_idx(f) for f in files)
            return images[:, None], labels.astype(np.int64)
    tried = [folder / f"{stem}[.gz]" for folder in folders for stem in stems]
    raise not_found(
        f"Fashion-MNIST {split} split",
        tried,
        "Install it with `apt-get install dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_DEFAULT_ROOT}), or set data.root to a folder holding "
        f"{stems[0]}.gz and {stems[1]}.gz (plain or gzipped; torchvision's FashionMNIST/raw/ "
        "layout under data.root works too).",
    )


def _read_digits(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits, split 3:1 (stratified, fixed seed); ``root`` is unused."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=DIGITS_SPLIT_SEED,
    )
    keep = np.sort(train_idx if split == "train" else test_idx)
    return images[keep], labels[keep]


def _cifar_reader(folder_name: str, files: Mapping[str, Sequence[str]], label_key: str, how: str) -> Reader:
    """A reader for torchvision's python-pickle CIFAR layout ``<root>/<folder_name>/``."""

    def read(root: Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
        if root is None:
            raise DatasetNotFoundError(f"data.root is not set; {how}")
        folders = [root / folder_name] + ([root] if root.name == folder_name else [])
        candidates = [[folder / name for name in files[split]] for folder in folders]
        paths = next((c for c in candidates if all(p.is_file() for p in c)), None)
        if paths is None:
            raise not_found(f"{folder_name} {split} split", candidates[0], how)
        batches = [_unpickle(p) for p in paths]
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
        return data.reshape(-1, 3, 32, 32), labels

    return read


def _unpickle(path: Path) -> dict:
    """One CIFAR batch file (a trusted pickle, as torchvision reads it)."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


_CIFAR_HOW = (
    "Set data.root to the folder that holds {folder}/ (torchvision's python layout: unpack "
    "{archive} there); nothing is downloaded."
)
_READERS: dict[str, Reader] = {
    "fashion-mnist": _read_fashion_mnist,
    "digits": _read_digits,
    "cifar10": _cifar_reader(
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels",
        _CIFAR_HOW.format(folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz"),
    ),
    "cifar100": _cifar_reader(
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
        "fine_labels",
        _CIFAR_HOW.format(folder="cifar-100-python", archive="cifar-100-python.tar.gz"),
    ),
}
_NUM_CLASSES = {"fashion-mnist": 10, "digits": 10, "cifar10": 10, "cifar100": 100}
for _name, _reader in _READERS.items():
    DATASETS.register(_name)(_in_memory(_reader, _NUM_CLASSES[_name], _name))
