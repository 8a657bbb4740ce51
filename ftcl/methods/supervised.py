"""The supervised reference (the ceiling row of a table): the same backbone, data, augmentation and
budget as the self-supervised rows, trained with the labels.

One step: pooled features f1, f2 of the two views (the same two-view augmentation the other
methods get, so every row sees the same images), a linear classifier on each, and
``loss = (CE(W f1 + b, y) + CE(W f2 + b, y)) / 2``. The classifier is discarded afterwards: like
every row, the backbone is evaluated by the linear probe, kNN and detection. For the score plots,
``pos`` = cos(f1_b, f2_b) of the B pairs and ``neg`` = each f1_b's cosines with the other samples'
f2 (not in the loss; temperature 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftcl.config import RunConfig
from ftcl.errors import ConfigError
from ftcl.methods.base import METHODS, Method, StepOutput, fp32, off_diagonal
from ftcl.models.split_bn import convert_split_batchnorm


class Supervised(Method):
    """Cross-entropy on the labels of both views (module docstring)."""

    needs_labels = True

    def __init__(self, backbone: nn.Module, num_classes: int, bn_splits: int = 1):
        super().__init__()
        self.backbone = convert_split_batchnorm(backbone, int(bn_splits))
        self.classifier = nn.Linear(backbone.out_dim, int(num_classes))

    def training_step(self, view1: Tensor, view2: Tensor, epoch: int, labels: Tensor | None = None) -> StepOutput:
        if labels is None:
            raise ValueError("the supervised method needs the batch's labels")
        f1, f2 = self.backbone(view1).float(), self.backbone(view2).float()
        loss = (F.cross_entropy(self.classifier(f1), labels) + F.cross_entropy(self.classifier(f2), labels)) / 2
        with torch.no_grad(), fp32(f1):
            n1, n2 = F.normalize(f1, dim=1), F.normalize(f2, dim=1)
            pos = (n1 * n2).sum(dim=1)
            neg = off_diagonal(n1 @ n2.T)
        return StepOutput(loss, pos, neg, 1.0)


@METHODS.register("supervised")
def build(cfg: RunConfig, backbone: nn.Module, bn_splits: int, num_classes: int | None = None) -> Supervised:
    """The reference row's method; ``num_classes``: the training set's (it needs labels)."""
    if num_classes is None or num_classes < 2:
        raise ConfigError(f"method.name 'supervised' needs a labelled training set, got {num_classes} classes")
    return Supervised(backbone, num_classes, bn_splits)
