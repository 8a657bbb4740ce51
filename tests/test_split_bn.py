"""Split BatchNorm and Shuffle-BN on one device (MoCo's single-GPU recipe): a sample's statistics
come from its sub-batch only, a key never shares a sub-batch with its query, and checkpoints stay
plain torchvision ResNets."""

import pytest
import torch
from torch import nn

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.config import batch_layout
from ftcl.config.rules import bn_splits
from ftcl.models.split_bn import (
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    convert_split_batchnorm,
    frozen_bn_statistics,
    split_shuffle,
)
from ftcl.train import pretrain
from tests.helpers import smoke_cfg, tiny_method


def test_one_split_equals_plain_batchnorm_in_training_and_eval():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2)
        plain.bias.uniform_(-1, 1)
    split = convert_split_batchnorm(nn.Sequential(plain), 1)[0]
    assert split is plain  # nothing to convert
    two = SplitBatchNorm2d(6, 1)
    two.load_state_dict(plain.state_dict())
    x = torch.randn(16, 6, 5, 5) * 3 + 1
    assert torch.allclose(two(x), plain(x), atol=1e-6)
    assert torch.allclose(two.running_mean, plain.running_mean) and torch.allclose(two.running_var, plain.running_var)
    two.eval()
    plain.eval()
    assert torch.allclose(two(x), plain(x), atol=1e-6)


@pytest.mark.parametrize("kind", ["2d", "1d"])
def test_a_samples_output_depends_only_on_its_own_sub_batch(kind):
    torch.manual_seed(0)
    shape = (16, 4, 3, 3) if kind == "2d" else (16, 4)
    bn = SplitBatchNorm2d(4, 4) if kind == "2d" else SplitBatchNorm1d(4, 4)
    x = torch.randn(shape)
    out = bn(x)
    # sample 0 is in sub-batch 0 (positions 0, 4, 8, 12); perturb sample 1 (sub-batch 1)
    y = x.clone()
    y[1] += 10 * torch.randn_like(y[1])
    out2 = bn(y)
    in_split0 = [0, 4, 8, 12]
    assert torch.allclose(out[in_split0], out2[in_split0], atol=1e-6)
    assert not torch.allclose(out[1], out2[1])
    # perturbing a sample of sub-batch 0 changes the others of sub-batch 0
    z = x.clone()
    z[4] += 10
    assert not torch.allclose(bn(z)[0], out[0])
    # each sub-batch is normalised to mean 0 on its own
    flat = out.transpose(0, 1).reshape(4, 16, -1) if kind == "2d" else out.T.reshape(4, 16, 1)
    for s in range(4):
        assert flat[:, s::4].mean().abs() < 1e-5


def test_running_statistics_are_the_mean_of_the_sub_batches_and_eval_is_plain_bn():
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3, 2, momentum=1.0)  # momentum 1: running stats = this batch's
    x = torch.randn(8, 3, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)
    bn(x)
    split_means = torch.stack([x[s::2].mean(dim=(0, 2, 3)) for s in range(2)])
    split_vars = torch.stack([x[s::2].transpose(0, 1).reshape(3, -1).var(dim=1) for s in range(2)])
    assert torch.allclose(bn.running_mean, split_means.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var, split_vars.mean(0), atol=1e-5)
    assert bn.num_batches_tracked.item() == 1
    assert set(bn.state_dict()) == set(nn.BatchNorm2d(3).state_dict())  # torchvision key names and shapes
    bn.eval()
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(bn.state_dict())
    assert torch.allclose(bn(x), plain(x))


def test_a_batch_that_does_not_split_fails_with_the_key_named():
    with pytest.raises(ValueError, match="bn_splits"):
        SplitBatchNorm2d(3, 4)(torch.randn(6, 3, 2, 2))


@pytest.mark.parametrize("n,s", [(16, 4), (256, 8), (24, 3), (8, 2)])
def test_split_shuffle_puts_every_key_in_another_sub_batch_than_its_query(n, s):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        perm = split_shuffle(n, s, "cpu", generator=gen)
        assert sorted(perm.tolist()) == list(range(n))
        position = torch.argsort(perm)  # where sample i's key is computed
        assert (position % s != torch.arange(n) % s).all()
    # key sub-batches mix samples of several query sub-batches (not one query sub-batch moved whole)
    if s >= 3 and n // s >= 4:  # with 2 sub-batches the other one is the only choice
        key_split0 = perm[0::s] % s
        assert len(set(key_split0.tolist())) > 1


def test_moco_shuffles_keys_across_sub_batches_and_returns_them_in_order(monkeypatch):
    method = tiny_method("moco", **{"method.bn_splits": 4})
    assert method.bn_splits == 4
    assert isinstance(method.encoder_q.backbone.bn1, SplitBatchNorm2d)
    assert isinstance(method.encoder_k.backbone.bn1, SplitBatchNorm2d)
    seen = {}
    real = method.encoder_k.forward

    def spy(x):
        seen["input"] = x.clone()
        return real(x)

    monkeypatch.setattr(method.encoder_k, "forward", spy)
    views = torch.randn(16, 1, 8, 8)
    keys = method._keys(views)
    # the key encoder saw a permutation of the batch in which no sample sits in its own sub-batch
    for i in range(16):
        pos = [p for p in range(16) if torch.equal(seen["input"][p], views[i])]
        assert len(pos) == 1 and pos[0] % 4 != i % 4
    # and the keys come back in the batch order: the same as computing the shuffled batch by hand
    monkeypatch.setattr(method.encoder_k, "forward", real)
    perm = torch.tensor([p for i in range(16) for p in range(16) if torch.equal(seen["input"][p], views[i])])
    with torch.no_grad():
        expected = method.encoder_k(seen["input"])[perm]
    assert torch.allclose(keys, expected, atol=1e-5)


