"""Smoke mode: any pipeline config run in minutes, to learn that every stage works on this cluster
before GPU days are spent on it (``snakemake --configfile config/paper/X.yaml --config smoke=true``).

:func:`apply` turns a validated pipeline config with ``smoke: true`` into its smoke version, before
:func:`ftcl.pipeline.load` resolves the rows:

* **Kept** (they decide the code path): every row, and in each the model, method, FT, FA, HSG,
  augmentation, precision (``optim.amp``, ``channels_last``, ``compile``), data set and decoding,
  evaluation protocols, detection head and norm, the launcher's name and its other settings.
* **Shrunk** (amounts only; a last layer of run-config overrides on top of every row, rows' own
  overrides included, computed from the row's own values): the module constants below, e.g.
  ``optim.epochs`` -> ``min(epochs, 2)`` (0 stays 0: the floor), a few hundred training images at
  <= 64 px, a batch that still meets every rule of :mod:`ftcl.config.rules` for the capped process
  count, schedules' milestones scaled into the shorter run (one that fired still fires), ~10
  detection iterations on small images.
* **Capped** (what a smoke job may ask of the machine): GPUs (and processes) per node of every stage
  to ``smoke.gpus`` (default :data:`SMOKE_GPUS`), :data:`SMOKE_NODES` node, :data:`SMOKE_TIMEOUT_MIN`
  minutes, :data:`SMOKE_MEM_GB` GB.
* **Its own experiment** ``<experiment>-smoke`` (results folder and MLflow experiment), the first seed;
  composed detection scenes (``detection.scenes.folder``) go to its data folder too.
* **Data**: a dataset root that exists is used as it is (a subset: ``data.train_subset`` /
  ``test_subset``; a VOC devkit through a folder of links to its images and annotations with the first
  ids of each image set); a missing one is generated, deterministically and once (a manifest), under
  ``<results_dir>/<experiment>-smoke/smoke-data/``: an ImageFolder (``imagefolder``), CIFAR's python
  pickles (``cifar10``, ``cifar100``) or a VOC devkit / folder (detection ``voc`` / ``folder``).

The applied config's ``smoke`` is a mapping (``of``: the experiment shrunk, ``gpus``, ``note``, and
``overrides``: row -> the dotted keys smoke changed); :func:`apply` leaves such a config as it is, so the
config aggregation reads (``<experiment>/pipeline.yaml``) loads to the same pipeline, and the tables
say :func:`note` at the top (:mod:`ftcl.results.render`). docs/USAGE.md "Smoke runs" is the user's guide.
:mod:`ftcl.pipeline.smoke_data` writes the generated data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftcl import config as runconfig
from ftcl.constants import DETECTION, PRETRAIN, RESULTS_DIR
from ftcl.errors import ConfigError
from ftcl.pipeline import smoke_data

#: the smoke experiment's name: ``<experiment><SUFFIX>``
SUFFIX = "-smoke"
#: the folder of generated data inside the smoke experiment's folder
DATA_FOLDER = "smoke-data"
#: the first line of a smoke run's tables
NOTE = "Smoke run of {experiment}: amounts shrunk, not results"
#: seed of the generated data (independent of the run's seeds)
DATA_SEED = 0

# --- launcher caps (every stage; launcher.slurm and launcher.stages.*, launcher.local)
#: GPUs, and processes, per node of a stage's job (``smoke: {gpus: N}`` sets another cap, e.g. 2 for DDP)
SMOKE_GPUS = 1
#: nodes of a SLURM job
SMOKE_NODES = 1
#: time limit of a job in minutes
SMOKE_TIMEOUT_MIN = 30
#: memory of a SLURM job in GB
SMOKE_MEM_GB = 16

# --- amounts (each a ceiling: a config asking for less keeps its value)
EPOCHS = 2                   # optim.epochs (0 stays 0); optim.warmup_epochs -> 0
TRAIN_ITEMS = 256            # data.train_subset
TEST_ITEMS = 100             # data.test_subset
IMAGE_SIZE = 64              # data.image_size (null = the dataset's native size)
BATCH = 32                   # optim.batch_size, rounded to what the processes and BN sub-batches share
NUM_WORKERS = 2              # data.num_workers, detection.num_workers
LINEAR_EPOCHS = 2            # eval.linear.epochs
LINEAR_BATCH = 64            # eval.linear.batch_size
KNN_K = 20                   # eval.knn.k, eval.monitor.k
HISTOGRAM_EVERY = 4          # scores.histogram_every
LOG_EVERY = 4                # log_every
DET_ITERATIONS = 10          # detection.iterations (0 stays 0)
DET_WARMUP = 2               # detection.warmup_iterations
DET_BATCH = 4                # detection.batch_size (two virtual GPUs of two images)
DET_EVAL_BATCH = 4           # detection.eval_batch_size
DET_SIZES = (96, 128)        # detection.min_size: the larger alone, both when several were drawn from
DET_MAX_SIZE = 192           # detection.max_size
DET_PRECISE_BN = 2           # detection.precise_bn_iterations (0 stays 0)
DET_RPN_BATCH = 32           # detection.rpn_batch_size
DET_ROI_BATCH = 8            # detection.roi_batch_size (per image; each RoI runs res5 in the c4 head)
DET_PRE_NMS = (128, 64)      # detection.rpn_pre_nms_top_n
DET_POST_NMS = (32, 8)       # detection.rpn_post_nms_top_n (evaluation: res5 on each)
DET_CHECKPOINT_EVERY = 5     # detection.checkpoint_every (0 stays 0): a checkpoint within the run
DET_LOG_EVERY = 2            # detection.log_every
SCENES = (32, 16)            # detection.scenes.num_train, num_test
DET_REAL_IMAGES = 100        # images of each image set of an existing VOC devkit (its first ids)

# --- generated data
#: classes of a generated ImageFolder without data.class_list
FOLDER_CLASSES = 10
#: images of each generated VOC image set
VOC_IMAGES = 16
#: classes of generated detection images without detection.classes (Pascal VOC names)
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle")

#: datasets whose root smoke generates when it is missing
GENERATED_DATASETS = ("imagefolder", "cifar10", "cifar100")
#: each dataset's native view size (``ftcl.transforms.hsg.NATIVE_SIZE``; a test keeps them equal)
NATIVE_SIZE = {"digits": 8, "fashion-mnist": 28, "cifar10": 32, "cifar100": 32, "imagefolder": 224}


# ------------------------------------------------------------------------------------------ state
def requested(cfg: Mapping) -> bool:
    """Whether ``cfg`` asks for smoke mode and it is not applied yet (``smoke: true`` or ``{gpus: N}``)."""
    smoke = cfg.get("smoke")
    return smoke is True or (isinstance(smoke, Mapping) and "of" not in smoke)


def applied(cfg: Mapping) -> bool:
    """Whether ``cfg`` is a smoke config :func:`apply` produced."""
    smoke = cfg.get("smoke")
    return isinstance(smoke, Mapping) and "of" in smoke


def note(cfg: Mapping | None) -> str | None:
    """The line a smoke run's tables start with, None for another config."""
    return str(cfg["smoke"].get("note") or NOTE.format(experiment=cfg["smoke"]["of"])) \
        if cfg is not None and applied(cfg) else None


