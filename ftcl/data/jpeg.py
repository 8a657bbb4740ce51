"""Decode-and-crop of ``imagefolder`` files in the loader workers (``data.decode``).

``data.decode: fast`` (the default) makes the RandomResizedCrops of modes ``pretrain`` (two views,
``2 x 3 x S x S``) and ``eval_aug`` (one view + horizontal flip, ``3 x S x S``) with
:class:`FastCrops`; ``data.decode: pil`` keeps the reference path (PIL decodes the whole file,
torchvision's ``RandomResizedCrop`` crops and resizes PIL images). Mode ``eval``
(Resize(S*8/7) + CenterCrop) always takes the reference path.

What :class:`FastCrops` does per file, and why (chosen by measurement, ``benchmarks/jpeg.py``):

1. Read the header only and draw every view's crop box as torchvision's
   ``RandomResizedCrop.get_params`` draws it on the full-resolution size (:class:`BoxSampler`): the
   same area-scale and aspect-ratio (3/4..4/3) draws from the same torch RNG, in the same order, with
   the same fallback to a center crop after 10 failed attempts. With the same seed the boxes are
   *identical* to the reference's, so the crop statistics are unchanged; the draws reuse two
   one-element tensors instead of allocating about ten per box (4-5x faster per box).
2. Decode the whole file once for all views. A baseline or progressive YCbCr or greyscale JPEG is
   decoded by libjpeg-turbo's TurboJPEG interface (``simplejpeg``, :func:`turbo_decode`) straight
   into a packed ``H x W x 3`` array, with the same DCT (accurate integer) and chroma upsampling
   (fancy) as Pillow's decoder: the pixels are bit-identical to PIL's (tested, at full size and at
   every DCT scaling), and the decode takes 2.2-2.4 ms per file of the benchmark's set against
   PIL's 2.6-2.9 ms (open + decode) here. A file TurboJPEG rejects (e.g. libjpeg's recoverable
   "corrupt data" warnings, which its strict mode raises; a truncated file, which PIL then fails
   on as in the reference), a CMYK JPEG and every non-JPEG file (e.g. PNG) are decoded by PIL
   instead, as the reference path decodes them; so is every file when ``simplejpeg`` is not
   installed.
3. A JPEG is decoded with libjpeg's DCT scaling at the largest reduction r in 1/2, 1/4, 1/8 that
   still leaves every view's box at least S pixels high and wide (box side / r >= S); the views are
   then resampled from the reduced image with PIL's antialiased bilinear resize of the scaled
   (fractional) box. This only applies to large images or large crops (at S = 224 a 500 x 375
   ImageNet photo always decodes at full size; 3 % of the benchmark's items). The views differ
   from a full-size decode + resize of the same box by about a grey level on average (up to ~1.7
   on the benchmark's noise-heavy images): libjpeg's scaled IDCT is a slightly different low-pass
   filter.
4. Otherwise each box is cropped from the full-size pixels as a uint8 tensor and resized by torch's
   antialiased bilinear ``interpolate``, two to three times as fast as PIL's resize here and within
   a grey level of it (PIL's resize is what torchvision's transforms use on PIL images; on
   photo-like 224 px crops the mean absolute difference is below 0.01 grey levels).

Items keep the ``views x 3 x S x S`` shape and values, but with channels-last strides (each view is
a packed ``S x S x 3`` block, the layout the resize kernel reads and writes): transposing every view
to ``3 x S x S`` planes cost about 0.13 ms per view. ``FolderImageSet.collate`` stacks such items
into a batch with the same strides (torch's default collate would transpose them in the worker), and
the training step reads either layout.

Where the time goes on typical ImageNet files (about 500 x 375, decoded at full size at S = 224):
decoding is the floor, 2.2-2.4 ms of the about 4 ms an item takes here, and most of it is entropy
decoding, which every decode pays (a 1/8-scaled decode still takes 1.4-1.5 ms); the rest is the two
crops' resize (about 0.33 ms each, plus 0.05-0.06 ms to copy each crop) and the box draws. Also
measured and not taken: libjpeg's M/8 scalings other than 1/2, 1/4, 1/8 (no SIMD IDCT: 5/8 .. 7/8
decode slower than full size); ``torchvision.io.decode_jpeg`` (bit-identical, 2.5 ms, and
deprecated in torchvision 0.29 in favour of TorchCodec); libjpeg's fast chroma upsampling (no faster
here, and the 224 px views move by 1.8 grey levels on average) and fast integer DCT (moves pixels by
about 4 grey levels on average); decoding only the rectangle the views read (libjpeg-turbo's
scanline skip and crop, which no maintained Python binding offers: through a C extension of ftcl's
own it took the fast path from 1.90x to 2.07x of the reference per worker, about one loader worker
fewer for 2500 images/s, not worth a fourth decode path in native code).

Files that cannot be decoded raise :class:`~ftcl.errors.CorruptImageError` naming the file
(:func:`cannot_decode`), whichever path reads them.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow
import torch
import torch.nn.functional as F
from PIL import Image

from ftcl.errors import CorruptImageError

try:  # a declared dependency; without it (e.g. a bare GPU machine's Python) every file goes to PIL
    import simplejpeg
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    simplejpeg = None

DECODE_MODES = ("fast", "pil", "gpu")  # gpu: ftcl/data/device_decode.py
DEFAULT_DECODE = "fast"
DRAFT_REDUCTIONS = (8, 4, 2)  # the DCT scalings taken (1/8, 1/4, 1/2): libjpeg's SIMD ones, PIL's draft ones
# what PIL raises on a file it cannot read or decode (a truncated file, a non-image, a bomb)
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)
# Pillow exports an image's pixel memory as an Arrow array (RGB as 4 bytes a pixel) since 11.2
_ARROW_EXPORT = hasattr(Image.Image, "__arrow_c_array__")
JPEG_SOI = b"\xff\xd8"  # every JPEG file starts with this marker
# the JPEG colour spaces TurboJPEG converts to RGB exactly as Pillow does (CMYK/YCCK go to PIL)
TURBO_COLORSPACES = ("YCbCr", "Gray")


def cannot_decode(path: Path | str, err: BaseException) -> CorruptImageError:
    """The error for an image file that cannot be decoded (the message names the file)."""
    return CorruptImageError(f"cannot decode image file {path}: {err}; remove or replace it")


def decoder() -> str:
    """Which decoder ``data.decode: fast`` uses for YCbCr and greyscale JPEGs here, in words (the
    benchmarks print it)."""
    if simplejpeg is None:
        return "PIL (simplejpeg is not installed)"
    return "TurboJPEG (simplejpeg), whole files, DCT-scaled where the crops allow; PIL for the rest"


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
        try:  # the data buffer itself: Array.to_numpy would import pandas (about 0.35 s) on first use
            values = pyarrow.array(img).values
            values = np.frombuffer(values.buffers()[1], np.uint8, count=len(values), offset=values.offset)
        except (ValueError, TypeError, pyarrow.ArrowException):  # e.g. rows in several memory blocks
            values = None
        if values is not None and values.size == width * height * 4:
            array = values.reshape(height, width, 4)
    if array is None:
        array = np.asarray(img)
    with warnings.catch_warnings():  # read-only: nothing writes to it, the crops are resized copies
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).permute(2, 0, 1)


def turbo_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG that :func:`turbo_decode` may decode (a YCbCr or greyscale
    JPEG whose header TurboJPEG reads), else None: the file goes to PIL (so does every file when
    ``simplejpeg`` is not installed)."""
    if simplejpeg is None or not data.startswith(JPEG_SOI):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colorspace in TURBO_COLORSPACES else None


