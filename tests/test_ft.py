"""The feature-transformation math (Zhu et al., ICCV 2021, Sec. 4) on hand-checkable cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from ftcl.config.types import FTSide
from ftcl.transforms.ft import (
    FeatureTransform,
    extrapolate_positives,
    interpolate_negatives,
    interpolate_positives,
    lambda_shape,
    mix_pair,
    sample_lambda,
)


def side(mode: str = "none", **kw) -> FTSide:
    """One side of the run config's ``ft`` section: ftcl's defaults but for ``mode`` and ``kw``."""
    return FTSide(**{"mode": mode, "distribution": "beta", "alpha": 1.0, "granularity": "iteration",
                     "renormalize": False, **kw})


def unit_pair(cos: float, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors with cosine ``cos``."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, dim, generator=g, dtype=torch.float64)
    a = F.normalize(a, dim=0)
    b = F.normalize(b - (b @ a) * a, dim=0)  # orthogonal to a
    return a[None], (cos * a + math.sqrt(1 - cos**2) * b)[None]


@pytest.mark.parametrize("s", [-0.3, 0.2, 0.8, 0.95])
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.5, 1.0, 1.5, 2.0])
def test_transformed_positive_score_follows_closed_form(s, lam):
    q, k = unit_pair(s)
    q2, k2 = mix_pair(q, k, lam)
    expected = s * (lam**2 + (1 - lam) ** 2) + 2 * lam * (1 - lam)
    assert (q2 * k2).sum().item() == pytest.approx(expected, abs=1e-9)


def test_paper_example_extrapolation_to_one_and_a_half():
    q, k = unit_pair(0.8)
    q2, k2 = extrapolate_positives(q, k, 0.5)  # lambda = 1.5
    assert (q2 * k2).sum().item() == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("b", [0.05, 0.5, 1.0])
def test_extrapolation_makes_positives_harder_and_interpolation_easier(b):
    for s in (0.0, 0.5, 0.9):
        q, k = unit_pair(s)
        assert (torch.mul(*extrapolate_positives(q, k, b))).sum() < s
        assert (torch.mul(*interpolate_positives(q, k, b))).sum() >= s - 1e-12


def test_gradient_reaches_query_through_both_mixed_terms():
    q, k = unit_pair(0.6)
    q = q.clone().requires_grad_(True)
    lam = 1.4
    q2, k2 = mix_pair(q, k, lam)
    (q2 * k2).sum().backward()
    both_terms = lam * k2.detach() + (1 - lam) * q2.detach()
    only_first = lam * k2.detach()
    assert torch.allclose(q.grad, both_terms)
    assert not torch.allclose(q.grad, only_first)


def test_negative_interpolation_keeps_mean_and_shrinks_variance():
    torch.manual_seed(0)
    queue = F.normalize(torch.randn(4096, 32, dtype=torch.float64), dim=1)
    perm = torch.randperm(4096)
    mixed = interpolate_negatives(queue, 0.7, perm)
    assert torch.allclose(mixed.mean(0), queue.mean(0), atol=1e-12)
    ratio = mixed.var(0).sum() / queue.var(0).sum()
    assert ratio == pytest.approx(0.7**2 + 0.3**2, rel=0.05)
    assert ratio < 1


def test_negative_interpolation_leaves_the_queue_untouched():
    queue = F.normalize(torch.randn(64, 8), dim=1)
    before = queue.clone()
    interpolate_negatives(queue, 0.3, torch.randperm(64))
    assert torch.equal(queue, before)


@pytest.mark.parametrize("granularity,shape", [("iteration", (1, 1)), ("sample", (10, 1)), ("element", (10, 4))])
def test_lambda_shapes_per_granularity(granularity, shape):
    assert lambda_shape(torch.zeros(10, 4), granularity) == shape


def test_beta_lambda_moments_and_range():
    torch.manual_seed(0)
    b = sample_lambda((200_000,), "beta", 2.0, device="cpu")
    assert b.min() >= 0 and b.max() <= 1
    assert b.mean().item() == pytest.approx(0.5, abs=5e-3)
    assert b.var().item() == pytest.approx(1 / (4 * (2 * 2.0 + 1)), rel=0.03)  # Var Beta(a,a) = 1/(4(2a+1))


def test_uniform_lambda_and_bad_arguments():
    u = sample_lambda((100_000,), "uniform", 1.0, device="cpu")
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="distribution"):
        sample_lambda((2,), "gauss", 1.0, device="cpu")


def test_feature_transform_respects_start_epoch_and_modes():
    ft = FeatureTransform(side("extrapolate", alpha=2.0), side("interpolate", alpha=1.6), start_epoch=2)
    q = F.normalize(torch.randn(8, 16), dim=1)
    k = F.normalize(torch.randn(8, 16), dim=1)
    queue = F.normalize(torch.randn(32, 16), dim=1)
    same = ft(q, k, queue, epoch=1)
    assert all(a is b for a, b in zip(same, (q, k, queue), strict=True))
    q2, k2, n2 = ft(q, k, queue, epoch=2)
    assert ((q2 * k2).sum(1) < (q * k).sum(1)).all()  # extrapolated positives are harder
    assert n2.shape == queue.shape and not torch.equal(n2, queue)


def test_renormalize_puts_mixed_features_back_on_the_sphere():
    ft = FeatureTransform(side("extrapolate", renormalize=True, granularity="sample"),
                          side("interpolate", renormalize=True, granularity="element"))
    q, k = (F.normalize(torch.randn(8, 16), dim=1) for _ in range(2))
    q2, k2, n2 = ft(q, k, F.normalize(torch.randn(32, 16), dim=1), epoch=0)
    for t in (q2, k2, n2):
        assert torch.allclose(t.norm(dim=1), torch.ones(t.shape[0]), atol=1e-5)


def test_unknown_modes_and_a_bad_alpha_are_rejected_when_the_config_is_resolved():
    """The one place FT's settings are checked (the transform takes them as checked)."""
    from ftcl import config
    from ftcl.config import ConfigError

    with pytest.raises(ConfigError, match=r"ft.positive.mode.*'sideways'"):
        config.resolve(overrides={"ft.positive.mode": "sideways"})
    with pytest.raises(ConfigError, match=r"ft.negative.mode.*'extrapolate'"):
        config.resolve(overrides={"ft.negative.mode": "extrapolate"})
    with pytest.raises(ConfigError, match=r"ft.positive.alpha.*must be > 0"):
        config.resolve(overrides={"ft.positive.alpha": 0.0})
