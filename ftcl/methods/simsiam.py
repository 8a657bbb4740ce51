"""SimSiam (Chen & He, "Exploring Simple Siamese Representation Learning", CVPR 2021): the targets are
the online projections with a stop-gradient (Algorithm 1); ``D = -cos / 2`` per direction (Eq. 1-2),
so the loss lies in [-1, 1]; no EMA. The predictor defaults to a bottleneck of ``feature_dim / 4``
(Sec. 4: 512 for 2048). Shared machinery, score recording, FA and HSG:
``ftcl/methods/instance_similarity.py``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ftcl.config import RunConfig
from ftcl.losses import simsiam_distance
from ftcl.methods.base import METHODS
from ftcl.methods.instance_similarity import InstanceSimilarity, parts


class SimSiam(InstanceSimilarity):
    """SimSiam (module docstring)."""

    def distance(self, cos: Tensor) -> Tensor:
        return simsiam_distance(cos)

    def targets(self, v1, v2, z1, z2, input_grad):
        return z1.detach(), z2.detach()


@METHODS.register("simsiam")
def build(cfg: RunConfig, backbone: nn.Module, bn_splits: int, num_classes: int | None = None) -> SimSiam:
    return SimSiam(**parts(cfg, backbone, bn_splits, bottleneck=True))
