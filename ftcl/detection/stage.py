"""The detection stage: data, ``ftcl detect``, result files, MLflow.

``ftcl detect --config FILE [--set k=v ...] --checkpoint PRETRAIN_DIR_OR_FILE --out DIR`` reads the
data, builds the detector (:mod:`ftcl.detection.model`), fine-tunes it, recomputes its BatchNorm
statistics (Precise BN) and predicts on the test set (:mod:`ftcl.detection.train`), scores the
predictions (:mod:`ftcl.detection.metrics`) and writes ``OUT/config.yaml``, ``OUT/detection.json``
and ``OUT/per_class_ap.csv``, inside an MLflow run ``detection``.

``detection.json``: the six metrics of :data:`~ftcl.detection.metrics.METRICS` (percent; JSON null
for a metric no class could be scored on), ``per_class`` (class -> the same six), ``protocol``
(settings, ``primary``: the metric family the papers report for this kind of data, ``voc07`` for
VOC-style data, ``coco`` for COCO; ``metrics``: their definitions), ``checkpoint``,
``pretrain_epochs``. MLflow: metrics ``det/<metric>``, params ``detection.*`` (the config) and
``protocol.*`` (including the global ``batch_size`` and the ``lr`` it gives).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchvision.models.detection import FasterRCNN

from ftcl import checkpoint as ckpt
from ftcl import config, runtime
from ftcl.config import ConfigError, RunConfig
from ftcl.config.types import Detection, to_dict
from ftcl.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from ftcl.detection import data as ddata
from ftcl.detection import scenes
from ftcl.detection.metrics import DEFINITIONS, METRICS, evaluate_detections
from ftcl.detection.model import build_detector
from ftcl.detection.train import base_lr, precise_bn, predict, train_detector
from ftcl.files import replacing

RESULT_FILE = "detection.json"
PER_CLASS_FILE = "per_class_ap.csv"
#: dataset kind -> the metric family its papers report
PRIMARY = {"voc": "voc07", "folder": "voc07", "scenes": "voc07", "coco": "coco"}
PROTOCOL_KEYS = ("dataset", "init", "head", "norm", "freeze_at", "iterations", "batch_size", "lr_per_16",
                 "momentum", "weight_decay", "warmup_iterations", "milestones", "gamma", "min_size", "max_size",
                 "hflip")


# -------------------------------------------------------------------------------------------- data
@dataclass
class DetectionData:
    """Training and test sets, the class names (label k is ``classes[k - 1]``), RGB normalisation."""

    train: ddata.DetectionDataset
    test: ddata.DetectionDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_detection_data(cfg: RunConfig, out: str | Path) -> DetectionData:
    """The sets ``detection.dataset`` names.

    ``voc``: ``root`` holding ``VOCdevkit/VOC<year>`` (``train_sets``, ``test_sets``); ``folder``: a
    single VOC-style folder ``root`` (xml beside images) for training and ``test_root`` (default:
    ``root``) for testing; ``coco``: ``coco.{train,test}_{json,images}``; ``scenes``: scenes composed
    from the held-out split of ``data`` into ``scenes.folder`` (default ``<out>/scenes``).
    Classes: ``detection.classes`` or the sorted names found (scenes: the dataset's label order).
    Normalisation: ``image_mean``/``image_std``, else the source set's for scenes (the data the
    backbone was pretrained on) unless ``init`` is ``supervised``, else ImageNet's.
    """
    det = cfg.detection
    mean, std, classes = IMAGENET_MEAN, IMAGENET_STD, det.classes
    kind = det.dataset
    if kind == "scenes":
        from ftcl.data.datasets import build_dataset

        source = build_dataset(cfg.data, "test", "eval")
        classes = classes or [str(k) for k in range(source.num_classes)]
        folder = Path(det.scenes.folder or Path(out) / "scenes")
        scenes.compose_scenes(source, classes, folder, scenes.SceneSpec.from_section(det.scenes))
        train = ddata.voc_devkit_annotations(folder, [(scenes.SCENES_YEAR, "trainval")])
        test = ddata.voc_devkit_annotations(folder, [(scenes.SCENES_YEAR, "test")])
        if det.init != "supervised":
            mean, std = _rgb(source.mean), _rgb(source.std)
    elif kind == "coco":
        paths = det.coco
        train, classes_found = ddata.coco_annotations(paths.train_json, paths.train_images)
        test, _ = ddata.coco_annotations(paths.test_json, paths.test_images)
        classes = classes or classes_found
    else:
        if not det.root:
            raise ConfigError("detection.dataset needs detection.root")
        if kind == "voc":
            train = ddata.voc_devkit_annotations(det.root, det.train_sets)
            test = ddata.voc_devkit_annotations(det.root, det.test_sets)
        else:
            train = ddata.voc_folder_annotations(det.root)
            test = ddata.voc_folder_annotations(det.test_root or det.root)
    classes = list(classes or ddata.discover_classes([*train, *test]))
    return DetectionData(
        ddata.DetectionDataset(train, classes), ddata.DetectionDataset(test, classes), classes,
        tuple(det.image_mean or mean), tuple(det.image_std or std),
    )


def _rgb(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


# ------------------------------------------------------------------------------------------- stage
@dataclass
class DetectionJob:
    """Everything a detection run needs, checked before any training starts."""

    data: DetectionData
    model: FasterRCNN
    checkpoint: Path | None
    pretrain_epochs: int | None
    model_cfg: Mapping


def prepare_detection(cfg: RunConfig, checkpoint: str | Path | None, out: str | Path) -> DetectionJob:
    """Read the data and build the detector; bad paths, keys or weights fail here.

    The backbone's architecture comes from the checkpoint when one is given (so ``random`` rows
    match the pretrained ones), else from ``cfg.model``.
    """

    checkpoint = ckpt.resolve_checkpoint_path(checkpoint) if checkpoint is not None else None
    det = cfg.detection
    data = build_detection_data(cfg, out)
    state = ckpt.load(checkpoint) if checkpoint is not None else None
    model_cfg = state["config"]["model"] if state else to_dict(cfg.model)
    runtime.seed_everything(cfg.seed)
    model = build_detector(det.init, checkpoint, det.head, len(data.classes), det.norm,
                           model_cfg=model_cfg, in_channels=int(state["in_channels"]) if state else 3,
                           supervised_weights=det.supervised_weights, settings=det,
                           image_mean=data.mean, image_std=data.std)
    return DetectionJob(data, model, checkpoint, state["epoch"] if state else None, model_cfg)


def fit_and_evaluate(job: DetectionJob, cfg: RunConfig, out: str | Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune, run Precise BN, evaluate on the test set, write ``<out>/detection.json`` and
    ``per_class_ap.csv``; returns the detection.json content."""
    from ftcl.evaluate import write_result

    det, data, out, seed = cfg.detection, job.data, Path(out), cfg.seed
    runtime.apply_determinism(cfg.deterministic.enabled, cfg.deterministic.threads)
    device = runtime.select_device(cfg.device)
    log(f"[detect] {det.head} head, init {det.init}, norm {det.norm}: {len(data.train)} training "
        f"/ {len(data.test)} test images, {len(data.classes)} classes, {det.iterations} iterations of "
        f"{det.batch_size} images at lr {base_lr(det):.3g} on {device}")
    start = time.perf_counter()
    fingerprint = json.dumps({"detection": to_dict(det), "seed": cfg.seed, "checkpoint": str(job.checkpoint),
                              "pretrain_epochs": job.pretrain_epochs, "model": job.model_cfg}, sort_keys=True,
                             default=str)
    train_detector(job.model, data.train, det, device, seed, log, ckpt_dir=out / "checkpoints",
                   fingerprint=fingerprint)
    precise_batches = precise_bn(job.model, data.train, det, device, seed, log)
    train_s = time.perf_counter() - start
    predictions = predict(job.model, data.test, det.eval_batch_size, device, det.num_workers)
    summary, rows = evaluate_detections([data.test.target(i) for i in range(len(data.test))], predictions,
                                        data.classes)
    result = {
        **{k: _finite(summary[k]) for k in METRICS},
        "per_class": {r["class"]: {k: _finite(r[k]) for k in METRICS} for r in rows},
        "protocol": protocol(det, data, job.model_cfg, train_s, precise_batches),
        "checkpoint": str(job.checkpoint) if job.checkpoint else None,
        "pretrain_epochs": job.pretrain_epochs,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_per_class_csv(rows, out / PER_CLASS_FILE)
    write_result(result, out / RESULT_FILE)
    log(f"[detect] {format_metrics(result)}")
    return result


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def format_metrics(result: Mapping[str, Any]) -> str:
    """``voc07_AP50 81.23 voc07_AP 52.10 ...`` (``-`` for a missing value)."""
    return " ".join(f"{k} {result[k]:.2f}" if result.get(k) is not None else f"{k} -" for k in METRICS)


def protocol(det: Detection, data: DetectionData, model_cfg: Mapping, train_s: float,
             precise_batches: int) -> dict[str, Any]:
    """The ``protocol`` of ``detection.json``: the settings that define the numbers, ``lr`` (the peak
    learning rate of the global ``batch_size``), ``precise_bn_iterations`` (batches Precise BN
    averaged the BatchNorm statistics over; 0: not run, as with frozen BatchNorm), the ``primary``
    metric family and the metric definitions."""
    return {
        **{k: to_dict(getattr(det, k)) for k in PROTOCOL_KEYS},
        "lr": base_lr(det),
        "precise_bn_iterations": precise_batches,
        "backbone": _backbone_name(det, model_cfg),
        "train_images": len(data.train), "test_images": len(data.test), "classes": len(data.classes),
        "primary": PRIMARY[det.dataset],
        "metrics": DEFINITIONS,
        "train_seconds": round(train_s, 1),
    }


def _backbone_name(det: Detection, model_cfg: Mapping) -> str:
    if det.init == "supervised":
        return "torchvision resnet50 (supervised ImageNet weights)"
    stem = " small stem" if model_cfg["small_stem"] else ""
    return f"{model_cfg['backbone']} width {model_cfg['width']}{stem}"


def write_per_class_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """One row per class: name, number of non-difficult boxes, then :data:`METRICS` (percent; empty
    where the class has no boxes)."""
    with replacing(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["class", "num_boxes", *METRICS])
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                         for r in rows)


