"""Split BatchNorm: a batch normalised in ``num_splits`` sub-batches, as if spread over that many
devices without SyncBN.

MoCo (He et al., CVPR 2020, Sec. 3.3) shuffles the key encoder's batch across GPUs so that a query
and its key are never normalised with the same batch statistics: otherwise the model can find its
positive through BatchNorm ("cheating") instead of learning good features. On one device the same
effect needs the batch to be normalised in sub-batches; MoCo's own single-GPU recipe (its CIFAR-10
demo) uses such a split BatchNorm in both encoders together with a shuffle of the key batch.

Sample ``n`` of a batch of ``N`` belongs to sub-batch ``n % num_splits`` (the batch is viewed as
``N / num_splits`` rows of ``num_splits * C`` channels, one BatchNorm call). In training mode each
sub-batch is normalised with its own mean and variance; the running statistics are updated per
sub-batch and then averaged back into one ``C``-sized buffer, so the module keeps the buffers,
names and shapes of the plain BatchNorm it replaces: a state dict from a split-BN network loads
into a torchvision ResNet as it is, and evaluation mode is plain BatchNorm with those statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def split_of(index: Tensor, num_splits: int) -> Tensor:
    """The sub-batch each sample position of a batch belongs to (``position % num_splits``)."""
    return index % num_splits


class _SplitMixin:
    num_splits: int

    def _split_forward(self, x: Tensor) -> Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)  # type: ignore[misc]
        n, c = x.shape[0], x.shape[1]
        if n % s:
            raise ValueError(f"split BatchNorm: a batch of {n} cannot be split into {s} equal sub-batches "
                             "(method.bn_splits must divide the per-process batch)")
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        grouped = x.reshape(n // s, c * s, *x.shape[2:])
        track = self.track_running_stats and self.running_mean is not None  # type: ignore[attr-defined]
        mean = self.running_mean.repeat(s) if track else None  # type: ignore[attr-defined]
        var = self.running_var.repeat(s) if track else None  # type: ignore[attr-defined]
        weight = self.weight.repeat(s) if self.affine else None  # type: ignore[attr-defined]
        bias = self.bias.repeat(s) if self.affine else None  # type: ignore[attr-defined]
        factor = 0.0
        if track:
            self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
            momentum = self.momentum  # type: ignore[attr-defined]
            factor = 1.0 / float(self.num_batches_tracked) if momentum is None else momentum  # type: ignore[attr-defined]
        out = F.batch_norm(grouped, mean, var, weight, bias, True, factor, self.eps)  # type: ignore[attr-defined]
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(s, c).mean(dim=0))  # type: ignore[attr-defined]
                self.running_var.copy_(var.view(s, c).mean(dim=0))  # type: ignore[attr-defined]
        out = out.view(x.shape)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out


class SplitBatchNorm2d(_SplitMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that normalises a training batch in ``num_splits`` sub-batches (module docstring)."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = int(num_splits)

    def forward(self, x: Tensor) -> Tensor:
        return self._split_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class SplitBatchNorm1d(_SplitMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (e.g. in an MLP head) that normalises a training batch in ``num_splits`` sub-batches."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = int(num_splits)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"SplitBatchNorm1d expects (N, C) inputs, got shape {tuple(x.shape)}")
        return self._split_forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm1d``/``BatchNorm2d`` in ``module`` by its split version, keeping the
    parameters and running statistics (the returned module is ``module`` itself unless it is a
    BatchNorm). ``num_splits == 1`` returns ``module`` unchanged."""
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_splits == 1:
        return module
    kinds = ((nn.BatchNorm2d, SplitBatchNorm2d), (nn.BatchNorm1d, SplitBatchNorm1d))
    for plain, split in kinds:
        if type(module) is plain:
            bn = split(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                       affine=module.affine, track_running_stats=module.track_running_stats)
            state = module.state_dict()
            bn.load_state_dict(state)
            return bn.to(next(iter(state.values())).device) if state else bn
    for name, child in module.named_children():
        replaced = convert_split_batchnorm(child, num_splits)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def split_shuffle(batch_size: int, num_splits: int, device: torch.device | str,
                  generator: torch.Generator | None = None) -> Tensor:
    """A permutation ``perm`` of ``range(batch_size)`` for the key batch: the key of sample ``n`` is
    computed at position ``p`` with ``perm[p] == n``, so that it lands in another sub-batch than its
    query (``p % s != n % s`` for every ``n``) while every key sub-batch mixes samples of several query
    sub-batches.

    Built on the device without a host round trip: the batch as ``N/s`` rows of ``s`` sub-batch
    columns; each column's samples are shuffled over the rows, then every row is rotated by its own
    random offset in ``1 .. s-1``. With ``s == 1`` it is a plain random permutation.
    """
    s = num_splits
    if s == 1:
        return torch.randperm(batch_size, device=device, generator=generator)
    if batch_size % s:
        raise ValueError(f"a batch of {batch_size} cannot be split into {s} equal sub-batches")
    rows = batch_size // s
    grid = torch.arange(batch_size, device=device).view(rows, s)  # grid[i, j] = i*s + j: sub-batch j
    order = torch.rand(rows, s, device=device, generator=generator).argsort(dim=0)
    grid = grid.gather(0, order)  # each column shuffled over the rows
    offsets = torch.randint(1, s, (rows, 1), device=device, generator=generator)
    target = (torch.arange(s, device=device) + offsets) % s  # column j of row i moves to column target[i, j]
    return torch.empty_like(grid).scatter_(1, target, grid).flatten()


@contextmanager
def frozen_bn_statistics(*modules: nn.Module) -> Iterator[None]:
    """Within the block, the BatchNorm layers of ``modules`` normalise with batch statistics (in
    training mode) without updating their running statistics or batch counters."""
    norms = [m for module in modules for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
