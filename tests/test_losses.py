"""The losses of ftcl's methods (ftcl/losses.py) on hand-computed cases; InfoNCE and its multi-positive
form are also checked in tests/test_moco.py and tests/test_fa.py."""

import math

import pytest
import torch

from ftcl.losses import byol_distance, cosine, info_nce, simsiam_distance, weighted_mean


def test_cosine_is_the_row_wise_cosine_whatever_the_norms():
    a = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert cosine(a, b).tolist() == pytest.approx([0.0, 1.0])


def test_byol_distance_is_the_squared_distance_of_unit_vectors():
    cos = torch.tensor([1.0, 0.0, -1.0])
    assert byol_distance(cos).item() == pytest.approx((0 + 2 + 4) / 3)


def test_simsiam_distance_is_minus_half_the_mean_cosine():
    assert simsiam_distance(torch.tensor([1.0, 0.5])).item() == pytest.approx(-0.375)


def test_weighted_mean_keeps_the_scale_of_the_loss():
    assert weighted_mean(torch.tensor(2.0), torch.tensor(2.0), 3.0).item() == pytest.approx(2.0)
    assert weighted_mean(torch.tensor(1.0), torch.tensor(4.0), 1.0).item() == pytest.approx(2.5)


def test_info_nce_of_one_positive_and_one_negative():
    loss = info_nce(torch.tensor([0.5]), torch.tensor([[0.0]]), 0.5)
    assert loss.item() == pytest.approx(-math.log(math.exp(1.0) / (math.exp(1.0) + 1.0)))
