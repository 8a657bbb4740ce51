"""Hard sample generation (HSG), after Wu et al., "Learn by Challenging Yourself: Contrastive Visual
Representation Learning with Hard Sample Generation" (2022; "Synthetic Data Can Also Teach",
AAAI 2023).

What the paper fixes (``shared/papers.md`` Sec. 3): a sample generator is trained jointly with the
contrastive model as a min-max game -- the generator maximises the contrastive loss of its samples,
the encoder minimises it -- and a *pair* of generators makes two similar-but-distinct images used
as a positive pair (each augmented again) whose similarity is lowered over training. The
architecture is not public; the choices made here, each a ``hsg.*`` config key:

**The min-max game with one optimiser.** The training loop is generic: one SGD optimiser over all
parameters, one backward pass. A gradient-reversal layer (:func:`grad_reverse`, Ganin & Lempitsky,
ICML 2015) sits between the generators' output and the encoder: identity forward, gradient
multiplied by ``-hsg.adversarial_scale`` backward. The method's loss becomes
``(L + w L(G(x))) / (1 + w)``, w = ``hsg.weight`` (a weighted mean, so the generated pair adds
samples without scaling the gradient: an unnormalised sum acts like a larger learning rate
without the matching weight decay); in the one backward pass the encoder receives
``+dL/dtheta_E`` (it descends L) and the generators ``-scale * dL/dtheta_G`` (they ascend L), so
one SGD step is one simultaneous gradient step of both players (the generators' learning rate is
the encoder's times ``scale * w / (1 + w)``; weight decay applies to both). The alternative,
alternating steps with two optimisers, would need generator code in the loop.

**The generator** (:class:`ConditionalGenerator`): conditional on a real image, so it customises
hard versions of the data rather than synthesising from noise alone (which would need a far
larger, GAN-trained model to produce useful images). Input: the first augmented view x
(normalised, C x S x S) and a noise vector z ~ N(0, I) of ``hsg.generator.noise_dim``; a small
U-Net: 3x3 conv stem of ``hsg.generator.width`` channels, ``stages`` stride-2 conv stages (width
doubling, capped at 4x), a residual block at the bottleneck where z joins as broadcast channels,
as many 3x3 conv + nearest-upsample + additive-skip stages, a 3x3 conv to C channels. The output is a
bounded residual ``x + epsilon * tanh(.)`` (``hsg.generator.epsilon``, in normalised pixel
units), so a generator cannot win by destroying the image. Sized to the resolution: ``stages``
(``hsg.generator.stages``; null = ``clamp(floor(log2(S / 8)), 0, 3)``: 0 for 8 px digits, 1 for
28 px Fashion-MNIST, 2 for 32 px CIFAR, 3 from 64 px on) keeps the bottleneck at 7-8 px for small
images and 28 px at 224 px; the resolution is ``data.image_size`` or the dataset's native size.

**The pair.** Two generators G_a, G_b (separate weights) see the same view with independent noise:
a = G_a(x, z_a), b = G_b(x, z_b). Similarity is the cosine of the flattened images (normalised
pixels). Its target s(epoch) falls from ``hsg.pair.similarity_start`` to ``similarity_end``
(``linear`` or ``cosine`` in the epoch, reaching the end at the last epoch; :func:`similarity_target`).
``hsg.pair.mode``:

* ``project`` (default): the target is met exactly. b is replaced by the image of the same norm
  whose cosine with a is s: ``b' = ||b|| (s u + sqrt(1 - s^2) w)``, u = a / ||a||, w the unit
  component of b orthogonal to a (:func:`set_similarity`). The generators choose *how* the two
  samples differ (adversarially), the schedule *how much*.
* ``penalty``: b is kept and the generators also minimise
  ``hsg.pair.penalty_weight * mean (cos(a, b) - s)^2`` (added before the reversal layer, so only
  the generators see it): the similarity follows the target only as far as training pulls it.

**How many pairs.** ``hsg.fraction`` of each batch seeds the generators, one pair per view: the
first ceil(fraction x B) views (at least 2 per BatchNorm sub-batch, so every BatchNorm sees a batch,
and rounded up to a multiple of the method's sub-batches, ``method.bn_splits``; the batch is
shuffled). 1.0 (default) makes one pair per view. The generators run at the full input resolution
and their pair goes through both encoders with gradients, so the extra cost scales with this
fraction: lower it where HSG must fit a budget.

Each sample of the pair is then augmented again (``hsg.reaugment``: a RandomResizedCrop of
``hsg.crop_scale`` + horizontal flip, batched and differentiable, ``ftcl.data.views.crop_flip``),
goes through the reversal layer, and the method computes its own loss on the pair (MoCo: InfoNCE of
f_q(a) against f_k(b) and the queue; BYOL / SimSiam: their symmetric loss), with no gradient to
the key / target network's weights but to its input, so both generators learn. MoCo's generated
keys get the Shuffle-BN of its real keys (MoCo Sec. 3.3): under DDP the generated batch is gathered
from every process, shuffled across them and the keys gathered back with autograd-aware collectives,
so each process's generators receive the gradient of their own samples' keys wherever they were
computed.

**BatchNorm statistics.** The paper treats generated pairs as extra samples of the contrastive loss;
nothing in it asks the evaluated network's statistics to describe generated images. So generated
batches are normalised with their own batch statistics (training mode) but update no BatchNorm
running statistic or batch counter of any of the method's networks (query / online encoder,
predictor, MoCo's key encoder, BYOL's target): the running statistics that the linear probe, kNN and
detection evaluate describe real augmented views only. The generated pass still shapes the
encoder's weights through the loss.

All noise is drawn on the images' device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftcl.config.types import HSG
from ftcl.data.views import crop_flip

SCHEDULES = ("linear", "cosine")
NATIVE_SIZE = {"digits": 8, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32, "imagefolder": 224}


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float = 1.0) -> Tensor:
    """Identity forward; backward multiplies the gradient by ``-scale``."""
    return _GradReverse.apply(x, scale)


def similarity_target(epoch: int, epochs: int, start: float, end: float, schedule: str = "linear") -> float:
    """Target pair similarity at ``epoch`` (0-based) of ``epochs``: ``start`` at epoch 0, ``end`` at
    the last epoch, ``linear`` or ``cosine`` in between (and ``end`` after)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"hsg.pair.schedule {schedule!r} is not one of {SCHEDULES}")
    p = min(1.0, epoch / max(1, epochs - 1))
    if schedule == "linear":
        return start + (end - start) * p
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


