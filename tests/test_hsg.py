"""Hard sample generation (ftcl/transforms/hsg.py): the reversal layer, the min-max game in one
backward pass, the generator's shapes and bounds, the pair-similarity schedule, and a one-epoch
MoCo + HSG run on digits."""

import math

import pytest
import torch
from helpers import check_smoke_run, make_backbone, smoke_cfg, tiny_method

from ftcl import config
from ftcl.methods import build_method
from ftcl.transforms.hsg import (
    ConditionalGenerator,
    HardSampleGenerator,
    auto_stages,
    grad_reverse,
    image_cosine,
    set_similarity,
    similarity_target,
)


def tiny(name: str = "moco", **overrides):
    return tiny_method(name, **{"hsg.enabled": True, "hsg.generator.width": 8, "optim.epochs": 5, **overrides})


def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(4.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(4.0).expand(3, 4))


@pytest.mark.parametrize("size,stages", [(8, 0), (28, 1), (32, 2), (64, 3), (224, 3)])
def test_generator_is_sized_to_the_resolution_and_bounded(size, stages):
    assert auto_stages(size) == stages
    gen = ConditionalGenerator(3, width=4, noise_dim=2, stages=stages, epsilon=0.3)
    x = torch.randn(2, 3, size, size)
    out = gen(x, torch.randn(2, 2))
    assert out.shape == x.shape
    assert (out - x).abs().max() <= 0.3 + 1e-6
    assert len(gen.down) == len(gen.up) == stages


def test_similarity_schedules_by_hand():
    assert similarity_target(0, 5, 0.95, 0.75) == pytest.approx(0.95)
    assert similarity_target(2, 5, 0.95, 0.75) == pytest.approx(0.85)
    assert similarity_target(4, 5, 0.95, 0.75) == pytest.approx(0.75)
    assert similarity_target(9, 5, 0.95, 0.75) == pytest.approx(0.75)  # stays at the end
    assert similarity_target(1, 5, 0.95, 0.75, "cosine") == pytest.approx(0.75 + 0.1 * (1 + math.cos(math.pi / 4)))
    assert similarity_target(2, 5, 0.95, 0.75, "cosine") == pytest.approx(0.85)
    assert similarity_target(0, 1, 0.9, 0.5) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="schedule"):
        similarity_target(0, 5, 0.9, 0.5, "step")


@pytest.mark.parametrize("s", [0.99, 0.8, 0.3, -0.2])
def test_set_similarity_hits_the_target_and_keeps_the_norm(s):
    a, b = torch.randn(2, 4, 1, 5, 5, dtype=torch.float64)
    out = set_similarity(a, b, s)
    assert torch.allclose(image_cosine(a, out), torch.full((4,), s, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(out.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1))
    # it stays in the plane of a and b
    basis = torch.linalg.qr(torch.stack([a.flatten(1), b.flatten(1)], dim=2)).Q
    residual = out.flatten(1) - (basis @ (basis.transpose(1, 2) @ out.flatten(1)[..., None]))[..., 0]
    assert residual.abs().max() < 1e-9


def test_the_positive_pair_follows_the_similarity_schedule_during_training():
    moco = tiny(**{"hsg.pair.similarity_start": 0.9, "hsg.pair.similarity_end": 0.5})
    seen = []
    for epoch in range(5):
        sample = moco.hsg(torch.randn(6, 1, 8, 8), epoch)
        seen.append(sample.similarity.mean().item())
        assert sample.target == pytest.approx(0.9 - 0.1 * epoch)
        assert torch.allclose(sample.similarity, torch.full((6,), sample.target), atol=1e-5)
        assert sample.first.shape == sample.second.shape == (6, 1, 8, 8)
        moco.training_step(*torch.randn(2, 6, 1, 8, 8), epoch=epoch).loss.backward()
    assert seen == sorted(seen, reverse=True)


def test_penalty_mode_pulls_the_similarity_toward_the_target():
    torch.manual_seed(0)
    hsg = HardSampleGenerator(1, 8, 3, width=8, noise_dim=4, epsilon=1.0, mode="penalty", similarity_start=0.5,
                              similarity_end=0.5, reaugment=False)
    x = torch.randn(16, 1, 8, 8)
    opt = torch.optim.SGD(hsg.parameters(), lr=0.05)

    def sample():
        torch.manual_seed(1)
        return hsg(x, 0)

    first = sample()
    assert first.penalty.item() == pytest.approx(10.0 * (first.similarity - 0.5).square().mean().item(), rel=1e-5)
    for _ in range(30):
        opt.zero_grad()
        sample().penalty.backward()
        opt.step()
    assert sample().penalty.item() < 0.5 * first.penalty.item()


def _generated_loss(method, view, seed=7):
    torch.manual_seed(seed)  # the same noise and re-augmentation every time
    return method.hsg.add_to(torch.zeros(()), view, 0, method._pair_loss)


@pytest.mark.parametrize("name,encoder", [("moco", "encoder_q"), ("byol", "encoder"), ("simsiam", "encoder")])
def test_generator_step_raises_the_loss_and_encoder_step_lowers_it(name, encoder):
    view = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    results = {}
    for player in ("generator", "encoder"):
        method = tiny(name)
        params = list(method.hsg.parameters()) if player == "generator" else list(getattr(method, encoder).parameters())
        opt = torch.optim.SGD(params, lr=1e-4)  # small: the first-order effect dominates
        before = _generated_loss(method, view)
        opt.zero_grad()
        before.backward()  # one backward through the reversal layer, as in training
        if player == "generator":  # both generators learn, also the one seen by MoCo's frozen key encoder
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.hsg.parameters())
        opt.step()
        with torch.no_grad():
            results[player] = (before.item(), _generated_loss(method, view).item())
    g_before, g_after = results["generator"]
    e_before, e_after = results["encoder"]
    assert g_before == pytest.approx(e_before)
    assert g_after > g_before  # the generators maximise the loss of their samples
    assert e_after < e_before  # the encoder minimises it


