"""MoCo v1 / v2 two-view augmentation, batched on the training device.

Presets (per view, both views drawn independently from the same preset):

* ``v1`` -- MoCo v1 (He et al., "Momentum Contrast for Unsupervised Visual Representation
  Learning", CVPR 2020; the InstDisc recipe): RandomResizedCrop(scale=crop_scale, ratio 3/4..4/3),
  RandomGrayscale(p=0.2), ColorJitter(0.4, 0.4, 0.4, 0.4) always, horizontal flip.
* ``v2`` -- MoCo v2 (Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020):
  RandomResizedCrop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, RandomGrayscale(p=0.2),
  Gaussian blur (sigma ~ U(0.1, 2.0), kernel about 10% of the image size) with p=0.5,
  horizontal flip.

Every random parameter is drawn per sample on the batch's device and every step runs on the whole
batch at once (no Python loop over samples): the crop and the flip are one ``affine_grid`` +
``grid_sample`` per view, colour jitter uses per-sample factors, the blur is a separable grouped
convolution with one kernel per sample. Two documented approximations of torchvision's
per-image pipeline: the order of the four jitter operations is drawn once per batch (as Kornia
does) rather than once per image, and a crop whose 10 area/ratio draws all fall outside the image
falls back to the whole image. On 1-channel images jitter is brightness + contrast only and
grayscale is a no-op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PRESETS = ("v1", "v2")
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # as torchvision's rgb_to_grayscale
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
BLUR_SIGMA = (0.1, 2.0)


def normalize(batch: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``B x C x H x W`` (or a float batch in [0, 1]) -> float ``(x - mean) / std``."""
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _uniform(n: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _bernoulli(n: int, p: float, device: torch.device) -> Tensor:
    return torch.rand(n, device=device) < p


def crop_flip(
    x: Tensor, size: int, scale: Sequence[float], flip: bool = True, ratio: Sequence[float] = CROP_RATIO
) -> Tensor:
    """Per-sample RandomResizedCrop (+ horizontal flip with p=0.5) of float ``B x C x H x W``.

    For each sample: up to 10 draws of area ~ U(scale) * H * W and log-ratio ~ U(log ratio); the
    first draw that fits is kept (else the whole image), its offset is uniform. The crop and the
    flip are folded into one affine transform, resampled bilinearly to ``size x size``.
    """
    b, _, h, w = x.shape
    dev = x.device
    area = _uniform(b * CROP_ATTEMPTS, scale[0], scale[1], dev).view(b, CROP_ATTEMPTS)
    log_r = _uniform(b * CROP_ATTEMPTS, math.log(ratio[0]), math.log(ratio[1]), dev).view(b, -1)
    r = log_r.exp() * (h / w)  # aspect ratio in pixels -> in fractions of the sides
    cw, ch = (area * r).sqrt(), (area / r).sqrt()  # crop size as fractions of w, h
    fits = (cw <= 1.0) & (ch <= 1.0)
    first = fits.float().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    one = torch.ones(b, device=dev)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), one)
    ch = torch.where(found, ch.gather(1, first).squeeze(1), one)
    cx = (2 * torch.rand(b, device=dev) - 1) * (1 - cw)  # crop centre in [-1, 1] coordinates
    cy = (2 * torch.rand(b, device=dev) - 1) * (1 - ch)
    sign = torch.where(_bernoulli(b, 0.5, dev), -one, one) if flip else one
    zero = torch.zeros(b, device=dev)
    theta = torch.stack([cw * sign, zero, cx, zero, ch, cy], dim=1).view(b, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def eval_aug_batch(batch: Tensor, image_size: int, mean: Sequence[float], std: Sequence[float],
                   crop_scale: Sequence[float] = (0.08, 1.0)) -> Tensor:
    """The linear probe's augmented training input: RandomResizedCrop(scale ``crop_scale``) + flip,
    batched on ``batch``'s device, then normalised. Use it on ``crops_on_device`` datasets; for the
    others the loader already cropped, so :func:`normalize` is enough."""
    return normalize(crop_flip(batch.float() / 255.0, image_size, tuple(crop_scale)), mean, std)




def _gray(x: Tensor) -> Tensor:
    """Luma ``B x 1 x H x W`` of RGB (or the image itself when it has one channel)."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _per_sample(f)).clamp_(0, 1)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(f)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    f = _per_sample(f)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """Shift the HSV hue of RGB ``x`` by ``f`` turns per sample (torchvision's ``adjust_hue``).

    Hue in sixths: ``(c1 - c2) / (max - min) + 2 * argmax`` with ``c1, c2`` the channels after the
    largest one; back to RGB with ``max - (max - min) * clamp(min(k, 4 - k), 0, 1)``,
    ``k = (n + hue) mod 6`` for ``n = 5, 3, 1`` (R, G, B). Ties give the same hue either way.
    """
    maxc, idx = x.max(dim=1, keepdim=True)
    delta = maxc - x.min(dim=1, keepdim=True).values
    diff = x.roll(-1, dims=1) - x.roll(-2, dims=1)
    hue = diff.gather(1, idx) / delta.clamp_min(1e-12) + 2.0 * idx + 6.0 * _per_sample(f)
    n = torch.tensor((5.0, 3.0, 1.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + hue, 6.0)
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0, 1)


def color_jitter(
    x: Tensor, strength: Sequence[float], p: float, order: Sequence[int] | None = None
) -> Tensor:
    """ColorJitter(brightness, contrast, saturation, hue = ``strength``) applied with probability
    ``p`` per sample, factors drawn per sample; ``order`` of the ops defaults to a random one per
    batch. Saturation and hue are skipped on 1-channel images."""
    b, dev = x.shape[0], x.device
    bri, con, sat, hue = strength
    applied = _bernoulli(b, p, dev)
    factors = [
        torch.where(applied, _uniform(b, max(0.0, 1 - s), 1 + s, dev), torch.ones(b, device=dev))
        for s in (bri, con, sat)
    ]
    factors.append(torch.where(applied, _uniform(b, -hue, hue, dev), torch.zeros(b, device=dev)))
    ops = (_brightness, _contrast, _saturation, _hue)
    n_ops = 4 if x.shape[1] == 3 else 2
    order = torch.randperm(n_ops).tolist() if order is None else order
    for i in order:
        x = ops[i](x, factors[i])
    return x


def random_grayscale(x: Tensor, p: float) -> Tensor:
    """Replace each RGB sample by its luma (3 equal channels) with probability ``p``."""
    if x.shape[1] == 1:
        return x
    chosen = _per_sample(_bernoulli(x.shape[0], p, x.device))
    return torch.where(chosen, _gray(x).expand_as(x), x)


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image size, odd, at least 3 (23 for 224, 3 for 28 or 32)."""
    k = max(3, round(image_size / 10))
    return k if k % 2 else k + 1


def random_blur(x: Tensor, p: float, kernel_size: int, sigma: Sequence[float] = BLUR_SIGMA) -> Tensor:
    """Gaussian blur with sigma ~ U(sigma) applied with probability ``p``, one kernel per sample.

    Separable: a vertical and a horizontal grouped convolution (one group per sample and channel),
    reflect padding; samples not blurred get a delta kernel.
    """
    b, c, h, w = x.shape
    dev = x.device
    s = _uniform(b, sigma[0], sigma[1], dev).view(b, 1)
    pos = torch.arange(kernel_size, device=dev, dtype=x.dtype) - kernel_size // 2
    kernel = torch.exp(-(pos.view(1, -1) ** 2) / (2 * s**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (pos == 0).to(x.dtype).expand(b, -1)
    kernel = torch.where(_bernoulli(b, p, dev).view(b, 1), kernel, delta)
    weight = kernel.repeat_interleave(c, dim=0)  # (b*c, k)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, kernel_size, 1), groups=b * c)
    y = F.conv2d(y, weight.view(b * c, 1, 1, kernel_size), groups=b * c)
    return y.view(b, c, h, w)


class TwoViews(nn.Module):
    """Two independently augmented, normalised views of a uint8 batch (MoCo v1 / v2 presets).

    ``forward(batch)`` takes ``B x C x S0 x S0`` uint8 whole images when ``crops_on_device`` (the
    crops happen here, output ``image_size``) or ``B x 2 x C x S x S`` uint8 crops made by the
    loader (then only the flip and the colour steps happen here), and returns ``(view1, view2)``,
    float ``B x C x S x S`` on the batch's device. See the module docstring for the presets
    (MoCo v1: He et al. 2020; MoCo v2: Chen et al. 2020).
    """

    def __init__(
        self,
        preset: str,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: Sequence[float] = (0.2, 1.0),
        crops_on_device: bool = True,
    ):
        super().__init__()
        if preset not in PRESETS:
            raise ValueError(f"augmentation preset must be one of {PRESETS}, got {preset!r}")
        if channels not in (1, 3):
            raise ValueError(f"TwoViews handles 1- or 3-channel images, got {channels} channels")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} need {channels} values each")
        self.preset = preset
        self.image_size = image_size
        self.channels = channels
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crops_on_device = crops_on_device
        self.blur_kernel = blur_kernel_size(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        if self.crops_on_device:
            return self._view(batch), self._view(batch)
        return self._view(batch[:, 0]), self._view(batch[:, 1])

    def _view(self, batch: Tensor) -> Tensor:
        x = batch.float() / 255.0
        if self.crops_on_device:
            x = crop_flip(x, self.image_size, self.crop_scale)
        else:
            flip = _per_sample(_bernoulli(x.shape[0], 0.5, x.device))
            x = torch.where(flip, x.flip(-1), x)
        x = self._v1_colour(x) if self.preset == "v1" else self._v2_colour(x)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std

    def _v1_colour(self, x: Tensor) -> Tensor:
        x = random_grayscale(x, 0.2)
        return color_jitter(x, (0.4, 0.4, 0.4, 0.4), p=1.0)

    def _v2_colour(self, x: Tensor) -> Tensor:
        x = color_jitter(x, (0.4, 0.4, 0.4, 0.1), p=0.8)
        x = random_grayscale(x, 0.2)
        return random_blur(x, 0.5, self.blur_kernel)

    def extra_repr(self) -> str:
        return (
            f"preset={self.preset}, image_size={self.image_size}, channels={self.channels}, "
            f"crop_scale={self.crop_scale}, crops_on_device={self.crops_on_device}"
        )
