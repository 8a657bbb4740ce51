"""``data.decode: gpu``: JPEG decoding on the training device (nvJPEG through ``torchvision.io.decode_jpeg``).

The loader workers do what is cheap on the CPU: read a file's bytes and header and draw its crop boxes
(and flips) exactly as :class:`~ftcl.data.jpeg.FastCrops` draws them (the same torch RNG calls in the
same order, so the crop statistics are those of torchvision's ``RandomResizedCrop``). The batch they
hand over is an :class:`EncodedBatch`; its ``.to(device)`` (what the training step and the augmented
linear probe call on every batch) decodes all its JPEGs at once on ``device`` and crops and resizes
each box there (antialiased bilinear, in float, rounded back to uint8), giving the tensor the other
paths give: ``B x views x 3 x S x S`` (``B x 3 x S x S`` for one squeezed view), uint8.

Files nvJPEG is not for (anything but a baseline or progressive YCbCr or greyscale JPEG: PNG, CMYK, a
file whose header PIL cannot read as such) are decoded and cropped in the worker by the
:class:`~ftcl.data.jpeg.FastCrops` path from the same draws, and travel as finished views. On a CPU
device the same code decodes with libjpeg on the CPU, in the main process: a stand-in for tests,
not a speed-up.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ftcl.data.jpeg import DECODE_ERRORS, FastCrops, cannot_decode

#: PIL modes of the JPEGs decoded on the device (YCbCr files open as "RGB", greyscale as "L")
DEVICE_MODES = ("RGB", "L")


@dataclass
class EncodedItem:
    """One file's bytes (uint8 1-D tensor) and its drawn ``boxes`` (``views x 5``: top, left, height,
    width, flip), or ``views`` already made in the worker (a file not for the device decoder)."""

    data: torch.Tensor | None
    boxes: torch.Tensor | None
    views: torch.Tensor | None = None


class EncodedCrops(FastCrops):
    """``path -> EncodedItem``: the worker's share of ``data.decode: gpu`` (module docstring)."""

    def __call__(self, path: Path | str) -> EncodedItem:
        try:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as img:  # the header only
                size, device_ok = img.size, img.format == "JPEG" and img.mode in DEVICE_MODES
        except (*DECODE_ERRORS, OSError) as err:
            raise cannot_decode(path, err) from err
        if not device_ok:
            return EncodedItem(None, None, super().__call__(path))
        draws = self.boxes(*size)
        boxes = torch.tensor([(*d[:4], int(d[4]) if self.flip else 0) for d in draws], dtype=torch.int64)
        return EncodedItem(torch.frombuffer(bytearray(data), dtype=torch.uint8), boxes)


class EncodedBatch:
    """A batch of :class:`EncodedItem`; ``.to(device)`` decodes, crops and resizes it on ``device``."""

    def __init__(self, items: Sequence[EncodedItem], size: int, squeeze: bool):
        self.items, self.size, self.squeeze = list(items), size, squeeze

    def __len__(self) -> int:
        return len(self.items)

    def pin_memory(self) -> EncodedBatch:
        """What the loader calls with ``pin_memory=True``: the finished views are pinned."""
        for item in self.items:
            if item.views is not None:
                item.views = item.views.pin_memory()
        return self

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        device = torch.device(device)
        encoded = [i for i, item in enumerate(self.items) if item.data is not None]
        decoded = dict(zip(encoded, decode_jpegs([self.items[i].data for i in encoded], device)))
        views = []
        for i, item in enumerate(self.items):
            if item.views is not None:
                made = item.views.to(device, non_blocking=non_blocking)
                views.append(made.unsqueeze(0) if self.squeeze else made)
            else:
                views.append(crop_resize(decoded[i], item.boxes.tolist(), self.size))
        batch = torch.stack(views)
        return batch[:, 0] if self.squeeze else batch


def decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes decoded to RGB uint8 ``3 x H x W`` tensors on ``device`` (all at once; nvJPEG on CUDA)."""
    if not data:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; the call is the same
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
    return [img.to(device) for img in out]


def crop_resize(image: torch.Tensor, boxes: Sequence[Sequence[int]], size: int) -> torch.Tensor:
    """``views x 3 x S x S`` uint8: each ``(top, left, h, w, flip)`` box of a ``3 x H x W`` uint8 image,
    resized with antialiased bilinear interpolation (as the CPU paths) and flipped where drawn."""
    out = []
    for top, left, h, w, flip in boxes:
        crop = image[:, top:top + h, left:left + w].unsqueeze(0).float()
        view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        view = view.round_().clamp_(0, 255).to(torch.uint8)
        out.append(view.flip(-1) if flip else view)
    return torch.stack(out)
