"""``imagefolder``: ImageNet-style ``train/<class>/`` and ``val/<class>/`` folders, decoded and cropped
per item in the loader workers (``data.decode``: ``fast`` through :mod:`ftcl.data.jpeg`, or ``pil``
through torchvision's transforms; the crop boxes are drawn identically either way)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from ftcl.config.types import Data
from ftcl.data.device_decode import EncodedCrops
from ftcl.data.imagesets import (
    DATASETS,
    IMAGE_EXTENSIONS,
    DatasetNotFoundError,
    FolderImageSet,
    ImageSet,
    balanced_subset,
    data_root,
    not_found,
)
from ftcl.data.jpeg import DEFAULT_DECODE, FastCrops, check_decode


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
    """``{"reader": path -> item}`` (``data.decode: fast`` or ``gpu``, modes ``pretrain`` and ``eval_aug``) or
    ``{"transform": PIL image -> item}`` (``decode: pil``, and mode ``eval`` always): the
    :class:`FolderImageSet` arguments for ``mode``. Both draw the same crop boxes from the torch RNG."""
    readers = {"fast": FastCrops, "gpu": EncodedCrops}
    if check_decode(decode) in readers and mode == "pretrain":
        return {"reader": readers[decode](size, crop_scale, views=2)}
    if decode in readers and mode == "eval_aug":
        return {"reader": readers[decode](size, crop_scale, views=1, flip=True, squeeze=True)}
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
        raise not_found(
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
    root = data_root(data)
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
