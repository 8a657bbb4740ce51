"""Instance-similarity methods without negatives: the machinery BYOL (``ftcl/methods/byol.py``) and
SimSiam (``ftcl/methods/simsiam.py``) share; each gives its targets and its distance.

One step, views v1 and v2 (each through the online network separately, so BatchNorm sees one view
at a time, as in both papers): projections z = g(f(v)), predictions p = h(z), targets t (no
gradient: SimSiam's stop-gradient ``t = sg(z)``, Algorithm 1; BYOL's target network). The loss is
symmetric, ``D(p1, t2) + D(p2, t1)`` with the method's distance of the cosine (SimSiam Eq. 1-2:
``D = -cos / 2`` per direction; BYOL Eq. 2: ``2 - 2 cos`` per direction).

Choices where this library departs from the papers (to share backbone, data and loop with MoCo):
the projector is ``model.head`` (``mlp_bn`` = the BYOL projector, Linear-BN-ReLU-Linear; SimSiam's
3-layer projector with BN on its output is not offered), the optimiser is the loop's SGD (BYOL
uses LARS; SimSiam keeps the predictor's learning rate fixed), and BYOL's target momentum is the
constant ``method.momentum`` (the paper raises it to 1 with a cosine schedule).

Score recording (``ftcl/scores.py``): ``pos`` = the 2B cosines of the loss (both directions, then
those of any FA pairs); ``neg`` = for each of the 2B predictions, its cosines with the targets of
the *other* B - 1 samples of the batch (the off-diagonal of the B x B prediction-target cosine
matrix; not in the loss, recorded to compare the score distributions with MoCo's). These methods
have no temperature: ``temperature`` = 1, so the exp statistics are exp(s).

Feature augmentation (``fa.*``, placements ``basic`` / ``serial`` / ``parallel``) and hard sample
generation (``hsg.*``) compose as in MoCo, their terms joining the loss as a weighted mean
``(L + w L_extra) / (1 + w)``; see ``ftcl/transforms/fa.py`` and ``hsg.py``. As in MoCo, generated
pairs update no BatchNorm running statistic (of the online network, the predictor or BYOL's target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ftcl.config import RunConfig
from ftcl.losses import cosine, weighted_mean
from ftcl.methods.base import Method, StepOutput, fp32, hard_sample_generator, off_diagonal
from ftcl.models.heads import Encoder, PredictionHead, ProjectionHead
from ftcl.models.split_bn import convert_split_batchnorm, frozen_bn_statistics
from ftcl.transforms.fa import FeatureAugmentation
from ftcl.transforms.hsg import HardSampleGenerator


class InstanceSimilarity(Method):
    """Online encoder (backbone + projection head) and predictor; subclasses give the targets and
    the distance (module docstring)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, predictor: nn.Module, *, bn_splits: int,
                 fa: FeatureAugmentation, hsg: HardSampleGenerator | None):
        """``head``: the projection head (raw outputs: ``normalize=False``); ``predictor``: h; ``bn_splits``:
        the BatchNorm sub-batches of each process; ``fa``, ``hsg``: the run's FA and HSG."""
        super().__init__()
        self.bn_splits = int(bn_splits)
        self.encoder = Encoder(backbone, head)
        self.predictor = predictor
        convert_split_batchnorm(self.encoder, self.bn_splits)  # BYOL's target copies the converted encoder
        convert_split_batchnorm(self.predictor, self.bn_splits)
        self.fa, self.hsg = fa, hsg

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.encoder.backbone

    def distance(self, cos: Tensor) -> Tensor:
        """Loss of one direction from its cosines (B,) (:mod:`ftcl.losses`)."""
        raise NotImplementedError

    def targets(self, v1: Tensor, v2: Tensor, z1: Tensor, z2: Tensor, input_grad: bool) -> tuple[Tensor, Tensor]:
        """Targets (t1, t2) of the two views, without gradient to any weight; ``input_grad`` keeps
        the graph to the views (for generated views, so the generators learn)."""
        raise NotImplementedError

    def _forward(self, v1: Tensor, v2: Tensor, input_grad: bool = False):
        z1, z2 = self.encoder(v1).float(), self.encoder(v2).float()
        p1, p2 = self.predictor(z1).float(), self.predictor(z2).float()
        t1, t2 = self.targets(v1, v2, z1, z2, input_grad)
        return z1, z2, p1, p2, t1.float(), t2.float()

    def training_step(self, view1: Tensor, view2: Tensor, epoch: int, labels: Tensor | None = None) -> StepOutput:
        z1, z2, p1, p2, t1, t2 = self._forward(view1, view2)
        c1, c2 = cosine(p1, t2), cosine(p2, t1)
        loss = self.distance(c1) + self.distance(c2)
        pos = [c1, c2]
        if self.fa.enabled:
            e1, e2 = self.fa.instance_similarity(z1, z2, p1, p2, t1, t2, self.predictor)
            loss = weighted_mean(loss, self.distance(e1) + self.distance(e2), self.fa.weight)
            pos += [e1, e2]
        if self.hsg is not None:
            loss = self.hsg.add_to(loss, view1, epoch, self._pair_loss)
        with torch.no_grad(), fp32(p1):
            n1, n2 = F.normalize(p1, dim=1), F.normalize(p2, dim=1)
            neg = torch.cat([off_diagonal(n1 @ F.normalize(t2, dim=1).T),
                             off_diagonal(n2 @ F.normalize(t1, dim=1).T)])
        return StepOutput(loss, torch.cat(pos), neg, 1.0)

    def _pair_loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        """The method's own loss on a generated pair (gradient reaches the generated images
        through the online and, for BYOL, the target network). Every BatchNorm (online encoder,
        predictor, BYOL's target) normalises the generated batches with their own statistics but
        updates no running statistic or counter: those, evaluated on the online backbone, describe
        real views only."""
        with frozen_bn_statistics(self):
            _, _, p1, p2, t1, t2 = self._forward(x1, x2, input_grad=True)
        return self.distance(cosine(p1, t2)) + self.distance(cosine(p2, t1))


def parts(cfg: RunConfig, backbone: nn.Module, bn_splits: int, bottleneck: bool) -> dict:
    """The constructor arguments of an instance-similarity method for ``cfg``: projection head
    (``model.*``, raw outputs), predictor (hidden width ``method.predictor_hidden_dim``, else
    ``feature_dim / 4`` with ``bottleneck``, SimSiam Sec. 4, else the head's hidden width), FA and HSG,
    created in this order."""
    model, dim = cfg.model, cfg.model.feature_dim
    head = ProjectionHead(model.head, backbone.out_dim, dim, model.hidden_dim, normalize=False)
    hidden = cfg.method.predictor_hidden_dim
    if hidden is None:
        hidden = max(1, dim // 4) if bottleneck else (head.hidden_dim or backbone.out_dim)
    return {"backbone": backbone, "head": head, "predictor": PredictionHead(dim, int(hidden)),
            "bn_splits": bn_splits, "fa": FeatureAugmentation(cfg.fa, dim),
            "hsg": hard_sample_generator(cfg, backbone, bn_splits)}
