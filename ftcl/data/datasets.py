"""Datasets behind ``data.dataset``: a registry of builders that all return an :class:`ImageSet`.

``build_dataset(data, split, mode)`` (``data``: the run config's typed ``data`` section) is the only
entry point the rest of ftcl uses (see the "Data contract" in ``docs/ARCHITECTURE.md``). Items are
``(uint8 image, int label)``:

* in-memory datasets (``fashion-mnist``, ``digits``, ``cifar10``, ``cifar100``) hold every image as
  one ``N x C x S x S`` uint8 tensor (resized once at load time when ``image_size`` differs from the
  native size); crops and all other augmentation happen later on the training device
  (``crops_on_device = True``), so an item is ``C x S x S`` in every mode;
* ``imagefolder`` decodes and crops files per item in the loader workers (``crops_on_device =
  False``): mode ``pretrain`` gives two RandomResizedCrops (``2 x C x S x S``), ``eval`` gives
  Resize(S*8/7) + CenterCrop(S), ``eval_aug`` gives RandomResizedCrop(S, crop_scale) + horizontal flip.
  ``data.decode`` says how the random crops are decoded and resampled (``fast``, the default: one
  decode per file, JPEG DCT scaling when the crops allow it, torch resampling; ``pil``: torchvision's
  transforms on PIL images); the crop boxes are drawn identically either way (``ftcl/data/jpeg.py``).

``mean``/``std`` are those of the whole training split at the view size (both splits use them;
``imagefolder`` uses ImageNet's). ``data.train_subset`` / ``data.test_subset`` keep a
class-balanced, deterministic subset (:func:`balanced_subset`).

Nothing is ever downloaded: every missing folder or file raises :class:`DatasetNotFoundError` (a
``FileNotFoundError``) naming the paths looked at and how to provide them.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate
from torchvision import transforms

from ftcl.config.types import Data
from ftcl.data.jpeg import DECODE_ERRORS, DEFAULT_DECODE, FastCrops, cannot_decode, check_decode
from ftcl.registry import Registry

SPLITS = ("train", "test")
MODES = ("pretrain", "eval", "eval_aug")
FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SUBSET_SEED = 0
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0

Stats = tuple[tuple[float, ...], tuple[float, ...]]
Builder = Callable[[Data, str, str, tuple[float, float]], "ImageSet"]
Reader = Callable[["Path | None", str], tuple[np.ndarray, np.ndarray]]  # (root, split) -> arrays
# name -> builder(data, split, mode, crop_scale); use build_dataset rather than calling these
DATASETS: Registry[ImageSet] = Registry("dataset")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing; the message lists the paths tried and the fix."""


class ImageSet(Dataset):
    """A labelled image dataset whose items are ``(uint8 image tensor, int label)``.

    Attributes: ``num_classes``, ``channels``, ``image_size`` (the view size S), ``labels``
    (LongTensor, N), ``mean``/``std`` (per channel, in [0, 1] units, for normalisation) and
    ``crops_on_device`` (True: items are whole ``C x S x S`` images that ``views.TwoViews`` crops
    on the device; False: items of mode ``pretrain`` are already two crops, ``2 x C x S x S``).
    Loaders batch items with :meth:`collate` (the default collate unless a subclass knows better).
    """

    def __init__(
        self,
        *,
        labels: torch.Tensor,
        num_classes: int,
        channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crops_on_device: bool,
    ):
        self.labels = labels.long()
        self.num_classes = num_classes
        self.channels = channels
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crops_on_device = crops_on_device

    def __len__(self) -> int:
        return int(self.labels.numel())

    @staticmethod
    def collate(batch: list) -> Any:
        """The loader's ``collate_fn``: torch's default (a contiguous stack)."""
        return default_collate(batch)