def test_mlp_bn_heads_and_byol_predictors_are_split_too():
    moco = tiny_method("moco", **{"model.head": "mlp_bn", "method.bn_splits": 2})
    assert any(isinstance(m, SplitBatchNorm1d) for m in moco.encoder_q.head.modules())
    byol = tiny_method("byol", **{"model.head": "mlp_bn", "method.bn_splits": 2})
    assert any(isinstance(m, SplitBatchNorm1d) for m in byol.predictor.modules())
    assert any(isinstance(m, SplitBatchNorm1d) for m in byol.target.modules())
    auto = tiny_method("byol", **{"model.head": "mlp_bn", "method.bn_splits": None})  # auto: BYOL keeps plain BN
    assert not any(isinstance(m, SplitBatchNorm2d) for m in auto.modules())


def test_bn_splits_default_to_eight_for_single_process_moco_and_one_otherwise():
    moco = config.resolve()
    assert bn_splits(moco, world=1) == 8
    assert bn_splits(moco, world=4) == 1
    assert bn_splits(config.resolve(overrides={"method.shuffle_bn": False}), world=1) == 1
    assert bn_splits(config.resolve(overrides={"method.name": "byol"}), world=1) == 1
    assert bn_splits(config.resolve(overrides={"method.bn_splits": 2}, world=4), world=4) == 2


def test_a_shuffle_bn_that_cannot_happen_is_rejected_when_the_config_is_resolved():
    with pytest.raises(config.ConfigError, match=r"method.bn_splits.*does not divide the per-process batch 60"):
        config.resolve(overrides={"optim.batch_size": 60})
    with pytest.raises(config.ConfigError, match=r"method.shuffle_bn.*bn_splits' is 1 in a single process"):
        config.resolve(overrides={"method.bn_splits": 1})
    assert batch_layout(config.resolve(overrides={"method.bn_splits": 1, "method.shuffle_bn": False})).bn_splits == 1


def test_generated_pairs_leave_the_key_encoders_running_statistics_alone():
    method = tiny_method("moco", **{"hsg.enabled": True, "method.bn_splits": 2, "hsg.fraction": 0.25,
                                    "data.image_size": 16, "model.small_stem": True})
    before = {k: v.clone() for k, v in method.encoder_k.state_dict().items() if "running" in k or "tracked" in k}
    x1, x2 = torch.randn(4, 1, 16, 16, requires_grad=True), torch.randn(4, 1, 16, 16, requires_grad=True)
    method.train()
    loss = method._pair_loss(x1, x2)
    loss.backward()
    after = method.encoder_k.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert x2.grad is not None and x2.grad.abs().sum() > 0  # the generator still learns through the keys
    # real keys do update them
    method._keys(torch.randn(8, 1, 16, 16))
    after = method.encoder_k.state_dict()
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])


def test_frozen_bn_statistics_restores_tracking():
    bn = nn.BatchNorm2d(2)
    with frozen_bn_statistics(nn.Sequential(bn)):
        bn(torch.randn(4, 2, 2, 2) + 5)
    assert bn.track_running_stats and torch.equal(bn.running_mean, torch.zeros(2))


def test_a_split_bn_checkpoint_loads_into_a_plain_torchvision_resnet(tmp_path):
    from helpers import make_backbone
    from torchvision.models.resnet import ResNet

    from ftcl.detection.model import build_detector
    from ftcl.methods import build_method

    cfg = smoke_cfg(**{"method.bn_splits": 4})
    pretrain(cfg, tmp_path, echo=lambda *_: None)
    backbone, _ = ckpt.load_backbone(tmp_path)  # strict: every key and shape of a plain ResNet
    assert isinstance(backbone, ResNet)
    assert not any(isinstance(m, SplitBatchNorm2d) for m in backbone.modules())
    assert backbone.bn1.running_var.sum() != 8.0  # the statistics were trained, not defaults
    method = build_method(cfg, make_backbone(cfg), bn_splits=4)
    method.load_state_dict(ckpt.load(tmp_path / "checkpoints" / "last.pt")["method"])
    x = torch.randn(8, 1, 8, 8)
    backbone.eval()
    method.eval()
    with torch.no_grad():
        assert torch.allclose(backbone(x), method.backbone(x), atol=1e-5)  # eval mode: plain BN, same stats
    detector = build_detector("pretrained", tmp_path, "c4", 3, "frozen",
                              settings=config.resolve(overrides={"detection.min_size": [32],
                                                                 "detection.max_size": 32}).detection)
    assert detector is not None
