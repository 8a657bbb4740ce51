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

import argparse
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
from ftcl.config import Config, ConfigError
from ftcl.data import detection as ddata
from ftcl.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from ftcl.detection.metrics import DEFINITIONS, METRICS, evaluate_detections
from ftcl.detection.model import FPN_LEVELS, build_detector
from ftcl.detection.train import base_lr, precise_bn, predict, train_detector
from ftcl.files import replacing

RESULT_FILE = "detection.json"
PER_CLASS_FILE = "per_class_ap.csv"
#: dataset kind -> the metric family its papers report
PRIMARY = {"voc": "voc07", "folder": "voc07", "scenes": "voc07", "coco": "coco"}
PROTOCOL_KEYS = ("dataset", "init", "head", "norm", "freeze_at", "iterations", "batch_size", "lr_per_16",
                 "momentum", "weight_decay", "warmup_iterations", "milestones", "gamma", "min_size", "max_size",
                 "hflip")


# ------------------------------------------------------------------------------------------ config
def detection_settings(cfg: Mapping) -> dict[str, Any]:
    """The run config's ``detection`` section (defaults filled and schema-checked by
    :func:`ftcl.config.resolve`), plus the checks a schema cannot express."""
    det = dict(cfg["detection"])
    if det["head"] == "fpn" and len(det["anchor_sizes"]) != FPN_LEVELS:
        raise ConfigError(f"key 'detection.anchor_sizes' has {len(det['anchor_sizes'])} sizes; the fpn head "
                          f"needs one per level ({FPN_LEVELS})")
    return det


def resolve_config(path: str | Path | None, overrides: Sequence[str]) -> tuple[Config, dict[str, Any]]:
    """The run config (defaults <- file <- ``--set``) and its checked detection section."""
    cfg = config.resolve(path, overrides)
    return cfg, detection_settings(cfg)


# -------------------------------------------------------------------------------------------- data
@dataclass
class DetectionData:
    """Training and test sets, the class names (label k is ``classes[k - 1]``), RGB normalisation."""

    train: ddata.DetectionDataset
    test: ddata.DetectionDataset
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_detection_data(cfg: Mapping, det: Mapping[str, Any], out: str | Path) -> DetectionData:
    """The sets ``detection.dataset`` names.

    ``voc``: ``root`` holding ``VOCdevkit/VOC<year>`` (``train_sets``, ``test_sets``); ``folder``: a
    single VOC-style folder ``root`` (xml beside images) for training and ``test_root`` (default:
    ``root``) for testing; ``coco``: ``coco.{train,test}_{json,images}``; ``scenes``: scenes composed
    from the held-out split of ``data`` into ``scenes.folder`` (default ``<out>/scenes``).
    Classes: ``detection.classes`` or the sorted names found (scenes: the dataset's label order).
    Normalisation: ``image_mean``/``image_std``, else the source set's for scenes (the data the
    backbone was pretrained on) unless ``init`` is ``supervised``, else ImageNet's.
    """
    mean, std, classes = IMAGENET_MEAN, IMAGENET_STD, det["classes"]
    kind = det["dataset"]
    if kind == "scenes":
        from ftcl.data.datasets import build_dataset

        source = build_dataset(cfg["data"], "test", "eval")
        classes = classes or [str(k) for k in range(source.num_classes)]
        folder = Path(det["scenes"]["folder"] or Path(out) / "scenes")
        ddata.compose_scenes(source, classes, folder, ddata.SceneSpec.from_config(det["scenes"]))
        train = ddata.voc_devkit_annotations(folder, [(ddata.SCENES_YEAR, "trainval")])
        test = ddata.voc_devkit_annotations(folder, [(ddata.SCENES_YEAR, "test")])
        if det["init"] != "supervised":
            mean, std = _rgb(source.mean), _rgb(source.std)
    elif kind == "coco":
        paths = det["coco"]
        _require(paths, ("train_json", "train_images", "test_json", "test_images"), "detection.coco")
        train, classes_found = ddata.coco_annotations(paths["train_json"], paths["train_images"])
        test, _ = ddata.coco_annotations(paths["test_json"], paths["test_images"])
        classes = classes or classes_found
    else:
        _require(det, ("root",), "detection")
        if kind == "voc":
            train = ddata.voc_devkit_annotations(det["root"], det["train_sets"])
            test = ddata.voc_devkit_annotations(det["root"], det["test_sets"])
        else:
            train = ddata.voc_folder_annotations(det["root"])
            test = ddata.voc_folder_annotations(det["test_root"] or det["root"])
    classes = list(classes or ddata.discover_classes([*train, *test]))
    return DetectionData(
        ddata.DetectionDataset(train, classes), ddata.DetectionDataset(test, classes), classes,
        tuple(det["image_mean"] or mean), tuple(det["image_std"] or std),
    )


