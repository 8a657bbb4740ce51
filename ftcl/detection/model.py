"""The detector: torchvision's Faster R-CNN on a pretrained ftcl ResNet.

``c4`` is MoCo's R50-C4 (``facebookresearch/moco`` ``detection/``: Detectron2's ``Res5ROIHeads``
with ``Res5ROIHeadsExtraNorm``): res2-res4 are the backbone the RPN reads (stride 16); each proposal
is pooled to 14 x 14 by :class:`AlignedRoIAlign` (Detectron2's ``ROIAlignV2``: RoIAlign with
``aligned=True``, adaptive sampling), then runs through res5, one extra BatchNorm over res5's output
channels (:func:`extra_norm`) and a spatial mean, into the box predictor, initialised as Detectron2's
``FastRCNNOutputLayers`` (:func:`init_box_predictor`).

``fpn``: res2-res5 under torchvision's ``BackboneWithFPN`` (P2-P6), torchvision's box pooler
(``MultiScaleRoIAlign``: 7 x 7, sampling ratio 2, ``aligned=False``; it has no ``aligned`` flag) and
two-layer MLP box head; only the predictor init is Detectron2's. The papers' numbers are C4's.

Channel counts come from the backbone, so any ``model.width`` works. Images are always RGB; a
backbone pretrained on 1-channel data gets the mean of the three normalised channels as its input
(:class:`ChannelMean`), so a grey image reaches it unchanged up to normalisation.

BatchNorm (``detection.norm``, :func:`convert_norm`): ``frozen`` (FrozenBatchNorm2d everywhere; the
extra norm then has identity statistics), ``train`` (BatchNorm2d updated from each batch: the whole
batch, padded to one size, is one BN batch) or ``sync``. ``sync`` in one process (detection runs as
one) reproduces MoCo's ``naiveSyncBN`` over 8 GPUs x 2 images (:mod:`ftcl.detection.norm`): the
backbone's norms (stem and res2-res4 for C4, the ResNet body for FPN), which see padded images, take
per-pair statistics over each same-orientation pair's own canvas (the pair's max height x width at
that level: the pair's own padding counts, the padding to the whole batch's size does not) and
average them with equal weight; the C4 box head's norms (res5, the extra norm: RoI features, no
padding) take statistics over all RoIs. Evaluation uses the running statistics either way. Under a
distributed run of several processes ``sync`` is torch's SyncBatchNorm.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.config import ConfigError
from ftcl.config.types import Detection, from_dict
from ftcl.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from ftcl.detection.norm import attach_virtual_sync

FPN_LEVELS = 5  # P2-P5 plus the max-pooled P6
#: Detectron2 pads each GPU's images to a multiple of the backbone's ``size_divisibility``: 0 (none) for
#: the ResNet C4 backbone (``Backbone.size_divisibility``), 32 for FPN (``FPN._size_divisibility = strides[-1]``)
SIZE_DIVISIBILITY = {"c4": 0, "fpn": 32}
CLS_SCORE_STD, BBOX_PRED_STD = 0.01, 0.001  # Detectron2's FastRCNNOutputLayers


class ChannelMean(nn.Module):
    """Average the channels of an RGB batch, so a 1-channel backbone reads 3-channel images."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1, keepdim=True)


