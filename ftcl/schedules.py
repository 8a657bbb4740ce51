"""Learning-rate schedules as pure functions of the epoch (and iteration): pretraining's and the
linear probe's. The detector's (Detectron2's warm-up + steps) lives with it, ``ftcl.detection.train``."""

from __future__ import annotations

import math

from ftcl.config.types import LinearEval, Optim


def learning_rate(optim: Optim, epoch: int, it: int, iters: int) -> float:
    """Pretraining's lr at iteration ``it`` (of ``iters``) of ``epoch``: linear scaling with the global
    batch (``lr_per_256 * batch_size / 256``, whatever the number of processes), a linear warm-up over
    ``warmup_epochs``, then per epoch: ``cosine`` down to ``eta_min = lr * eta_min_ratio`` (MoCo v2's
    ``--cos`` and the FT code's ``--cosine``), ``step``: ``lr * gamma ** #{milestones <= epoch}``
    (MoCo v1's ``main_moco.py``, milestones 120 and 160), or ``constant``."""
    base = optim.lr_per_256 * optim.batch_size / 256
    warmup = optim.warmup_epochs
    if epoch < warmup:
        return base * (epoch * iters + it + 1) / (warmup * iters)
    if optim.schedule == "constant":
        return base
    if optim.schedule == "step":
        return base * optim.gamma ** sum(epoch >= m for m in optim.milestones)
    eta_min = base * optim.eta_min_ratio
    span = max(1, optim.epochs - warmup)
    return eta_min + (base - eta_min) * 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / span))


def linear_probe_lr(linear: LinearEval, epoch: int) -> float:
    """The linear probe's lr in ``epoch``: ``step``: ``lr * 0.1 ** #{milestones <= epoch}`` (MoCo's
    ``main_lincls.py``; the FT code's ``epoch > m`` on 1-based epochs gives the same epochs), or
    ``cosine``: ``lr (1 + cos(pi epoch / epochs)) / 2``."""
    if linear.schedule == "step":
        return linear.lr * 0.1 ** sum(epoch >= m for m in linear.milestones)
    return linear.lr * 0.5 * (1 + math.cos(math.pi * epoch / linear.epochs))
