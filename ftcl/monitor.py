"""Accuracy over training (``eval.monitor``): the weighted kNN top-1 of the backbone being pretrained,
at the initialisation and every few epochs, as MoCo's CIFAR notebook monitors its training.

The backbone is evaluated in eval mode on the test split against the training split (the kNN of
:mod:`ftcl.evaluate`, with the monitor's own ``k`` and temperature), then put back in the mode it
was in. The evaluation draws no random numbers from the training's generators (it runs inside
:func:`torch.random.fork_rng`), so a run trains bit for bit the same with the monitor on or off.
The curve lives in each checkpoint, so a resumed run continues it without repeating or losing an
epoch, and in ``<pretrain>/monitor.json`` (:data:`MONITOR_FILE`), which aggregation plots.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ftcl.config.types import Data, MonitorEval
from ftcl.evaluate import extract_features, knn_predict, topk_accuracy
from ftcl.files import write_json

MONITOR_FILE = "monitor.json"
METRIC = "monitor/knn_top1"


def due(epoch: int, epochs: int, every: int) -> bool:
    """Whether the monitor evaluates after ``epoch`` epochs (0: the initialisation) of ``epochs``."""
    return every > 0 and (epoch == 0 or epoch % every == 0 or epoch == epochs)


class KnnMonitor:
    """kNN top-1 (%) of a backbone on ``data``'s test split against its training split."""

    def __init__(self, data: Data, section: MonitorEval, batch_size: int, device: torch.device):
        from ftcl.data.datasets import build_dataset

        with torch.random.fork_rng(devices=[]):
            self.train = build_dataset(data, "train", "eval")
            self.test = build_dataset(data, "test", "eval")
        self.k, self.temperature, self.batch_size, self.device = section.k, section.temperature, batch_size, device

    def __call__(self, backbone: nn.Module) -> float:
        was_training = backbone.training
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                train_x, train_y = extract_features(backbone, self.train, self.device, self.batch_size)
                test_x, test_y = extract_features(backbone, self.test, self.device, self.batch_size)
                scores = knn_predict(train_x, train_y, test_x, self.train.num_classes, self.k, self.temperature)
                return topk_accuracy(scores, test_y, ks=(1,))["top1"]
        finally:
            backbone.train(was_training)


def write_curve(out_dir: str | Path, curve: list[dict]) -> None:
    """``monitor.json``: ``{"metric", "curve": [{"epoch", "knn_top1"}, ...]}`` (atomic)."""
    write_json(Path(out_dir) / MONITOR_FILE, {"metric": METRIC, "curve": curve})


def read_curve(out_dir: str | Path) -> list[dict]:
    """The curve of a pretraining folder (empty when it has none)."""
    path = Path(out_dir) / MONITOR_FILE
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("curve", []))
