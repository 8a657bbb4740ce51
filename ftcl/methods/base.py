"""The method interface: the seam that keeps the training loop generic.

A method turns two batches of views into a loss plus the similarity scores the score recorder
needs, declares its momentum (EMA) pairs, and may act after the optimiser step (e.g. enqueue keys).
The loop owns the optimiser, AMP, EMA updates, checkpointing and logging; a method knows nothing
about launchers, trackers or Snakemake.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ftcl.config import RunConfig
from ftcl.registry import Registry
from ftcl.transforms.hsg import HardSampleGenerator, input_channels, resolution

#: method name -> ``build(cfg, backbone, bn_splits, num_classes) -> Method`` (each method module registers
#: its builder; :func:`ftcl.methods.build_method` looks them up)
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
    reference row); self-supervised methods get ``labels=None``. ``shuffles_keys``: the method computes
    keys with Shuffle-BN (``method.shuffle_bn``; :data:`ftcl.config.rules.KEY_SHUFFLING_METHODS` lists
    them for the config's rules)."""

    backbone: nn.Module
    needs_labels = False
    shuffles_keys = False

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


def off_diagonal(m: Tensor) -> Tensor:
    """The N x (N - 1) off-diagonal entries of a square N x N matrix, row by row (no host sync): the
    "negative" scores recorded for methods whose loss has none (BYOL, SimSiam, supervised)."""
    n = m.shape[0]
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def hard_sample_generator(cfg: RunConfig, backbone: nn.Module, bn_splits: int) -> HardSampleGenerator | None:
    """The run's HSG generators (``None`` unless ``hsg.enabled``), for a method's builder: sized to the
    view resolution and the backbone's input channels, their pair count a multiple of ``bn_splits``."""
    if not cfg.hsg.enabled:
        return None
    return HardSampleGenerator.from_section(cfg.hsg, input_channels(backbone), resolution(cfg.data.dataset,
                                            cfg.data.image_size), cfg.optim.epochs, batch_multiple=bn_splits)