def _rgb(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(values) * 3 if len(values) == 1 else tuple(values)


def _require(section: Mapping, keys: Sequence[str], prefix: str) -> None:
    missing = [k for k in keys if not section.get(k)]
    if missing:
        raise ConfigError(f"detection.dataset needs {', '.join(f'{prefix}.{k}' for k in missing)}")


# ------------------------------------------------------------------------------------------- stage
@dataclass
class DetectionJob:
    """Everything a detection run needs, checked before any training starts."""

    data: DetectionData
    model: FasterRCNN
    checkpoint: Path | None
    pretrain_epochs: int | None
    model_cfg: Mapping


def prepare_detection(cfg: Mapping, det: Mapping[str, Any], checkpoint: str | Path | None,
                      out: str | Path) -> DetectionJob:
    """Read the data and build the detector; bad paths, keys or weights fail here.

    The backbone's architecture comes from the checkpoint when one is given (so ``random`` rows
    match the pretrained ones), else from ``cfg["model"]``.
    """

    checkpoint = ckpt.resolve_checkpoint_path(checkpoint) if checkpoint is not None else None
    data = build_detection_data(cfg, det, out)
    state = ckpt.load(checkpoint) if checkpoint is not None else None
    model_cfg = state["config"]["model"] if state else cfg["model"]
    runtime.seed_everything(int(cfg["seed"]))
    model = build_detector(det["init"], checkpoint, det["head"], len(data.classes), det["norm"],
                           model_cfg=model_cfg, in_channels=int(state["in_channels"]) if state else 3,
                           supervised_weights=det["supervised_weights"], settings=det,
                           image_mean=data.mean, image_std=data.std)
    return DetectionJob(data, model, checkpoint, state["epoch"] if state else None, model_cfg)


def fit_and_evaluate(job: DetectionJob, cfg: Mapping, det: Mapping[str, Any], out: str | Path,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune, run Precise BN, evaluate on the test set, write ``<out>/detection.json`` and
    ``per_class_ap.csv``; returns the detection.json content."""
    from ftcl.evaluate import write_result

    data, out, seed = job.data, Path(out), int(cfg["seed"])
    runtime.apply_determinism(cfg["deterministic"]["enabled"], cfg["deterministic"]["threads"])
    device = runtime.select_device(cfg["device"])
    log(f"[detect] {det['head']} head, init {det['init']}, norm {det['norm']}: {len(data.train)} training "
        f"/ {len(data.test)} test images, {len(data.classes)} classes, {det['iterations']} iterations of "
        f"{det['batch_size']} images at lr {base_lr(det):.3g} on {device}")
    start = time.perf_counter()
    fingerprint = json.dumps({"detection": dict(det), "seed": cfg["seed"], "checkpoint": str(job.checkpoint),
                              "pretrain_epochs": job.pretrain_epochs, "model": job.model_cfg}, sort_keys=True,
                             default=str)
    train_detector(job.model, data.train, det, device, seed, log, ckpt_dir=out / "checkpoints",
                   fingerprint=fingerprint)
    precise_batches = precise_bn(job.model, data.train, det, device, seed, log)
    train_s = time.perf_counter() - start
    predictions = predict(job.model, data.test, int(det["eval_batch_size"]), device, int(det["num_workers"]))
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


def protocol(det: Mapping, data: DetectionData, model_cfg: Mapping, train_s: float,
             precise_batches: int) -> dict[str, Any]:
    """The ``protocol`` of ``detection.json``: the settings that define the numbers, ``lr`` (the peak
    learning rate of the global ``batch_size``), ``precise_bn_iterations`` (batches Precise BN
    averaged the BatchNorm statistics over; 0: not run, as with frozen BatchNorm), the ``primary``
    metric family and the metric definitions."""
    return {
        **{k: det[k] for k in PROTOCOL_KEYS},
        "lr": base_lr(det),
        "precise_bn_iterations": precise_batches,
        "backbone": _backbone_name(det, model_cfg),
        "train_images": len(data.train), "test_images": len(data.test), "classes": len(data.classes),
        "primary": PRIMARY[det["dataset"]],
        "metrics": DEFINITIONS,
        "train_seconds": round(train_s, 1),
    }


def _backbone_name(det: Mapping, model_cfg: Mapping) -> str:
    if det["init"] == "supervised":
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


# -------------------------------------------------------------------------------------------- CLI
def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ftcl detect --config FILE [--set k=v ...] --checkpoint PRETRAIN_DIR_OR_FILE --out DIR``."""
    from ftcl.cli import CONFIG_HELP, add_set_option

    p = subparsers.add_parser(
        "detect", help="fine-tune Faster R-CNN from a pretrained backbone and report detection AP",
        description=f"Detection transfer; writes OUT/config.yaml, OUT/{RESULT_FILE}, OUT/{PER_CLASS_FILE}.")
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    add_set_option(p)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="pretraining run folder (holding checkpoints/last.pt) or a checkpoint file; "
                        "required for detection.init=pretrained")
    p.add_argument("--out", type=Path, required=True, help="run folder for outputs (created)")
    p.set_defaults(func=cli_detect)


def cli_detect(args: argparse.Namespace) -> int:
    """``ftcl detect``: resolve and check the inputs, run the stage inside an MLflow run ``detection``."""
    from ftcl.tracking import Tracker

    cfg, det = resolve_config(args.config, args.overrides)
    if args.checkpoint is not None:
        ckpt.resolve_checkpoint_path(args.checkpoint)
    elif det["init"] == "pretrained":
        raise ConfigError("ftcl detect with detection.init=pretrained needs --checkpoint")
    job = prepare_detection(cfg, det, args.checkpoint, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    config.dump(cfg, args.out / "config.yaml")
    with Tracker(cfg, args.out, "detection") as tracker:
        tracker.log_params({k: v for k, v in config.flatten(cfg).items()
                            if k.startswith(("detection.", "model.", "data.", "seed"))})
        tracker.log_params({"protocol.batch_size": int(det["batch_size"]), "protocol.lr": base_lr(det)})
        result = fit_and_evaluate(job, cfg, det, args.out)
        tracker.log_params({f"protocol.{k}": v for k, v in result["protocol"].items()
                            if k not in ("metrics", "train_seconds")})
        tracker.log_metrics({f"det/{k}": result[k] for k in METRICS if result[k] is not None})
        tracker.log_artifact(args.out / RESULT_FILE)
        tracker.log_artifact(args.out / PER_CLASS_FILE)
    print(f"[detect] {format_metrics(result)} (primary: {result['protocol']['primary']}) "
          f"-> {args.out / RESULT_FILE}")
    return 0
