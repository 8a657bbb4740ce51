"""Composed detection scenes: a synthetic multi-object set written in the Pascal VOC devkit layout.

``compose_scenes`` pastes items of a labelled image set (the pretraining dataset's held-out split)
onto noisy canvases and writes each scene's PNG and VOC XML (1-based inclusive pixel boxes), so
:func:`ftcl.detection.data.voc_devkit_annotations` reads the result like any VOC set.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ftcl.config import ConfigError
from ftcl.config.types import DetectionScenes
from ftcl.detection.voc_xml import voc_xml
from ftcl.files import folder_once

SCENES_YEAR = "2007"
SCENES_MANIFEST = "scenes.json"
INK_THRESHOLD = 0.1  # a pasted pixel belongs to the object when it is above 10% of full scale

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
    try:
        return folder_once(folder, SCENES_MANIFEST, manifest,
                           lambda tmp: _write_scenes(source, class_names, tmp / "VOCdevkit" / f"VOC{SCENES_YEAR}",
                                                     spec))
    except FileExistsError:
        raise ConfigError(f"scenes folder {folder} exists but was not composed with these settings "
                          f"({manifest['spec']}); delete it or set detection.scenes.folder") from None


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
                voc_xml(f"{scene_id}.png", spec.canvas, spec.canvas, objects, depth=image.shape[0],
                        folder=f"VOC{SCENES_YEAR}"))
            ids.append(scene_id)
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def _write_png(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
