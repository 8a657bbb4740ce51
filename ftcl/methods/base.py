"""The method interface: the seam that keeps the training loop generic.

A method turns two batches of views into a loss plus the similarity scores the score recorder
needs, declares its momentum (EMA) pairs, and may act after the optimiser step (e.g. enqueue keys).
The loop owns the optimiser, AMP, EMA updates, checkpointing and logging; a method knows nothing
about launchers, trackers or Snakemake.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ftcl.registry import Registry

METHODS: Registry[nn.Module] = Registry("method")


@dataclass
class StepOutput:
    """What one training step returns.

    ``pos``: (B,) positive cosine scores as used in the loss (after any feature transform);
    ``neg``: (B, K) negative cosine scores as used, or ``None`` for methods without negatives;
    ``temperature``: the softmax temperature applied to them (for exp(s / tau) statistics).
    """

    loss: Tensor
    pos: Tensor
    neg: Tensor | None
    temperature: float


class Method(nn.Module):
    """Base class. Subclasses set ``self.backbone`` (the online backbone that is evaluated).
    ``needs_labels``: the loop passes the batch's class labels to ``training_step`` (the supervised
    reference row); self-supervised methods get ``labels=None``."""

    backbone: nn.Module
    needs_labels = False

    def training_step(self, view1: Tensor, view2: Tensor, epoch: int, labels: Tensor | None = None) -> StepOutput:
        raise NotImplementedError

    def forward(self, view1: Tensor, view2: Tensor, epoch: int, labels: Tensor | None = None) -> StepOutput:
        """``training_step`` through ``__call__``, so DDP's gradient hooks see it."""
        return self.training_step(view1, view2, epoch, labels)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """``(online, target)`` module pairs the loop updates by EMA after each optimiser step."""
        return []

    def after_step(self) -> None:
        """Called once after the optimiser step and the EMA update."""


def fp32(x: Tensor):
    """A block where autocast is off on ``x``'s device: the feature transform, the logits and the
    loss run in float32 under bf16 mixed precision. The encoders' heavy layers keep autocast; the
    B x K negative logits (K = 65536) would otherwise be a bf16 matmul (8-bit mantissa, scores
    rounded to ~0.004) while the positives are float32 sums, and the scores the loss and the score
    statistics see would differ in precision between the two sides."""
    return torch.autocast(x.device.type, enabled=False)


@torch.no_grad()
def ema_update(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """target <- m * target + (1 - m) * online for parameters (MoCo Eq. 2).

    Buffers (BatchNorm running statistics) are not averaged: the target keeps its own, as in MoCo.
    """
    for online, target in pairs:
        online_params = [p.detach() for p in online.parameters()]
        target_params = list(target.parameters())
        torch._foreach_mul_(target_params, momentum)
        torch._foreach_add_(target_params, online_params, alpha=1 - momentum)


#: sub-batches of a split BatchNorm when MoCo runs in one process (MoCo's single-GPU CIFAR-10 recipe)
SINGLE_PROCESS_BN_SPLITS = 8


def resolve_bn_splits(method_cfg: Mapping, world: int = 1) -> int:
    """Sub-batches each process's BatchNorm layers normalise a training batch in (``method.bn_splits``).

    ``null`` (auto): MoCo with ``shuffle_bn`` in one process gets :data:`SINGLE_PROCESS_BN_SPLITS`, so
    that a query and its key never share BatchNorm statistics; under DDP the key batch is shuffled
    across processes instead (MoCo Sec. 3.3), so 1. BYOL and SimSiam have no negatives to cheat with
    and their papers use plain (synchronised) BatchNorm: 1 unless set.
    """
    value = method_cfg.get("bn_splits")
    if value is not None:
        return int(value)
    if method_cfg["name"] == "moco" and method_cfg.get("shuffle_bn", False) and world == 1:
        return SINGLE_PROCESS_BN_SPLITS
    return 1


def build_method(cfg: Mapping, backbone: nn.Module, bn_splits: int | None = None,
                 num_classes: int | None = None) -> Method:
    """The method named by ``cfg['method']['name']``, built around ``backbone``.

    ``bn_splits``: see :func:`resolve_bn_splits` (None: resolved for one process); ``num_classes``:
    the training set's classes, for methods that need labels.
    """
    import ftcl.methods.byol  # noqa: F401  (each registers itself)
    import ftcl.methods.moco  # noqa: F401
    import ftcl.methods.simsiam  # noqa: F401
    import ftcl.methods.supervised  # noqa: F401

    splits = resolve_bn_splits(cfg["method"]) if bn_splits is None else bn_splits
    cls = METHODS.get(cfg["method"]["name"])
    if getattr(cls, "needs_labels", False):
        return cls(cfg, backbone, bn_splits=splits, num_classes=num_classes)
    return cls(cfg, backbone, bn_splits=splits)
