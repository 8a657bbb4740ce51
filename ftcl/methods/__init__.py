"""Methods: MoCo (+ FT, FA, HSG), BYOL, SimSiam and the supervised reference, behind one interface
(:class:`ftcl.methods.base.Method`). Each method module registers a builder that maps the run config to
its constructor's plain values; :func:`build_method` is how the training loop gets one, without asking
which it is."""

from __future__ import annotations

from torch import nn

from ftcl.config import RunConfig
from ftcl.methods import byol, moco, simsiam, supervised  # noqa: F401  (each registers its builder)
from ftcl.methods.base import METHODS, Method


def build_method(cfg: RunConfig, backbone: nn.Module, bn_splits: int, num_classes: int | None = None) -> Method:
    """The method ``method.name`` around ``backbone``; ``bn_splits``: each process's BatchNorm
    sub-batches (:func:`ftcl.config.rules.bn_splits`); ``num_classes``: the training set's classes
    (for methods that need labels)."""
    return METHODS.get(cfg.method.name)(cfg, backbone, bn_splits, num_classes)
