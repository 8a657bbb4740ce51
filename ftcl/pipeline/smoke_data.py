"""The data a smoke run generates where a dataset root is missing (:mod:`ftcl.pipeline.smoke`): an
ImageFolder, CIFAR's python pickles, a VOC devkit or folder, and a link folder holding the first images of
an existing VOC devkit. Each is written once, deterministically, into a folder named by the digest of what
it holds, with a manifest written last (:func:`materialise`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ftcl.detection.voc_xml import voc_xml
from ftcl.errors import ConfigError
from ftcl.files import folder_once

#: written in each generated data folder, last: what it holds (a folder whose manifest matches is kept)
MANIFEST = "smoke-data.json"

#: image side of generated ImageFolder images (width x height, landscape like most ImageNet photos)
FOLDER_IMAGE = (96, 80)
#: sides of generated detection images (landscape and portrait: both orientations)
VOC_SIDES = ((160, 120), (120, 160))

#: torchvision's python-pickle layout of each CIFAR (what ``ftcl.data.arrays`` reads)
CIFAR_LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "classes": 10, "label_key": "labels", "meta": "batches.meta",
                "names_key": "label_names",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    "cifar100": {"folder": "cifar-100-python", "classes": 100, "label_key": "fine_labels", "meta": "meta",
                 "names_key": "fine_label_names", "train": ["train"], "test": ["test"]},
}


def materialise(data_dir: Path, spec: Mapping, write: Callable[[Path, Mapping], None], generate: bool) -> Path:
    """The folder of ``spec`` under ``data_dir`` (``<kind>-<digest of spec>``), written by ``write`` once
    when ``generate`` (:func:`ftcl.files.folder_once`: an unfinished folder is written again)."""
    text = json.dumps(spec, sort_keys=True)
    folder = data_dir / f"{spec['kind']}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    if not generate:
        return folder
    return folder_once(folder, MANIFEST, spec, lambda tmp: write(tmp, spec), replace_other=True)


def _class_colour(index: int, count: int):
    """A distinct RGB colour per class (hues around the wheel)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index / max(count, 1)) % 1.0, 0.8, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