class TensorImageSet(ImageSet):
    """An in-memory :class:`ImageSet`; ``images`` is the whole ``N x C x S x S`` uint8 tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, stats: Stats):
        super().__init__(
            labels=labels,
            num_classes=num_classes,
            channels=images.shape[1],
            image_size=images.shape[-1],
            mean=stats[0],
            std=stats[1],
            crops_on_device=True,
        )
        self.images = images

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class FolderImageSet(ImageSet):
    """An :class:`ImageSet` of image files decoded and cropped per item in the loader workers
    (converted to RGB), so ``crops_on_device`` is False in every mode. ``transform`` makes an item
    from a file's decoded PIL image (the reference path); ``reader`` instead makes it from the
    file's path (:class:`ftcl.data.jpeg.FastCrops`, which decodes the file itself)."""

    def __init__(
        self,
        paths: list[Path],
        labels: torch.Tensor,
        num_classes: int,
        image_size: int,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        reader: Callable[[Path], torch.Tensor] | None = None,
    ):
        if (transform is None) == (reader is None):
            raise ValueError("FolderImageSet needs exactly one of transform and reader")
        super().__init__(
            labels=labels,
            num_classes=num_classes,
            channels=3,
            image_size=image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            crops_on_device=False,
        )
        self.paths = paths
        self.transform = transform
        self.reader = reader

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        image = self.reader(path) if self.reader is not None else self.transform(load_rgb(path))
        return image, int(self.labels[index])

    def collate(self, batch: list) -> Any:
        """Items of the fast path have channels-last strides (:class:`~ftcl.data.jpeg.FastCrops`):
        stacked as packed ``... x S x S x C`` blocks (a copy, not a transpose; in shared memory in a
        worker, as the default collate does) and handed on with the same strides."""
        if self.reader is None:
            return super().collate(batch)
        images, labels = default_collate([(image.movedim(-3, -1), label) for image, label in batch])
        return images.movedim(-1, -3), labels


def build_dataset(
    data: Data,
    split: str,
    mode: str,
    crop_scale: Sequence[float] = (0.2, 1.0),
) -> ImageSet:
    """The ``split`` ("train" | "test") of ``data.dataset`` prepared for ``mode``.

    ``mode`` is "pretrain", "eval" or "eval_aug"; it only changes what ``imagefolder`` items
    look like (in-memory datasets are cropped on the device). ``crop_scale`` is the area range
    of the RandomResizedCrops ``imagefolder`` makes in the loader: the two pretraining crops
    (``augment.crop_scale``) or the linear probe's crop in ``eval_aug`` (``eval.linear.crop_scale``).
    ``data.<split>_subset = N`` keeps a class-balanced, deterministic subset of N items.
    An unknown dataset name raises ``KeyError`` listing the known ones.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    low, high = crop_scale
    return DATASETS.get(data.dataset)(data, split, mode, (float(low), float(high)))


def balanced_subset(labels: np.ndarray, n: int | None, seed: int = SUBSET_SEED) -> np.ndarray:
    """Sorted indices of a class-balanced subset of ``n`` items (all items when ``n`` is None or
    at least ``len(labels)``).

    Items are shuffled once with ``seed``, then taken round-robin over the classes (the first of
    every class, then the second, ...), so class counts differ by at most one unless a class runs
    out; the same labels, ``n`` and seed always give the same subset.
    """
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    by_class = np.argsort(shuffled, kind="stable")
    sorted_labels = shuffled[by_class]
    rank = np.empty(len(labels), dtype=np.int64)
    rank[by_class] = np.arange(len(labels)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    picked = np.lexsort((shuffled, rank))[:n]
    return np.sort(order[picked])


def channel_stats(images: torch.Tensor) -> Stats:
    """Exact per-channel mean and std, in [0, 1] units, of uint8 images ``N x C x H x W``."""
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        mean = float(counts @ values / counts.sum())
        var = float(counts @ (values - mean) ** 2 / counts.sum())
        means.append(mean)
        stds.append(max(var, 1e-12) ** 0.5)
    return tuple(means), tuple(stds)


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 ``N x C x H x W`` images to ``size x size`` (bilinear, antialiased)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        block = images[start : start + chunk].float()
        resized = F.interpolate(block, size=(size, size), mode="bilinear", antialias=True)
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file as RGB; a file PIL cannot decode raises ``CorruptImageError`` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except DECODE_ERRORS as err:
        raise cannot_decode(path, err) from err  # "cannot decode image file <path>: ..."


# ---------------------------------------------------------------------------------------------
# in-memory datasets
# ---------------------------------------------------------------------------------------------


def _root(data: Data) -> Path | None:
    return None if data.root is None else Path(data.root).expanduser()


def _in_memory(reader: Reader, num_classes: int, name: str) -> Builder:
    """A builder for a dataset ``reader(root, split) -> (uint8 N x C x H x W, int64 labels)``."""

    def build(
        data: Data, split: str, mode: str, crop_scale: tuple[float, float]
    ) -> ImageSet:
        root = _root(data)
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


def _missing(what: str, tried: Sequence[Path], how: str) -> DatasetNotFoundError:
    looked = "\n  ".join(str(p) for p in tried)
    return DatasetNotFoundError(f"{what} not found; looked for:\n  {looked}\n{how}")


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
    raise _missing(
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
            raise _missing(f"{folder_name} {split} split", candidates[0], how)
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


# ---------------------------------------------------------------------------------------------
# imagefolder
# ---------------------------------------------------------------------------------------------


class _Crops:
    """``n`` independent applications of ``transform`` stacked along a new first dimension."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], n: int):
        self.transform = transform
        self.n = n

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(img) for _ in range(self.n)])


