"""MoCo v1/v2 (He et al., CVPR 2020; Chen et al., 2020) with the feature transformation of
Zhu et al. (ICCV 2021) between the projection head and the InfoNCE loss, optionally composed with
feature augmentation (``ftcl/transforms/fa.py``) and hard sample generation
(``ftcl/transforms/hsg.py``).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ftcl.config import RunConfig
from ftcl.losses import info_nce, multi_positive_info_nce, weighted_mean
from ftcl.methods.base import METHODS, Method, StepOutput, fp32, hard_sample_generator
from ftcl.models.heads import Encoder, ProjectionHead
from ftcl.models.split_bn import convert_split_batchnorm, frozen_bn_statistics, split_shuffle
from ftcl.runtime import distributed
from ftcl.transforms.fa import FeatureAugmentation
from ftcl.transforms.ft import FeatureTransform
from ftcl.transforms.hsg import HardSampleGenerator


def gather_all(x: Tensor, grad: bool = False) -> Tensor:
    """Concatenate ``x`` from every process; identity when not distributed.

    Without ``grad`` no gradient flows. With it the gather is autograd-aware: the backward pass sums
    the gradients every process computed for the rows of the gathered tensor and hands each process
    those of its own ``x``, so a sample's gradient reaches the process it came from."""
    if not distributed():
        return x
    if grad:
        # imported here: the module needs a distributed build; its all_gather is deprecated in favour of
        # functional collectives whose autograd support needs torch >= 2.6, while this project supports 2.4
        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather", FutureWarning)
            return torch.cat(all_gather(x))
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)


