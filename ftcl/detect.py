"""Detection transfer: Faster R-CNN on a pretrained ftcl backbone, scored with COCO and VOC07 AP.

The protocol is MoCo's (He et al., "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020, sec. 4.2), which the FT paper (Zhu et al., ICCV 2021) follows for its
"VOC07+12 det" column: Faster R-CNN R50-C4 (res2-res4 as the backbone, res5 as the box head on
14x14 RoIAlign features), all layers fine-tuned, SyncBN, VOC07+12 trainval, 24k iterations of batch
16 at lr 0.02 (momentum 0.9, weight decay 1e-4, x0.1 at 18k and 22k, 100 linear warm-up
iterations), training short side 480-800, test short side 800, evaluated on VOC07 test. Those are
the defaults of the ``detection`` config section (``ftcl/resources/defaults.yaml``); a demo config
shrinks them.

Models are torchvision's ``FasterRCNN``: the ``c4`` head as above, or ``fpn`` (res2-res5 under
``BackboneWithFPN``, torchvision's two-layer MLP box head). Channel counts come from the backbone,
so any ``model.width`` works. Images are always RGB; a backbone pretrained on 1-channel data gets
the mean of the three normalised channels as its input (:class:`ChannelMean`), so a grey image
reaches it unchanged up to normalisation.

Metrics (percent): ``AP``, ``AP50``, ``AP75`` are COCO-style (pycocotools' COCOeval, 101-point
interpolation, IoU .50:.05:.95); ``VOC07_AP50`` is the VOC2007 11-point AP at IoU > 0.5 that the
papers report for VOC. "difficult" boxes count neither as hits nor misses in both.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.config import Config, ConfigError
from ftcl.data import detection as ddata
from ftcl.data.datasets import IMAGENET_MEAN, IMAGENET_STD

METRICS = ("AP", "AP50", "AP75", "VOC07_AP50")
RESULT_FILE = "detection.json"
PER_CLASS_FILE = "per_class_ap.csv"
DETECTION_FORMAT = "ftcl-detection-resume-1"  # OUT/checkpoints/last.pt while fine-tuning runs
FPN_LEVELS = 5  # P2-P5 plus the max-pooled P6


# ------------------------------------------------------------------------------------------ config
def detection_settings(cfg: Mapping) -> dict[str, Any]:
    """The run config's ``detection`` section (defaults filled and schema-checked by
    :func:`ftcl.config.resolve`), plus the checks a schema cannot express."""
    det = dict(cfg["detection"])
    if det["head"] == "fpn" and len(det["anchor_sizes"]) != FPN_LEVELS:
        raise ConfigError(f"key 'detection.anchor_sizes' has {len(det['anchor_sizes'])} sizes; the fpn head "
                          f"needs one per level ({FPN_LEVELS})")
    return det


def resolve_config(path: str | Path | None, overrides: Sequence[str]) -> tuple[Config, dict[str, Any]]:
    """The run config (defaults <- file <- ``--set``) and its checked detection section."""
    cfg = config.resolve(path, overrides)
    return cfg, detection_settings(cfg)


# ------------------------------------------------------------------------------------------- model
class ChannelMean(nn.Module):
    """Average the channels of an RGB batch, so a 1-channel backbone reads 3-channel images."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1, keepdim=True)


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


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """``frozen``: FrozenBatchNorm2d everywhere; ``sync``: SyncBatchNorm (plain BatchNorm outside a
    distributed run); ``train``: BatchNorm updated from each batch."""
    if norm == "frozen":
        return freeze_batchnorm(module)
    if norm == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def initial_backbone(init: str, checkpoint: str | Path | None, model_cfg: Mapping | None = None,
                     in_channels: int = 3, supervised_weights: str | Path | None = None) -> nn.Module:
    """The ResNet the detector starts from.

    ``pretrained``: the checkpoint's backbone through ``ftcl.checkpoint.load_backbone`` (a key or
    shape that does not fit raises ``CheckpointError``, naming the file); ``random``: a fresh
    ``model_cfg`` network with ``in_channels``; ``supervised``: torchvision's ResNet-50 loaded from
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
        return build_backbone(model_cfg, in_channels)
    if supervised_weights is None:
        raise ConfigError("detection.init=supervised needs detection.supervised_weights: a local torchvision "
                          "ResNet-50 ImageNet state dict file (nothing is downloaded)")
    path = Path(supervised_weights)
    if not path.is_file():
        raise FileNotFoundError(f"supervised weights {path} not found (detection.supervised_weights)")
    backbone = build_backbone({"backbone": "resnet50", "width": 64, "small_stem": False}, 3)
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
                   settings: Mapping[str, Any] | None = None,
                   image_mean: Sequence[float] = IMAGENET_MEAN,
                   image_std: Sequence[float] = IMAGENET_STD) -> FasterRCNN:
    """A torchvision Faster R-CNN for ``num_classes`` object classes (plus background).

    ``init``/``checkpoint``/``model_cfg``/``in_channels``/``supervised_weights``: see
    :func:`initial_backbone`. ``head``: ``c4`` (res2-res4 backbone, res5 + global average pool as
    the box head on ``roi_pool_size`` RoIAlign features, MoCo's R50-C4) or ``fpn``. ``norm``: see
    :func:`convert_norm`. ``settings``: the detection config (sizes, anchors, RPN/RoI sampling).
    ``image_mean``/``image_std``: RGB normalisation in [0, 1] units.
    """
    backbone = initial_backbone(init, checkpoint, model_cfg, in_channels, supervised_weights)
    channels = stage_channels(backbone)
    settings = settings if settings is not None else config.defaults()["detection"]
    parts = resnet_parts(backbone, int(settings["freeze_at"]))
    s = settings
    common = dict(
        min_size=tuple(s["min_size"]), max_size=s["max_size"],
        image_mean=list(image_mean), image_std=list(image_std),
        rpn_pre_nms_top_n_train=s["rpn_pre_nms_top_n"][0], rpn_pre_nms_top_n_test=s["rpn_pre_nms_top_n"][1],
        rpn_post_nms_top_n_train=s["rpn_post_nms_top_n"][0],
        rpn_post_nms_top_n_test=s["rpn_post_nms_top_n"][1],
        rpn_batch_size_per_image=s["rpn_batch_size"], box_batch_size_per_image=s["roi_batch_size"],
        box_score_thresh=s["score_threshold"], box_detections_per_img=s["detections_per_image"],
    )
    sizes, ratios = [int(a) for a in s["anchor_sizes"]], tuple(float(r) for r in s["aspect_ratios"])
    if head == "c4":
        layer4 = parts.pop("layer4")
        body = nn.Sequential(parts)
        body.out_channels = channels[2]
        box_head = nn.Sequential(OrderedDict(layer4=layer4, pool=nn.AdaptiveAvgPool2d(1),
                                             flatten=nn.Flatten()))
        model = FasterRCNN(
            body, None,
            rpn_anchor_generator=AnchorGenerator((tuple(sizes),), (ratios,)),
            box_roi_pool=MultiScaleRoIAlign(["0"], int(s["roi_pool_size"]), sampling_ratio=0),
            box_head=box_head, box_predictor=FastRCNNPredictor(channels[3], num_classes + 1), **common)
    elif head == "fpn":
        fpn = BackboneWithFPN(nn.Sequential(parts), {f"layer{i + 1}": str(i) for i in range(4)}, channels,
                              int(s["fpn_channels"]), extra_blocks=LastLevelMaxPool())
        anchors = AnchorGenerator(tuple((a,) for a in sizes), (ratios,) * len(sizes))
        model = FasterRCNN(fpn, num_classes + 1, rpn_anchor_generator=anchors, **common)
    else:
        raise ConfigError(f"detection.head {head!r}; allowed: c4, fpn")
    return convert_norm(model, norm)


def backbone_weights(model: FasterRCNN) -> dict[str, Tensor]:
    """The ResNet tensors inside a detector under torchvision's names (``conv1.weight``,
    ``layer4.1.bn2.running_var``, ...), for comparison with a pretraining checkpoint."""
    body = model.backbone.body if isinstance(model.backbone, BackboneWithFPN) else model.backbone
    weights = dict(body.state_dict())
    layer4 = getattr(model.roi_heads.box_head, "layer4", None)  # the C4 box head holds res5
    if layer4 is not None:
        weights.update({f"layer4.{k}": v for k, v in layer4.state_dict().items()})
    return weights


# ---------------------------------------------------------------------------------------- training
def lr_at(iteration: int, base_lr: float, warmup_iterations: int, warmup_factor: float,
          milestones: Sequence[int], gamma: float) -> float:
    """Learning rate at an iteration, as detectron2's ``WarmupMultiStepLR`` (linear warm-up of Goyal
    et al. 2017): ``base_lr * w * gamma ** #{m in milestones: m <= iteration}``, where ``w`` rises
    linearly from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iterations``."""
    warm = 1.0
    if iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        warm = warmup_factor * (1.0 - alpha) + alpha
    return base_lr * warm * gamma ** bisect_right(sorted(milestones), iteration)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with no weight decay on normalisation layers (detectron2's
    ``SOLVER.WEIGHT_DECAY_NORM = 0``)."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in norm_ids], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in norm_ids], "weight_decay": 0.0},
    ]


def hflip(image: Tensor, target: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an image and its xyxy boxes left-right (continuous coordinates: x -> W - x)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def _collate(batch: Sequence) -> tuple:
    return tuple(zip(*batch))


def train_detector(model: FasterRCNN, dataset: ddata.DetectionDataset, det: Mapping[str, Any],
                   device: torch.device, seed: int, log: Callable[[str], None] = print,
                   ckpt_dir: str | Path | None = None, fingerprint: str = "") -> None:
    """Fine-tune ``model`` for ``det["iterations"]`` SGD steps of ``det["batch_size"]`` images.

    lr = ``lr_per_16 * batch_size / 16`` (linear scaling) following :func:`lr_at`; momentum,
    weight decay (:func:`parameter_groups`), random horizontal flips, sampling without replacement
    epoch after epoch, all seeded by ``seed``; gradients clipped to ``clip_grad_norm`` when set
    (short, high-lr CPU schedules). A non-finite loss stops the run with an error.

    With ``ckpt_dir``, every ``checkpoint_every`` iterations the model, the optimiser, the iteration
    and the global RNG state are saved atomically to ``ckpt_dir/last.pt``, and a run that finds that
    file resumes after its iteration: the image order and the flips are drawn up front from
    ``seed``, so the resumed run sees exactly the batches the uninterrupted one would have. A file
    saved under another ``fingerprint`` (other settings or another pretrained backbone) is not
    resumed from: training starts afresh and says so. The file is removed once training ends.
    """
    iterations, batch_size = int(det["iterations"]), int(det["batch_size"])
    if iterations == 0:
        return
    model.to(device).train()
    base_lr = float(det["lr_per_16"]) * batch_size / 16
    optimizer = torch.optim.SGD(parameter_groups(model, float(det["weight_decay"])), lr=base_lr,
                                momentum=float(det["momentum"]))
    order = list(RandomSampler(dataset, num_samples=iterations * batch_size,
                               generator=torch.Generator().manual_seed(seed)))
    flips = (torch.rand(iterations * batch_size, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).tolist()
    done, rng = _resume_detector(model, optimizer, ckpt_dir, fingerprint, device, log)
    every = int(det.get("checkpoint_every") or 0)
    batches = iter(DataLoader(dataset, batch_size, sampler=order[done * batch_size:], collate_fn=_collate,
                              num_workers=int(det["num_workers"])))
    if rng is not None:  # after the loader's own draw from the global RNG, as in the uninterrupted run
        torch.set_rng_state(rng)
    start = time.perf_counter()
    for it, (images, targets) in enumerate(batches, start=done + 1):
        lr = lr_at(it - 1, base_lr, det["warmup_iterations"], det["warmup_factor"], det["milestones"],
                   det["gamma"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        flip = flips[(it - 1) * batch_size:it * batch_size]
        pairs = [hflip(i, t) if det["hflip"] and f else (i, t) for i, t, f in zip(images, targets, flip)]
        losses = model([i.to(device) for i, _ in pairs],
                       [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in pairs])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {loss.item()} at iteration {it} ({_fmt(losses)})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if det["clip_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(det["clip_grad_norm"]))
        optimizer.step()
        if it == done + 1 or it % int(det["log_every"]) == 0 or it == iterations:
            rate = (time.perf_counter() - start) / (it - done)
            log(f"[detect] iter {it}/{iterations} loss {loss.item():.3f} ({_fmt(losses)}) lr {lr:.2e} "
                f"{rate:.2f} s/it")
        if ckpt_dir is not None and every and it % every == 0 and it < iterations:
            ckpt.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                              "rng": torch.get_rng_state(), "fingerprint": fingerprint,
                              "format": DETECTION_FORMAT}, Path(ckpt_dir) / "last.pt")
    if ckpt_dir is not None:
        (Path(ckpt_dir) / "last.pt").unlink(missing_ok=True)


def _resume_detector(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: str | Path | None,
                     fingerprint: str, device: torch.device,
                     log: Callable[[str], None]) -> tuple[int, Tensor | None]:
    """Load ``ckpt_dir/last.pt`` into ``model`` and ``optimizer`` if it exists and was saved under
    ``fingerprint``; the iterations it holds (0: start afresh) and the global RNG state to go on with."""
    path = Path(ckpt_dir) / "last.pt" if ckpt_dir is not None else None
    if path is None or not path.exists():
        return 0, None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt zips
        log(f"[detect] not resuming: {path} is truncated or corrupted ({err}); training from the start")
        return 0, None
    if not isinstance(state, dict) or state.get("format") != DETECTION_FORMAT:
        log(f"[detect] not resuming: {path} is not a detection checkpoint; training from the start")
        return 0, None
    if state.get("fingerprint") != fingerprint:
        log(f"[detect] not resuming from {path}: it was saved with other detection settings or another "
            "pretrained backbone; training from the start")
        return 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"[detect] resumed from {path} after iteration {state['iteration']}")
    return int(state["iteration"]), state["rng"]


def _fmt(losses: Mapping[str, Tensor]) -> str:
    return " ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())


@torch.no_grad()
def predict(model: FasterRCNN, dataset: ddata.DetectionDataset, batch_size: int, device: torch.device,
            num_workers: int = 0) -> list[dict[str, np.ndarray]]:
    """Detections (``boxes`` xyxy, ``scores``, ``labels``) for every image of ``dataset``, in order."""
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size, shuffle=False, collate_fn=_collate, num_workers=num_workers)
    out = []
    for images, _ in loader:
        for pred in model([i.to(device) for i in images]):
            out.append({k: pred[k].cpu().numpy() for k in ("boxes", "scores", "labels")})
    return out


# -------------------------------------------------------------------------------------- evaluation
def voc07_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 11-point interpolated average precision (Everingham et al., "The PASCAL Visual Object
    Classes (VOC) Challenge", IJCV 2010, sec. 4.2): the mean over t = 0, 0.1, ..., 1 of the highest
    precision at a recall >= t (0 when the recall never reaches t).

    The thresholds are the exact ratios k/10, so a recall of exactly 0.3 counts for t = 0.3
    (py-faster-rcnn's ``np.arange(0, 1.1, 0.1)`` makes that threshold 0.30000000000000004).
    """
    recall, precision = np.asarray(recall, dtype=float), np.asarray(precision, dtype=float)
    points = [precision[recall >= k / 10].max() if np.any(recall >= k / 10) else 0.0 for k in range(11)]
    return float(np.mean(points))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each row of ``boxes`` (continuous coordinates)."""
    iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, np.finfo(float).eps)


def voc_precision_recall(
    detections: Sequence[tuple[int, float, np.ndarray]],
    ground_truth: Mapping[int, tuple[np.ndarray, np.ndarray]],
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Precision/recall curve of one class as the VOC devkit (``VOCevaldet``) computes it.

    ``detections``: ``(image, score, box)``; ``ground_truth``: image -> ``(boxes, difficult)``.
    In decreasing score order (stable for ties), each detection takes the ground-truth box of its
    image with the highest IoU; above ``iou_threshold`` (strictly) it is a true positive if that
    box is not difficult and not yet taken, a false positive if already taken, and ignored if the
    box is difficult; otherwise a false positive. Recall is over the non-difficult boxes. Returns
    None when the class has no non-difficult box.
    """
    n_pos = int(sum((~np.asarray(d, dtype=bool)).sum() for _, d in ground_truth.values()))
    if n_pos == 0:
        return None
    taken = {img: np.zeros(len(b), dtype=bool) for img, (b, _) in ground_truth.items()}
    order = np.argsort([-score for _, score, _ in detections], kind="stable")
    tp, fp = np.zeros(len(order)), np.zeros(len(order))
    for rank, idx in enumerate(order):
        img, _, box = detections[idx]
        boxes, difficult = ground_truth.get(img, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        ious = box_iou(np.asarray(box, dtype=float), np.asarray(boxes, dtype=float))
        best = int(np.argmax(ious))
        if ious[best] <= iou_threshold:
            fp[rank] = 1
        elif difficult[best]:
            continue
        elif taken[img][best]:
            fp[rank] = 1
        else:
            tp[rank] = 1
            taken[img][best] = True
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return tp / n_pos, tp / np.maximum(tp + fp, np.finfo(float).eps)


def voc07_ap50_per_class(targets: Sequence[Mapping], predictions: Sequence[Mapping],
                         num_classes: int) -> np.ndarray:
    """VOC07 11-point AP at IoU > 0.5 for classes 1..C (NaN for a class without non-difficult boxes)."""
    detections: list[list] = [[] for _ in range(num_classes + 1)]
    for i, p in enumerate(predictions):
        for box, score, label in zip(p["boxes"], p["scores"], p["labels"]):
            detections[int(label)].append((i, float(score), box))
    result = np.full(num_classes, np.nan)
    for c in range(1, num_classes + 1):
        ground_truth = {}
        for i, t in enumerate(targets):
            keep = np.asarray(t["labels"]) == c
            ground_truth[i] = (np.asarray(t["boxes"])[keep], np.asarray(t["difficult"])[keep])
        curve = voc_precision_recall(detections[c], ground_truth, 0.5)
        if curve is not None:
            result[c - 1] = voc07_ap(*curve)
    return result


def coco_ap_per_class(targets: Sequence[Mapping], predictions: Sequence[Mapping],
                      num_classes: int) -> np.ndarray:
    """COCO-style AP of classes 1..C at IoU .50:.05:.95 (rows: C, columns: the 10 thresholds), from
    pycocotools' COCOeval (bbox, all areas, 100 detections per image, 101-point interpolation).

    Difficult boxes enter as ``iscrowd`` regions, which COCOeval neither counts nor penalises
    detections on. NaN for a class without boxes; 0 everywhere when there is no detection at all.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations = [], []
    for i, t in enumerate(targets):
        images.append({"id": i + 1})
        boxes, labels, difficult = (np.asarray(t[k]) for k in ("boxes", "labels", "difficult"))
        for box, label, hard in zip(boxes, labels, difficult):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(hard)})
    has_boxes = np.isin(np.arange(1, num_classes + 1), [a["category_id"] for a in annotations])
    results = [{"image_id": i + 1, "category_id": int(lab), "score": float(s),
                "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
               for i, p in enumerate(predictions) for b, s, lab in zip(p["boxes"], p["scores"], p["labels"])]
    if not results:
        return np.where(has_boxes[:, None], 0.0, np.nan) * np.ones((1, 10))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c} for c in range(1, num_classes + 1)]}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # T x R x K, area "all", 100 detections
    valid = (precision > -1).all(axis=1)
    ap = np.where(valid, np.where(precision > -1, precision, 0).mean(axis=1), np.nan)
    return ap.T


def evaluate_detections(targets: Sequence[Mapping], predictions: Sequence[Mapping],
                        classes: Sequence[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Summary metrics (percent, means over classes that have boxes) and one row per class."""
    coco = 100.0 * coco_ap_per_class(targets, predictions, len(classes))
    voc = 100.0 * voc07_ap50_per_class(targets, predictions, len(classes))
    counts = np.zeros(len(classes), dtype=int)
    for t in targets:
        labels = np.asarray(t["labels"])[~np.asarray(t["difficult"], dtype=bool)]
        counts += np.bincount(labels, minlength=len(classes) + 1)[1:]
    rows = [{"class": name, "num_boxes": int(counts[k]), "AP": coco[k].mean(), "AP50": coco[k, 0],
             "AP75": coco[k, 5], "VOC07_AP50": voc[k]} for k, name in enumerate(classes)]
    summary = {"AP": _nanmean(coco.mean(axis=1)), "AP50": _nanmean(coco[:, 0]), "AP75": _nanmean(coco[:, 5]),
               "VOC07_AP50": _nanmean(voc)}
    return summary, rows


def _nanmean(values: np.ndarray) -> float:
    """Mean over the classes that have boxes (NaN when none has)."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# ---------------------------------------------------------------------------------------- the stage
@dataclass
class DetectionData:
    """Training and test sets, the class names (label k is ``classes[k - 1]``), RGB normalisation."""

    train: ddata.DetectionDataset
    test: ddata.DetectionDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_detection_data(cfg: Mapping, det: Mapping[str, Any], out: str | Path) -> DetectionData:
    """The sets ``detection.dataset`` names.

    ``voc``: ``root`` holding ``VOCdevkit/VOC<year>`` (``train_sets``, ``test_sets``); ``folder``: a
    single VOC-style folder ``root`` (xml beside images) for training and ``test_root`` (default:
    ``root``) for testing; ``coco``: ``coco.{train,test}_{json,images}``; ``scenes``: scenes composed
    from the held-out split of ``data`` into ``scenes.folder`` (default ``<out>/scenes``).
    Classes: ``detection.classes`` or the sorted names found (scenes: the dataset's label order).
    Normalisation: ``image_mean``/``image_std``, else the source set's for scenes (the data the
    backbone was pretrained on) unless ``init`` is ``supervised``, else ImageNet's.
    """
    mean, std, classes = IMAGENET_MEAN, IMAGENET_STD, det["classes"]
    kind = det["dataset"]
    if kind == "scenes":
        from ftcl.data.datasets import build_dataset

        source = build_dataset(cfg["data"], "test", "eval")
        classes = classes or [str(k) for k in range(source.num_classes)]
        folder = Path(det["scenes"]["folder"] or Path(out) / "scenes")
        ddata.compose_scenes(source, classes, folder, ddata.SceneSpec.from_config(det["scenes"]))
        train = ddata.voc_devkit_annotations(folder, [(ddata.SCENES_YEAR, "trainval")])
        test = ddata.voc_devkit_annotations(folder, [(ddata.SCENES_YEAR, "test")])
        if det["init"] != "supervised":
            mean, std = _rgb(source.mean), _rgb(source.std)
    elif kind == "coco":
        paths = det["coco"]
        _require(paths, ("train_json", "train_images", "test_json", "test_images"), "detection.coco")
        train, classes_found = ddata.coco_annotations(paths["train_json"], paths["train_images"])
        test, _ = ddata.coco_annotations(paths["test_json"], paths["test_images"])
        classes = classes or classes_found
    else:
        _require(det, ("root",), "detection")
        if kind == "voc":
            train = ddata.voc_devkit_annotations(det["root"], det["train_sets"])
            test = ddata.voc_devkit_annotations(det["root"], det["test_sets"])
        else:
            train = ddata.voc_folder_annotations(det["root"])
            test = ddata.voc_folder_annotations(det["test_root"] or det["root"])
    classes = list(classes or ddata.discover_classes([*train, *test]))
    return DetectionData(
        ddata.DetectionDataset(train, classes), ddata.DetectionDataset(test, classes), classes,
        tuple(det["image_mean"] or mean), tuple(det["image_std"] or std),
    )


def _rgb(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def _require(section: Mapping, keys: Sequence[str], prefix: str) -> None:
    missing = [k for k in keys if not section.get(k)]
    if missing:
        raise ConfigError(f"detection.dataset needs {', '.join(f'{prefix}.{k}' for k in missing)}")


@dataclass
class DetectionJob:
    """Everything a detection run needs, checked before any training starts."""

    data: DetectionData
    model: FasterRCNN
    checkpoint: Path | None
    pretrain_epochs: int | None
    model_cfg: Mapping


def prepare_detection(cfg: Mapping, det: Mapping[str, Any], checkpoint: str | Path | None,
                      out: str | Path) -> DetectionJob:
    """Read the data and build the detector; bad paths, keys or weights fail here.

    The backbone's architecture comes from the checkpoint when one is given (so ``random`` rows
    match the pretrained ones), else from ``cfg["model"]``.
    """
    from ftcl.train import seed_everything

    checkpoint = ckpt.resolve_checkpoint_path(checkpoint) if checkpoint is not None else None
    data = build_detection_data(cfg, det, out)
    state = ckpt.load(checkpoint) if checkpoint is not None else None
    model_cfg = state["config"]["model"] if state else cfg["model"]
    seed_everything(int(cfg["seed"]))
    model = build_detector(det["init"], checkpoint, det["head"], len(data.classes), det["norm"],
                           model_cfg=model_cfg, in_channels=int(state["in_channels"]) if state else 3,
                           supervised_weights=det["supervised_weights"], settings=det,
                           image_mean=data.mean, image_std=data.std)
    return DetectionJob(data, model, checkpoint, state["epoch"] if state else None, model_cfg)


def fit_and_evaluate(job: DetectionJob, cfg: Mapping, det: Mapping[str, Any], out: str | Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune, evaluate on the test set, write ``<out>/detection.json`` and ``per_class_ap.csv``;
    returns the detection.json content."""
    from ftcl.evaluate import write_result
    from ftcl.train import select_device

    data, out = job.data, Path(out)
    device = select_device(cfg["device"])
    log(f"[detect] {det['head']} head, init {det['init']}, norm {det['norm']}: {len(data.train)} training "
        f"/ {len(data.test)} test images, {len(data.classes)} classes, {det['iterations']} iterations "
        f"on {device}")
    start = time.perf_counter()
    fingerprint = json.dumps({"detection": dict(det), "seed": cfg["seed"], "checkpoint": str(job.checkpoint),
                              "pretrain_epochs": job.pretrain_epochs, "model": job.model_cfg}, sort_keys=True,
                             default=str)
    train_detector(job.model, data.train, det, device, int(cfg["seed"]), log, ckpt_dir=out / "checkpoints",
                   fingerprint=fingerprint)
    train_s = time.perf_counter() - start
    predictions = predict(job.model, data.test, int(det["eval_batch_size"]), device, int(det["num_workers"]))
    summary, rows = evaluate_detections([data.test.target(i) for i in range(len(data.test))], predictions,
                                        data.classes)
    result = {
        **summary,
        "per_class": {r["class"]: {k: _finite(r[k]) for k in METRICS} for r in rows},
        "protocol": _protocol(det, data, job.model_cfg, train_s),
        "checkpoint": str(job.checkpoint) if job.checkpoint else None,
        "pretrain_epochs": job.pretrain_epochs,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_per_class_csv(rows, out / PER_CLASS_FILE)
    write_result(result, out / RESULT_FILE)
    log("[detect] " + " ".join(f"{k} {summary[k]:.2f}" for k in METRICS))
    return result


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _protocol(det: Mapping, data: DetectionData, model_cfg: Mapping, train_s: float) -> dict[str, Any]:
    keys = ("dataset", "init", "head", "norm", "freeze_at", "iterations", "batch_size", "lr_per_16",
            "momentum", "weight_decay", "warmup_iterations", "milestones", "gamma", "min_size", "max_size",
            "hflip")
    return {
        **{k: det[k] for k in keys},
        "backbone": _backbone_name(det, model_cfg),
        "train_images": len(data.train), "test_images": len(data.test), "classes": len(data.classes),
        "metrics": "AP/AP50/AP75: COCO-style (pycocotools, IoU .50:.05:.95, 101-point); "
                   "VOC07_AP50: VOC2007 11-point AP at IoU > 0.5; percent, difficult boxes ignored",
        "train_seconds": round(train_s, 1),
    }


def _backbone_name(det: Mapping, model_cfg: Mapping) -> str:
    if det["init"] == "supervised":
        return "torchvision resnet50 (supervised ImageNet weights)"
    stem = " small stem" if model_cfg["small_stem"] else ""
    return f"{model_cfg['backbone']} width {model_cfg['width']}{stem}"


def write_per_class_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """One row per class: name, number of non-difficult boxes, AP, AP50, AP75, VOC07_AP50 (percent)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["class", "num_boxes", *METRICS])
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                         for r in rows)
    tmp.replace(path)


# -------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ftcl detect --config FILE [--set k=v ...] --checkpoint PRETRAIN_DIR_OR_FILE --out DIR``."""
    from ftcl.cli import CONFIG_HELP, add_set_option

    p = subparsers.add_parser(
        "detect", help="fine-tune Faster R-CNN from a pretrained backbone and report detection AP",
        description=f"Detection transfer; writes OUT/config.yaml, OUT/{RESULT_FILE}, OUT/{PER_CLASS_FILE}.")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    add_set_option(p)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="pretraining run folder (holding checkpoints/last.pt) or a checkpoint file; "
                        "required for detection.init=pretrained")
    p.add_argument("--out", type=Path, required=True, help="run folder for outputs (created)")
    p.set_defaults(func=cli_detect)


def cli_detect(args: argparse.Namespace) -> int:
    """``ftcl detect``: resolve and check the inputs, run the stage inside an MLflow run ``detection``."""
    from ftcl.tracking import Tracker

    cfg, det = resolve_config(args.config, args.overrides)
    if args.checkpoint is not None:
        ckpt.resolve_checkpoint_path(args.checkpoint)
    elif det["init"] == "pretrained":
        raise ConfigError("ftcl detect with detection.init=pretrained needs --checkpoint")
    job = prepare_detection(cfg, det, args.checkpoint, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, args.out / "config.yaml")
    with Tracker(cfg, args.out, "detection") as tracker:
        tracker.log_params({k: v for k, v in config.flatten(cfg).items()
                            if k.startswith(("detection.", "model.", "data.", "seed"))})
        result = fit_and_evaluate(job, cfg, det, args.out)
        tracker.log_metrics({f"det/{k}": result[k] for k in METRICS})
        tracker.log_artifact(args.out / RESULT_FILE)
        tracker.log_artifact(args.out / PER_CLASS_FILE)
    print(f"[detect] AP50 {result['AP50']:.2f} VOC07_AP50 {result['VOC07_AP50']:.2f} "
          f"-> {args.out / RESULT_FILE}")
    return 0
