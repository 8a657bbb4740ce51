"""Benchmark section "jpeg": per-worker images/s of the ImageNet-style ``imagefolder`` data path.

    .venv/bin/python benchmarks/bench.py --sections jpeg
    .venv/bin/python benchmarks/jpeg.py [--files 200] [--pairs 10]       # the same, standalone

Writes an ImageFolder of synthetic JPEGs with ImageNet's typical sizes (mostly 500 x 375 and
375 x 500, see ``SIZES``; quality 90; smooth gradients + multi-scale texture + noise, about 100 KB
per 500 x 375 file) to a temporary folder, then times, in one process with one thread (what one
DataLoader worker does: ``num_workers=0``, ``torch.set_num_threads(1)``), one item per file, the
items collated in batches of 32 by each pipeline's collate (a loader worker collates its batches):

* ``reference``: ``torchvision.datasets.ImageFolder`` (PIL decode, ``.convert("RGB")``) with two
  ``RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor`` views, stacked (``2 x 3 x 224 x 224``
  uint8), torch's default collate. Its crop scale is ftcl's default ``augment.crop_scale``, so only the
  implementations differ;
* ``ftcl decode=pil``: ftcl's ``imagefolder`` pretraining items (``build_dataset(..., "pretrain")``)
  with ``data.decode: pil``, the path before ``ftcl/data/jpeg.py`` (no flip: ftcl flips on the device);
* ``ftcl decode=fast``: the same with ``data.decode: fast`` (the default).

Rounds are interleaved: every round passes over all files once with each pipeline, back to back
(the order alternates between rounds), and each ftcl pipeline's ratio to the reference is taken per
round (a pair). The table gives the median images/s over rounds, the median per-pair ratio and a 95 %
interval for the ratio from Student's t on the log ratios (the interval of their geometric mean),
and the worker processes each pipeline needs for 2500 images/s (``ceil(2500 / images/s)``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image, features
from torch.utils.data import default_collate
from torchvision import datasets, transforms

from ftcl import config
from ftcl.data.datasets import build_dataset
from ftcl.data.jpeg import FastCrops, decoder, draft_reduction, turbo_decode, turbo_size
from ftcl.results.stats import goal_verdict, ratio_interval

# (width, height): share of files. Mostly ImageNet's 500 x 375 / 375 x 500, some other sizes.
SIZES = {(500, 375): 48, (375, 500): 22, (500, 333): 8, (333, 500): 4, (500, 500): 4, (400, 300): 4,
         (300, 225): 4, (800, 600): 3, (1024, 768): 2, (1600, 1200): 1}
CLASSES = 4
QUALITY = 90
TARGET_RATE = 2500  # images/s a ResNet-50 training step at 224 px can eat on a fast GPU node
VIEW_SIZE = 224
BATCH = 32  # items per collate call
GOAL = 2.0  # decode=fast images/s per worker over the reference's


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image with a photo's mix of frequencies: smooth gradients and waves, texture at 1/16,
    1/4 and full resolution, so that quality-90 JPEGs are about as large as ImageNet's."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, fx, fy = rng.uniform(-1, 1, 4)
        img[..., c] = (128 + 55 * np.sin(6 * fx * x / width + 4 * fy * y / height + c)
                       + 40 * a * x / width + 30 * b * y / height)
    for step, amp in ((16, 30.0), (4, 14.0)):
        low = rng.normal(0, amp, (height // step + 2, width // step + 2, 3)).astype(np.float32)
        texture = Image.fromarray((low + 128).clip(0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
        img += np.asarray(texture, np.float32) - 128
    img += rng.normal(0, 18.0, img.shape).astype(np.float32)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def write_folder(root: Path, n_files: int, seed: int = 0) -> dict[str, float]:
    """``root/train/c<k>/<i>.jpg`` (and a one-file ``val/``), sizes drawn by ``SIZES``' shares."""
    rng = np.random.default_rng(seed)
    total = sum(SIZES.values())
    sizes = [s for s, share in SIZES.items() for _ in range(max(1, round(share * n_files / total)))]
    sizes = [sizes[i] for i in rng.permutation(len(sizes))]
    nbytes = 0
    for i, (w, h) in enumerate(sizes):
        folder = root / "train" / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.jpg"
        synthetic_photo(w, h, rng).save(path, quality=QUALITY)
        nbytes += path.stat().st_size
    for k in range(CLASSES):  # build_dataset checks that the val split exists
        (root / "val" / f"c{k}").mkdir(parents=True, exist_ok=True)
        synthetic_photo(64, 48, rng).save(root / "val" / f"c{k}" / "0.jpg", quality=QUALITY)
    common = sum(1 for s in sizes if s in ((500, 375), (375, 500)))
    return {"files": len(sizes), "mean_kb": nbytes / len(sizes) / 1024,
            "mean_mpix": sum(w * h for w, h in sizes) / len(sizes) / 1e6, "share_500x375": common / len(sizes)}


