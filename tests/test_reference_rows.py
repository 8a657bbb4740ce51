"""The floor and ceiling rows every table can compare with: a randomly initialised backbone
(``optim.epochs: 0``, evaluated like any other) and the same backbone trained with labels
(``method.name: supervised``)."""

import pandas as pd
import pytest
import torch

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.errors import ConfigError
from ftcl.evaluate import knn_eval
from ftcl.methods import build_method
from ftcl.methods.base import METHODS
from ftcl.models.backbones import build_backbone
from ftcl.train import pretrain
from tests.helpers import smoke_cfg


def _weights(folder) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in ckpt.load(folder / "checkpoints" / "last.pt")["backbone"].values()])


def test_zero_epochs_saves_the_seeded_random_initialisation_and_trains_nothing(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        pretrain(smoke_cfg(**{"optim.epochs": 0, "seed": seed}), tmp_path / name, echo=lambda *_: None)
        runs[name] = _weights(tmp_path / name)
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])  # seeded
    state = ckpt.load(tmp_path / "a" / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["iteration"] == 0
    assert not (tmp_path / "a" / "scores").exists()
    assert (tmp_path / "a" / "pretrain.json").is_file()
    torch.manual_seed(0)  # the same draw as the pretraining stage: seed, then the views, then the backbone
    backbone, _ = ckpt.load_backbone(tmp_path / "a")
    knn = knn_eval(backbone, smoke_cfg(**{"eval.knn.k": 10}), torch.device("cpu"))
    assert 0 <= knn["top1"] <= 100


def test_the_supervised_row_trains_the_backbone_with_labels(tmp_path):
    cfg = smoke_cfg(**{"method.name": "supervised", "optim.epochs": 3, "optim.lr_per_256": 0.4,
                       "data.train_subset": None})
    pretrain(cfg, tmp_path, echo=lambda *_: None)
    stats = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "scores").glob("epoch_*.parquet")))
    per_epoch = stats.groupby("epoch")["loss"].mean()
    assert per_epoch.iloc[-1] < per_epoch.iloc[0] - 0.3, per_epoch.to_dict()  # cross-entropy falls
    backbone, _ = ckpt.load_backbone(tmp_path)
    knn = knn_eval(backbone, smoke_cfg(**{"eval.knn.k": 10}), torch.device("cpu"))
    assert knn["top1"] > 60  # 10 digit classes: chance is 10 %


def test_the_supervised_row_refuses_what_it_cannot_do():
    with pytest.raises(ConfigError, match="hsg.enabled"):  # checked when the config is resolved
        config.resolve(overrides={"method.name": "supervised", "hsg.enabled": True, "data.dataset": "digits"})
    with pytest.raises(ConfigError, match="labelled training set"):
        build_method(config.resolve(overrides={"method.name": "supervised"}), build_backbone("resnet18", 8, True, 1),
                     bn_splits=1)


def test_every_registered_method_is_in_the_schema_and_back():
    schema = config.schema()["properties"]["method"]["properties"]["name"]["enum"]
    assert sorted(schema) == sorted(METHODS.names())
