"""Accuracy over training (eval.monitor): the kNN curve of a pretraining, which changes nothing the
training does, continues across a resume without repeating or losing an epoch, and reaches MLflow."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import smoke_cfg

from ftcl import checkpoint as ckpt
from ftcl.monitor import MONITOR_FILE, due, read_curve
from ftcl.train import pretrain

EPOCHS = 3


def cfg(**overrides):
    return smoke_cfg(**{"optim.epochs": EPOCHS, "deterministic.enabled": True, "deterministic.threads": 1,
                        **overrides})


def test_due_epochs_are_the_initialisation_every_nth_and_the_last():
    assert [e for e in range(8) if due(e, 7, 3)] == [0, 3, 6, 7]
    assert not any(due(e, 7, 0) for e in range(8))


def test_the_monitor_changes_nothing_the_training_does(tmp_path):
    pretrain(cfg(), tmp_path / "off", echo=lambda *_: None)
    pretrain(cfg(**{"eval.monitor.every": 1}), tmp_path / "on", echo=lambda *_: None)
    off, on = (ckpt.load(tmp_path / name / "checkpoints" / "last.pt") for name in ("off", "on"))
    for key, value in off["method"].items():
        assert torch.equal(value, on["method"][key]), key
    assert not (tmp_path / "off" / MONITOR_FILE).exists()
    curve = read_curve(tmp_path / "on")
    assert [c["epoch"] for c in curve] == list(range(EPOCHS + 1))
    assert all(0.0 <= c["knn_top1"] <= 100.0 for c in curve)
    assert json.loads((tmp_path / "on" / "pretrain.json").read_text())["monitor/knn_top1"] == curve[-1]["knn_top1"]


def test_a_resumed_run_continues_the_curve_without_repeating_or_losing_an_epoch(tmp_path, monkeypatch):
    on = cfg(**{"eval.monitor.every": 1})
    pretrain(on, tmp_path / "whole", echo=lambda *_: None)

    real_save = ckpt.save_epoch

    def save_then_die(state, *args, **kwargs):
        real_save(state, *args, **kwargs)
        if state["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint, before its curve file
    monkeypatch.setattr(ckpt, "save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(on, tmp_path / "resumed", echo=lambda *_: None)
    assert [c["epoch"] for c in read_curve(tmp_path / "resumed")] == [0, 1]  # the file lags the checkpoint
    monkeypatch.setattr(ckpt, "save_epoch", real_save)
    pretrain(on, tmp_path / "resumed", echo=lambda *_: None)
    assert read_curve(tmp_path / "resumed") == read_curve(tmp_path / "whole")


def test_the_curve_is_logged_with_the_epoch_as_step(tmp_path):
    class Recorder:
        def __init__(self):
            self.points = []

        def log_params(self, params):
            pass

        def log_metrics(self, metrics, step=None):
            if "monitor/knn_top1" in metrics:
                self.points.append((step, metrics["monitor/knn_top1"]))

        def log_artifact(self, path, artifact_path=None):
            pass

    logger = Recorder()
    pretrain(cfg(**{"eval.monitor.every": 2}), tmp_path, logger, echo=lambda *_: None)
    assert logger.points == [(c["epoch"], c["knn_top1"]) for c in read_curve(tmp_path)]
    assert [step for step, _ in logger.points] == [0, 2, 3]