def turbo_decode(data: bytes, size: tuple[int, int], reduction: int = 1) -> np.ndarray | None:
    """A JPEG of ``size`` ``(height, width)`` decoded to a packed uint8 RGB array by TurboJPEG at
    1/``reduction`` of its size (``ceil(height / r) x ceil(width / r) x 3``: libjpeg's DCT scaling,
    the pixels PIL's ``draft`` gives), with accurate integer DCT and fancy upsampling (Pillow's
    settings); None when TurboJPEG reports any error or warning (strict mode; PIL then decodes the
    file as the reference path would)."""
    height, width = size
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // reduction),
                                      min_width=-(-width // reduction))
    except ValueError:
        return None


class BoxSampler:
    """torchvision's ``RandomResizedCrop.get_params`` for a given image size, draw for draw: the
    same torch RNG calls in the same order (``uniform_`` for the area share and the log aspect
    ratio, ``random_`` for the corner, ``uniform_`` for a flip), on two reused one-element tensors
    instead of about ten new ones per box. Same seed -> the same boxes and the same RNG state after."""

    def __init__(self, scale: Sequence[float], ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        # torchvision takes the log of the ratios in float32: the bounds of its uniform draw
        self.log_ratio = tuple(torch.log(torch.tensor(self.ratio)).tolist())
        self._float = torch.empty(1)
        self._long = torch.empty(1, dtype=torch.int64)

    def __getstate__(self) -> dict:
        return {"scale": self.scale, "ratio": self.ratio}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["scale"], state["ratio"])

    def box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: a box of area share in ``scale`` and aspect ratio (w/h) in
        ``ratio`` (log-uniform), up to 10 attempts, else the center crop clamped to ``ratio``."""
        area = height * width
        for _ in range(10):
            target_area = area * self._float.uniform_(*self.scale).item()
            aspect = self._float.uniform_(*self.log_ratio).exp_().item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = self._long.random_(0, height - h + 1).item()
                left = self._long.random_(0, width - w + 1).item()
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def flip(self) -> bool:
        """``torch.rand(1) < 0.5``, as ``RandomHorizontalFlip`` draws it."""
        return bool(self._float.uniform_().item() < 0.5)


class FastCrops:
    """``path -> uint8 views x 3 x S x S`` RandomResizedCrops (``views = 1`` and ``squeeze``: one
    ``3 x S x S`` view), optionally each flipped horizontally with p = 0.5 after its crop (as
    ``Compose([RandomResizedCrop, RandomHorizontalFlip])`` draws it), with channels-last strides.
    See the module doc."""

    def __init__(self, size: int, crop_scale: Sequence[float], views: int = 2, flip: bool = False,
                 squeeze: bool = False):
        if squeeze and views != 1:
            raise ValueError("squeeze needs views=1")
        self.size = int(size)
        self.sampler = BoxSampler(crop_scale)
        self.views = views
        self.flip = flip
        self.squeeze = squeeze

    def boxes(self, width: int, height: int) -> list[tuple]:
        """``views`` boxes ``(top, left, height, width)`` drawn as torchvision draws them on a
        ``width x height`` image, each followed by its flip draw (a fifth element) when ``flip``."""
        out = []
        for _ in range(self.views):
            box = self.sampler.box(height, width)
            out.append((*box, self.sampler.flip()) if self.flip else box)
        return out

    def __call__(self, path: Path | str) -> torch.Tensor:
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise cannot_decode(path, err) from err
        size = turbo_size(data)
        img = None
        if size is None:
            try:
                img = Image.open(io.BytesIO(data))  # header only
            except DECODE_ERRORS as err:
                raise cannot_decode(path, err) from err
            size = img.size[::-1]
        draws = self.boxes(size[1], size[0])
        boxes = [d[:4] for d in draws]
        reduction = draft_reduction(boxes, self.size) if img is None or img.format == "JPEG" else 1
        pixels = turbo_decode(data, size, reduction) if img is None else None
        if pixels is None:  # not for TurboJPEG, or TurboJPEG refused it
            img = self._pil_decode(path, data, img, reduction)
        elif reduction > 1:
            img = Image.fromarray(pixels)
        out = torch.empty((self.views, self.size, self.size, 3), dtype=torch.uint8).permute(0, 3, 1, 2)
        if reduction > 1:
            self._resize_scaled(img, boxes, reduction, out)
        else:
            full = torch.from_numpy(pixels).permute(2, 0, 1) if pixels is not None else _pixels(img)
            self._resize(full, boxes, out)
        if self.flip:
            for k, draw in enumerate(draws):
                if draw[4]:
                    out[k] = out[k].flip(-1)
        return out[0] if self.squeeze else out

    @staticmethod
    def _pil_decode(path: Path | str, data: bytes, img: Image.Image | None, reduction: int) -> Image.Image:
        """``data`` decoded by PIL as RGB, at 1/``reduction`` size (a JPEG's DCT scaling) if > 1."""
        try:
            if img is None:
                img = Image.open(io.BytesIO(data))
            if reduction > 1:
                img.draft("RGB", (img.size[0] // reduction, img.size[1] // reduction))
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")
        except DECODE_ERRORS as err:
            raise cannot_decode(path, err) from err

    def _resize(self, pixels: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], out: torch.Tensor) -> None:
        """Crop each box of the full-size ``C x H x W`` pixels (channels-last strides, C = 3 or 4)
        and resize it to ``S x S`` (torch, antialiased bilinear) into ``out``. The crop is copied to
        a contiguous channels-last block first: torch's fast uint8 kernel needs one."""
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
