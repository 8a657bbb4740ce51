"""kNN and linear-probe building blocks on cases with known answers."""

import pytest
import torch

from ftcl import config
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
    cfg = config.resolve(overrides={"eval.linear.epochs": 10, "eval.linear.batch_size": 32, "eval.linear.lr": 0.5,
                                    "eval.linear.schedule": "cosine"}).eval.linear
    batches = feature_batches(x, y, 32, torch.Generator().manual_seed(0))
    clf = train_linear(batches, 5, 2, cfg, torch.device("cpu"), echo=lambda *_: None)
    assert topk_accuracy(clf(x), y)["top1"] > 99


def test_linear_result_reports_the_configured_epoch_and_records_both():
    """MoCo's main_lincls.py reports the best validation top-1 over epochs; the last epoch is the other
    choice. Both are recorded; ``top1`` is the one ``eval.linear.report`` names."""
    from ftcl.evaluate import linear_result

    curve = [{"top1": 50.0, "top5": 80.0}, {"top1": 70.0, "top5": 90.0}, {"top1": 65.0, "top5": 95.0}]
    best = linear_result(curve, "best")
    assert (best["top1"], best["top5"], best["best_epoch"]) == (70.0, 90.0, 2)
    assert (best["top1_last"], best["top5_last"], best["top1_best"], best["top5_best"]) == (65.0, 95.0, 70.0, 90.0)
    last = linear_result(curve, "last")
    assert (last["top1"], last["top5"]) == (65.0, 95.0)
    assert last["top1_curve"] == [50.0, 70.0, 65.0]
    with pytest.raises(ValueError, match="report"):
        linear_result(curve, "median")


def test_linear_probe_evaluates_every_epoch_and_says_which_epoch_it_reports():
    from ftcl.evaluate import linear_probe
    from ftcl.models.backbones import build_backbone

    cfg = config.resolve(overrides={"data.dataset": "digits", "model.width": 8, "model.small_stem": True,
                                    "eval.linear.epochs": 3, "eval.linear.lr": 1.0, "eval.linear.report": "best"})
    torch.manual_seed(0)
    result = linear_probe(build_backbone("resnet18", 8, True, 1), cfg, torch.device("cpu"), echo=lambda *_: None)
    assert len(result["top1_curve"]) == 3
    assert result["top1"] == result["top1_best"] == max(result["top1_curve"])
    assert result["top1_last"] == result["top1_curve"][-1]
    assert result["protocol"]["report"] == "best"