def image_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity (B,) of flattened images."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def set_similarity(a: Tensor, b: Tensor, s: float | Tensor, eps: float = 1e-8) -> Tensor:
    """The image of ``b``'s norm whose (flattened) cosine with ``a`` is ``s``, turning ``b`` in the
    plane of a and b: ``||b|| (s u + sqrt(1 - s^2) w)``; u = a / ||a||, w = unit(b - (b.u) u)."""
    fa, fb = a.flatten(1), b.flatten(1)
    u = fa / fa.norm(dim=1, keepdim=True).clamp_min(eps)
    d = fb - (fb * u).sum(dim=1, keepdim=True) * u
    w = d / d.norm(dim=1, keepdim=True).clamp_min(eps)
    s = torch.as_tensor(s, dtype=fb.dtype, device=fb.device)
    out = fb.norm(dim=1, keepdim=True) * (s * u + torch.sqrt(1 - s * s) * w)
    return out.view_as(b)


def auto_stages(image_size: int) -> int:
    """Down-sampling stages for an ``image_size`` px generator: ``clamp(floor(log2(S / 8)), 0, 3)``."""
    return int(min(3, max(0, math.floor(math.log2(max(image_size, 1) / 8)))))


def input_channels(backbone: nn.Module) -> int:
    """Image channels a backbone takes: those of its first convolution."""
    return next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels


def resolution(dataset: str, image_size: int | None) -> int:
    """The view size of a run: ``data.image_size`` or the dataset's native size."""
    return int(image_size or NATIVE_SIZE[dataset])


class ConditionalGenerator(nn.Module):
    """``G(x, z) = x + epsilon * tanh(UNet(x, z))``, same size as ``x`` (module docstring).

    Layout (w = ``width``, w_i = w * min(2^i, 4)): 3x3 conv C -> w at full resolution; ``stages``
    stride-2 3x3 convs w_i -> w_(i+1); at the bottleneck the noise joins as channels,
    ``y + conv(relu(conv([y, z])))``; back up, each stage a 3x3 conv w_(i+1) -> w_i at the lower
    resolution, nearest upsampling, plus the skip of that resolution; a 3x3 conv w -> C. The convs
    run at low resolution where they can (additive skips, conv before upsampling), so at 224 px
    with w = 16 one generator costs 0.8 GFLOP per image (0.2 M parameters), a tenth of a ResNet-50
    forward (8.2 GFLOP); at 32 px 0.02 GFLOP.
    """

    def __init__(self, channels: int, width: int = 16, noise_dim: int = 16, stages: int = 2,
                 epsilon: float = 0.5):
        super().__init__()
        self.noise_dim, self.epsilon = noise_dim, epsilon
        widths = [width * min(2**i, 4) for i in range(stages + 1)]
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1), nn.ReLU(inplace=True))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, 2, 1), nn.ReLU(inplace=True)) for i in range(stages))
        w = widths[-1]
        self.mid = nn.Sequential(nn.Conv2d(w + noise_dim, w, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, 1, 1))
        self.up = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i + 1], widths[i], 3, 1, 1), nn.ReLU(inplace=True))
            for i in reversed(range(stages)))
        self.out = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        y = self.stem(x)
        skips = [y]
        for down in self.down:
            y = down(y)
            skips.append(y)
        noise = z[:, :, None, None].expand(-1, -1, *y.shape[-2:])
        y = y + self.mid(torch.cat([y, noise], dim=1))
        for up, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            y = F.interpolate(up(y), size=skip.shape[-2:], mode="nearest") + skip
        return x + self.epsilon * torch.tanh(self.out(y))