def folder_transform(mode: str, size: int, crop_scale: tuple[float, float]) -> Callable:
    """PIL image -> uint8 tensor for an ``imagefolder`` item in ``mode`` (see the module doc)."""
    to_tensor = transforms.PILToTensor()
    if mode == "pretrain":
        crop = transforms.RandomResizedCrop(size, scale=crop_scale)
        return _Crops(transforms.Compose([crop, to_tensor]), 2)
    if mode == "eval":
        return transforms.Compose(
            [transforms.Resize(round(size * 8 / 7)), transforms.CenterCrop(size), to_tensor]
        )
    crop = transforms.RandomResizedCrop(size, scale=crop_scale)
    return transforms.Compose([crop, transforms.RandomHorizontalFlip(), to_tensor])


def folder_reader(mode: str, size: int, crop_scale: tuple[float, float], decode: str) -> dict[str, Callable]:
    """``{"reader": path -> item}`` (``data.decode: fast``, modes ``pretrain`` and ``eval_aug``) or
    ``{"transform": PIL image -> item}`` (``decode: pil``, and mode ``eval`` always): the
    :class:`FolderImageSet` arguments for ``mode``. Both draw the same crop boxes from the torch RNG."""
    if check_decode(decode) == "fast" and mode == "pretrain":
        return {"reader": FastCrops(size, crop_scale, views=2)}
    if decode == "fast" and mode == "eval_aug":
        return {"reader": FastCrops(size, crop_scale, views=1, flip=True, squeeze=True)}
    return {"transform": folder_transform(mode, size, crop_scale)}


def read_class_list(path: str | Path) -> list[str]:
    """Class folder names from a file with one name per line, sorted (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"class list {path} not found; set data.class_list to a file with one class folder "
            "name per line (e.g. config/imagenet100.txt), or null for every folder"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    duplicates = sorted(n for n, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"class list {path} names these classes more than once: {duplicates}")
    return sorted(names)


def _split_folder(root: Path | None, split: str) -> Path:
    sub = "train" if split == "train" else "val"
    if root is None:
        raise DatasetNotFoundError(
            "data.root is not set; point it at an ImageFolder root holding train/<class>/ and "
            "val/<class>/ image folders"
        )
    folder = root / sub
    if not folder.is_dir():
        raise _missing(
            f"imagefolder {split} split",
            [folder],
            f"data.root must hold {sub}/<class>/<image files> (the test split reads val/).",
        )
    return folder


def _class_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"class folder {folder} not found")
    files = []
    for dirpath, dirnames, names in os.walk(folder, followlinks=True):
        dirnames.sort()
        files += [Path(dirpath) / n for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DatasetNotFoundError(
            f"class folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


@DATASETS.register("imagefolder")
def _imagefolder(
    data: Data, split: str, mode: str, crop_scale: tuple[float, float]
) -> ImageSet:
    """ImageNet-style folders; labels are 0..n-1 over the sorted class names (from
    ``data.class_list`` when set, else every sub-folder of ``train/``); normalised with ImageNet's
    mean/std."""
    root = _root(data)
    folder = _split_folder(root, split)
    class_list = data.class_list
    if class_list:
        classes = read_class_list(class_list)
    else:
        classes = sorted(d.name for d in _split_folder(root, "train").iterdir() if d.is_dir())
    if not classes:
        raise DatasetNotFoundError(f"{folder} holds no class folders")
    per_class = [_class_files(folder / name) for name in classes]
    paths = [p for files in per_class for p in files]
    labels = np.concatenate([np.full(len(files), i, dtype=np.int64) for i, files in enumerate(per_class)])
    keep = balanced_subset(labels, getattr(data, f"{split}_subset"))
    size = data.image_size or 224
    decode = check_decode(data.decode or DEFAULT_DECODE)
    return FolderImageSet(
        [paths[i] for i in keep],
        torch.from_numpy(labels[keep]),
        len(classes),
        size,
        **folder_reader(mode, size, crop_scale, decode),
    )