class _TwoViews:
    def __init__(self, view: Callable):
        self.view = view

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([self.view(img), self.view(img)])


def pipelines(root: Path, crop_scale: tuple[float, float]) -> dict[str, Callable[[range], object]]:
    """name -> batch(indices) for the three pipelines (all over the same files in the same order):
    the items and their collate into one batch, the work a loader worker does per batch."""
    view = transforms.Compose([transforms.RandomResizedCrop(VIEW_SIZE, scale=crop_scale),
                               transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    reference = datasets.ImageFolder(str(root / "train"), transform=_TwoViews(view))
    data_cfg = config.resolve(overrides={"data.dataset": "imagefolder", "data.root": str(root),
                                         "data.image_size": VIEW_SIZE}).data
    old = build_dataset(dataclasses.replace(data_cfg, decode="pil"), "train", "pretrain", crop_scale)
    new = build_dataset(dataclasses.replace(data_cfg, decode="fast"), "train", "pretrain", crop_scale)
    assert [Path(p) for p, _ in reference.samples] == old.paths == new.paths, "pipelines read different files"
    def batches(items: Callable[[int], object], collate: Callable[[list], object]) -> Callable[[range], object]:
        return lambda indices: collate([items(i) for i in indices])

    return {"reference": batches(reference.__getitem__, default_collate),
            "ftcl decode=pil": batches(old.__getitem__, old.collate),
            "ftcl decode=fast": batches(new.__getitem__, new.collate)}


def draft_share(root: Path, crop_scale: tuple[float, float]) -> float:
    """Share of pretraining items whose file the fast path decodes at a DCT reduction (1/2 or less)."""
    crops = FastCrops(VIEW_SIZE, crop_scale)
    paths = sorted(root.glob("train/*/*.jpg"))
    torch.manual_seed(0)
    reduced = 0
    for path in paths:
        with Image.open(path) as img:
            reduced += draft_reduction(crops.boxes(*img.size), VIEW_SIZE) > 1
    return reduced / len(paths)


def decode_floor(root: Path, repeats: int = 3) -> dict[str, float]:
    """ms per file (best of ``repeats`` passes) of decoding alone: PIL full size (as the reference
    reads a file) and, with the fast path's own decoder (absent without ``simplejpeg``), TurboJPEG at
    full size (what decode=fast does for most items) and at a 1/8 DCT scaling (little left but
    entropy decoding, which every decode pays)."""
    files = [path.read_bytes() for path in sorted(root.glob("train/*/*.jpg"))]
    sizes = [turbo_size(data) for data in files]
    ways = {"PIL": lambda data, size: Image.open(io.BytesIO(data)).convert("RGB")}
    if all(sizes):
        ways["TurboJPEG"] = lambda data, size: turbo_decode(data, size)
        ways["TurboJPEG 1/8"] = lambda data, size: turbo_decode(data, size, 8)
    out = {}
    for name, decode in ways.items():
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            for data, size in zip(files, sizes):
                decode(data, size)
            best = min(best, time.perf_counter() - t0)
        out[name] = 1e3 * best / len(files)
    return out


def measure(batches: dict[str, Callable[[range], object]], n: int, pairs: int) -> dict[str, list[float]]:
    """images/s of each pipeline per round: ``pairs`` interleaved rounds after one warm-up round
    (first calls import and allocate); a round makes all ``n`` items in batches of ``BATCH`` (the
    last one smaller)."""
    names = list(batches)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(pairs + 1):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            batch = batches[name]
            t0 = time.perf_counter()
            for start in range(0, n, BATCH):
                batch(range(start, min(n, start + BATCH)))
            if r:  # round 0 warms up
                rates[name].append(n / (time.perf_counter() - t0))
    return rates


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"{model}, {os.cpu_count()} cores ({usable} usable), load average {load}; torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, Pillow {PIL.__version__}, "
            f"libjpeg-turbo: {features.check_feature('libjpeg_turbo')}")


def jpeg_section(files: int = 200, pairs: int = 10, folder: str | None = None) -> dict[str, dict[str, float]]:
    """Run the section and print its table; returns ``{pipeline: {images_per_s, ratio, low, high, workers}}``
    and ``decode_ms`` (:func:`decode_floor`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="ftcl-jpeg-", dir=folder) as tmp:
            root = Path(tmp)
            info = write_folder(root, files)
            crop_scale = tuple(config.defaults()["augment"]["crop_scale"])
            items = pipelines(root, crop_scale)
            reduced = draft_share(root, crop_scale)
            torch.manual_seed(0)
            rates = measure(items, info["files"], pairs)
            floor = decode_floor(root)
    finally:
        torch.set_num_threads(threads)
    print(f"\n# jpeg: imagefolder pretraining items ({VIEW_SIZE} px, two views, crop scale {list(crop_scale)}), "
          f"one process, one thread (= one loader worker), items collated in batches of {BATCH}\n"
          f"machine: {machine()}\n"
          f"data: {info['files']} synthetic quality-{QUALITY} JPEGs, {info['share_500x375']:.0%} 500x375 or 375x500, "
          f"mean {info['mean_mpix']:.3f} Mpixel, {info['mean_kb']:.0f} KB; decode=fast decodes "
          f"{reduced:.0%} of the items at a DCT reduction; its decoder: {decoder()}\n"
          f"{pairs} interleaved rounds over all files; ratio = geometric mean of the per-round ratios to the "
          f"reference, 95% interval from Student's t on the log ratios")
    ref = rates["reference"]
    out = {}
    print(f"| {'pipeline':<18} | {'images/s per worker':>19} | {'ratio to reference [95% interval]':>33} | "
          f"{f'workers for {TARGET_RATE} images/s':>26} |")
    print(f"|{'-' * 20}|{'-' * 20}:|{'-' * 34}:|{'-' * 27}:|")
    for name, values in rates.items():
        ips = statistics.median(values)
        ratios = [v / r for v, r in zip(values, ref)]
        ratio, low, high = ratio_interval(ratios) if name != "reference" else (1.0, 1.0, 1.0)
        workers = math.ceil(TARGET_RATE / ips)
        shown = "1 (reference)" if name == "reference" else f"{ratio:.2f} [{low:.2f}, {high:.2f}]"
        print(f"| {name:<18} | {ips:>19.1f} | {shown:>33} | {workers:>26} |")
        out[name] = {"images_per_s": ips, "ratio": ratio, "low": low, "high": high, "workers": workers}
    fast = out["ftcl decode=fast"]
    print(f"goal: decode=fast at least {GOAL:g}x the reference per worker: "
          f"{goal_verdict(fast['low'], fast['high'], GOAL)} (interval [{fast['low']:.2f}, {fast['high']:.2f}])")
    turbo = (f"TurboJPEG {floor['TurboJPEG']:.2f}, TurboJPEG at 1/8 scale {floor['TurboJPEG 1/8']:.2f} "
             f"(mostly entropy decoding, which every decode pays)" if "TurboJPEG" in floor
             else "TurboJPEG not measured (simplejpeg is not installed)")
    print(f"decoding alone, ms per file (best of 3 passes): PIL {floor['PIL']:.2f}, {turbo}; "
          f"reference {1e3 / out['reference']['images_per_s']:.2f} and decode=fast "
          f"{1e3 / fast['images_per_s']:.2f} ms per item")
    out["decode_ms"] = floor
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200, help="synthetic JPEGs to write (default 200)")
    parser.add_argument("--pairs", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--tmp", default=None, help="parent folder of the temporary ImageFolder (default: $TMPDIR)")
    args = parser.parse_args()
    jpeg_section(args.files, args.pairs, args.tmp)


if __name__ == "__main__":
    main()
