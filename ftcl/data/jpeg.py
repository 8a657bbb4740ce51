"""Decode-and-crop of ``imagefolder`` files in the loader workers (``data.decode``).

``data.decode: fast`` (the default) makes the RandomResizedCrops of modes ``pretrain`` (two views,
``2 x 3 x S x S``) and ``eval_aug`` (one view + horizontal flip, ``3 x S x S``) with
:class:`FastCrops`; ``data.decode: pil`` keeps the reference path (PIL decodes the whole file,
torchvision's ``RandomResizedCrop`` crops and resizes PIL images). Mode ``eval``
(Resize(S*8/7) + CenterCrop) always takes the reference path.

What :class:`FastCrops` does per file, and why (chosen by measurement, ``benchmarks/jpeg.py``):

1. Read the header only (PIL opens lazily) and draw every view's crop box with torchvision's own
   ``RandomResizedCrop.get_params`` on the full-resolution size: the same area-scale and aspect-ratio
   (3/4..4/3) draws from the same torch RNG, in the same order, with the same fallback to a center
   crop after 10 failed attempts. With the same seed the boxes are *identical* to the reference's,
   so the crop statistics are unchanged.
2. Decode the file once for all views. A JPEG is decoded with libjpeg's DCT scaling
   (``Image.draft``) at the largest reduction r in 1/2, 1/4, 1/8 that still leaves every view's box
   at least S pixels high and wide (box side / r >= S); the views are then resampled from the
   reduced image with PIL's antialiased bilinear resize of the scaled (fractional) box. This only
   applies to large images or large crops (at S = 224 a 500 x 375 ImageNet photo always decodes at
   full size), but there it removes most of the decoding. The views differ from a full-size
   decode + resize of the same box by about a grey level on average (up to ~1.7 on the benchmark's
   noise-heavy images): libjpeg's scaled IDCT is a slightly different low-pass filter.
3. Otherwise (full-size decode, and every non-JPEG file, e.g. PNG: plain PIL decode), each box is
   cropped from the decoded pixels as a uint8 tensor and resized by torch's antialiased bilinear
   ``interpolate``, two to three times as fast as PIL's resize here and within a grey level of it
   (PIL's resize is what torchvision's transforms use on PIL images; on photo-like 224 px crops the
   mean absolute difference is below 0.01 grey levels). The pixels reach torch without a copy
   through Pillow's Arrow export where Pillow has it (:func:`_pixels`).

On typical ImageNet files (about 500 x 375, decoded at full size at S = 224) the gain comes from
step 3; decoding the full-size JPEG (libjpeg-turbo in both paths, about 40 % of the reference's
time per item and 60 % of this path's) is a floor both share, which caps the per-worker speed-up
there at about 1.5-1.7x; large files gain more from step 2. Also measured and not taken:
``torchvision.io.decode_jpeg`` decodes bit-identically and about 10 % faster than PIL, but
torchvision 0.29 deprecates its image decoders (in favour of TorchCodec); libjpeg's fast integer
DCT without fancy chroma upsampling (PIL's draft flag) decodes 15 % faster but moves pixels by
about 4 grey levels on average (on the benchmark's images).

Files that cannot be decoded raise :class:`~ftcl.errors.CorruptImageError` naming the file
(:func:`cannot_decode`), whichever path reads them.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from ftcl.errors import CorruptImageError

DECODE_MODES = ("fast", "pil")
DEFAULT_DECODE = "fast"
DRAFT_REDUCTIONS = (8, 4, 2)  # the DCT scalings PIL's JPEG draft mode offers (1/8, 1/4, 1/2)
# what PIL raises on a file it cannot read or decode (a truncated file, a non-image, a bomb)
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# Pillow exports an image's pixel memory as an Arrow array (RGB as 4 bytes a pixel) since 11.2
_ARROW_EXPORT = hasattr(Image.Image, "__arrow_c_array__")


def cannot_decode(path: Path | str, err: BaseException) -> CorruptImageError:
    """The error for an image file that cannot be decoded (the message names the file)."""
    return CorruptImageError(f"cannot decode image file {path}: {err}; remove or replace it")


def check_decode(decode: str) -> str:
    """``decode`` if it is a known ``data.decode`` value, else a ``ValueError`` naming the key."""
    if decode not in DECODE_MODES:
        raise ValueError(f"data.decode must be one of {DECODE_MODES}, got {decode!r}")
    return decode


def draft_reduction(boxes: Sequence[tuple[int, int, int, int]], size: int) -> int:
    """The largest JPEG DCT reduction r (8, 4, 2, else 1) at which every ``(top, left, height,
    width)`` box is still at least ``size`` pixels high and wide, i.e. ``min side >= size * r``."""
    smallest = min(min(h, w) for _, _, h, w in boxes)
    return next((r for r in DRAFT_REDUCTIONS if smallest >= size * r), 1)


def _pixels(img: Image.Image) -> torch.Tensor:
    """A decoded RGB PIL image as a read-only uint8 ``C x H x W`` tensor with channels-last strides
    (the layout torch's uint8 resize is fastest on): ``C = 4`` (R, G, B, padding) when Pillow hands
    over its own pixel memory through the Arrow C data interface (no copy: Pillow >= 11.2 and an
    image in one memory block), else ``C = 3`` (a packed copy, ``np.asarray``)."""
    width, height = img.size
    array = None
    if _ARROW_EXPORT:
        try:
            values = pyarrow.array(img).values.to_numpy(zero_copy_only=True)
        except (ValueError, TypeError, pyarrow.ArrowException):  # e.g. rows in several memory blocks
            values = None
        if values is not None and values.size == width * height * 4:
            array = values.reshape(height, width, 4)
    if array is None:
        array = np.asarray(img)
    with warnings.catch_warnings():  # read-only: nothing writes to it, the crops are resized copies
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).permute(2, 0, 1)


class FastCrops:
    """``path -> uint8 views x 3 x S x S`` RandomResizedCrops (``views = 1`` and ``squeeze``: one
    ``3 x S x S`` view), optionally each flipped horizontally with p = 0.5 after its crop (as
    ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` draws it). See the module doc."""

    def __init__(self, size: int, crop_scale: Sequence[float], views: int = 2, flip: bool = False,
                 squeeze: bool = False):
        if squeeze and views != 1:
            raise ValueError("squeeze needs views=1")
        self.size = int(size)
        self.crop = transforms.RandomResizedCrop(self.size, scale=tuple(crop_scale))
        self.views = views
        self.flip = flip
        self.squeeze = squeeze

    def boxes(self, img: Image.Image) -> list[tuple[int, int, int, int]]:
        """``views`` boxes ``(top, left, height, width)`` drawn as torchvision draws them on ``img``
        (only its size is read), each followed by its flip draw when ``flip``."""
        out = []
        for _ in range(self.views):
            out.append(tuple(self.crop.get_params(img, self.crop.scale, self.crop.ratio)))
            if self.flip:
                out[-1] = (*out[-1], bool(torch.rand(1) < 0.5))
        return out

    def __call__(self, path: Path | str) -> torch.Tensor:
        try:
            img = Image.open(io.BytesIO(Path(path).read_bytes()))  # header only
        except DECODE_ERRORS as err:
            raise cannot_decode(path, err) from err
        draws = self.boxes(img)
        boxes = [d[:4] for d in draws]
        reduction = draft_reduction(boxes, self.size) if img.format == "JPEG" else 1
        try:
            if reduction > 1:
                img.draft("RGB", (img.size[0] // reduction, img.size[1] // reduction))
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
        except DECODE_ERRORS as err:
            raise cannot_decode(path, err) from err
        out = torch.empty((self.views, 3, self.size, self.size), dtype=torch.uint8)
        if reduction > 1:
            self._resize_scaled(img, boxes, reduction, out)
        else:
            self._resize(_pixels(img), boxes, out)
        if self.flip:
            for k, draw in enumerate(draws):
                if draw[4]:
                    out[k] = out[k].flip(-1)
        return out[0] if self.squeeze else out

    def _resize(self, pixels: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], out: torch.Tensor) -> None:
        """Crop each box of the full-size ``C x H x W`` pixels (:func:`_pixels`) and resize it to
        ``S x S`` (torch, antialiased bilinear) into ``out``. The crop is copied to a contiguous
        channels-last block first: torch's fast uint8 kernel needs one."""
        for k, (top, left, h, w) in enumerate(boxes):
            crop = pixels[:, top : top + h, left : left + w].unsqueeze(0).contiguous(memory_format=torch.channels_last)
            out[k] = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True)[0, :3]

    def _resize_scaled(self, img: Image.Image, boxes: Sequence[tuple[int, int, int, int]], reduction: int,
                       out: torch.Tensor) -> None:
        """Resample each full-resolution box from ``img`` decoded at 1/``reduction`` (PIL,
        antialiased bilinear of the box scaled to the reduced image, fractional edges included)."""
        for k, (top, left, h, w) in enumerate(boxes):
            box = (left / reduction, top / reduction, (left + w) / reduction, (top + h) / reduction)
            view = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
            out[k] = _pixels(view)[:3]