def _picture(rng, width: int, height: int, colour) -> Any:
    """A uint8 H x W x 3 image: a noisy background, a shape of ``colour`` at a random place."""
    import numpy as np

    image = rng.integers(0, 96, size=(height, width, 3), dtype=np.uint8)
    w, h = int(rng.integers(width // 3, width // 2 + 1)), int(rng.integers(height // 3, height // 2 + 1))
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image[y : y + h, x : x + w] = np.asarray(colour, dtype=np.uint8)
    return image


def write_imagefolder(folder: Path, spec: Mapping) -> None:
    """``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``: a class-coloured shape on noise per image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(spec["seed"])
    classes = spec["classes"]
    width, height = spec["size"]
    for split, sub in (("train", "train"), ("test", "val")):
        for index, name in enumerate(classes):
            (folder / sub / name).mkdir(parents=True, exist_ok=True)
            for k in range(spec["per_class"][split]):
                image = _picture(rng, width, height, _class_colour(index, len(classes)))
                Image.fromarray(image).save(folder / sub / name / f"{name}_{k:04d}.JPEG", quality=90)


def write_cifar(folder: Path, spec: Mapping) -> None:
    """torchvision's python-pickle layout of ``spec['kind']`` with ``per_class`` images per class and split."""
    import pickle

    import numpy as np

    layout = CIFAR_LAYOUT[spec["kind"]]
    rng = np.random.default_rng(spec["seed"])
    out = folder / layout["folder"]
    out.mkdir(parents=True)
    n_classes = layout["classes"]
    for split in ("train", "test"):
        labels = np.repeat(np.arange(n_classes), spec["per_class"][split])
        rng.shuffle(labels)
        images = np.stack([_picture(rng, 32, 32, _class_colour(int(c), n_classes)) for c in labels])
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), -1)  # CIFAR rows: R plane, G plane, B plane
        parts = np.array_split(np.arange(len(labels)), len(layout[split]))
        for name, part in zip(layout[split], parts, strict=True):
            batch = {"batch_label": f"smoke {name}", "data": data[part],
                     layout["label_key"]: labels[part].tolist(),
                     "filenames": [f"smoke_{split}_{i:05d}.png" for i in part]}
            if spec["kind"] == "cifar100":
                batch["coarse_labels"] = (labels[part] // 5).tolist()
            with open(out / name, "wb") as f:
                pickle.dump(batch, f)
    names = {layout["names_key"]: [f"class{i:02d}" for i in range(n_classes)]}
    if spec["kind"] == "cifar100":
        names["coarse_label_names"] = [f"super{i:02d}" for i in range(n_classes // 5)]
    with open(out / layout["meta"], "wb") as f:
        pickle.dump(names, f)


def detection_images(rng, classes: Sequence[str], count: int, prefix: str, images: Path,
                            annotations: Path) -> list[str]:
    """``count`` JPEGs (both orientations) with 1-3 class-coloured boxes each and their VOC XML; the ids."""
    import numpy as np
    from PIL import Image

    ids = []
    for k in range(count):
        width, height = VOC_SIDES[k % len(VOC_SIDES)]
        image = rng.integers(0, 96, size=(height, width, 3), dtype=np.uint8)
        objects = []
        for _ in range(int(rng.integers(1, 4))):
            label = int(rng.integers(len(classes)))
            w, h = int(rng.integers(24, width // 2 + 1)), int(rng.integers(24, height // 2 + 1))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            image[y : y + h, x : x + w] = np.asarray(_class_colour(label, len(classes)), dtype=np.uint8)
            objects.append((classes[label], (x, y, x + w, y + h)))
        image_id = f"{prefix}{k:06d}"
        Image.fromarray(image).save(images / f"{image_id}.jpg", quality=90)
        (annotations / f"{image_id}.xml").write_text(voc_xml(f"{image_id}.jpg", width, height, objects))
        ids.append(image_id)
    return ids


def write_voc(folder: Path, spec: Mapping) -> None:
    """``VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main/<set>.txt}`` for every image set."""
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    for year, split in spec["sets"]:
        voc = folder / "VOCdevkit" / f"VOC{year}"
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True, exist_ok=True)
        ids = detection_images(rng, spec["classes"], spec["images"], f"{year}_{split}_",
                                      voc / "JPEGImages", voc / "Annotations")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def write_voc_folder(folder: Path, spec: Mapping) -> None:
    """One folder of JPEGs with their VOC XML beside them (detection.dataset ``folder``)."""
    import numpy as np

    detection_images(np.random.default_rng(spec["seed"]), spec["classes"], spec["images"], "smoke_",
                            folder, folder)


def write_voc_subset(folder: Path, spec: Mapping) -> None:
    """A devkit of links to the real one's ``JPEGImages`` and ``Annotations``, and each image set's first ids."""
    source_root = Path(spec["source"])  # as ftcl.detection.data.find_devkit: root/VOCdevkit, or root itself
    devkit = source_root / "VOCdevkit" if (source_root / "VOCdevkit").is_dir() else source_root
    for year, split in spec["sets"]:
        source, voc = devkit / f"VOC{year}", folder / "VOCdevkit" / f"VOC{year}"
        ids_file = source / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise ConfigError(f"key 'detection.root' is {spec['source']!r}: its image set {ids_file} (year {year}, "
                              f"set {split!r} of detection.train_sets / test_sets) does not exist")
        (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for sub in ("JPEGImages", "Annotations"):
            if not (voc / sub).exists():
                (voc / sub).symlink_to(source / sub, target_is_directory=True)
        ids = [line for line in ids_file.read_text().splitlines() if line.strip()][: spec["images"]]
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
