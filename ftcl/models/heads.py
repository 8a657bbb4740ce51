"""Projection heads: linear (MoCo v1) or 2-layer MLP (MoCo v2), output L2-normalised."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionHead(nn.Module):
    """``linear``: W x; ``mlp``: W2 relu(W1 x) (MoCo v2, Chen et al. 2020). Output has unit norm."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"projection head {kind!r} is not 'linear' or 'mlp'")

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.net(x), dim=1)


class Encoder(nn.Module):
    """Backbone followed by a projection head: image -> unit-norm embedding."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
