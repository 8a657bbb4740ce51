"""Feature transformation (FT) of Zhu et al., "Improving Contrastive Learning by Visualizing
Feature Transformation", ICCV 2021, Sec. 4.

All functions are pure: they take L2-normalised features and mixing coefficients and return new
tensors; nothing is sampled on the host and nothing is modified in place. ``FeatureTransform``
composes them from a config, samples the coefficients on the features' device, and is the only
thing a method calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ftcl.config.types import FTSide

GRANULARITIES = ("iteration", "sample", "element")
DISTRIBUTIONS = ("beta", "uniform")


def lambda_shape(features: Tensor, granularity: str) -> tuple[int, ...]:
    """Shape of the coefficient that broadcasts over ``features`` (N x D).

    ``iteration``: one scalar for the whole batch (1 x 1); ``sample``: one per row (N x 1);
    ``element``: one per row and dimension (N x D), the authors' per-dimension mask.
    """
    n, d = features.shape
    shapes = {"iteration": (1, 1), "sample": (n, 1), "element": (n, d)}
    if granularity not in shapes:
        raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITIES}")
    return shapes[granularity]


def sample_lambda(
    shape: tuple[int, ...],
    distribution: str,
    alpha: float,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw mixing coefficients b in [0, 1] on ``device``: b ~ Beta(alpha, alpha) (alpha > 0, which the
    run config's schema guarantees) or U(0, 1).

    Beta(a, a) is sampled as G1 / (G1 + G2) with G1, G2 ~ Gamma(a, 1) drawn by
    ``torch._standard_gamma`` on the device, so no host-side sampling and no synchronisation.
    ``generator`` (uniform only) makes the draw reproducible in tests.
    """
    if distribution == "uniform":
        return torch.rand(shape, device=device, dtype=dtype, generator=generator)
    if distribution != "beta":
        raise ValueError(f"distribution {distribution!r} is not one of {DISTRIBUTIONS}")
    conc = torch.full((2, *shape), float(alpha), device=device, dtype=torch.float32)
    g = torch._standard_gamma(conc)
    return (g[0] / (g[0] + g[1]).clamp_min(torch.finfo(torch.float32).tiny)).to(dtype)


def mix_pair(q: Tensor, k: Tensor, lam: Tensor | float) -> tuple[Tensor, Tensor]:
    """Symmetric mixing of a positive pair (paper Eq. 5 / 6).

    ``q' = lam * q + (1 - lam) * k`` and ``k' = lam * k + (1 - lam) * q``.
    For unit q, k with cosine s, ``q'.k' = s (lam^2 + (1 - lam)^2) + 2 lam (1 - lam)``:
    lam in [0, 1] interpolates (the score rises, easier positives), lam > 1 extrapolates (the score
    falls, harder positives). The gradient reaches q through both q' and k'.
    """
    return lam * q + (1 - lam) * k, lam * k + (1 - lam) * q


def extrapolate_positives(q: Tensor, k: Tensor, b: Tensor | float) -> tuple[Tensor, Tensor]:
    """Positive extrapolation (paper Eq. 6): ``mix_pair`` with ``lam = 1 + b``, b in [0, 1]."""
    return mix_pair(q, k, 1 + b)


def interpolate_positives(q: Tensor, k: Tensor, b: Tensor | float) -> tuple[Tensor, Tensor]:
    """Positive interpolation (paper Eq. 5): ``mix_pair`` with ``lam = b`` in [0, 1]."""
    return mix_pair(q, k, b)


def interpolate_negatives(negatives: Tensor, lam: Tensor | float, perm: Tensor) -> Tensor:
    """Negative interpolation (paper Eq. 7): ``n'_i = lam * n_i + (1 - lam) * n_perm(i)``.

    ``negatives`` is K x D (a copy of the queue; the queue itself is never changed), ``perm`` a
    permutation of range(K). Since ``perm`` is a permutation the mean of the negatives is kept
    exactly, while their spread shrinks by about ``lam^2 + (1 - lam)^2``: more, and more diverse,
    points inside the same region.
    """
    return lam * negatives + (1 - lam) * negatives[perm]


class FeatureTransform:
    """FT composed from config: which transforms run, with which coefficient law and granularity.

    Call it with normalised q (N x D, with grad), k (N x D, no grad) and the queue (K x D); it
    returns ``(q_for_pos, k_for_pos, q_for_neg, negatives)``, the tensors the logits are built
    from. With every mode ``none`` (or before ``start_epoch``) it returns its inputs untouched.
    The queue is never modified; the caller enqueues the *unmixed* keys.
    """

    def __init__(self, positive: FTSide, negative: FTSide, start_epoch: int = 0):
        """``positive``/``negative``: the run config's ``ft.positive``/``ft.negative`` (mode, law,
        alpha, granularity, renormalisation of each side, checked when the config was resolved);
        ``start_epoch``: ``ft.start_epoch``."""
        self.positive, self.negative, self.start_epoch = positive, negative, start_epoch

    @property
    def enabled(self) -> bool:
        return self.positive.mode != "none" or self.negative.mode != "none"

    def active(self, epoch: int) -> bool:
        return self.enabled and epoch >= self.start_epoch

    def __call__(self, q: Tensor, k: Tensor, queue: Tensor, epoch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Return ``(q', k', negatives')``: q' is used for both the positive and negative logits."""
        if not self.active(epoch):
            return q, k, queue
        pos, neg = self.positive, self.negative
        if pos.mode != "none":
            b = sample_lambda(lambda_shape(q, pos.granularity), pos.distribution, pos.alpha,
                              device=q.device, dtype=q.dtype)
            mix = extrapolate_positives if pos.mode == "extrapolate" else interpolate_positives
            q, k = mix(q, k, b)
            if pos.renormalize:
                q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        if neg.mode != "none":
            lam = sample_lambda(lambda_shape(queue, neg.granularity), neg.distribution, neg.alpha,
                                device=queue.device, dtype=queue.dtype)
            perm = torch.randperm(queue.shape[0], device=queue.device)
            queue = interpolate_negatives(queue, lam, perm)
            if neg.renormalize:
                queue = F.normalize(queue, dim=1)
        return q, k, queue
