"""BYOL and SimSiam: losses on hand-checkable cases, shapes, stop-gradient, EMA, score recording,
and a one-epoch pretraining run each on digits."""


import pytest
import torch
import torch.nn.functional as F
from helpers import assert_ema_follows, check_smoke_run, smoke_cfg, tiny_method

from ftcl.methods.base import off_diagonal
from ftcl.methods.byol import BYOL
from ftcl.methods.simsiam import SimSiam
from ftcl.models.heads import PredictionHead, ProjectionHead
from ftcl.scores import ScoreRecorder


def views(b: int = 6):
    return torch.randn(2, b, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_distances_on_hand_checkable_cosines():
    cos = torch.tensor([1.0, 0.0, -1.0, 0.5])
    assert BYOL.distance(None, cos).item() == pytest.approx((0 + 2 + 4 + 1) / 4)  # 2 - 2 cos
    assert SimSiam.distance(None, cos).item() == pytest.approx(-0.5 * 0.5 / 4 * 1 - 0.5 * 0.0)  # -mean(cos) / 2
    assert SimSiam.distance(None, torch.ones(3)).item() == pytest.approx(-0.5)


def test_off_diagonal_is_row_major_without_the_diagonal():
    m = torch.arange(16.0).view(4, 4)
    expected = torch.tensor([[1, 2, 3], [4, 6, 7], [8, 9, 11], [12, 13, 14]], dtype=torch.float32)
    assert torch.equal(off_diagonal(m), expected)


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_loss_matches_the_papers_formula_and_scores_have_batch_negatives(name):
    method = tiny_method(name)
    v1, v2 = views()
    torch.manual_seed(5)
    out = method.training_step(v1, v2, epoch=0)
    # recompute independently (BatchNorm in train mode is deterministic for a given batch)
    with torch.no_grad():
        z1, z2 = method.encoder(v1), method.encoder(v2)
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1, t2 = (method.target(v1), method.target(v2)) if name == "byol" else (z1, z2)
    n = lambda x: F.normalize(x, dim=1)  # noqa: E731
    if name == "byol":  # Eq. 2: || p/|p| - t/|t| ||^2, both directions
        expected = ((n(p1) - n(t2)) ** 2).sum(1).mean() + ((n(p2) - n(t1)) ** 2).sum(1).mean()
    else:  # Eq. 1-2: D(p1, z2)/2 + D(p2, z1)/2, D = -cos
        expected = -0.5 * (n(p1) * n(t2)).sum(1).mean() - 0.5 * (n(p2) * n(t1)).sum(1).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    b = v1.shape[0]
    assert out.pos.shape == (2 * b,) and out.neg.shape == (2 * b, b - 1) and out.temperature == 1.0
    full = n(p1) @ n(t2).T
    assert torch.allclose(out.pos[:b], full.diagonal(), atol=1e-5)
    assert torch.allclose(out.neg[:b], off_diagonal(full), atol=1e-5)
    assert not out.neg.requires_grad


def test_simsiam_stop_gradient_blocks_the_target_branch():
    method = tiny_method("simsiam")
    z1 = torch.randn(6, 16, requires_grad=True)
    z2 = torch.randn(6, 16, requires_grad=True)
    t1, t2 = method.targets(None, None, z1, z2, input_grad=False)
    p1 = method.predictor(z1)
    method.distance(F.cosine_similarity(p1, t2)).backward()  # one direction: D(p1, sg(z2))
    assert z2.grad is None  # the target z2 got no gradient
    assert z1.grad is not None and z1.grad.abs().sum() > 0


def test_byol_target_gets_no_gradient_and_follows_the_online_network_by_ema():
    method = tiny_method("byol")
    method.training_step(*views(), epoch=0).loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in method.target.parameters())
    assert all(p.grad is not None for p in method.encoder.parameters())
    assert all(p.grad is not None for p in method.predictor.parameters())
    assert_ema_follows(method, method.encoder, method.target)
    assert tiny_method("simsiam").momentum_pairs() == []


def test_heads_and_predictor_widths():
    byol, simsiam = tiny_method("byol", **{"model.head": "mlp_bn", "model.hidden_dim": 48}), tiny_method("simsiam")
    assert isinstance(byol.encoder.head, ProjectionHead) and not byol.encoder.head.normalize
    assert isinstance(byol.encoder.head.net[1], torch.nn.BatchNorm1d)
    assert isinstance(byol.predictor, PredictionHead)
    assert byol.predictor.net[0].out_features == 48  # BYOL: the projector's hidden width
    assert simsiam.predictor.net[0].out_features == 16 // 4  # SimSiam: a bottleneck
    assert tiny_method("simsiam", **{"method.predictor_hidden_dim": 7}).predictor.net[0].out_features == 7
    z = byol.encoder(torch.randn(4, 1, 8, 8))
    assert z.shape == (4, 16)


def test_score_recorder_handles_byol_output():
    method = tiny_method("byol")
    rec = ScoreRecorder(2, 1, [0], 1, 20, torch.device("cpu"))
    rec.start_epoch(0)
    for i in range(2):
        out = method.training_step(*views(), epoch=0)
        rec.record(i, out.loss, out.pos, out.neg, out.temperature)
    stats = rec._stats
    assert torch.isfinite(stats).all()
    assert rec._neg_hist.sum() == 2 * 12 * 5  # 2 iterations x 2B rows x (B - 1)


@pytest.mark.parametrize("name,extra", [("byol", {"model.head": "mlp_bn"}), ("simsiam", {"model.head": "mlp_bn"})])
def test_one_epoch_of_pretraining_on_digits(tmp_path, name, extra):
    check_smoke_run(tmp_path, smoke_cfg(**{"method.name": name, **extra}))
