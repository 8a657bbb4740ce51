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

``compose_scenes`` writes a synthetic multi-object set in the VOC devkit layout from a labelled
image set (the pretraining dataset's held-out split), so the same VOC loader reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ftcl.config import ConfigError
from ftcl.config.types import DetectionScenes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".ppm")
SCENES_YEAR = "2007"
SCENES_MANIFEST = "scenes.json"
INK_THRESHOLD = 0.1  # a pasted pixel belongs to the object when it is above 10% of full scale


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


# ------------------------------------------------------------------------------------------ scenes
@dataclass(frozen=True)
class SceneSpec:
    """How ``compose_scenes`` builds a set: canvas side, items per scene, item side range (pixels),
    background noise amplitude (fraction of full scale), number of trainval/test scenes, seed."""

    canvas: int = 96
    items: tuple[int, int] = (2, 4)
    item_size: tuple[int, int] = (24, 48)
    noise: float = 0.1
    num_train: int = 1000
    num_test: int = 300
    seed: int = 0

    @classmethod
    def from_section(cls, scenes: DetectionScenes) -> SceneSpec:
        """From the run config's ``detection.scenes`` (``folder`` is not part of the spec)."""
        return cls(canvas=scenes.canvas, items=(scenes.items[0], scenes.items[1]),
                   item_size=(scenes.item_size[0], scenes.item_size[1]), noise=scenes.noise,
                   num_train=scenes.num_train, num_test=scenes.num_test, seed=scenes.seed)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Continuous xyxy box of the True pixels of a 2-D mask (None when there are none)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def compose_scene(
    items: Sequence[Tensor], canvas: int, item_size: tuple[int, int], noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, int, int, int] | None]]:
    """Paste uint8 ``C x S x S`` items, resized to a random side in ``item_size``, at random
    non-overlapping places on a ``canvas x canvas`` image with uniform noise of amplitude ``noise``.

    Returns the uint8 ``C x canvas x canvas`` image and, per item, the tight box of its ink
    (pixels above ``INK_THRESHOLD``) or None when the item found no free place or has no ink.
    Pixels combine by maximum, so an item's dark margin never hides the background noise.
    """
    channels = items[0].shape[0]
    image = (rng.random((channels, canvas, canvas)) * noise * 255.0).astype(np.uint8)
    taken: list[tuple[int, int, int, int]] = []
    boxes: list[tuple[int, int, int, int] | None] = []
    for item in items:
        side = int(rng.integers(item_size[0], item_size[1] + 1))
        place = _free_place(side, canvas, taken, rng)
        if place is None:
            boxes.append(None)
            continue
        x, y = place
        taken.append((x, y, x + side, y + side))
        patch = F.interpolate(item[None].float(), size=(side, side), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp_(0, 255).round_().to(torch.uint8).numpy()
        region = image[:, y : y + side, x : x + side]
        np.maximum(region, patch, out=region)
        box = tight_box(patch.max(axis=0) > INK_THRESHOLD * 255)
        boxes.append(None if box is None else (box[0] + x, box[1] + y, box[2] + x, box[3] + y))
    return image, boxes


def _free_place(side: int, canvas: int, taken: Sequence[tuple[int, int, int, int]],
                rng: np.random.Generator, tries: int = 50) -> tuple[int, int] | None:
    """Top-left corner of a ``side``-square inside the canvas that overlaps no ``taken`` square."""
    if side > canvas:
        return None
    for _ in range(tries):
        x, y = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
        if all(x + side <= x1 or x2 <= x or y + side <= y1 or y2 <= y for x1, y1, x2, y2 in taken):
            return x, y
    return None


def voc_xml(filename: str, width: int, height: int, depth: int,
            objects: Sequence[tuple[str, tuple[int, int, int, int]]]) -> str:
    """A Pascal VOC annotation document; boxes are continuous xyxy, written 1-based inclusive."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{SCENES_YEAR}"
    ET.SubElement(root, "filename").text = filename
    size = ET.SubElement(root, "size")
    for key, value in (("width", width), ("height", height), ("depth", depth)):
        ET.SubElement(size, key).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x1, y1, x2, y2) in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = "0"
        bnd = ET.SubElement(obj, "bndbox")
        for key, value in (("xmin", x1 + 1), ("ymin", y1 + 1), ("xmax", x2), ("ymax", y2)):
            ET.SubElement(bnd, key).text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def compose_scenes(source: Sequence, class_names: Sequence[str], folder: str | Path, spec: SceneSpec) -> Path:
    """Write a multi-object detection set in VOC layout under ``folder/VOCdevkit/VOC2007``.

    ``source[i]`` is ``(uint8 C x S x S image, label)`` (the ``ImageSet`` contract; use the
    pretraining dataset's held-out split). Items are shuffled with ``spec.seed`` and split in two
    disjoint halves: the first feeds the ``trainval`` scenes, the second the ``test`` scenes. Each
    scene holds ``spec.items`` (inclusive range) items; the box of an item is the tight box of its
    pasted ink and its class is ``class_names[label]``. The result depends only on the inputs and
    the seed. ``folder/scenes.json`` (written last) records the spec and classes; when it already
    matches, nothing is written again, so rows and seeds can share one folder. Composition happens
    in a temporary sibling folder that is renamed into place, so concurrent writers are safe.
    """
    folder = Path(folder)
    manifest = {"spec": asdict(spec), "classes": list(class_names), "items": len(source)}
    if _manifest_matches(folder, manifest):
        return folder
    if folder.exists():
        raise ConfigError(f"scenes folder {folder} exists but was not composed with these settings "
                          f"({manifest['spec']}); delete it or set detection.scenes.folder")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_scenes(source, class_names, tmp / "VOCdevkit" / f"VOC{SCENES_YEAR}", spec)
    (tmp / SCENES_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        if not _manifest_matches(folder, manifest):
            raise
    return folder


def _manifest_matches(folder: Path, manifest: Mapping) -> bool:
    path = folder / SCENES_MANIFEST
    return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(manifest))


def _write_scenes(source: Sequence, class_names: Sequence[str], voc: Path, spec: SceneSpec) -> None:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    order = rng.permutation(len(source))
    half = len(order) // 2
    if half == 0:
        raise ValueError("compose_scenes needs at least two source items")
    splits = (("trainval", order[:half], spec.num_train), ("test", order[half:], spec.num_test))
    for split, pool, count in splits:
        ids, cursor = [], 0
        for k in range(count):
            n_items = int(rng.integers(spec.items[0], spec.items[1] + 1))
            picks = [source[int(pool[(cursor + j) % len(pool)])] for j in range(n_items)]
            cursor += n_items
            image, boxes = compose_scene([p[0] for p in picks], spec.canvas, spec.item_size, spec.noise, rng)
            objects = [(class_names[int(p[1])], b) for p, b in zip(picks, boxes) if b is not None]
            scene_id = f"{split}_{k:06d}"
            _write_png(image, voc / "JPEGImages" / f"{scene_id}.png")
            (voc / "Annotations" / f"{scene_id}.xml").write_text(
                voc_xml(f"{scene_id}.png", spec.canvas, spec.canvas, image.shape[0], objects))
            ids.append(scene_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _write_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
