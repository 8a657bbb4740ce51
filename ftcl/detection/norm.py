"""BatchNorm as MoCo's detection protocol computes it (SyncBN over 8 GPUs x 2 images), in one process.

MoCo's VOC and COCO detection configs (``facebookresearch/moco`` ``detection/configs/Base-RCNN-C4-BN.yaml``:
``RESNETS.NORM: "naiveSyncBN"``, ``SOLVER.IMS_PER_BATCH: 16``, run with ``train_net.py --num-gpus 8``)
train every BatchNorm as Detectron2's ``NaiveSyncBatchNorm`` (``detectron2/layers/batch_norm.py``,
``stats_mode=""``): each GPU takes the mean and the mean of squares of its own input, the GPUs average
them with equal weight, var = E[x^2] - E[x]^2 of those averages (no Bessel factor, also in the
running variance), and that mean and var normalise every pixel. Each GPU's input is its 2 images
(``AspectRatioGroupedDataset``: same orientation) padded to the pair's own max height and width
(``ImageList.from_tensors`` with the backbone's ``size_divisibility``: 0 for the C4 ResNet, 32 for
FPN), with zeros after normalisation.

ftcl runs the global batch in one process, and torchvision's ``GeneralizedRCNNTransform`` pads all of
it to one size (a multiple of 32). :class:`VirtualSyncBatchNorm2d` gives back the statistics above:
the batch's consecutive groups of :data:`IMAGES_PER_GPU` images are the virtual GPUs (the sampler in
:mod:`ftcl.detection.train` makes them same-orientation pairs), and each group's statistics are taken
over its own canvas only (:meth:`BatchLayout.canvases`), so the padding beyond the pair's canvas,
which Detectron2 never sees, counts for nothing. :func:`attach_virtual_sync` wires a detector: a
forward hook on ``model.transform`` records the resized image sizes and the padded size into a
:class:`BatchLayout` that the backbone's norm layers read, and a hook on ``model.backbone`` clears it.

What still differs from 8 real GPUs: beyond a pair's canvas, a convolution near the canvas edge reads
the features of ftcl's extra padding (computed from zero pixels, non-zero after BatchNorm and ReLU)
where Detectron2's reads zero padding, so features near the right and bottom canvas edges differ
slightly; the statistics are over the same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

#: Images per GPU in MoCo's detection protocol: ``SOLVER.IMS_PER_BATCH: 16`` (moco
#: ``detection/configs/Base-RCNN-C4-BN.yaml``) over 8 GPUs (``--num-gpus 8``, moco ``detection/README.md``);
#: Detectron2 gives each GPU ``IMS_PER_BATCH / world size`` images.
IMAGES_PER_GPU = 2


def group_sizes(batch_size: int) -> list[int]:
    """The virtual GPUs' batch sizes for a global batch: :data:`IMAGES_PER_GPU` each, and the
    remainder (an odd batch) on a last one."""
    full, rest = divmod(int(batch_size), IMAGES_PER_GPU)
    return [IMAGES_PER_GPU] * full + ([rest] if rest else [])


def _level_stride(padded: int, feature: int) -> int:
    """The power of two ``s`` with ``ceil(padded / s) == feature``: every stride-2 op of a ResNet (7x7
    conv pad 3, 3x3 max-pool pad 1, 3x3 conv pad 1, 1x1 conv pad 0) maps a side ``n`` to ``ceil(n / 2)``.
    The smallest such ``s``; when ``feature`` is 1 any of them gives an extent of 1."""
    stride = 1
    while -(-padded // stride) > feature:
        stride *= 2
    if -(-padded // stride) != feature:
        raise ValueError(f"a feature side {feature} does not come from a padded side {padded} by stride-2 steps")
    return stride


def feature_extent(size: tuple[int, int], padded: tuple[int, int], feature: tuple[int, int]) -> tuple[int, int]:
    """The feature-map region ``(h, w)`` that an image region ``size`` at the top-left of a padded input
    ``padded`` maps to, on a feature map of size ``feature``: ``ceil(size / stride)`` per side, the
    feature the region alone would give. Equal to ``ceil(size * feature / padded)`` when the padded
    size is a multiple of the stride (torchvision pads to multiples of 32)."""
    return tuple(-(-int(s) // _level_stride(int(p), int(f))) for s, p, f in zip(size, padded, feature))


class BatchLayout:
    """The images of the training forward under way: their sizes after resizing (before padding),
    ``(h, w)`` each, in batch order, and the padded input size; None outside a forward.

    ``size_divisibility``: Detectron2's rounding of each GPU's padded size (``ImageList.from_tensors``):
    0 (none) for the C4 ResNet backbone, 32 for FPN (``FPN._size_divisibility = strides[-1]``).
    """

    def __init__(self, size_divisibility: int = 0):
        self.size_divisibility = int(size_divisibility)
        self.image_sizes: list[tuple[int, int]] | None = None
        self.padded_size: tuple[int, int] | None = None

    def set(self, image_sizes: Sequence[Sequence[int]], padded_size: Sequence[int]) -> None:
        """Record a batch's image sizes and its padded size."""
        self.image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        self.padded_size = (int(padded_size[0]), int(padded_size[1]))

    def clear(self, *_: Any) -> None:
        """Forget the batch (a forward hook on the backbone: called with its module, inputs, output)."""
        self.image_sizes = self.padded_size = None

    def record(self, _module: nn.Module, _inputs: Any, output: tuple) -> None:
        """Forward hook on ``GeneralizedRCNNTransform``: its output's ``ImageList``."""
        images = output[0]
        self.set(images.image_sizes, images.tensors.shape[-2:])

    def _canvas(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """A group's padded size in input pixels: the max height and width, rounded up to
        ``size_divisibility``, never beyond the batch's padded size."""
        step = max(self.size_divisibility, 1)
        return tuple(min(-(-max(s[k] for s in sizes) // step) * step, self.padded_size[k]) for k in (0, 1))

    def canvases(self, feature: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """Per virtual GPU (consecutive groups of :func:`group_sizes`): ``(first, stop, h, w)``, the
        images ``first:stop`` of the batch and their canvas ``h x w`` on a feature map of size
        ``feature`` (:func:`feature_extent`)."""
        out, first = [], 0
        for size in group_sizes(len(self.image_sizes)):
            stop = first + size
            out.append((first, stop, *feature_extent(self._canvas(self.image_sizes[first:stop]), self.padded_size,
                                                     feature)))
            first = stop
        return out


def canvas_statistics(x: Tensor, canvases: Sequence[tuple[int, int, int, int]]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and variance as ``NaiveSyncBatchNorm`` (``stats_mode=""``) over one GPU per
    canvas: the equal-weight averages of each canvas's mean and mean square, var = E[x^2] - E[x]^2.
    Written as mean of the canvas variances plus the variance of the canvas means (the same number,
    without the cancellation); differentiable, as Detectron2's all-reduce is."""
    variances, means = zip(*(torch.var_mean(x[a:b, :, :h, :w], dim=(0, 2, 3), unbiased=False)
                             for a, b, h, w in canvases))
    means, variances = torch.stack(means), torch.stack(variances)
    mean = means.mean(0)
    return mean, variances.mean(0) + (means - mean).pow(2).mean(0)


class VirtualSyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that trains as Detectron2's ``NaiveSyncBatchNorm`` over virtual GPUs (module doc).

    In training, the statistics are :func:`canvas_statistics` over ``layout``'s canvases at this
    layer's feature size; without a layout, or outside a recorded forward, over the whole batch as
    one group (plain BatchNorm's statistics). The running mean and variance follow them with
    ``momentum`` (the variance without Bessel's factor, as ``NaiveSyncBatchNorm``'s), so Precise BN
    (fvcore's ``update_bn_stats``, momentum 1) averages the same statistics. In evaluation it is
    ``nn.BatchNorm2d`` on the running statistics. The C4 box head's norms (res5 and MoCo's extra norm,
    on 14 x 14 RoI features without padding) have no layout: statistics over all RoIs, which is what
    SyncBN over all RoIs gives, up to ``NaiveSyncBatchNorm``'s equal weight per GPU (the same when
    every image gives the same number of sampled RoIs).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 layout: BatchLayout | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.layout = layout

    @classmethod
    def convert(cls, module: nn.Module, layout: BatchLayout | None) -> nn.Module:
        """Replace every ``nn.BatchNorm2d`` of ``module`` (not already converted, not frozen) by one
        with the same parameters and buffers reading ``layout``; returns the module."""
        if type(module) is nn.BatchNorm2d:
            converted = cls(module.num_features, module.eps, module.momentum, layout)
            converted.load_state_dict(module.state_dict())
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
            converted.train(module.training)
            return converted
        for name, child in module.named_children():
            replaced = cls.convert(child, layout)
            if replaced is not child:
                setattr(module, name, replaced)
        return module

    def _canvases(self, x: Tensor) -> list[tuple[int, int, int, int]]:
        layout = self.layout
        if layout is None or layout.image_sizes is None:
            return [(0, x.shape[0], x.shape[-2], x.shape[-1])]
        if len(layout.image_sizes) != x.shape[0]:
            raise RuntimeError(f"{type(self).__name__}: a batch of {x.shape[0]} feature maps, but the recorded "
                               f"layout has {len(layout.image_sizes)} images")
        return layout.canvases((x.shape[-2], x.shape[-1]))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        mean, var = canvas_statistics(x, self._canvases(x))
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        with torch.no_grad():
            self.num_batches_tracked += 1
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(var.detach(), factor)
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


def attach_virtual_sync(model: GeneralizedRCNN, size_divisibility: int) -> GeneralizedRCNN:
    """Make ``model``'s BatchNorm2d layers :class:`VirtualSyncBatchNorm2d`: those of ``model.backbone``
    (they see padded images: the stem and res2-res4 for C4, the ResNet body for FPN) read one
    :class:`BatchLayout` that ``model.transform`` fills on each forward and ``model.backbone`` clears
    after its own; the others (the C4 box head) get no layout. Returns the model."""
    layout = BatchLayout(size_divisibility)
    VirtualSyncBatchNorm2d.convert(model.backbone, layout)
    VirtualSyncBatchNorm2d.convert(model, None)
    model.transform.register_forward_hook(layout.record)
    model.backbone.register_forward_hook(layout.clear)
    return model
