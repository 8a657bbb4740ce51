"""MoCo + FT: the loss, the queue, the momentum encoder."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_ema_follows, tiny_method

from ftcl.losses import info_nce


def tiny_moco(**overrides):
    return tiny_method("moco", **{"model.feature_dim": 128, **overrides})


def test_info_nce_matches_hand_computation():
    pos = torch.tensor([0.9, 0.1])
    neg = torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.0, 0.1]])
    t = 0.5
    expected = 0.0
    for p, n in zip(pos, neg, strict=True):
        expected += -math.log(math.exp(p / t) / (math.exp(p / t) + sum(math.exp(x / t) for x in n)))
    assert info_nce(pos, neg, t).item() == pytest.approx(expected / 2, rel=1e-6)


def test_info_nce_validates_shapes_and_temperature():
    with pytest.raises(ValueError, match="expected pos"):
        info_nce(torch.zeros(2, 1), torch.zeros(2, 3), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.zeros(2), torch.zeros(2, 3), 0.0)


@pytest.mark.parametrize("ft", [{}, {"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate",
                                     "ft.negative.granularity": "element"}])
def test_queue_after_a_step_holds_the_unmixed_keys(ft):
    moco = tiny_moco(**ft)
    v1, v2 = torch.randn(2, 4, 1, 8, 8)
    with torch.no_grad():
        expected_keys = moco.encoder_k(v2)
    before = moco.queue.clone()
    out = moco.training_step(v1, v2, epoch=0)
    out.loss.backward()
    moco.after_step()
    assert torch.allclose(moco.queue[:4], expected_keys, atol=1e-6)
    assert torch.equal(moco.queue[4:], before[4:])
    assert int(moco.queue_ptr) == 4


def test_queue_wraps_around():
    moco = tiny_moco(**{"method.queue_size": 6})
    for _ in range(2):
        moco.training_step(*torch.randn(2, 4, 1, 8, 8), epoch=0)
        moco.after_step()
    assert int(moco.queue_ptr) == 2
    assert torch.allclose(moco.queue.norm(dim=1), torch.ones(6), atol=1e-5)


def test_ft_scores_are_the_ones_in_the_loss():
    moco = tiny_moco(**{"ft.positive.mode": "extrapolate"})
    out = moco.training_step(*torch.randn(2, 4, 1, 8, 8), epoch=0)
    assert out.loss.item() == pytest.approx(info_nce(out.pos, out.neg, out.temperature).item(), rel=1e-6)
    assert out.neg.shape == (4, 32)


def test_gradient_flows_to_the_query_encoder_only():
    moco = tiny_moco(**{"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"})
    moco.training_step(*torch.randn(2, 4, 1, 8, 8), epoch=0).loss.backward()
    assert all(p.grad is not None for p in moco.encoder_q.parameters())
    assert all(p.grad is None and not p.requires_grad for p in moco.encoder_k.parameters())


def test_momentum_update_moves_the_key_encoder_towards_the_query_encoder():
    moco = tiny_moco()
    assert_ema_follows(moco, moco.encoder_q, moco.encoder_k)


def test_heads_are_normalised_and_v1_head_is_linear():
    moco = tiny_moco(**{"model.head": "linear"})
    assert isinstance(moco.encoder_q.head.net, torch.nn.Linear)
    z = moco.encoder_q(torch.randn(4, 1, 8, 8))  # a batch the 2 BatchNorm sub-batches can share
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert torch.allclose(F.normalize(z, dim=1), z, atol=1e-6)
