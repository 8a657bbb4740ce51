"""Evaluation of frozen pretrained features: weighted kNN and the linear probe.

kNN (Wu et al., CVPR 2018, Sec. 3.4): cosine similarity to the training features; each of the k
nearest neighbours votes for its class with weight exp(s / T).
Linear probe (MoCo protocol): a linear classifier on frozen, pooled backbone features, SGD with
lr 30, weight decay 0, cosine or step schedule; either on precomputed features (no augmentation,
fast) or on RandomResizedCrop + flip views recomputed every epoch (the paper's protocol). The test
set is evaluated after every epoch, as MoCo's ``main_lincls.py`` validates; the result holds the
last and the best epoch's accuracy and reports the one ``eval.linear.report`` names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ftcl.config import RunConfig
from ftcl.config.types import LinearEval
from ftcl.data.datasets import build_dataset
from ftcl.data.views import eval_aug_batch, normalize
from ftcl.files import write_json
from ftcl.schedules import linear_probe_lr


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, device: torch.device, batch_size: int = 512,
                     num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """Pooled backbone features (N x D, float32, on ``device``) and labels of ``dataset``."""
    backbone.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", collate_fn=dataset.collate)
    feats, labels = [], []
    for images, y in loader:
        x = normalize(images.to(device, non_blocking=True), dataset.mean, dataset.std)
        feats.append(backbone(x).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def knn_predict(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> Tensor:
    """Class scores (N_test x C) of the weighted kNN classifier.

    score_c(x) = sum over the k most cosine-similar training features f_i with label c of
    exp(cos(x, f_i) / T). Features are L2-normalised here; ``k`` is capped at the training size.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise ValueError("train_feats and train_labels differ in length")
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats, dim=1)
    out = []
    for start in range(0, test_feats.shape[0], chunk):
        sim = F.normalize(test_feats[start : start + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy in percent for each k below the number of classes (top-1 always)."""
    result = {}
    for k in ks:
        if k == 1 or k < scores.shape[1]:
            hit = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
            result[f"top{k}"] = 100.0 * hit.float().mean().item()
    return result


def feature_batches(features: Tensor, labels: Tensor, batch_size: int, gen: torch.Generator):
    """A per-epoch factory of shuffled mini-batches of precomputed features."""

    def epoch_batches(_epoch: int):
        perm = torch.randperm(labels.shape[0], generator=gen).to(labels.device)
        for start in range(0, labels.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            yield features[idx], labels[idx]

    return epoch_batches


def train_linear(batches, in_dim: int, num_classes: int, ecfg: LinearEval, device: torch.device,
                 echo=print, seed: int = 0, on_epoch: Callable[[int, nn.Linear], None] | None = None) -> nn.Linear:
    """Fit a linear classifier with SGD + momentum (MoCo's linear protocol).

    ``batches(epoch)`` yields ``(features, labels)`` mini-batches for one epoch: precomputed
    features (``feature_batches``) or features of freshly augmented views. ``on_epoch(epoch, clf)``
    runs after every epoch (the validation of MoCo's ``main_lincls.py``).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    clf = nn.Linear(in_dim, num_classes).to(device)
    with torch.no_grad():
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) * 0.01)
        clf.bias.zero_()
    opt = torch.optim.SGD(clf.parameters(), lr=ecfg.lr, momentum=ecfg.momentum, weight_decay=ecfg.weight_decay)
    for epoch in range(ecfg.epochs):
        for g in opt.param_groups:
            g["lr"] = linear_probe_lr(ecfg, epoch)
        total, n, t0 = torch.zeros((), device=device), 0, time.perf_counter()
        for x, y in batches(epoch):
            loss = F.cross_entropy(clf(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * y.shape[0]
            n += y.shape[0]
        if on_epoch is not None:
            on_epoch(epoch, clf)
        if (epoch + 1) % max(1, ecfg.epochs // 10) == 0 or epoch + 1 == ecfg.epochs:
            echo(f"[linear] epoch {epoch + 1}/{ecfg.epochs} loss {total.item() / max(n, 1):.4f} "
                 f"lr {opt.param_groups[0]['lr']:.4g} ({time.perf_counter() - t0:.1f} s)")
    return clf


#: which epoch's accuracy a linear probe reports (``eval.linear.report``)
LINEAR_REPORTS = ("last", "best")


def linear_result(curve: Sequence[Mapping[str, float]], report: str) -> dict:
    """The linear probe's result from its per-epoch test accuracies ``curve`` (``{"top1", "top5"}``
    per epoch): both the last epoch's and the best epoch's (highest top-1; MoCo's ``main_lincls.py``
    reports this ``best_acc1``, with the top-5 of that epoch here), and as ``top1`` / ``top5`` the one
    ``report`` names. ``best_epoch`` counts from 1."""
    if report not in LINEAR_REPORTS:
        raise ValueError(f"eval.linear.report {report!r} is not one of {LINEAR_REPORTS}")
    best = max(range(len(curve)), key=lambda e: curve[e]["top1"])  # the first epoch of the highest top-1
    chosen = {"last": curve[-1], "best": curve[best]}[report]
    result = {k: v for k, v in chosen.items() if k.startswith("top")}
    for name, epoch in (("last", curve[-1]), ("best", curve[best])):
        result.update({f"{k}_{name}": v for k, v in epoch.items() if k.startswith("top")})
    return {**result, "best_epoch": best + 1, "top1_curve": [e["top1"] for e in curve]}


def _augmented_batches(backbone: nn.Module, dataset, ecfg: LinearEval, device: torch.device, num_workers: int):
    """Per-epoch batches of features of RandomResizedCrop + flip views (the paper's protocol)."""
    loader = DataLoader(dataset, batch_size=ecfg.batch_size, shuffle=True, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                        collate_fn=dataset.collate)

    def epoch_batches(_epoch: int):
        backbone.eval()
        for images, y in loader:
            images = images.to(device, non_blocking=True)
            if dataset.crops_on_device:
                x = eval_aug_batch(images, dataset.image_size, dataset.mean, dataset.std, ecfg.crop_scale)
            else:
                x = normalize(images, dataset.mean, dataset.std)
            with torch.no_grad():
                feats = backbone(x).float()
            yield feats, y.to(device)

    return epoch_batches


def linear_probe(backbone: nn.Module, cfg: RunConfig, device: torch.device, echo=print) -> dict:
    """Linear evaluation of ``backbone`` on ``cfg``'s dataset; returns accuracies and the protocol."""
    ecfg = cfg.eval.linear
    workers = cfg.data.num_workers
    test = build_dataset(cfg.data, "test", "eval")
    test_x, test_y = extract_features(backbone, test, device, num_workers=workers)
    gen = torch.Generator().manual_seed(cfg.seed)
    if ecfg.augment:
        train = build_dataset(cfg.data, "train", "eval_aug", crop_scale=ecfg.crop_scale)
        batches = _augmented_batches(backbone, train, ecfg, device, workers)
    else:
        train = build_dataset(cfg.data, "train", "eval")
        train_x, train_y = extract_features(backbone, train, device, num_workers=workers)
        batches = feature_batches(train_x, train_y, ecfg.batch_size, gen)
    curve: list[dict[str, float]] = []

    def validate(_epoch: int, clf: nn.Linear) -> None:
        with torch.no_grad():
            curve.append(topk_accuracy(clf(test_x), test_y))

    train_linear(batches, test_x.shape[1], train.num_classes, ecfg, device, echo, cfg.seed, on_epoch=validate)
    protocol = {"kind": "linear", "epochs": ecfg.epochs, "lr": ecfg.lr, "schedule": ecfg.schedule,
                "report": ecfg.report,
                "milestones": list(ecfg.milestones) if ecfg.schedule == "step" else None,
                "weight_decay": ecfg.weight_decay, "batch_size": ecfg.batch_size,
                "augment": ecfg.augment, "crop_scale": list(ecfg.crop_scale) if ecfg.augment else None,
                "features": "frozen pooled backbone",
                "train_images": len(train), "test_images": len(test)}
    return {**linear_result(curve, ecfg.report), "protocol": protocol}


def knn_eval(backbone: nn.Module, cfg: RunConfig, device: torch.device) -> dict:
    """Weighted kNN accuracy of ``backbone``'s features on ``cfg``'s dataset."""
    kcfg = cfg.eval.knn
    train = build_dataset(cfg.data, "train", "eval")
    test = build_dataset(cfg.data, "test", "eval")
    train_x, train_y = extract_features(backbone, train, device, kcfg.batch_size)
    test_x, test_y = extract_features(backbone, test, device, kcfg.batch_size)
    scores = knn_predict(train_x, train_y, test_x, train.num_classes, kcfg.k, kcfg.temperature)
    protocol = {"kind": "knn", "k": min(kcfg.k, len(train)), "temperature": kcfg.temperature,
                "similarity": "cosine", "train_images": len(train), "test_images": len(test)}
    return {**topk_accuracy(scores, test_y), "protocol": protocol}


def write_result(result: Mapping, path: Path) -> None:
    """Write a stage's result JSON atomically."""
    write_json(path, result)