def run_detection(cfg: RunConfig, checkpoint: str | Path | None, out: str | Path) -> dict[str, Any]:
    """The detection stage: check the inputs (a checkpoint for ``detection.init: pretrained``), read the
    data, build the detector, then fine-tune and evaluate it inside an MLflow run ``detection``."""
    from ftcl.tracking import Tracker

    det, out = cfg.detection, Path(out)
    if checkpoint is not None:
        ckpt.resolve_checkpoint_path(checkpoint)
    elif det.init == "pretrained":
        raise ConfigError("ftcl detect with detection.init=pretrained needs --checkpoint")
    job = prepare_detection(cfg, checkpoint, out)
    out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, out / "config.yaml")
    with Tracker(cfg, out, "detection") as tracker:
        tracker.log_params({k: v for k, v in config.flatten(to_dict(cfg)).items()
                            if k.startswith(("detection.", "model.", "data.", "seed"))})
        tracker.log_params({"protocol.batch_size": det.batch_size, "protocol.lr": base_lr(det)})
        result = fit_and_evaluate(job, cfg, out)
        tracker.log_params({f"protocol.{k}": v for k, v in result["protocol"].items()
                            if k not in ("metrics", "train_seconds")})
        tracker.log_metrics({f"det/{k}": result[k] for k in METRICS if result[k] is not None})
        tracker.log_artifact(out / RESULT_FILE)
        tracker.log_artifact(out / PER_CLASS_FILE)
    print(f"[detect] {format_metrics(result)} (primary: {result['protocol']['primary']}) -> {out / RESULT_FILE}")
    return result
