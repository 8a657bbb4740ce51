"""benchmarks/bench.py: the speed-of-light reference is a standard supervised step (one view: one
forward and backward pass of the batch), not the ceiling row's two-view step, which does about twice
the work and would make the "MoCo + FT >= 0.7 of supervised" goal meet itself."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench import OneViewSupervised  # noqa: E402


class CountingBackbone(nn.Module):
    out_dim = 8

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.conv(x).mean(dim=(2, 3))


def test_the_reference_step_trains_on_one_view_of_the_batch():
    backbone = CountingBackbone()
    method = OneViewSupervised(backbone, num_classes=5)
    view1, view2 = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    labels = torch.arange(6) % 5
    out = method.training_step(view1, view2, 0, labels)
    out.loss.backward()
    assert backbone.images == 6  # the batch once (the ceiling row's step: 12)
    expected = nn.functional.cross_entropy(method.classifier(backbone(view1)), labels)
    assert torch.allclose(out.loss, expected)
    assert backbone.conv.weight.grad is not None
