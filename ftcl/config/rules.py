"""The rules that involve several keys (the schema checks each key alone), checked once, when a run
config is resolved (:func:`ftcl.config.resolve`): while Snakemake plans, for the process count the
launcher will give the stage, or when ``ftcl pretrain --config`` starts by hand.

The batch: ``optim.batch_size`` is the whole job's batch (MoCo's ``main_moco.py`` and the FT code
divide it among the processes); each of ``world`` processes draws ``batch_size / world`` images and
normalises them in ``bn_splits`` BatchNorm sub-batches (:class:`BatchLayout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ftcl.config.types import RunConfig
from ftcl.constants import DETECTION, PRETRAIN, STAGES
from ftcl.errors import ConfigError

#: sub-batches of a split BatchNorm when a key-shuffling method runs in one process (MoCo's
#: single-GPU CIFAR-10 recipe: ``--bn-splits 8``)
SINGLE_PROCESS_BN_SPLITS = 8
#: methods that compute keys with Shuffle-BN (``method.shuffle_bn``); ``tests/test_config.py``
#: checks this against the methods' own ``shuffles_keys``
KEY_SHUFFLING_METHODS = ("moco",)
#: methods that train without feature augmentation and hard sample generation (the supervised reference)
WITHOUT_FA_HSG = ("supervised",)
#: FPN levels of the detector (P2-P6): one anchor size each
FPN_LEVELS = 5
#: methods with a queue of negatives (``fa.interpolate.source: queue`` needs one)
QUEUE_METHODS = ("moco",)


@dataclass(frozen=True)
class BatchLayout:
    """How a step's batch is spread over ``world`` processes and, within each, over ``bn_splits``
    BatchNorm sub-batches (module docstring)."""

    global_batch: int
    per_process: int
    world: int
    bn_splits: int

    def params(self) -> dict[str, int]:
        """What a run records about its batch (MLflow params, ``pretrain.json``)."""
        return {"batch/global": self.global_batch, "batch/per_process": self.per_process,
                "batch/world": self.world, "batch/bn_splits": self.bn_splits}


def bn_splits(cfg: RunConfig, world: int) -> int:
    """``method.bn_splits``, or for ``null``: :data:`SINGLE_PROCESS_BN_SPLITS` for a key-shuffling
    method with ``shuffle_bn`` in one process (a query and its key never share BatchNorm statistics),
    else 1 (under DDP the key batch is shuffled across processes instead, MoCo Sec. 3.3; BYOL and
    SimSiam have no negatives to cheat with and their papers use plain, synchronised BatchNorm)."""
    m = cfg.method
    if m.bn_splits is not None:
        return m.bn_splits
    return SINGLE_PROCESS_BN_SPLITS if m.name in KEY_SHUFFLING_METHODS and m.shuffle_bn and world == 1 else 1


def batch_layout(cfg: RunConfig, world: int = 1) -> BatchLayout:
    """The :class:`BatchLayout` of a resolved ``cfg`` on ``world`` processes (arithmetic only: the
    config was checked for this ``world`` when it was resolved, :func:`check_batch`)."""
    per_process = cfg.optim.batch_size // world
    return BatchLayout(cfg.optim.batch_size, per_process, world, bn_splits(cfg, world))


def check_batch(cfg: RunConfig, world: int = 1) -> BatchLayout:
    """``ConfigError`` when the global batch does not divide among the ``world`` processes, or the
    per-process batch among the BN sub-batches, or when ``method.shuffle_bn`` asks for a Shuffle-BN
    that cannot happen (one process, one sub-batch); else the layout."""
    batch, method = cfg.optim.batch_size, cfg.method
    if batch % world:
        raise ConfigError(
            f"key 'optim.batch_size' is {batch}, the whole job's batch, which {world} processes cannot share "
            f"equally; use a multiple of {world}"
        )
    layout = batch_layout(cfg, world)
    per_process, splits = layout.per_process, layout.bn_splits
    if per_process % splits:
        raise ConfigError(
            f"key 'method.bn_splits' is {splits}{' (auto)' if method.bn_splits is None else ''}, which does "
            f"not divide the per-process batch {per_process} (optim.batch_size {batch} / {world} process(es)); "
            "choose a batch that is a multiple of it, or set method.bn_splits to a divisor"
        )
    if per_process // splits < 2:
        raise ConfigError(
            f"key 'method.bn_splits' is {splits}: sub-batches of {per_process // splits} image(s) of the per-process "
            f"batch {per_process}; a BatchNorm needs at least 2, so raise optim.batch_size or lower method.bn_splits"
        )
    if method.name in KEY_SHUFFLING_METHODS and method.shuffle_bn and world == 1 and splits == 1:
        raise ConfigError(
            "key 'method.shuffle_bn' is true but key 'method.bn_splits' is 1 in a single process: no key can be "
            "normalised apart from its query. Set method.bn_splits >= 2 (null = 8), or method.shuffle_bn: false "
            "to train without Shuffle-BN knowingly"
        )
    return layout


def check(cfg: RunConfig, world: int = 1, stages: Sequence[str] = STAGES) -> BatchLayout:
    """Every cross-key rule of ``cfg`` that the ``stages`` to run involve, for a pretraining on ``world``
    processes (the other stages run as one process); returns the pretraining's batch layout."""
    layout = check_batch(cfg, world if PRETRAIN in stages else 1)
    if cfg.method.name in WITHOUT_FA_HSG:
        for section, on in (("fa", cfg.fa.enabled), ("hsg", cfg.hsg.enabled)):
            if on:
                raise ConfigError(f"key '{section}.enabled' is true, but method.name {cfg.method.name!r} (the "
                                  "reference row) trains with labels only; turn it off for this row")
    fa = cfg.fa
    if fa.enabled and fa.operator == "interpolate" and fa.interpolate.source == "queue" \
            and cfg.method.name not in QUEUE_METHODS:
        raise ConfigError(f"key 'fa.interpolate.source' is 'queue', but method.name {cfg.method.name!r} has no queue; "
                          "use 'batch'")
    if cfg.scores.range is not None and not cfg.scores.range[0] < cfg.scores.range[1]:
        raise ConfigError(f"key 'scores.range' is {list(cfg.scores.range)}; it must be [low, high] with low < high")
    det = cfg.detection
    if DETECTION not in stages:
        return layout
    if det.head == "fpn" and len(det.anchor_sizes) != FPN_LEVELS:
        raise ConfigError(f"key 'detection.anchor_sizes' has {len(det.anchor_sizes)} sizes; the fpn head needs one "
                          f"per level ({FPN_LEVELS})")
    if det.dataset == "coco":
        missing = [k for k in ("train_json", "train_images", "test_json", "test_images")
                   if not getattr(det.coco, k)]
        if missing:
            raise ConfigError(f"detection.dataset needs {', '.join(f'detection.coco.{k}' for k in missing)}")
    if det.init == "supervised" and det.supervised_weights is None:
        raise ConfigError("detection.init=supervised needs detection.supervised_weights: a local torchvision "
                          "ResNet-50 ImageNet state dict file (nothing is downloaded)")
    return layout