def test_generator_and_encoder_gradients_have_opposite_signs():
    """Same loss, with and without the reversal: the generator's gradient flips, the encoder's not."""
    view = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grads = {}
    for scale in (1.0, 0.0):
        method = tiny(**{"hsg.adversarial_scale": scale})
        _generated_loss(method, view).backward()
        grads[scale] = (method.hsg.gen_a.out.weight.grad.clone(), method.encoder_q.backbone.conv1.weight.grad.clone())
    assert grads[1.0][0].abs().sum() > 0 and torch.all(grads[0.0][0] == 0)
    assert torch.allclose(grads[1.0][1], grads[0.0][1], atol=1e-6)


@pytest.mark.parametrize(("fraction", "pairs"), [(1.0, 10), (0.25, 4), (0.01, 4)])
def test_fraction_sets_how_many_views_seed_a_pair(fraction, pairs):
    # ceil(fraction x 10), at least 2 per BatchNorm sub-batch, a multiple of the 2 sub-batches
    moco = tiny(**{"hsg.fraction": fraction})
    x = torch.randn(10, 1, 8, 8)
    sample = moco.hsg(x, 0)
    assert sample.first.shape == sample.second.shape == (pairs, 1, 8, 8)
    moco.hsg.reaugment = False
    torch.manual_seed(3)
    unaugmented = moco.hsg(x, 0).first
    moco.hsg.fraction = 1.0
    torch.manual_seed(3)
    assert torch.allclose(unaugmented, moco.hsg(x[:pairs], 0).first, atol=1e-5)  # the first views of the batch
    moco.hsg.fraction = fraction
    moco.training_step(x, torch.randn_like(x), epoch=0).loss.backward()


def test_pair_count_rounds_up_to_the_split_batchnorm_sub_batches():
    from ftcl.transforms.hsg import pair_count

    assert [pair_count(256, f, 8) for f in (1.0, 0.25, 0.1, 0.001)] == [256, 64, 32, 16]
    assert pair_count(10, 0.25, 1) == 3 and pair_count(10, 0.01, 1) == 2 and pair_count(6, 0.9, 4) == 6


def test_fraction_outside_the_unit_interval_is_rejected():
    with pytest.raises(config.ConfigError, match="hsg.fraction"):
        config.resolve(overrides={"hsg.fraction": 0})
    with pytest.raises(config.ConfigError, match="hsg.fraction"):
        config.resolve(overrides={"hsg.fraction": 1.5})


def test_disabled_hsg_adds_no_parameters():
    cfg = config.resolve(overrides={"model.width": 8, "model.small_stem": True, "data.dataset": "digits"})
    moco = build_method(cfg, make_backbone(cfg), bn_splits=8)
    assert moco.hsg is None and not any(k.startswith("hsg") for k in moco.state_dict())


def test_one_epoch_of_moco_with_hsg_on_digits(tmp_path):
    check_smoke_run(tmp_path, smoke_cfg(**{"hsg.enabled": True, "hsg.generator.width": 8}))


def _bn_statistics(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm running statistic and batch counter of ``module``."""
    return {k: v.clone() for k, v in module.named_buffers() if "running_" in k or "num_batches_tracked" in k}


@pytest.mark.parametrize("name,networks", [("moco", ("encoder_q", "encoder_k")),
                                           ("byol", ("encoder", "predictor", "target")),
                                           ("simsiam", ("encoder", "predictor"))])
def test_generated_pairs_leave_every_running_statistic_to_the_real_views(name, networks):
    """A step with HSG moves the BatchNorm statistics exactly as the same step's real views alone do."""
    method = tiny(name, **{"model.head": "mlp_bn"})  # BatchNorm in the heads and predictors too
    real_only = tiny(name, **{"model.head": "mlp_bn"})
    real_only.hsg = None
    views = torch.randn(2, 8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    before = _bn_statistics(method)
    assert before.keys() == _bn_statistics(real_only).keys()
    for m in (method, real_only):
        torch.manual_seed(1)  # the same key shuffle for the real views
        m.training_step(*views, epoch=0)
    with_hsg, without = _bn_statistics(method), _bn_statistics(real_only)
    for network in networks:
        keys = [k for k in before if k.startswith(f"{network}.")]
        assert keys and any(not torch.equal(before[k], without[k]) for k in keys)  # the real views do update them
        changed = [k for k in keys if not torch.equal(with_hsg[k], without[k])]
        assert not changed, f"{name}: generated pairs changed {len(changed)} buffers of {network}: {changed[:3]}"
