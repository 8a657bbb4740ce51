"""Object-detection data: Pascal VOC (devkit and single-folder layouts), COCO json, composed scenes.

Every dataset here is a :class:`DetectionDataset` whose items are ``(image, target)``:

* ``image``: float tensor ``3 x H x W`` in [0, 1] (RGB; grey files are repeated to three channels,
  a 1-channel backbone averages them back, see ``ftcl.detection.model``);
* ``target``: ``{"boxes": float32 (N, 4) xyxy, "labels": int64 (N,) in 1..C, "difficult": bool (N,)}``
  (label 0 is the background, torchvision's convention).

``DetectionDataset.image_size(i)`` gives an item's ``(width, height)`` without decoding its image (the
training sampler groups images by orientation, as Detectron2's ``AspectRatioGroupedDataset``).

Boxes are in continuous, 0-based pixel coordinates. VOC files store 1-based inclusive pixel
indices, so a VOC box ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)``
(detectron2's ``pascal_voc.py`` convention); its width ``xmax - xmin + 1`` is the one the VOC
devkit's IoU uses, so the continuous IoU of these boxes is the devkit's ``+1``-pixel IoU of the raw
ones (``ftcl.detection.metrics`` evaluates in the devkit's own pixel indices, ``+1`` on ``xmin`` and
``ymin``, which gives back the XML's integers exactly).

Synthetic multi-object sets are written in the VOC devkit layout by :mod:`ftcl.detection.scenes`,
so the same VOC loader reads them.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ftcl.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm")



@dataclass(frozen=True)
class ImageAnnotation:
    """The boxes of one image, as read from its annotation file (``source``)."""

    image: Path
    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]
    names: tuple[str, ...]
    difficult: tuple[bool, ...]
    source: str


def parse_voc_xml(xml_path: str | Path, image_dir: str | Path) -> ImageAnnotation:
    """Read one Pascal VOC annotation file (VOC devkit, "Annotation" format).

    The image is ``image_dir / <filename>``; when that file is missing, a file in ``image_dir``
    with the annotation's stem and an image suffix is used (deepforest's ``OSBS_029.xml`` names a
    ``.tif``). ``<difficult>`` defaults to 0 when absent. Boxes become 0-based xyxy (module doc).
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"VOC annotation file {xml_path} not found")
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    boxes, names, difficult = [], [], []
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        xmin, ymin, xmax, ymax = (float(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append((xmin - 1.0, ymin - 1.0, xmax, ymax))
        names.append(obj.findtext("name").strip())
        difficult.append(obj.findtext("difficult", "0").strip() == "1")
    return ImageAnnotation(
        image=_image_file(Path(image_dir), root.findtext("filename", "").strip(), xml_path.stem),
        width=int(float(size.findtext("width"))) if size is not None else 0,
        height=int(float(size.findtext("height"))) if size is not None else 0,
        boxes=tuple(boxes),
        names=tuple(names),
        difficult=tuple(difficult),
        source=str(xml_path),
    )


def _image_file(image_dir: Path, filename: str, stem: str) -> Path:
    named = image_dir / filename
    if filename and named.is_file():
        return named
    for suffix in IMAGE_SUFFIXES:
        if (image_dir / (stem + suffix)).is_file():
            return image_dir / (stem + suffix)
    raise FileNotFoundError(f"image {named if filename else image_dir / stem} of annotation {stem} not found")


def find_devkit(root: str | Path) -> Path:
    """The ``VOCdevkit`` folder: ``root/VOCdevkit`` or ``root`` itself when it holds ``VOC20xx``."""
    root = Path(root)
    if (root / "VOCdevkit").is_dir():
        return root / "VOCdevkit"
    if any(root.glob("VOC20*")):
        return root
    raise FileNotFoundError(f"no Pascal VOC devkit at {root} (expected {root / 'VOCdevkit' / 'VOC2007'})")


def voc_devkit_annotations(root: str | Path, sets: Iterable[Sequence[str | int]]) -> list[ImageAnnotation]:
    """Annotations of the VOC devkit image sets ``[(year, split), ...]``, e.g. 07+12 trainval.

    Reads ``VOC<year>/ImageSets/Main/<split>.txt`` and, for each id,
    ``VOC<year>/Annotations/<id>.xml`` with the image in ``VOC<year>/JPEGImages``.
    """
    devkit = find_devkit(root)
    annotations = []
    for year, split in sets:
        folder = devkit / f"VOC{year}"
        ids_file = folder / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise FileNotFoundError(f"VOC image set {ids_file} not found")
        ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
        images = folder / "JPEGImages"
        annotations += [parse_voc_xml(folder / "Annotations" / f"{i}.xml", images) for i in ids]
    return annotations


def voc_folder_annotations(folder: str | Path) -> list[ImageAnnotation]:
    """Annotations of a single VOC-style folder: every ``*.xml`` with its image beside it."""
    folder = Path(folder)
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise FileNotFoundError(f"no VOC .xml annotation files in {folder}")
    return [parse_voc_xml(path, folder) for path in files]


def coco_annotations(json_path: str | Path, image_dir: str | Path) -> tuple[list[ImageAnnotation], list[str]]:
    """Annotations and class names (by category id) of a COCO ``instances_*.json``.

    COCO boxes are ``[x, y, w, h]`` in continuous 0-based pixels; they become xyxy. ``iscrowd``
    regions are kept as ``difficult`` (ignored by the evaluation, see ``ftcl.detection.metrics``).
    """
    json_path, image_dir = Path(json_path), Path(image_dir)
    if not json_path.is_file():
        raise FileNotFoundError(f"COCO annotation file {json_path} not found")
    if not image_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder {image_dir} not found")
    data = json.loads(json_path.read_text())
    categories = sorted(data["categories"], key=lambda c: c["id"])
    name_of = {c["id"]: c["name"] for c in categories}
    per_image: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    annotations = []
    for img in data["images"]:
        anns = [a for a in per_image[img["id"]] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        annotations.append(ImageAnnotation(
            image=image_dir / img["file_name"],
            width=int(img["width"]),
            height=int(img["height"]),
            boxes=tuple((x, y, x + w, y + h) for x, y, w, h in (a["bbox"] for a in anns)),
            names=tuple(name_of[a["category_id"]] for a in anns),
            difficult=tuple(bool(a.get("iscrowd", 0)) for a in anns),
            source=f"{json_path} (image id {img['id']})",
        ))
    return annotations, [c["name"] for c in categories]


def discover_classes(annotations: Iterable[ImageAnnotation]) -> list[str]:
    """Sorted class names found in the annotations (for VOC: the standard 20-class order)."""
    return sorted({name for ann in annotations for name in ann.names})


def read_image(path: str | Path) -> Tensor:
    """An image file as a float ``3 x H x W`` tensor in [0, 1] (grey and palette images become RGB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def image_file_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, from its header (PIL opens lazily: no pixel is decoded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} not found")
    with Image.open(path) as img:
        return img.size


class DetectionDataset(Dataset):
    """Images and their boxes; labels are 1 + the index of the box's name in ``classes``."""

    def __init__(self, annotations: Sequence[ImageAnnotation], classes: Sequence[str]):
        self.annotations = list(annotations)
        self.classes = list(classes)
        index = {name: i + 1 for i, name in enumerate(self.classes)}
        for ann in self.annotations:
            unknown = sorted(set(ann.names) - set(index))
            if unknown:
                raise ConfigError(f"{ann.source}: classes {unknown} are not in the class list {self.classes}")
        self._index = index

    def __len__(self) -> int:
        return len(self.annotations)

    def target(self, i: int) -> dict[str, Tensor]:
        """The boxes of item ``i`` without reading its image."""
        ann = self.annotations[i]
        return {
            "boxes": torch.tensor(ann.boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self._index[n] for n in ann.names], dtype=torch.int64),
            "difficult": torch.tensor(ann.difficult, dtype=torch.bool),
        }

    def image_size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of item ``i`` without decoding its image: the annotation's (VOC
        ``<size>``, COCO ``width``/``height``, the scenes' canvas), else the image file's header."""
        ann = self.annotations[i]
        if ann.width > 0 and ann.height > 0:
            return ann.width, ann.height
        return image_file_size(ann.image)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        return read_image(self.annotations[i].image), self.target(i)