def overrides(cfg: Mapping, row: str) -> dict[str, Any]:
    """The smoke layer of row ``row`` (dotted run-config keys; empty for a config that is not smoke)."""
    return dict(cfg["smoke"]["overrides"].get(row) or {}) if applied(cfg) else {}


# ------------------------------------------------------------------------------------------ apply
def apply(cfg: Mapping, *, generate: bool = True) -> dict:
    """The smoke version of the validated pipeline config ``cfg`` (module docstring); ``cfg`` itself
    when it is not a smoke config or is one already, without ``smoke`` when that is false (so a config
    that never asked for smoke reads as it did before the key existed). ``generate``: write the data of
    missing roots (and the link folders of existing VOC devkits) now; without it only their paths are set."""
    if not requested(cfg):
        return dict(cfg) if cfg.get("smoke") else {k: v for k, v in cfg.items() if k != "smoke"}
    from ftcl.pipeline.rows import parse_rows
    from ftcl.pipeline.settings import stage_world

    settings = cfg["smoke"] if isinstance(cfg["smoke"], Mapping) else {}
    gpus = int(settings.get("gpus") or SMOKE_GPUS)
    out = copy.deepcopy(dict(cfg))
    out["experiment"] = f"{cfg['experiment']}{SUFFIX}"
    out["seeds"] = list(cfg["seeds"])[:1]
    out["launcher"] = cap_launcher(cfg["launcher"], gpus)
    rows = parse_rows(out)
    if any(row.name == DATA_FOLDER for row in rows):
        raise ConfigError(f"ablation row {DATA_FOLDER!r}: the name is the smoke run's data folder; rename the row")
    data_dir = Path(cfg.get("results_dir") or RESULTS_DIR).expanduser().resolve() / out["experiment"] / DATA_FOLDER
    world = stage_world(out, PRETRAIN)
    layers = {}
    for row in rows:
        try:
            merged = runconfig.merge(overrides=row.overrides, base=out["defaults"])
        except ConfigError:
            continue  # load() reports it, naming the row
        layers[row.name] = row_layer(merged, world, out["stages"], data_dir, generate=generate)
    out["smoke"] = {"of": cfg["experiment"], "gpus": gpus, "note": NOTE.format(experiment=cfg["experiment"]),
                    "overrides": layers}
    return out


