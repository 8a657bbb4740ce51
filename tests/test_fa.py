"""Feature augmentation (ftcl/transforms/fa.py): operators on hand-checkable cases, shapes, the
stop-gradient, the MoCo and BYOL/SimSiam placements, and a one-epoch MoCo + FA run on digits."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import check_smoke_run, smoke_cfg, tiny_method

from ftcl import config
from ftcl.config.types import FA
from ftcl.losses import info_nce, multi_positive_info_nce
from ftcl.transforms.fa import (
    FeatureAugmentation,
    gaussian_perturb,
    interpolate_toward,
    nearest_index,
    other_index,
    rescale_to,
)


def tiny(name: str = "moco", **overrides):
    return tiny_method(name, **{"fa.enabled": True, **overrides})


#: test keyword -> the fa key it sets
FA_KEYS = {"lambda_min": "interpolate.lambda_min", "source": "interpolate.source", "partner": "interpolate.partner",
           "mlp_adversarial": "mlp.adversarial", "moco_positives": "moco.positives", "moco_negatives": "moco.negatives"}


def fa_section(**kw) -> FA:
    """The run config's ``fa`` section, enabled, ftcl's defaults but for ``kw``."""
    return config.resolve(overrides={"fa.enabled": True, **{f"fa.{FA_KEYS.get(k, k)}": v for k, v in kw.items()}}).fa


def fa(dim: int = 4, **kw) -> FeatureAugmentation:
    torch.manual_seed(0)
    return FeatureAugmentation(fa_section(**kw), dim)


# ------------------------------------------------------------------ operators


def test_gaussian_perturbation_by_hand_and_its_expected_size():
    x = torch.tensor([[3.0, 4.0]])
    out = gaussian_perturb(x, 0.2, torch.tensor([[1.0, -2.0]]))
    step = 0.2 * 5 / math.sqrt(2)
    assert torch.allclose(out, torch.tensor([[3 + step, 4 - 2 * step]]))
    torch.manual_seed(0)
    x = torch.randn(20000, 32) * 3
    d2 = (gaussian_perturb(x, 0.3, torch.randn_like(x)) - x).pow(2).sum(1) / x.pow(2).sum(1)
    assert d2.mean().item() == pytest.approx(0.09, rel=0.02)  # E||x' - x||^2 = sigma^2 ||x||^2


def test_interpolation_partners_and_rescaling():
    x, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    assert torch.allclose(interpolate_toward(x, y, 0.75), torch.tensor([[1.5, 1.0]]))
    assert torch.allclose(rescale_to(torch.tensor([[3.0, 4.0]]), x), torch.tensor([[1.2, 1.6]]))
    idx = other_index(5, "cpu", copies=40)
    assert idx.shape == (200,) and (idx != torch.arange(5).repeat(40)).all() and idx.max() < 5
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.2]])
    assert nearest_index(bank, bank, exclude_self=True, chunk=3).tolist() == [1, 0, 3, 2]
    assert nearest_index(bank[:1], bank, exclude_self=False).tolist() == [0]


def test_multi_positive_info_nce_is_the_mean_of_separate_info_nce_terms():
    pos = torch.tensor([[0.9, 0.4], [0.1, 0.3]])
    neg = torch.tensor([[0.2, -0.1, 0.3], [0.5, 0.0, 0.1]])
    t = 0.5
    expected = 0.0
    for b in range(2):
        for j in range(2):
            p = pos[b, j].item()
            expected += -math.log(math.exp(p / t) / (math.exp(p / t) + sum(math.exp(v / t) for v in neg[b].tolist())))
    assert multi_positive_info_nce(pos, neg, t).item() == pytest.approx(expected / 4, rel=1e-6)
    assert multi_positive_info_nce(pos[:, :1], neg, t).item() == pytest.approx(info_nce(pos[:, 0], neg, t).item())
    with pytest.raises(ValueError, match="expected pos"):
        multi_positive_info_nce(pos[:, 0], neg, t)


@pytest.mark.parametrize("operator", ["gaussian", "interpolate", "mlp"])
def test_augment_shapes_copy_order_and_renormalisation(operator):
    module = fa(operator=operator, copies=3)
    x = torch.randn(5, 4) * 2
    out = module.augment(x)
    assert out.shape == (15, 4)
    assert torch.allclose(out.norm(dim=1), x.norm(dim=1).repeat(3), atol=1e-5)  # renormalize: true
    assert not torch.allclose(out, x.repeat(3, 1))
    same = fa(operator="interpolate", copies=2, lambda_min=1.0).augment(x)  # lambda = 1: the sources
    assert torch.allclose(same, x.repeat(2, 1))


def test_interpolation_toward_the_queue_and_nearest_partners():
    x = F.normalize(torch.randn(5, 4), dim=1)
    q = torch.tensor([0.0, 0.0, 0.0, 2.0])
    module = fa(operator="interpolate", lambda_min=0.5, renormalize=False, source="queue")
    out = module.augment(x, q.repeat(7, 1))  # every queue entry is q: out = lam x + (1 - lam) q
    lam = ((out - q) * (x - q)).sum(1) / (x - q).pow(2).sum(1)
    assert torch.allclose(out, lam[:, None] * x + (1 - lam[:, None]) * q, atol=1e-6)
    assert ((lam >= 0.5) & (lam <= 1)).all()
    near = fa(operator="interpolate", lambda_min=0.0, renormalize=False, partner="nearest")
    bank = torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 0, 1.0, 0]])
    out = near.augment(bank)  # on the segment from each row to its nearest *other* row
    partner = bank[[1, 0, 0]]  # row 2 is orthogonal to both others: argmax takes the first
    ratio = ((out - partner) * (bank - partner)).sum(1) / (bank - partner).pow(2).sum(1)
    assert torch.allclose(out - partner, ratio[:, None] * (bank - partner), atol=1e-6)
    assert ((ratio >= 0) & (ratio <= 1)).all()


def test_queue_source_needs_a_queue_and_is_rejected_when_the_config_is_resolved():
    with pytest.raises(config.ConfigError, match=r"fa.interpolate.source.*'byol' has no queue"):
        config.resolve(overrides={"method.name": "byol", "fa.enabled": True, "fa.operator": "interpolate",
                                  "fa.interpolate.source": "queue"})
    with pytest.raises(config.ConfigError, match="fa.operator"):
        config.resolve(overrides={"fa.operator": "dropout"})


# ------------------------------------------------------------------ stop-gradient


@pytest.mark.parametrize("stop", [True, False])
def test_stop_gradient_on_the_features_fa_consumes(stop):
    x = torch.randn(6, 4, requires_grad=True)
    out = fa(operator="gaussian", stop_gradient=stop).augment(x)
    assert out.requires_grad is (not stop)
    mlp = fa(operator="mlp", stop_gradient=stop)
    mlp.augment(x).pow(2).sum().backward()  # the learned operator trains either way
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mlp.parameters())
    if stop:
        assert x.grad is None
    else:
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_adversarial_mlp_gets_the_reversed_gradient():
    x = torch.randn(6, 4)
    grads = []
    for adversarial in (False, True):
        module = fa(operator="mlp", mlp_adversarial=adversarial)
        module.augment(x).pow(3).sum().backward()
        grads.append(module.mlp.net[0].weight.grad.clone())
    assert torch.allclose(grads[1], -grads[0], atol=1e-6)


# ------------------------------------------------------------------ MoCo placement


def test_moco_extra_positives_and_negatives_shapes_and_identity_case():
    module = fa(operator="interpolate", lambda_min=1.0, copies=2)  # identity FA: exact copies
    q, k = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    queue = F.normalize(torch.randn(8, 4), dim=1)
    extra_pos, extra_neg = module.instance_discrimination(q, k, queue)
    assert extra_pos.shape == (3, 2) and extra_neg.shape == (3, 16)
    pos, neg = (q * k).sum(1), q @ queue.T
    assert torch.allclose(extra_pos, pos[:, None].expand(3, 2)) and torch.allclose(extra_neg, neg.repeat(1, 2))
    off = FeatureAugmentation(fa_section(moco_positives=False, moco_negatives=False), 4)
    assert off.instance_discrimination(q, k, queue) == (None, None)


def test_moco_loss_with_identity_fa_by_hand():
    moco = tiny(**{"fa.operator": "interpolate", "fa.interpolate.lambda_min": 1.0, "fa.weight": 0.5})
    v1, v2 = torch.randn(2, 4, 1, 8, 8)
    out = moco.training_step(v1, v2, epoch=0)
    with torch.no_grad():
        q, k = moco.encoder_q(v1), moco.encoder_k(v2)
    pos, neg = (q * k).sum(1), q @ moco.queue.T
    doubled = torch.cat([neg, neg], 1)  # the augmented queue equals the queue
    expected = info_nce(pos, doubled, moco.temperature)  # (L + 0.5 L) / 1.5 with the identical extra term
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.pos.shape == (8,) and out.neg.shape == (4, 64)
    moco.after_step()
    assert torch.allclose(moco.queue[:4], k, atol=1e-6)  # the un-augmented keys are enqueued


@pytest.mark.parametrize("stop", [True, False])
def test_moco_query_side_fa_respects_the_stop_gradient(stop):
    moco = tiny(**{"fa.operator": "mlp", "fa.moco.positive_source": "query", "fa.moco.negatives": False,
                   "fa.stop_gradient": stop})
    v1, v2 = torch.randn(2, 4, 1, 8, 8)
    q = moco.encoder_q(v1)
    with torch.no_grad():
        k = moco.encoder_k(v2)
    extra_pos, _ = moco.fa.instance_discrimination(q, k, moco.queue)
    multi_positive_info_nce(extra_pos, q.detach() @ moco.queue.T, 0.2).backward()  # the extra term only
    assert all(p.grad is not None for p in moco.fa.parameters())
    encoder_grads = [p.grad for p in moco.encoder_q.parameters()]
    if stop:
        assert all(g is None for g in encoder_grads)
    else:
        assert all(g is not None for g in encoder_grads) and sum(g.abs().sum() for g in encoder_grads) > 0


# ------------------------------------------------------------------ BYOL / SimSiam placements


def _features(b: int = 6, d: int = 16):
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(b, d, generator=g).requires_grad_(True) for _ in range(2))
    t1, t2 = torch.randn(2, b, d, generator=g)
    return z1, z2, t1, t2


@pytest.mark.parametrize("placement", ["basic", "serial", "parallel"])
@pytest.mark.parametrize("stop", [True, False])
def test_similarity_placements_shapes_and_stop_gradient(placement, stop):
    method = tiny("byol", **{"fa.placement": placement, "fa.stop_gradient": stop, "fa.copies": 2})
    z1, z2, t1, t2 = _features()
    p1 = method.predictor(z1)
    p2 = method.predictor(z2).detach()  # only direction 1 below
    e1, e2 = method.fa.instance_similarity(z1, z2, p1, p2, t1, t2, method.predictor)
    assert e1.shape == e2.shape == (12,)
    method.distance(e1).backward()  # direction 1 only: D(p1, FA(t2)) | D(h(FA(z1)), t2) | D(p1, FA(z2))
    if placement == "basic":
        assert z2.grad is None and z1.grad is not None  # through p1 only
    elif placement == "serial":
        assert z2.grad is None
        assert (z1.grad is None) if stop else (z1.grad.abs().sum() > 0)  # FA(z1) into the predictor
        assert all(p.grad is not None for p in method.predictor.parameters())
    else:
        assert z1.grad is not None  # through p1
        assert (z2.grad is None) if stop else (z2.grad.abs().sum() > 0)  # FA(z2) as the target


def test_similarity_extra_terms_by_hand_with_identity_fa():
    method = tiny("simsiam", **{"fa.operator": "interpolate", "fa.interpolate.lambda_min": 1.0,
                                "fa.placement": "basic", "fa.weight": 2.0})
    v1, v2 = torch.randn(2, 6, 1, 8, 8)
    out = method.training_step(v1, v2, epoch=0)
    b = 6
    main = -0.5 * out.pos[:b].mean() - 0.5 * out.pos[b:2 * b].mean()
    assert torch.allclose(out.pos[2 * b:], out.pos[:2 * b], atol=1e-6)  # FA(t) = t
    assert out.loss.item() == pytest.approx(main.item(), rel=1e-5)  # (L + 2 L) / 3 with the same term


@pytest.mark.parametrize("placement", ["basic", "serial", "parallel"])
def test_byol_with_fa_trains_end_to_end_for_a_step(placement):
    method = tiny("byol", **{"fa.placement": placement, "fa.operator": "mlp"})
    method.training_step(*torch.randn(2, 6, 1, 8, 8), epoch=0).loss.backward()
    assert all(p.grad is not None for p in method.fa.parameters())
    assert all(p.grad is None for p in method.target.parameters())


def test_one_epoch_of_moco_with_fa_on_digits(tmp_path):
    check_smoke_run(tmp_path, smoke_cfg(**{"fa.enabled": True, "fa.operator": "interpolate",
                                           "fa.interpolate.source": "queue"}))