class MoCo(Method):
    """Query encoder, momentum key encoder and a queue of ``K`` unit keys (a K x D buffer).

    One step: q = f_q(v1), k = f_k(v2) (no grad); ``FeatureTransform`` gives (q', k', negatives');
    loss = InfoNCE(q'.k', q'.negatives'). After the optimiser step the *unmixed* keys k are
    enqueued (``after_step``). Under DDP the keys are gathered from all processes and the key
    encoder's batch is shuffled across processes (Shuffle-BN, MoCo Sec. 3.3). In one process (or
    with ``bn_splits > 1``) both encoders normalise the batch in ``bn_splits`` sub-batches
    (``ftcl/models/split_bn.py``) and the key batch is permuted so that every key lands in another
    sub-batch than its query (:func:`~ftcl.models.split_bn.split_shuffle`): MoCo's single-GPU recipe.

    With ``fa.enabled`` the augmented keys are extra positives and the augmented negatives extra
    negatives (``FeatureAugmentation.instance_discrimination``): with L = InfoNCE(q'.k', [q'.n', q'.FA(n')])
    and L_FA = mean_j InfoNCE(q'.FA(k')_j, same negatives), loss = (L + w L_FA) / (1 + w), w =
    ``fa.weight``; the recorded scores are all those of the loss (``pos``: B originals then B x
    copies augmented; ``neg``: the K originals then the augmented ones). With ``hsg.enabled`` the
    loss of a generated pair, ``_pair_loss``, joins the same way (``HardSampleGenerator.add_to``);
    generated keys get the same Shuffle-BN as real ones but are never enqueued, and generated
    images update no BatchNorm running statistic of either encoder.
    """

    shuffles_keys = True

    def __init__(self, backbone: nn.Module, head: nn.Module, *, temperature: float, queue_size: int,
                 shuffle_bn: bool, bn_splits: int, transform: FeatureTransform, fa: FeatureAugmentation,
                 hsg: HardSampleGenerator | None):
        """``head``: the projection head (unit outputs); ``temperature``, ``queue_size`` (K),
        ``shuffle_bn``: ``method.*``; ``bn_splits``: the BatchNorm sub-batches of each process
        (:func:`ftcl.config.rules.bn_splits`); ``transform``, ``fa``, ``hsg``: FT, FA and HSG (built by
        :func:`build`)."""
        super().__init__()
        self.bn_splits = int(bn_splits)
        self.encoder_q = convert_split_batchnorm(Encoder(backbone, head), self.bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.shuffle_bn = bool(shuffle_bn)
        self.transform, self.fa, self.hsg = transform, fa, hsg
        queue = F.normalize(torch.randn(int(queue_size), int(head.out_dim)), dim=1)
        self.register_buffer("queue", queue)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._pending_keys: Tensor | None = None

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.encoder_q.backbone

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.encoder_q, self.encoder_k)]

    def _keys(self, view: Tensor, grad: bool = False) -> Tensor:
        """Keys of ``view`` in its order, computed with Shuffle-BN when ``shuffle_bn`` (MoCo Sec. 3.3).

        Under DDP the batch is gathered from every process and permuted with a permutation broadcast
        from rank 0; each process computes the keys of its slice of the permuted batch, and the keys
        are gathered and unshuffled. Within a process the split BatchNorm's sub-batches are shuffled
        too (:meth:`_split_shuffled_keys`). ``grad``: keep the graph to ``view`` (generated keys, so
        the generators learn; the key encoder's weights never require a gradient); the gathers are
        then autograd-aware (:func:`gather_all`), so each process's ``view`` receives the gradient of
        its own samples' keys wherever they were computed. Without ``grad`` nothing is recorded."""
        with nullcontext() if grad else torch.no_grad():
            if not self.shuffle_bn:
                return self.encoder_k(view)
            if not distributed():
                return self._split_shuffled_keys(view)
            world, rank = dist.get_world_size(), dist.get_rank()
            full = gather_all(view, grad)
            perm = torch.randperm(full.shape[0], device=view.device)
            dist.broadcast(perm, src=0)
            keys = gather_all(self._split_shuffled_keys(full[perm.view(world, -1)[rank]]), grad)
            return keys[torch.argsort(perm).view(world, -1)[rank]]

    def _split_shuffled_keys(self, view: Tensor) -> Tensor:
        """Keys in the order of ``view``, each computed in another BN sub-batch than its query (no
        shuffle with one sub-batch)."""
        if self.bn_splits == 1:
            return self.encoder_k(view)
        perm = split_shuffle(view.shape[0], self.bn_splits, view.device)
        return self.encoder_k(view[perm])[torch.argsort(perm)]  # row perm[p] of the output is row p

    def training_step(self, view1: Tensor, view2: Tensor, epoch: int, labels: Tensor | None = None) -> StepOutput:
        q = self.encoder_q(view1).float()
        k = self._keys(view2).float()
        with fp32(q):  # FT, the logits and the loss in float32, as the positives: see fp32()
            q_t, k_t, negatives = self.transform(q, k, self.queue, epoch)
            pos = (q_t * k_t).sum(dim=1)
            neg = q_t @ negatives.T
            extra_pos = None
            if self.fa.enabled:
                extra_pos, extra_neg = self.fa.instance_discrimination(q_t, k_t, negatives)
                neg = neg if extra_neg is None else torch.cat([neg, extra_neg], dim=1)
            loss = info_nce(pos, neg, self.temperature)
            if extra_pos is not None:
                loss = weighted_mean(loss, multi_positive_info_nce(extra_pos, neg, self.temperature), self.fa.weight)
                pos = torch.cat([pos, extra_pos.T.reshape(-1)])
        if self.hsg is not None:
            loss = self.hsg.add_to(loss, view1, epoch, self._pair_loss)
        self._pending_keys = k
        return StepOutput(loss, pos, neg, self.temperature)

    def _pair_loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        """InfoNCE of a generated pair: f_q(x1) against f_k(x2) and the queue. The key encoder's
        weights get no gradient (they do not require it) but its input does, so both generators
        learn. The generated keys go through the same Shuffle-BN as real ones (``_keys``: across
        processes under DDP, the gradient returning to the process each sample came from). Both
        encoders normalise the generated batches with their own batch statistics but update no
        BatchNorm running statistic or counter: the query encoder's are the ones evaluated and the
        key encoder's those of the query encoder's EMA copy, both describing real views only."""
        with frozen_bn_statistics(self.encoder_q, self.encoder_k):
            q = self.encoder_q(x1).float()
            k = self._keys(x2, grad=True).float()
        with fp32(q):
            return info_nce((q * k).sum(dim=1), q @ self.queue.T, self.temperature)

    @torch.no_grad()
    def after_step(self) -> None:
        if self._pending_keys is None:
            return
        keys = gather_all(self._pending_keys)
        size = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        if keys.shape[0] > size:  # a batch larger than the queue keeps its last K keys
            keys, idx = keys[-size:], idx[-size:]
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)
        self._pending_keys = None


@METHODS.register("moco")
def build(cfg: RunConfig, backbone: nn.Module, bn_splits: int, num_classes: int | None = None) -> MoCo:
    """MoCo with the projection head of ``model.*``, the ``method.*`` settings and the run's FT, FA and
    HSG (the parameters are created in this order, so a seed gives the same network as before)."""
    m, model = cfg.method, cfg.model
    head = ProjectionHead(model.head, backbone.out_dim, model.feature_dim, model.hidden_dim)
    return MoCo(backbone, head, temperature=m.temperature, queue_size=m.queue_size, shuffle_bn=m.shuffle_bn,
                bn_splits=bn_splits, transform=FeatureTransform(cfg.ft.positive, cfg.ft.negative, cfg.ft.start_epoch),
                fa=FeatureAugmentation(cfg.fa, model.feature_dim),
                hsg=hard_sample_generator(cfg, backbone, bn_splits))
