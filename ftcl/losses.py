"""Every loss of ftcl's methods as a pure function of similarity scores: MoCo's InfoNCE, its
multi-positive form (feature augmentation), BYOL's and SimSiam's distances, and the weighted mean
that joins extra terms (FA, HSG) to a method's own loss. The methods compose them; each has a test
with a hand-computed case (``tests/test_losses.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """InfoNCE with the positive at index 0 (MoCo, He et al. 2020, Eq. 1).

    ``pos``: (B,) positive scores, ``neg``: (B, K) negative scores, both cosine similarities.
    Returns ``mean_b -log( exp(pos_b / t) / (exp(pos_b / t) + sum_k exp(neg_bk / t)) )``.
    """
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"expected pos (B,) and neg (B, K), got {tuple(pos.shape)} and {tuple(neg.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = torch.cat([pos[:, None], neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device))


def multi_positive_info_nce(pos: Tensor, neg: Tensor, temperature: float) -> Tensor:
    """Mean over samples b and positives j of InfoNCE with positive ``pos[b, j]`` against all of
    ``neg[b]``: ``-log( exp(pos_bj / t) / (exp(pos_bj / t) + sum_k exp(neg_bk / t)) )``.

    With one positive column this is MoCo's InfoNCE; each positive has its own softmax (the extra
    positives do not compete with one another).
    """
    if pos.dim() != 2 or neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"expected pos (B, P) and neg (B, K), got {tuple(pos.shape)} and {tuple(neg.shape)}")
    lse_neg = torch.logsumexp(neg / temperature, dim=1, keepdim=True)
    p = pos / temperature
    return (torch.logaddexp(p, lse_neg) - p).mean()


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity (N,) of N x D tensors."""
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(dim=1)


def byol_distance(cos: Tensor) -> Tensor:
    """BYOL's loss of one direction (Grill et al. 2020, Eq. 2): ``mean (2 - 2 cos)``, the squared
    distance of the L2-normalised prediction and target; 0 when aligned, at most 4."""
    return (2 - 2 * cos).mean()


def simsiam_distance(cos: Tensor) -> Tensor:
    """SimSiam's loss of one direction (Chen & He 2021, Eq. 1-2): ``-mean cos / 2``, in [-1/2, 1/2]."""
    return -0.5 * cos.mean()


def weighted_mean(loss: Tensor, extra: Tensor, weight: float) -> Tensor:
    """``(loss + weight * extra) / (1 + weight)``: a method's loss with extra terms, same scale (an
    unnormalised sum would act like a larger learning rate without the matching weight decay)."""
    return (loss + weight * extra) / (1 + weight)
