"""Checkpoints: atomic writes, truncation detected, strict backbone loading."""

import pytest
import torch

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.models.backbones import build_backbone


def state(epoch: int, width: int = 8) -> dict:
    cfg = config.resolve(overrides={"model.width": width})
    return {"epoch": epoch, "config": config.to_dict(cfg), "in_channels": 1,
            "backbone": build_backbone("resnet18", width, False, 1).state_dict()}


def test_save_epoch_keeps_the_newest_and_last(tmp_path):
    for e in (1, 2, 3):
        ckpt.save_epoch(state(e), tmp_path, keep=2)
    assert [p.name for p in ckpt.epoch_files(tmp_path)] == ["epoch_0002.pt", "epoch_0003.pt"]
    assert ckpt.load(tmp_path / "last.pt")["epoch"] == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_checkpoint_is_named_and_the_previous_good_one_used(tmp_path):
    for e in (1, 2):
        ckpt.save_epoch(state(e), tmp_path, keep=3)
    for name in ("last.pt", "epoch_0002.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"last.pt is truncated or corrupted"):
        ckpt.load(tmp_path / "last.pt")
    warnings = []
    assert ckpt.latest_good(tmp_path, warn=warnings.append)["epoch"] == 1
    assert any("epoch_0002.pt" in w for w in warnings)


def test_backbone_from_another_architecture_fails_loudly(tmp_path):
    ckpt.save_epoch(state(1, width=8), tmp_path / "checkpoints", keep=1)
    backbone, cfg = ckpt.load_backbone(tmp_path)
    assert cfg["model"]["width"] == 8
    wider = build_backbone("resnet18", 16, False, 1)
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this backbone: shape mismatches \['conv1.weight"):
        ckpt.load_backbone_state(wider, backbone.state_dict(), "x.pt")
    other = build_backbone("resnet50", 8, False, 1)
    with pytest.raises(ckpt.CheckpointError, match="missing keys"):
        ckpt.load_backbone_state(other, backbone.state_dict(), "x.pt")


def test_not_an_ftcl_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="foreign.pt is not an ftcl pretraining checkpoint"):
        ckpt.load(tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="no pretraining checkpoint at"):
        ckpt.resolve_checkpoint_path(tmp_path / "missing")
