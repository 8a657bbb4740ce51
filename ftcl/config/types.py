"""The run config as frozen, typed dataclasses: what stages, methods and transforms read.

One class per object of the JSON schema (``ftcl/resources/config.schema.yaml``), field for field
(``tests/test_config.py`` checks that they agree); the defaults live in one place,
``ftcl/resources/defaults.yaml``, so no field has a default here. :func:`from_dict` builds a
:class:`RunConfig` from a validated mapping (lists become tuples, integers in float fields floats);
:func:`to_dict` gives the mapping back (for YAML, digests and MLflow params).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Deterministic:
    """``deterministic``: bit-identical reruns on one machine (:func:`ftcl.runtime.apply_determinism`)."""

    enabled: bool
    threads: int

@dataclass(frozen=True)
class Data:
    """``data``: the training and evaluation images (:func:`ftcl.data.datasets.build_dataset`)."""

    dataset: str
    root: str | None
    image_size: int | None
    train_subset: int | None
    test_subset: int | None
    class_list: str | None
    decode: str
    num_workers: int

@dataclass(frozen=True)
class Augment:
    """``augment``: the two-view augmentation (:class:`ftcl.data.views.TwoViews`)."""

    preset: str
    crop_scale: tuple[float, ...]

@dataclass(frozen=True)
class Model:
    """``model``: backbone and projection head."""

    backbone: str
    width: int
    small_stem: bool
    head: str
    feature_dim: int
    hidden_dim: int | None

@dataclass(frozen=True)
class Method:
    """``method``: the self-supervised method and its MoCo / BYOL / SimSiam settings."""

    name: str
    temperature: float
    queue_size: int
    momentum: float
    shuffle_bn: bool
    bn_splits: int | None
    predictor_hidden_dim: int | None

@dataclass(frozen=True)
class FTSide:
    """``ft.positive`` / ``ft.negative``: one side of the feature transformation."""

    mode: str
    distribution: str
    alpha: float
    granularity: str
    renormalize: bool

@dataclass(frozen=True)
class FT:
    """``ft``: feature transformation (Zhu et al., ICCV 2021; :mod:`ftcl.transforms.ft`)."""

    start_epoch: int
    positive: FTSide
    negative: FTSide

@dataclass(frozen=True)
class FAGaussian:
    """``fa.gaussian``."""

    sigma: float

@dataclass(frozen=True)
class FAInterpolate:
    """``fa.interpolate``."""

    source: str
    partner: str
    lambda_min: float

@dataclass(frozen=True)
class FAMLP:
    """``fa.mlp``."""

    hidden_dim: int | None
    noise_dim: int
    scale: float
    adversarial: bool

@dataclass(frozen=True)
class FAMoCo:
    """``fa.moco``."""

    positives: bool
    negatives: bool
    positive_source: str

@dataclass(frozen=True)
class FA:
    """``fa``: feature augmentation (Zhang, Zhu et al. 2024; :mod:`ftcl.transforms.fa`)."""

    enabled: bool
    operator: str
    copies: int
    stop_gradient: bool
    renormalize: bool
    weight: float
    placement: str
    gaussian: FAGaussian
    interpolate: FAInterpolate
    mlp: FAMLP
    moco: FAMoCo

@dataclass(frozen=True)
class HSGGenerator:
    """``hsg.generator``."""

    width: int
    noise_dim: int
    stages: int | None
    epsilon: float

@dataclass(frozen=True)
class HSGPair:
    """``hsg.pair``."""

    mode: str
    similarity_start: float
    similarity_end: float
    schedule: str
    penalty_weight: float

@dataclass(frozen=True)
class HSG:
    """``hsg``: hard sample generation (Wu et al. 2022; :mod:`ftcl.transforms.hsg`)."""

    enabled: bool
    fraction: float
    weight: float
    adversarial_scale: float
    generator: HSGGenerator
    pair: HSGPair
    reaugment: bool
    crop_scale: tuple[float, ...]

@dataclass(frozen=True)
class Optim:
    """``optim``: the pretraining optimiser and schedule."""

    epochs: int
    batch_size: int
    lr_per_256: float
    momentum: float
    weight_decay: float
    schedule: str
    milestones: tuple[int, ...]
    gamma: float
    eta_min_ratio: float
    warmup_epochs: int
    amp: bool
    channels_last: bool
    compile: bool

@dataclass(frozen=True)
class Scores:
    """``scores``: pos/neg score statistics (:mod:`ftcl.scores`)."""

    enabled: bool
    histogram_epochs: tuple[int, ...]
    histogram_every: int
    bins: int
    range: tuple[float, ...] | None
    rows: int | None
    plot_epochs: tuple[int, ...]

@dataclass(frozen=True)
class LinearEval:
    """``eval.linear``: the linear probe."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    schedule: str
    milestones: tuple[int, ...]
    augment: bool
    report: str
    crop_scale: tuple[float, ...]

