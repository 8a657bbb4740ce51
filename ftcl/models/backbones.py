"""ResNet backbones (torchvision's blocks) with a width knob and a small-image stem.

Module names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so a
pretrained state dict maps one-to-one onto torchvision models (e.g. a Faster R-CNN backbone).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ftcl.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")


class ScalableResNet(ResNet):
    """torchvision ResNet whose stage widths are ``width * (1, 2, 4, 8)`` and ``fc`` is removed.

    ``width=64`` is the standard network. ``small_stem`` replaces the 7x7/2 conv and the max-pool
    by a 3x3/1 conv (as for CIFAR-sized inputs). ``out_dim`` is the pooled feature width.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        width: int = 64,
        small_stem: bool = False,
        in_channels: int = 3,
    ):
        super().__init__(block, layers)
        self.inplanes = width
        if small_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.fc = nn.Identity()
        self.out_dim = width * 8 * block.expansion
        for m in self.modules():  # torchvision's initialisation, re-applied to the rebuilt layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)


@BACKBONES.register("resnet18")
def resnet18(width: int = 64, small_stem: bool = False, in_channels: int = 3) -> ScalableResNet:
    return ScalableResNet(BasicBlock, [2, 2, 2, 2], width, small_stem, in_channels)


@BACKBONES.register("resnet50")
def resnet50(width: int = 64, small_stem: bool = False, in_channels: int = 3) -> ScalableResNet:
    return ScalableResNet(Bottleneck, [3, 4, 6, 3], width, small_stem, in_channels)


def build_backbone(name: str, width: int, small_stem: bool, in_channels: int) -> ScalableResNet:
    """The backbone ``name`` (``model.backbone``) with ``model.width`` and ``model.small_stem``."""
    return BACKBONES.get(name)(width=int(width), small_stem=bool(small_stem), in_channels=int(in_channels))
