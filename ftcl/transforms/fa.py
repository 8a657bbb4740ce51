"""Feature augmentation (FA) in the projected feature space, after Zhang, Zhu et al., "Feature
Augmentation for Self-supervised Contrastive Learning: A Closer Look" (2024).

The paper augments *features* (not images) to add data diversity: from a projected feature it
makes new features similar to the original and uses them as extra samples. Its FA operator and
exact architectures are not public (``shared/papers.md`` Sec. 2), so every choice below is an
option (``fa.*`` in ``ftcl/resources/config.schema.yaml``) with a documented default:

Operators (``fa.operator``), each mapping N x D features to ``fa.copies`` x N x D new ones:

* ``gaussian`` (default): ``x' = x + sigma * ||x|| / sqrt(D) * eps``, eps ~ N(0, I), so
  ``E ||x' - x||^2 = sigma^2 ||x||^2`` (a relative perturbation, the same for MoCo's unit
  features and BYOL's raw projections); ``fa.gaussian.sigma`` = 0.2.
* ``interpolate``: ``x' = lam * x + (1 - lam) * x_partner`` with lam ~ U(``lambda_min``, 1) per
  feature (default 0.7: the new feature stays closer to its source than to the partner). The
  partner comes from ``fa.interpolate.source`` (``batch``: the other features of the same batch,
  never the feature itself; ``queue``: MoCo's negatives) and is chosen ``random``-ly (default) or
  as the ``nearest`` by cosine (a no-grad search). Augmented *negatives* are always interpolated
  toward random other negatives (a K x K nearest-neighbour search per step would cost more than
  the encoder).
* ``mlp``: a learned perturbation ``delta = W2 relu(W1 [x / ||x||, eps])``, eps ~ N(0, I) of
  ``fa.mlp.noise_dim``, and ``x' = x + scale * ||x|| * delta / ||delta||`` (the network picks the
  direction, ``fa.mlp.scale`` the size). It is trained with the model; with
  ``fa.mlp.adversarial`` its gradient is reversed (it then makes the augmented samples hard, as
  HSG's generator does in image space).

``fa.renormalize`` (default true) rescales every new feature to the norm of its source, so
augmented MoCo features stay on the unit sphere. ``fa.stop_gradient`` (default true, which the
paper reports as crucial against overfitting) makes FA consume ``x.detach()``: no gradient goes
from the augmented features back into the encoder (the learned MLP still trains).

Placements. Instance discrimination (MoCo, :meth:`FeatureAugmentation.instance_discrimination`):
augmented keys are extra positives of their query (``fa.moco.positives``; with
``fa.moco.positive_source: query`` the query is augmented instead, the case where the
stop-gradient matters) and augmented negatives are extra negatives (``fa.moco.negatives``). Each
extra positive gets its own InfoNCE term against all (original + augmented) negatives
(:func:`multi_positive_info_nce`).

The extra terms enter as a weighted mean with the method's own loss, ``(L + w L_FA) / (1 + w)``,
w = ``fa.weight`` (:func:`weighted_mean`): FA adds samples without scaling the gradient. (An
unnormalised sum acts like a larger learning rate without the matching weight decay; with
w = 1 that alone made MoCo collapse on digits, even for an identity FA.)

Instance similarity (BYOL / SimSiam, :meth:`FeatureAugmentation.instance_similarity`), with
online projections z, predictions p = h(z) and targets t (stop-gradient), views 1 and 2, one
direction shown (the other swaps the views), the extra term being the method's distance:

* ``basic``: FA makes extra *targets*: D(p1, FA(t2)); the predictor is untouched.
* ``serial``: FA in series with the predictor on the same view: D(h(FA(z1)), t2).
* ``parallel`` (default; the paper's best, "FA and the predictor on different views"): the other
  view's online projection goes through FA instead of the predictor and serves as the target of
  this view's prediction: D(p1, FA(z2)). Without the stop-gradient the encoder also learns through
  FA(z2); with it (and for SimSiam, whose targets are the detached online projections) the term
  equals ``basic`` up to the target network.

All randomness is drawn on the features' device; nothing synchronises with the host.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftcl.config.types import FA
from ftcl.losses import cosine

# ---------------------------------------------------------------- pure functions


def gaussian_perturb(x: Tensor, sigma: float, noise: Tensor) -> Tensor:
    """``x + sigma * ||x|| / sqrt(D) * noise`` row-wise; with noise ~ N(0, I) the expected squared
    distance to ``x`` is ``sigma^2 ||x||^2``."""
    scale = sigma * x.norm(dim=1, keepdim=True) / math.sqrt(x.shape[1])
    return x + scale * noise


def interpolate_toward(x: Tensor, partners: Tensor, lam: Tensor | float) -> Tensor:
    """``lam * x + (1 - lam) * partners`` (lam = 1 keeps ``x``)."""
    return lam * x + (1 - lam) * partners


def rescale_to(x_new: Tensor, x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x_new`` rescaled row-wise to the norms of ``x``."""
    return x_new * (x.norm(dim=1, keepdim=True) / x_new.norm(dim=1, keepdim=True).clamp_min(eps))


def other_index(n: int, device: torch.device | str, copies: int = 1) -> Tensor:
    """A random partner index ``j != i`` for each of ``copies`` x ``n`` rows (row ``c * n + i``)."""
    if n < 2:
        raise ValueError("interpolation toward other samples needs at least 2 of them")
    i = torch.arange(n, device=device).repeat(copies)
    return (i + torch.randint(1, n, (copies * n,), device=device)) % n