def cap_launcher(launcher: Mapping, gpus: int = SMOKE_GPUS) -> dict:
    """``launcher`` (validated) with every stage's GPUs and processes per node capped at ``gpus``, one
    node, :data:`SMOKE_TIMEOUT_MIN` minutes and :data:`SMOKE_MEM_GB` GB; the launcher's name kept."""
    out = copy.deepcopy(dict(launcher))
    caps: dict[str, Callable[[Any], Any]] = {
        "gpus_per_node": lambda v: min(v, gpus), "tasks_per_node": lambda v: min(v, gpus),
        "nodes": lambda v: min(v, SMOKE_NODES), "timeout_min": lambda v: min(v, SMOKE_TIMEOUT_MIN),
        "mem_gb": lambda v: min(v, SMOKE_MEM_GB)}
    sections = [out.get("local"), out.get("slurm"), *(out.get("stages") or {}).values()]
    for section in sections:
        for key, cap in caps.items():
            if isinstance(section, dict) and section.get(key) is not None:
                section[key] = cap(section[key])
    return out


def _get(nested: Mapping, dotted: str) -> Any:
    value: Any = nested
    for part in dotted.split("."):
        value = value[part]
    return value


def scale_mark(mark: int, old: int, new: int) -> int:
    """An epoch or iteration ``mark`` (a milestone, a start) of a run of ``old`` for one of ``new``:
    one inside the run (``mark < old``: it happens) lands inside the shorter run, scaled, at 1 or later
    unless it was 0; one past the run stays as it is (it never happens, in either)."""
    if mark >= old or new >= old:
        return mark
    low = 0 if mark == 0 else 1
    return max(low, min(round(mark * new / old), new - 1))


