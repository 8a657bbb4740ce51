"""Builders and checks shared by the method tests: tiny CPU-sized methods on 8 px digits, a one-epoch
smoke run, and the EMA check of a momentum network."""

from __future__ import annotations

import json

import pandas as pd
import torch

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.config import batch_layout
from ftcl.methods import build_method
from ftcl.methods.base import ema_update
from ftcl.models.backbones import build_backbone
from ftcl.train import pretrain

TINY = {"model.width": 8, "model.small_stem": True, "model.feature_dim": 16, "method.queue_size": 32,
        "method.bn_splits": 2,  # split BatchNorm in 2 sub-batches, as a single-process MoCo run uses
        "data.dataset": "digits"}


def tiny_method(name: str = "moco", world: int = 1, **overrides):
    """A seeded method of width 8 on 1-channel 8 px inputs (``overrides``: dotted config keys) for a
    run of ``world`` processes."""
    cfg = config.resolve(overrides={**TINY, "method.name": name, **overrides}, world=world)
    torch.manual_seed(0)
    return build_method(cfg, make_backbone(cfg), batch_layout(cfg, world).bn_splits)


def make_backbone(cfg: config.RunConfig, in_channels: int = 1):
    """The backbone of ``cfg``'s ``model`` section."""
    m = cfg.model
    return build_backbone(m.backbone, m.width, m.small_stem, in_channels)


def assert_ema_follows(method, online: torch.nn.Module, target: torch.nn.Module, momentum: float = 0.9) -> None:
    """After moving ``online`` away, one EMA step gives ``target = m target + (1 - m) online``."""
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online_now = [p.clone() for p in online.parameters()]
    before = [p.clone() for p in target.parameters()]
    ema_update(method.momentum_pairs(), momentum)
    for o, b, a in zip(online_now, before, target.parameters(), strict=True):
        assert torch.allclose(a, momentum * b + (1 - momentum) * o)


def smoke_cfg(**overrides) -> config.RunConfig:
    """One epoch of 4 batches of 64 digits, tracking off."""
    return config.resolve(overrides={
        "device": "cpu", "data.dataset": "digits", "data.train_subset": 256, "model.width": 8, "model.small_stem": True,
        "model.feature_dim": 32, "method.queue_size": 256, "optim.epochs": 1, "optim.batch_size": 64,
        "optim.amp": False, "optim.channels_last": False, "tracking.enabled": False, "log_every": 1000,
        "scores.histogram_every": 4, **overrides})


def check_smoke_run(tmp_path, cfg) -> None:
    """Pretrain ``cfg`` for its one epoch: finite loss, one score row per iteration, a loadable backbone."""
    summary = pretrain(cfg, tmp_path, echo=lambda *_: None)
    assert json.loads((tmp_path / "pretrain.json").read_text())["epochs"] == 1
    assert summary["pretrain/loss"] == summary["pretrain/loss"]  # not NaN
    stats = pd.read_parquet(tmp_path / "scores" / "epoch_0000.parquet")
    assert len(stats) == 256 // 64
    assert stats[["loss", "pos_mean", "neg_mean", "neg_var"]].notna().all().all()
    backbone, saved = ckpt.load_backbone(tmp_path)
    assert saved["method"]["name"] == cfg.method.name
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    rebuilt = build_method(cfg, make_backbone(cfg), batch_layout(cfg).bn_splits)
    rebuilt.load_state_dict(state["method"])  # every key and shape matches
