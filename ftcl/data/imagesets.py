"""The :class:`ImageSet` contract every dataset builder returns (in-memory tensors or image files), the
dataset registry, and the helpers builders share (balanced subsets, channel statistics, resizing)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, default_collate

from ftcl.config.types import Data
from ftcl.data.device_decode import EncodedBatch, EncodedCrops
from ftcl.data.jpeg import DECODE_ERRORS, cannot_decode
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
        if isinstance(self.reader, EncodedCrops):  # data.decode: gpu, decoded by the batch's .to(device)
            return EncodedBatch([item for item, _ in batch], self.reader.size, self.reader.squeeze), \
                torch.tensor([label for _, label in batch])
        images, labels = default_collate([(image.movedim(-3, -1), label) for image, label in batch])
        return images.movedim(-1, -3), labels


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


def data_root(data: Data) -> Path | None:
    return None if data.root is None else Path(data.root).expanduser()


def not_found(what: str, tried: Sequence[Path], how: str) -> DatasetNotFoundError:
    looked = "\n  ".join(str(p) for p in tried)
    return DatasetNotFoundError(f"{what} not found; looked for:\n  {looked}\n{how}")