class AlignedRoIAlign(nn.Module):
    """RoIAlign of the single C4 feature map with ``aligned=True`` (pixel centres at +0.5, Detectron2's
    ``ROIAlignV2``), a drop-in for torchvision's ``MultiScaleRoIAlign`` in ``RoIHeads``.

    The spatial scale is inferred from the feature's size against the largest image size of the
    batch, rounded to a power of two, as torchvision's pooler does (1/16 on res4). ``sampling_ratio``
    0 = adaptive (``ceil`` of the bin size), as Detectron2's ``POOLER_SAMPLING_RATIO: 0``.
    """

    def __init__(self, featmap_name: str = "0", output_size: int = 14, sampling_ratio: int = 0):
        super().__init__()
        self.featmap_name = featmap_name
        self.output_size = (int(output_size), int(output_size))
        self.sampling_ratio = int(sampling_ratio)

    @staticmethod
    def infer_scale(feature: Tensor, image_shapes: Sequence[tuple[int, int]]) -> float:
        """``2 ** round(log2(feature height / largest image height))`` (torchvision's ``_infer_scale``)."""
        original = max(int(h) for h, _ in image_shapes)
        return 2.0 ** round(math.log2(feature.shape[-2] / original))

    def forward(self, features: Mapping[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        x = features[self.featmap_name]
        return roi_align(x, [b.to(x.dtype) for b in boxes], self.output_size,
                         spatial_scale=self.infer_scale(x, image_shapes), sampling_ratio=self.sampling_ratio,
                         aligned=True)

    def extra_repr(self) -> str:
        return f"featmap={self.featmap_name!r}, output_size={self.output_size}, " \
               f"sampling_ratio={self.sampling_ratio}, aligned=True"


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by a ``FrozenBatchNorm2d`` holding the same statistics and affine
    parameters (detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``); returns the module."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            frozen.weight.copy_(module.weight)
            frozen.bias.copy_(module.bias)
            frozen.running_mean.copy_(module.running_mean)
            frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def convert_norm(model: FasterRCNN, norm: str, head: str) -> FasterRCNN:
    """``frozen``: FrozenBatchNorm2d everywhere; ``train``: BatchNorm updated from each batch (plain
    BatchNorm over the whole padded batch); ``sync``: under a distributed run of several processes,
    torch's SyncBatchNorm; in one process, SyncBN over 8 GPUs x 2 images as MoCo's protocol trains it
    (:func:`ftcl.detection.norm.attach_virtual_sync`, with the ``head``'s Detectron2 size divisibility)."""
    if norm == "frozen":
        return freeze_batchnorm(model)
    if norm == "sync":
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return attach_virtual_sync(model, SIZE_DIVISIBILITY[head])
    return model


def extra_norm(channels: int, norm: str) -> nn.Module:
    """MoCo's extra norm after res5 (``get_norm(cfg.MODEL.RESNETS.NORM, C)``), freshly initialised:
    ``frozen`` gives a ``FrozenBatchNorm2d`` with identity statistics (Detectron2's: weight 1, bias 0,
    mean 0, var 1 - eps), ``train``/``sync`` a BatchNorm2d (converted for ``sync`` by :func:`convert_norm`)."""
    if norm == "frozen":
        frozen = FrozenBatchNorm2d(channels)
        frozen.running_var.fill_(1.0 - frozen.eps)
        return frozen
    return nn.BatchNorm2d(channels)


def init_box_predictor(predictor: FastRCNNPredictor) -> FastRCNNPredictor:
    """Detectron2's ``FastRCNNOutputLayers`` init: class scores N(0, 0.01), box deltas N(0, 0.001),
    biases 0 (torchvision keeps ``nn.Linear``'s default)."""
    nn.init.normal_(predictor.cls_score.weight, std=CLS_SCORE_STD)
    nn.init.normal_(predictor.bbox_pred.weight, std=BBOX_PRED_STD)
    for layer in (predictor.cls_score, predictor.bbox_pred):
        nn.init.constant_(layer.bias, 0.0)
    return predictor


def initial_backbone(init: str, checkpoint: str | Path | None, model_cfg: Mapping | None = None,
                     in_channels: int = 3, supervised_weights: str | Path | None = None) -> nn.Module:
    """The ResNet the detector starts from.

    ``pretrained``: the checkpoint's backbone through ``ftcl.checkpoint.load_backbone`` (a key or
    shape that does not fit raises ``CheckpointError``, naming the file); ``random``: a fresh
    ``model_cfg`` network (the ``model`` section as a mapping, e.g. a checkpoint's) with
    ``in_channels``; ``supervised``: torchvision's ResNet-50 loaded from
    the local file ``supervised_weights`` (an ImageNet state dict; its ``fc.*`` keys are dropped).
    """
    from ftcl.models.backbones import build_backbone

    if init == "pretrained":
        if checkpoint is None:
            raise ConfigError("detection.init=pretrained needs a pretraining checkpoint (--checkpoint)")
        return ckpt.load_backbone(checkpoint)[0]
    if init == "random":
        if model_cfg is None:
            raise ConfigError("detection.init=random needs the model config (model.*)")
        return build_backbone(model_cfg["backbone"], model_cfg["width"], model_cfg["small_stem"], in_channels)
    if supervised_weights is None:
        raise ConfigError("detection.init=supervised needs detection.supervised_weights: a local torchvision "
                          "ResNet-50 ImageNet state dict file (nothing is downloaded)")
    path = Path(supervised_weights)
    if not path.is_file():
        raise FileNotFoundError(f"supervised weights {path} not found (detection.supervised_weights)")
    backbone = build_backbone("resnet50", 64, False, 3)
    state = torch.load(path, map_location="cpu", weights_only=True)
    ckpt.load_backbone_state(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    return backbone


def resnet_parts(backbone: nn.Module, freeze_at: int) -> OrderedDict[str, nn.Module]:
    """The ResNet's modules in forward order under torchvision's names (``adapt`` first for a
    1-channel backbone). The first ``freeze_at`` stages (1 = stem, 2 = stem + res2, ...) get
    ``requires_grad=False`` and frozen BatchNorm, as detectron2's ``MODEL.BACKBONE.FREEZE_AT``."""
    in_channels = backbone.conv1.in_channels
    if in_channels not in (1, 3):
        raise ConfigError(f"detection needs a 1- or 3-channel backbone, this one has {in_channels}")
    parts = OrderedDict([("adapt", ChannelMean())] if in_channels == 1 else [])
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        parts[name] = getattr(backbone, name)
    stages = [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]
    for names in stages[:freeze_at]:
        for name in names:
            parts[name] = freeze_batchnorm(parts[name])
            parts[name].requires_grad_(False)
    return parts


def stage_channels(backbone: nn.Module) -> list[int]:
    """Output channels of res2..res5: ``out_dim / 8 * (1, 2, 4, 8)`` for every ScalableResNet."""
    return [backbone.out_dim // 8 * k for k in (1, 2, 4, 8)]


def build_detector(init: str, checkpoint: str | Path | None, head: str, num_classes: int, norm: str, *,
                   model_cfg: Mapping | None = None, in_channels: int = 3,
                   supervised_weights: str | Path | None = None,
                   settings: Detection | None = None,
                   image_mean: Sequence[float] = IMAGENET_MEAN,
                   image_std: Sequence[float] = IMAGENET_STD) -> FasterRCNN:
    """A torchvision Faster R-CNN for ``num_classes`` object classes (plus background).

    ``init``/``checkpoint``/``model_cfg``/``in_channels``/``supervised_weights``: see
    :func:`initial_backbone`. ``head``: ``c4`` (res2-res4 backbone; box head = aligned
    ``roi_pool_size`` RoIAlign, res5, the extra norm, spatial mean: MoCo's R50-C4) or ``fpn`` (module
    doc). ``norm``: see :func:`convert_norm`. ``settings``: the detection config (sizes, anchors,
    RPN/RoI sampling). ``image_mean``/``image_std``: RGB normalisation in [0, 1] units.

    The box head's res5 is the backbone's own ``layer4`` module (:func:`backbone_weights` finds it);
    the extra norm is a new module, ``roi_heads.box_head.norm``.
    """
    backbone = initial_backbone(init, checkpoint, model_cfg, in_channels, supervised_weights)
    channels = stage_channels(backbone)
    s = settings if settings is not None else from_dict(Detection, config.defaults()["detection"])
    parts = resnet_parts(backbone, s.freeze_at)
    common = dict(
        min_size=tuple(s.min_size), max_size=s.max_size,
        image_mean=list(image_mean), image_std=list(image_std),
        rpn_pre_nms_top_n_train=s.rpn_pre_nms_top_n[0], rpn_pre_nms_top_n_test=s.rpn_pre_nms_top_n[1],
        rpn_post_nms_top_n_train=s.rpn_post_nms_top_n[0],
        rpn_post_nms_top_n_test=s.rpn_post_nms_top_n[1],
        rpn_batch_size_per_image=s.rpn_batch_size, box_batch_size_per_image=s.roi_batch_size,
        box_score_thresh=s.score_threshold, box_detections_per_img=s.detections_per_image,
    )
    sizes, ratios = [int(a) for a in s.anchor_sizes], tuple(float(r) for r in s.aspect_ratios)
    if head == "c4":
        layer4 = parts.pop("layer4")
        body = nn.Sequential(parts)
        body.out_channels = channels[2]
        box_head = nn.Sequential(OrderedDict(layer4=layer4, norm=extra_norm(channels[3], norm),
                                             pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        model = FasterRCNN(
            body, None, rpn_anchor_generator=AnchorGenerator((tuple(sizes),), (ratios,)),
            box_head=box_head, box_predictor=FastRCNNPredictor(channels[3], num_classes + 1), **common)
        # FasterRCNN only takes a MultiScaleRoIAlign; RoIHeads takes any pooler with its call signature
        model.roi_heads.box_roi_pool = AlignedRoIAlign("0", s.roi_pool_size, sampling_ratio=0)
    elif head == "fpn":
        fpn = BackboneWithFPN(nn.Sequential(parts), {f"layer{i + 1}": str(i) for i in range(4)}, channels,
                              s.fpn_channels, extra_blocks=LastLevelMaxPool())
        anchors = AnchorGenerator(tuple((a,) for a in sizes), (ratios,) * len(sizes))
        model = FasterRCNN(fpn, num_classes + 1, rpn_anchor_generator=anchors, **common)
    else:
        raise ConfigError(f"detection.head {head!r}; allowed: c4, fpn")
    init_box_predictor(model.roi_heads.box_predictor)
    return convert_norm(model, norm, head)


def backbone_weights(model: FasterRCNN) -> dict[str, Tensor]:
    """The ResNet tensors inside a detector under torchvision's names (``conv1.weight``,
    ``layer4.1.bn2.running_var``, ...), for comparison with a pretraining checkpoint."""
    body = model.backbone.body if isinstance(model.backbone, BackboneWithFPN) else model.backbone
    weights = dict(body.state_dict())
    layer4 = getattr(model.roi_heads.box_head, "layer4", None)  # the C4 box head holds res5
    if layer4 is not None:
        weights.update({f"layer4.{k}": v for k, v in layer4.state_dict().items()})
    return weights


def has_trainable_batchnorm(model: nn.Module) -> bool:
    """Whether some BatchNorm of ``model`` keeps running statistics that training updates (norm
    ``train``/``sync``; a ``frozen`` detector has none)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())
