"""BYOL (Grill et al., "Bootstrap Your Own Latent", NeurIPS 2020).

Online network (backbone + projector + predictor) and a target network (backbone + projector), a
copy of the online one updated only by EMA, ``xi <- tau xi + (1 - tau) theta`` (Sec. 3.1) with
``tau = method.momentum`` (constant; the loop's generic EMA via ``momentum_pairs``). Loss (Eq. 2,
symmetrised as in Sec. 3.1): ``sum over both directions of mean_b (2 - 2 cos(p_b, t_b))``, i.e. the
squared distance of the L2-normalised prediction and target; 0 when aligned, at most 8.
Shared machinery, score recording, FA and HSG (generated pairs update the BatchNorm running
statistics of neither the online nor the target network): ``ftcl/methods/instance_similarity.py``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ftcl.config import RunConfig
from ftcl.losses import byol_distance
from ftcl.methods.base import METHODS
from ftcl.methods.instance_similarity import InstanceSimilarity, parts


class BYOL(InstanceSimilarity):
    """BYOL; the predictor's hidden width defaults to the projector's (4096 in the paper)."""

    def __init__(self, **kwargs):
        """The arguments of :class:`~ftcl.methods.instance_similarity.InstanceSimilarity`; the target
        network starts as a copy of the online encoder."""
        super().__init__(**kwargs)
        self.target = copy.deepcopy(self.encoder)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder, self.target)]

    def distance(self, cos: Tensor) -> Tensor:
        return byol_distance(cos)

    def targets(self, v1, v2, z1, z2, input_grad):
        if input_grad:  # the target's weights do not require grad: only the inputs get a gradient
            return self.target(v1), self.target(v2)
        with torch.no_grad():
            return self.target(v1), self.target(v2)


@METHODS.register("byol")
def build(cfg: RunConfig, backbone: nn.Module, bn_splits: int, num_classes: int | None = None) -> BYOL:
    return BYOL(**parts(cfg, backbone, bn_splits, bottleneck=False))