@torch.no_grad()
def nearest_index(x: Tensor, bank: Tensor, exclude_self: bool, chunk: int = 4096) -> Tensor:
    """Index of each row's most cosine-similar row of ``bank`` (itself excluded when ``bank`` is
    ``x``), computed in chunks of rows so memory stays ``chunk x len(bank)``."""
    xn, bn = F.normalize(x.float(), dim=1), F.normalize(bank.float(), dim=1)
    out = []
    for start in range(0, xn.shape[0], chunk):
        sim = xn[start:start + chunk] @ bn.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=sim.device)
            sim[rows, rows + start] = -float("inf")
        out.append(sim.argmax(dim=1))
    return torch.cat(out)


# ---------------------------------------------------------------- the learned operator


class PerturbationMLP(nn.Module):
    """``x' = x + scale * ||x|| * delta / ||delta||``, ``delta = W2 relu(W1 [x / ||x||, eps])``."""

    def __init__(self, dim: int, hidden_dim: int, noise_dim: int, scale: float, adversarial: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + noise_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, dim))
        self.noise_dim, self.scale, self.adversarial = noise_dim, scale, adversarial

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.randn(x.shape[0], self.noise_dim, device=x.device, dtype=x.dtype)
        delta = self.net(torch.cat([F.normalize(x, dim=1), eps], dim=1))
        if self.adversarial:
            from ftcl.transforms.hsg import grad_reverse

            delta = grad_reverse(delta)
        return x + self.scale * x.norm(dim=1, keepdim=True) * F.normalize(delta, dim=1)


# ---------------------------------------------------------------- the module


class FeatureAugmentation(nn.Module):
    """FA composed from config; a method calls :meth:`instance_discrimination` (MoCo) or
    :meth:`instance_similarity` (BYOL / SimSiam) when :attr:`enabled`.

    Holds parameters only for the ``mlp`` operator, so a disabled FA changes no state dict.
    """

    def __init__(self, cfg: FA, dim: int):
        """``cfg``: the run config's ``fa`` section (checked when the config was resolved); ``dim``:
        the projected feature size."""
        super().__init__()
        self.cfg = cfg
        self.mlp = None
        if cfg.enabled and cfg.operator == "mlp":
            m = cfg.mlp
            self.mlp = PerturbationMLP(dim, m.hidden_dim or dim, m.noise_dim, m.scale, m.adversarial)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    @property
    def weight(self) -> float:
        return self.cfg.weight

    def augment(self, x: Tensor, bank: Tensor | None = None, partner: str | None = None) -> Tensor:
        """``copies`` x N new features (row ``c * N + i`` comes from ``x[i]``), from ``x.detach()``
        under ``stop_gradient``. ``bank`` holds interpolation partners (default: ``x`` itself, the
        feature never being its own partner); ``partner`` overrides ``fa.interpolate.partner``."""
        c = self.cfg
        partner = partner or c.interpolate.partner
        src = x.detach() if c.stop_gradient else x
        n = src.shape[0]
        reps = src.repeat(c.copies, 1)
        if c.operator == "gaussian":
            out = gaussian_perturb(reps, c.gaussian.sigma, torch.randn_like(reps))
        elif c.operator == "interpolate":
            self_bank = bank is None
            bank = src if self_bank else bank
            if partner == "nearest":
                idx = nearest_index(src, bank, exclude_self=self_bank).repeat(c.copies)
            elif self_bank:
                idx = other_index(n, src.device, c.copies)
            else:
                idx = torch.randint(0, bank.shape[0], (c.copies * n,), device=src.device)
            low = c.interpolate.lambda_min
            lam = low + (1 - low) * torch.rand(c.copies * n, 1, device=src.device, dtype=src.dtype)
            out = interpolate_toward(reps, bank[idx].to(src.dtype), lam)
        else:
            out = self.mlp(reps)
        return rescale_to(out, reps) if c.renormalize else out

    def instance_discrimination(self, q: Tensor, k: Tensor, negatives: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """MoCo placement: ``(extra_pos (B, copies), extra_neg (B, copies * K))`` scores (either may
        be ``None`` when switched off); q, k: B x D unit features, negatives: K x D."""
        c, b = self.cfg, q.shape[0]
        extra_pos = extra_neg = None
        if c.moco.positives:
            bank = negatives if c.interpolate.source == "queue" else None
            if c.moco.positive_source == "key":
                extra_pos = (q[None] * self.augment(k, bank).view(c.copies, b, -1)).sum(-1).T
            else:
                extra_pos = (self.augment(q, bank).view(c.copies, b, -1) * k[None]).sum(-1).T
        if c.moco.negatives:
            extra_neg = q @ self.augment(negatives, partner="random").T
        return extra_pos, extra_neg

    def instance_similarity(self, z1: Tensor, z2: Tensor, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor,
                            predictor: nn.Module) -> tuple[Tensor, Tensor]:
        """BYOL / SimSiam placement: cosines ``(c1, c2)`` (each copies x B) of the extra pairs of
        both directions, per ``fa.placement`` (module docstring). z: online projections, p:
        predictions, t: targets (already without gradient)."""
        m = self.cfg.copies
        placement = self.cfg.placement
        if placement == "basic":
            return cosine(p1.repeat(m, 1), self.augment(t2)), cosine(p2.repeat(m, 1), self.augment(t1))
        if placement == "serial":
            return cosine(predictor(self.augment(z1)), t2.repeat(m, 1)), \
                cosine(predictor(self.augment(z2)), t1.repeat(m, 1))
        return cosine(p1.repeat(m, 1), self.augment(z2)), cosine(p2.repeat(m, 1), self.augment(z1))
