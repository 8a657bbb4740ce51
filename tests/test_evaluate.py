"""kNN and linear-probe building blocks on cases with known answers."""

import pytest
import torch

from ftcl.evaluate import feature_batches, knn_predict, topk_accuracy, train_linear


def test_weighted_knn_votes_with_exp_similarity():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    scores = knn_predict(train, labels, test, num_classes=2, k=2, temperature=0.1)
    assert scores.argmax(1).tolist() == [0, 1]
    t = torch.nn.functional.normalize
    s = t(test, dim=1) @ t(train, dim=1).T
    assert scores[0, 0].item() == pytest.approx(((s[0, 0] / 0.1).exp() + (s[0, 1] / 0.1).exp()).item(), rel=1e-5)


def test_topk_accuracy_skips_top5_for_few_classes():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert topk_accuracy(scores, torch.tensor([1, 1])) == {"top1": 50.0}


def test_linear_probe_separates_separable_features():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(100, 5) + 3, torch.randn(100, 5) - 3])
    y = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    cfg = {"epochs": 10, "batch_size": 32, "lr": 0.5, "momentum": 0.9, "weight_decay": 0.0,
           "schedule": "cosine", "milestones": []}
    batches = feature_batches(x, y, 32, torch.Generator().manual_seed(0))
    clf = train_linear(batches, 5, 2, cfg, torch.device("cpu"), echo=lambda *_: None)
    assert topk_accuracy(clf(x), y)["top1"] > 99