@dataclass
class HSGSample:
    """A generated positive pair (after re-augmentation and the reversal layer), the generators'
    own loss (the similarity penalty; zero in ``project`` mode), the pair's measured image cosine
    (before re-augmentation, no gradient) and the target it followed."""

    first: Tensor
    second: Tensor
    penalty: Tensor
    similarity: Tensor
    target: float


def pair_count(batch: int, fraction: float, multiple: int = 1) -> int:
    """Generated pairs per step: ``ceil(fraction x batch)``, at least 2 per BatchNorm sub-batch (a
    BatchNorm needs two samples), rounded up to a multiple of ``multiple`` (a split BatchNorm's
    sub-batches), at most ``batch``."""
    n = max(2 * multiple, math.ceil(fraction * batch))
    n = -(-n // multiple) * multiple
    return min(n, batch)


class HardSampleGenerator(nn.Module):
    """The pair of generators, the similarity schedule and the reversal layer (module docstring)."""

    def __init__(self, channels: int, image_size: int, epochs: int, *, width: int = 16, noise_dim: int = 16,
                 stages: int | None = None, epsilon: float = 0.5, mode: str = "project",
                 similarity_start: float = 0.95, similarity_end: float = 0.75, schedule: str = "linear",
                 penalty_weight: float = 10.0, reaugment: bool = True, crop_scale: tuple[float, float] = (0.5, 1.0),
                 weight: float = 1.0, adversarial_scale: float = 1.0, fraction: float = 1.0,
                 batch_multiple: int = 1):
        super().__init__()
        stages = auto_stages(image_size) if stages is None else stages
        self.gen_a = ConditionalGenerator(channels, width, noise_dim, stages, epsilon)
        self.gen_b = ConditionalGenerator(channels, width, noise_dim, stages, epsilon)
        self.image_size, self.epochs, self.stages = image_size, epochs, stages
        self.mode, self.schedule = mode, schedule
        self.similarity_start, self.similarity_end = similarity_start, similarity_end
        self.penalty_weight, self.reaugment, self.crop_scale = penalty_weight, reaugment, tuple(crop_scale)
        self.weight, self.adversarial_scale, self.fraction = weight, adversarial_scale, fraction
        self.batch_multiple = int(batch_multiple)

    @classmethod
    def from_section(cls, h: HSG, channels: int, image_size: int, epochs: int,
                     batch_multiple: int = 1) -> HardSampleGenerator:
        """The generators of the run config's ``hsg`` section ``h`` for ``channels``-channel views of
        ``image_size`` px and ``epochs`` epochs; ``batch_multiple``: the pair count is rounded up to a
        multiple of it (the method's BatchNorm sub-batches)."""
        g, p = h.generator, h.pair
        return cls(channels, image_size, epochs, width=g.width, noise_dim=g.noise_dim, stages=g.stages,
                   epsilon=g.epsilon, mode=p.mode, similarity_start=p.similarity_start,
                   similarity_end=p.similarity_end, schedule=p.schedule, penalty_weight=p.penalty_weight,
                   reaugment=h.reaugment, crop_scale=tuple(h.crop_scale), weight=h.weight,
                   adversarial_scale=h.adversarial_scale, fraction=h.fraction, batch_multiple=batch_multiple)

    def target(self, epoch: int) -> float:
        return similarity_target(epoch, self.epochs, self.similarity_start, self.similarity_end, self.schedule)

    def forward(self, x: Tensor, epoch: int) -> HSGSample:
        """A hard positive pair generated from the first :func:`pair_count` views of ``x``."""
        target = self.target(epoch)
        x = x[: pair_count(x.shape[0], self.fraction, self.batch_multiple)]
        b, nz = x.shape[0], self.gen_a.noise_dim
        a = self.gen_a(x, torch.randn(b, nz, device=x.device, dtype=x.dtype)).float()
        second = self.gen_b(x, torch.randn(b, nz, device=x.device, dtype=x.dtype)).float()
        if self.mode == "project":
            second = set_similarity(a, second, target)
        cos = image_cosine(a, second)
        penalty = (self.penalty_weight * (cos - target).square().mean() if self.mode == "penalty"
                   else torch.zeros((), device=x.device))
        first = a
        if self.reaugment:
            size = x.shape[-1]
            first, second = crop_flip(first, size, self.crop_scale), crop_flip(second, size, self.crop_scale)
        first = grad_reverse(first, self.adversarial_scale)
        second = grad_reverse(second, self.adversarial_scale)
        return HSGSample(first, second, penalty, cos.detach(), target)

    def add_to(self, loss: Tensor, x: Tensor, epoch: int, pair_loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """A method's ``loss`` with the generated pair's: ``(loss + w L(pair)) / (1 + w) + penalty``,
        w = ``hsg.weight``; ``pair_loss`` is the method's own loss on a pair of view batches."""
        sample = self(x, epoch)
        return (loss + self.weight * pair_loss(sample.first, sample.second)) / (1 + self.weight) + sample.penalty