def smoke_batch(merged: Mapping, world: int) -> int:
    """``optim.batch_size`` of a smoke run on ``world`` processes: the row's own when it is at most
    :data:`BATCH` and meets the batch rules, else the largest batch up to :data:`BATCH` whose per-process
    share divides into the row's BatchNorm sub-batches of at least 2 images (:mod:`ftcl.config.rules`;
    more than :data:`BATCH` only where 2 images per sub-batch already need more)."""
    from ftcl.config import rules

    cfg = runconfig.from_dict(runconfig.RunConfig, merged)
    splits = rules.bn_splits(cfg, world)
    batch = merged["optim"]["batch_size"]
    if batch <= BATCH:
        try:
            rules.check_batch(cfg, world)
            return batch
        except ConfigError:
            pass
    return world * splits * max(2, BATCH // (world * splits))


def row_layer(merged: Mapping, world: int, stages: Sequence[str], data_dir: Path, *,
              generate: bool = True) -> dict[str, Any]:
    """The smoke overrides of one row (dotted keys, only those whose value changes) from its merged,
    validated run config ``merged``, for a pretraining on ``world`` processes and the ``stages`` asked for."""
    o, data, ev = merged["optim"], merged["data"], merged["eval"]
    epochs = min(o["epochs"], EPOCHS)
    layer: dict[str, Any] = {
        "optim.epochs": epochs,
        "optim.warmup_epochs": 0,
        "optim.milestones": [scale_mark(m, o["epochs"], epochs) for m in o["milestones"]] if o["schedule"] == "step"
        else o["milestones"],
        "ft.start_epoch": scale_mark(merged["ft"]["start_epoch"], o["epochs"], epochs),
        "optim.batch_size": smoke_batch(merged, world),
        "data.train_subset": min(data["train_subset"] or TRAIN_ITEMS, TRAIN_ITEMS),
        "data.test_subset": min(data["test_subset"] or TEST_ITEMS, TEST_ITEMS),
        "data.num_workers": min(data["num_workers"], NUM_WORKERS),
        "eval.linear.epochs": min(ev["linear"]["epochs"], LINEAR_EPOCHS),
        "eval.linear.batch_size": min(ev["linear"]["batch_size"], LINEAR_BATCH),
        "eval.linear.milestones": [scale_mark(m, ev["linear"]["epochs"], min(ev["linear"]["epochs"], LINEAR_EPOCHS))
                                   for m in ev["linear"]["milestones"]] if ev["linear"]["schedule"] == "step"
        else ev["linear"]["milestones"],
        "eval.knn.k": min(ev["knn"]["k"], KNN_K),
        "eval.monitor.k": min(ev["monitor"]["k"], KNN_K),
        "scores.histogram_every": min(merged["scores"]["histogram_every"], HISTOGRAM_EVERY),
        "log_every": min(merged["log_every"], LOG_EVERY),
    }
    size = data["image_size"] or NATIVE_SIZE.get(data["dataset"])
    if size is not None and size > IMAGE_SIZE:
        stages_hsg = merged["hsg"]["generator"]["stages"]  # explicit HSG down-sampling stages need 2^stages px
        layer["data.image_size"] = max(IMAGE_SIZE, 2 ** stages_hsg if stages_hsg else 0)
    layer |= data_layer(data, data_dir, generate)
    if DETECTION in stages:
        layer |= detection_layer(merged["detection"], data_dir, generate)
    return {key: value for key, value in layer.items() if _get(merged, key) != value}


def detection_layer(det: Mapping, data_dir: Path, generate: bool) -> dict[str, Any]:
    """The detection stage's smoke overrides: ~:data:`DET_ITERATIONS` iterations with the warm-up and
    milestones inside, small images, batches, proposals and RoIs; the data of a missing root generated."""
    iterations = min(det["iterations"], DET_ITERATIONS)
    sizes = list(det["min_size"])
    if max(sizes) > DET_SIZES[-1]:  # several sizes stay several (the multi-scale draw), the last the largest
        sizes = [min(min(sizes), DET_SIZES[0]), DET_SIZES[-1]] if len(sizes) > 1 else [DET_SIZES[-1]]
    layer: dict[str, Any] = {
        "detection.iterations": iterations,
        "detection.warmup_iterations": min(det["warmup_iterations"], DET_WARMUP, max(iterations - 1, 0)),
        "detection.milestones": [scale_mark(m, det["iterations"], iterations) for m in det["milestones"]],
        "detection.batch_size": min(det["batch_size"], DET_BATCH),
        "detection.eval_batch_size": min(det["eval_batch_size"], DET_EVAL_BATCH),
        "detection.min_size": sizes,
        "detection.max_size": min(det["max_size"], DET_MAX_SIZE),
        "detection.precise_bn_iterations": min(det["precise_bn_iterations"], DET_PRECISE_BN),
        "detection.rpn_batch_size": min(det["rpn_batch_size"], DET_RPN_BATCH),
        "detection.roi_batch_size": min(det["roi_batch_size"], DET_ROI_BATCH),
        "detection.rpn_pre_nms_top_n": [min(v, c) for v, c in zip(det["rpn_pre_nms_top_n"], DET_PRE_NMS)],
        "detection.rpn_post_nms_top_n": [min(v, c) for v, c in zip(det["rpn_post_nms_top_n"], DET_POST_NMS)],
        "detection.checkpoint_every": min(det["checkpoint_every"], DET_CHECKPOINT_EVERY),
        "detection.log_every": min(det["log_every"], DET_LOG_EVERY),
        "detection.num_workers": min(det["num_workers"], NUM_WORKERS),
    }
    kind, root = det["dataset"], det["root"]
    if kind == "scenes":
        layer |= {"detection.scenes.num_train": min(det["scenes"]["num_train"], SCENES[0]),
                  "detection.scenes.num_test": min(det["scenes"]["num_test"], SCENES[1])}
        if det["scenes"]["folder"] is not None:  # composed there: the smoke run's own folder, not the real run's
            layer["detection.scenes.folder"] = str(data_dir / "scenes")
    if kind not in ("voc", "folder"):
        return layer
    classes = list(det["classes"] or VOC_CLASSES)
    if root is not None and Path(root).expanduser().exists():
        if kind == "voc":  # a subset of the real devkit: links to its images and annotations
            sets = _sets(det["train_sets"]) + _sets(det["test_sets"])
            spec = {"kind": "voc-subset", "source": str(Path(root).expanduser().resolve()),
                    "sets": [list(s) for s in dict.fromkeys(sets)], "images": DET_REAL_IMAGES}
            layer["detection.root"] = str(smoke_data.materialise(data_dir, spec, smoke_data.write_voc_subset, generate))
        return layer
    if kind == "voc":
        sets = _sets(det["train_sets"]) + _sets(det["test_sets"])
        spec = {"kind": "voc", "sets": [list(s) for s in dict.fromkeys(sets)], "classes": classes,
                "images": VOC_IMAGES, "seed": DATA_SEED}
        layer["detection.root"] = str(smoke_data.materialise(data_dir, spec, smoke_data.write_voc, generate))
    else:
        spec = {"kind": "voc-folder", "classes": classes, "images": VOC_IMAGES, "seed": DATA_SEED}
        layer["detection.root"] = str(smoke_data.materialise(data_dir, spec, smoke_data.write_voc_folder, generate))
        layer["detection.test_root"] = None
    return layer


def _sets(sets: Iterable[Sequence]) -> list[tuple[str, str]]:
    return [(str(year), str(split)) for year, split in sets]


def data_layer(data: Mapping, data_dir: Path, generate: bool) -> dict[str, Any]:
    """``data.root`` of generated data when the row's dataset needs a root that does not exist."""
    kind, root = data["dataset"], data["root"]
    if kind not in GENERATED_DATASETS or (root is not None and Path(root).expanduser().exists()):
        return {}
    per_split = {"train": TRAIN_ITEMS, "test": TEST_ITEMS}
    if kind == "imagefolder":
        class_list = data["class_list"]
        if class_list is not None and not Path(class_list).expanduser().is_file():
            raise ConfigError(f"key 'data.class_list' is {class_list!r}, which is not a file; smoke mode reads the "
                              "class names of the data it generates from it (give the file, or null for "
                              f"{FOLDER_CLASSES} classes)")
        classes = _class_names(class_list) if class_list else [f"class{i:02d}" for i in range(FOLDER_CLASSES)]
        spec = {"kind": "imagefolder", "classes": classes,
                "per_class": {s: max(1, math.ceil(n / len(classes))) for s, n in per_split.items()},
                "size": list(smoke_data.FOLDER_IMAGE), "seed": DATA_SEED}
        return {"data.root": str(smoke_data.materialise(data_dir, spec, smoke_data.write_imagefolder, generate))}
    layout = smoke_data.CIFAR_LAYOUT[kind]
    spec = {"kind": kind, "per_class": {s: max(1, math.ceil(n / layout["classes"])) for s, n in per_split.items()},
            "seed": DATA_SEED}
    return {"data.root": str(smoke_data.materialise(data_dir, spec, smoke_data.write_cifar, generate))}


def _class_names(path: str) -> list[str]:
    """Class folder names of a class list file, sorted (as :func:`ftcl.data.imagefolder.read_class_list`)."""
    lines = Path(path).expanduser().read_text().splitlines()
    return sorted(dict.fromkeys(line.strip() for line in lines if line.strip()))
