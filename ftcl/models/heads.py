"""Projection heads (linear, MLP, MLP with BatchNorm) and the predictor of BYOL / SimSiam."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HEADS = ("linear", "mlp", "mlp_bn")


class ProjectionHead(nn.Module):
    """``linear``: W x (MoCo v1); ``mlp``: W2 relu(W1 x) (MoCo v2, Chen et al. 2020);
    ``mlp_bn``: W2 relu(BN(W1 x)) (the BYOL projector, Grill et al. 2020, Sec. 3.3).

    The output has unit norm when ``normalize`` (MoCo's InfoNCE needs unit features); BYOL and
    SimSiam feed the raw projection to their predictor and normalise inside the loss.
    """

    def __init__(self, kind: str, in_dim: int, out_dim: int, hidden_dim: int | None = None,
                 normalize: bool = True):
        super().__init__()
        hidden = hidden_dim or in_dim
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        elif kind == "mlp_bn":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                     nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"projection head {kind!r} is not one of {HEADS}")
        self.normalize = normalize
        self.out_dim = out_dim
        self.hidden_dim = hidden if kind != "linear" else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.net(x)
        return F.normalize(x, dim=1) if self.normalize else x


class PredictionHead(nn.Module):
    """The predictor q of BYOL (Grill et al. 2020, Sec. 3.3) and h of SimSiam (Chen & He, CVPR 2021,
    Sec. 4): ``W2 relu(BN(W1 z))``, ``dim -> hidden -> dim``, output not normalised.

    BYOL uses hidden = 4096 for dim = 256; SimSiam a bottleneck, hidden = dim / 4 (512 for 2048).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, dim))

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class Encoder(nn.Module):
    """Backbone followed by a projection head: image -> embedding (unit norm for MoCo heads)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
