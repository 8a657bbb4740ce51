"""Checkpoints that are never left half-written, and loads that fail loudly.

Writes go through :func:`ftcl.files.replacing` (a temporary file, fsync'ed, renamed over the target),
so a crash at any instant leaves either the previous file or the new one. Loads check the format tag
and, for backbones, every key and shape.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftcl.errors import CheckpointError
from ftcl.files import replacing

FORMAT = "ftcl-pretrain/1"
LAST = "last.pt"
_EPOCH_RE = re.compile(r"epoch_(\d+)\.pt$")


__all__ = ["CheckpointError"]


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: equal exactly when the weights are."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`ftcl.files.replacing`)."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load an ftcl pretraining checkpoint; a truncated or foreign file raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt zips
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted and cannot be read ({err})") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an ftcl pretraining checkpoint (format {FORMAT!r})")
    return state


def save_epoch(state: dict, ckpt_dir: str | Path, keep: int) -> Path:
    """Write ``epoch_XXXX.pt`` and ``last.pt`` for ``state['epoch']``; prune all but ``keep`` epochs."""
    ckpt_dir = Path(ckpt_dir)
    state = {**state, "format": FORMAT}
    epoch_file = atomic_save(state, ckpt_dir / f"epoch_{state['epoch']:04d}.pt")
    atomic_save(state, ckpt_dir / LAST)
    for old in sorted(epoch_files(ckpt_dir))[:-keep]:
        old.unlink(missing_ok=True)
    return epoch_file


def epoch_files(ckpt_dir: str | Path) -> list[Path]:
    """Per-epoch checkpoints in ``ckpt_dir``, oldest first."""
    files = [p for p in Path(ckpt_dir).glob("epoch_*.pt") if _EPOCH_RE.search(p.name)]
    return sorted(files, key=lambda p: int(_EPOCH_RE.search(p.name).group(1)))


def latest_good(ckpt_dir: str | Path, map_location: str | torch.device = "cpu", warn=print) -> dict | None:
    """The newest checkpoint in ``ckpt_dir`` that loads; unreadable ones are reported and skipped."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [ckpt_dir / LAST, *reversed(epoch_files(ckpt_dir))]
    best: dict | None = None
    for path in candidates:
        if not path.is_file():
            continue
        try:
            state = load(path, map_location)
        except CheckpointError as err:
            warn(f"warning: {err}; trying an older checkpoint")
            continue
        if best is None or state["epoch"] > best["epoch"]:
            best = state
    return best


def resolve_checkpoint_path(path: str | Path) -> Path:
    """Accept a checkpoint file or a pretraining run folder (``<dir>/checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise CheckpointError(
            f"no pretraining checkpoint at {path} (give a run folder holding checkpoints/last.pt or a .pt file)"
        )
    return path


def load_backbone_state(backbone: nn.Module, state_dict: dict, source: str | Path) -> None:
    """Load weights strictly; any missing/unexpected key or shape mismatch names the file and keys."""
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise CheckpointError(f"checkpoint {source} does not fit this backbone: " + "; ".join(parts))
    backbone.load_state_dict(state_dict, strict=True)


def backbone_of(state: dict, source: str | Path) -> nn.Module:
    """The pretrained backbone of a loaded checkpoint ``state`` (``source``: where it came from, for
    errors): rebuilt from the model section of the config it saved, weights checked key by key."""
    from ftcl.models.backbones import build_backbone

    model = state["config"]["model"]
    backbone = build_backbone(model["backbone"], model["width"], model["small_stem"], int(state["in_channels"]))
    load_backbone_state(backbone, state["backbone"], source)
    return backbone


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the pretrained backbone from a checkpoint (file or run folder): ``(backbone, config)``."""
    path = resolve_checkpoint_path(path)
    state = load(path, map_location)
    return backbone_of(state, path), state["config"]
