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

from collections.abc import Sequence

from ftcl.config.types import Data
from ftcl.data import arrays, imagefolder  # noqa: F401  (each registers its datasets)
from ftcl.data.imagefolder import folder_reader, folder_transform, read_class_list
from ftcl.data.imagesets import (
    DATASETS,
    FASHION_MNIST_DEFAULT_ROOT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MODES,
    SPLITS,
    DatasetNotFoundError,
    FolderImageSet,
    ImageSet,
    TensorImageSet,
    balanced_subset,
    channel_stats,
    load_rgb,
    resize_uint8,
)

__all__ = ["build_dataset", "DATASETS", "ImageSet", "TensorImageSet", "FolderImageSet", "DatasetNotFoundError",
           "balanced_subset", "channel_stats", "resize_uint8", "load_rgb", "folder_reader", "folder_transform",
           "read_class_list", "FASHION_MNIST_DEFAULT_ROOT", "IMAGENET_MEAN", "IMAGENET_STD", "SPLITS", "MODES"]


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