@dataclass(frozen=True)
class KnnEval:
    """``eval.knn``: the weighted kNN classifier."""

    k: int
    temperature: float
    batch_size: int

@dataclass(frozen=True)
class MonitorEval:
    """``eval.monitor``: kNN top-1 on the pretraining's own checkpoints while it trains."""

    every: int
    k: int
    temperature: float

@dataclass(frozen=True)
class Eval:
    """``eval``."""

    linear: LinearEval
    knn: KnnEval
    monitor: MonitorEval

@dataclass(frozen=True)
class Tracking:
    """``tracking``: MLflow."""

    enabled: bool
    uri: str | None
    artifact_root: str | None
    run_name: str | None
    parent_run_id: str | None
    tags: dict[str, Any]

@dataclass(frozen=True)
class Checkpoint:
    """``checkpoint``."""

    keep: int

@dataclass(frozen=True)
class DetectionCOCO:
    """``detection.coco``."""

    train_json: str | None
    train_images: str | None
    test_json: str | None
    test_images: str | None

@dataclass(frozen=True)
class DetectionScenes:
    """``detection.scenes``: composed scenes."""

    folder: str | None
    canvas: int
    items: tuple[int, ...]
    item_size: tuple[int, ...]
    noise: float
    num_train: int
    num_test: int
    seed: int

@dataclass(frozen=True)
class Detection:
    """``detection``: the detection transfer (:mod:`ftcl.detection`)."""

    dataset: str
    root: str | None
    test_root: str | None
    train_sets: tuple[tuple[int | str, str], ...]
    test_sets: tuple[tuple[int | str, str], ...]
    coco: DetectionCOCO
    scenes: DetectionScenes
    classes: tuple[str, ...] | None
    init: str
    supervised_weights: str | None
    head: str
    norm: str
    freeze_at: int
    fpn_channels: int
    min_size: tuple[int, ...]
    max_size: int
    image_mean: tuple[float, ...] | None
    image_std: tuple[float, ...] | None
    anchor_sizes: tuple[int, ...]
    aspect_ratios: tuple[float, ...]
    rpn_batch_size: int
    rpn_pre_nms_top_n: tuple[int, ...]
    rpn_post_nms_top_n: tuple[int, ...]
    roi_batch_size: int
    roi_pool_size: int
    detections_per_image: int
    score_threshold: float
    iterations: int
    batch_size: int
    lr_per_16: float
    momentum: float
    weight_decay: float
    warmup_iterations: int
    warmup_factor: float
    milestones: tuple[int, ...]
    gamma: float
    clip_grad_norm: float | None
    hflip: bool
    precise_bn_iterations: int
    eval_batch_size: int
    num_workers: int
    log_every: int
    checkpoint_every: int

@dataclass(frozen=True)
class RunConfig:
    """One run's whole config, validated (:func:`ftcl.config.resolve`) and frozen."""

    experiment: str
    seed: int
    device: str
    deterministic: Deterministic
    data: Data
    augment: Augment
    model: Model
    method: Method
    ft: FT
    fa: FA
    hsg: HSG
    optim: Optim
    scores: Scores
    eval: Eval
    tracking: Tracking
    checkpoint: Checkpoint
    log_every: int
    detection: Detection


def from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """``cls`` (a dataclass of this module) from a validated mapping, recursively."""
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _typed(hints[f.name], data[f.name]) for f in dataclasses.fields(cls)})


def _typed(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _typed(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        return tuple(_typed(args[0], v) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is dict:
        return dict(value)
    return value


def to_dict(obj: Any) -> Any:
    """The plain mapping of a config dataclass (tuples as lists), e.g. to write it as YAML."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
