"""The fast decode-and-crop path of ``imagefolder`` (``data.decode: fast``, ftcl/data/jpeg.py) against
the reference path (``data.decode: pil``: PIL decode + torchvision RandomResizedCrop on PIL images)."""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms

from ftcl import config
from ftcl.config.types import Data
from ftcl.data import jpeg
from ftcl.data.datasets import build_dataset, folder_transform, load_rgb
from ftcl.data.device_decode import EncodedBatch, EncodedCrops
from ftcl.errors import ConfigError, CorruptImageError

SIZE = 32
SCALE = (0.2, 1.0)
# (width, height) of the train files; large enough that 32 px crops decode at 1/2 .. 1/8
SIZES = [(160, 120), (120, 160), (640, 480), (100, 75), (300, 40)]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients + a little noise: a JPEG-friendly, photo-like RGB image."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [128 + 90 * np.sin(2 * math.pi * (a * x + b * y) + c) for a, b, c in rng.uniform(0.5, 3, (3, 3))]
    img = np.stack(channels, -1) + rng.normal(0, 4, (height, width, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def cfg(root: Path, **kw) -> Data:
    """The typed ``data`` section for an ImageFolder at ``root``."""
    return dataclasses.replace(config.resolve().data, dataset="imagefolder", root=str(root), image_size=SIZE,
                               num_workers=0, **kw)


@pytest.fixture(scope="module")
def jpeg_root(tmp_path_factory) -> Path:
    """root/{train,val}/c{0,1}/*.jpg (quality 90) plus one grayscale and one CMYK JPEG in train/c1."""
    root = tmp_path_factory.mktemp("jpegs")
    for split in ("train", "val"):
        for c in (0, 1):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for k, (w, h) in enumerate(SIZES):
                photo(w, h, 10 * c + k).save(folder / f"{k}.jpg", quality=90)
    photo(200, 150, 99).convert("L").save(root / "train" / "c1" / "gray.jpg", quality=90)
    photo(200, 150, 98).convert("CMYK").save(root / "train" / "c1" / "cmyk.jpg", quality=90)
    return root


def pair(root: Path, mode: str, **kw):
    """The same split built with the fast and the reference path."""
    return (build_dataset(cfg(root, decode="fast", **kw), "train", mode, SCALE),
            build_dataset(cfg(root, decode="pil", **kw), "train", mode, SCALE))


def mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


def test_crop_boxes_are_torchvision_draws_from_the_same_rng(jpeg_root):
    """Same seed -> the very boxes RandomResizedCrop.get_params draws (fallback included: the 300 x 40
    file with a 0.9..1 area cannot fit a 3/4..4/3 box), and the torch RNG is left in the same state."""
    rrc = transforms.RandomResizedCrop(SIZE, scale=SCALE)
    for scale in (SCALE, (0.9, 1.0)):
        crops, rrc = jpeg.FastCrops(SIZE, scale), transforms.RandomResizedCrop(SIZE, scale=scale)
        for path in sorted(jpeg_root.glob("train/*/*.jpg")):
            with Image.open(path) as img:
                torch.manual_seed(7)
                ours = crops.boxes(*img.size)
                after = torch.rand(1)
                torch.manual_seed(7)
                theirs = [rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(2)]
                assert ours == theirs and torch.equal(after, torch.rand(1)), path
    with Image.open(jpeg_root / "train" / "c0" / "4.jpg") as img:  # 300 x 40 -> center-crop fallback
        assert jpeg.FastCrops(SIZE, (0.9, 1.0)).boxes(*img.size)[0] == (0, 123, 40, 53)  # 40 px high, ratio 4/3


def test_items_use_the_reference_boxes_and_rng(jpeg_root):
    """A pretraining item of either path from the same seed: same boxes (pixels within a grey level
    at full size), same RNG consumption afterwards."""
    fast, ref = pair(jpeg_root, "pretrain")
    assert fast.paths == ref.paths and fast.reader is not None and ref.transform is not None
    for i in range(len(fast)):
        torch.manual_seed(i)
        a, after_a = fast[i][0], torch.rand(1)
        torch.manual_seed(i)
        b, after_b = ref[i][0], torch.rand(1)
        assert torch.equal(after_a, after_b)
        assert mad(a, b) < 3.0, fast.paths[i]  # DCT-scaled decodes differ slightly (see the next test)


def test_area_and_aspect_quantiles_match_random_resized_crop():
    """Distributions, not just one seed: area share and log aspect ratio of 1000 boxes each."""
    img = Image.new("RGB", (500, 375))
    crops, rrc = jpeg.FastCrops(224, SCALE), transforms.RandomResizedCrop(224, scale=SCALE)
    torch.manual_seed(1)
    ours = np.array([b for _ in range(500) for b in crops.boxes(*img.size)], dtype=float)
    torch.manual_seed(2)
    theirs = np.array([rrc.get_params(img, rrc.scale, rrc.ratio) for _ in range(1000)], dtype=float)
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    for stat, tol in ((lambda b: b[:, 2] * b[:, 3] / (500 * 375), 0.05), (lambda b: np.log(b[:, 3] / b[:, 2]), 0.05)):
        assert np.allclose(np.quantile(stat(ours), q), np.quantile(stat(theirs), q), atol=tol)


def test_views_shape_dtype_and_differ(jpeg_root):
    fast, _ = pair(jpeg_root, "pretrain")
    torch.manual_seed(0)
    for i in range(len(fast)):
        views, label = fast[i]
        assert views.shape == (2, 3, SIZE, SIZE) and views.dtype == torch.uint8
        assert views.is_contiguous(memory_format=torch.channels_last)  # each view a packed S x S x 3 block
        # the 300 x 40 file has no 3/4..4/3 box of 20 % of its area: both views are the center crop
        assert torch.equal(views[0], views[1]) == (fast.paths[i].name == "4.jpg")
        assert label == fast.labels[i]
    for workers in (0, 1):  # the collate runs in the worker process when there is one
        batch, labels = next(iter(DataLoader(fast, batch_size=4, num_workers=workers, collate_fn=fast.collate)))
        assert batch.shape == (4, 2, 3, SIZE, SIZE) and labels.tolist() == [0, 0, 0, 0]
        assert batch.movedim(2, -1).is_contiguous()  # stacked as packed S x S x 3 views, no transpose
    items = [fast[i] for i in range(4)]
    batch, labels = fast.collate(items)
    assert torch.equal(batch, torch.stack([x for x, _ in items])) and labels.tolist() == [0, 0, 0, 0]
    assert pickle.loads(pickle.dumps(fast)).paths == fast.paths  # spawned workers get it too


@pytest.mark.parametrize("name", ["2.jpg", "0.jpg", "1.jpg"])
def test_crop_matches_a_full_resolution_pil_crop_of_the_same_box(jpeg_root, name):
    """Each view against PIL's full-resolution decode + crop + antialiased bilinear resize of the same
    box, at a DCT reduction (1/2 .. 1/8) and at full size."""
    path = jpeg_root / "train" / "c0" / name
    crops = jpeg.FastCrops(SIZE, SCALE)
    full = load_rgb(path)
    reductions = set()
    for seed in range(12):
        torch.manual_seed(seed)
        views = crops(path)
        torch.manual_seed(seed)
        with Image.open(path) as img:
            boxes = crops.boxes(*img.size)
        reductions.add(jpeg.draft_reduction(boxes, SIZE))
        for view, (top, left, h, w) in zip(views, boxes):
            expected = full.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
            expected = torch.from_numpy(np.asarray(expected).copy()).permute(2, 0, 1)
            assert mad(view, expected) < (1.5 if jpeg.draft_reduction(boxes, SIZE) > 1 else 0.5)
    # 640 x 480: always decoded at 1/4 or 1/8; 160 x 120 and 120 x 160: at 1/2 and at full size
    assert reductions == ({4, 8} if name == "2.jpg" else {1, 2})


def pil_draft(data: bytes, reduction: int) -> np.ndarray:
    """PIL's decode of a JPEG at 1/``reduction`` size (``draft``), as RGB."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (img.size[0] // reduction, img.size[1] // reduction))
    return np.asarray(img.convert("RGB"))


def test_turbojpeg_decodes_bit_identically_to_pil(jpeg_root):
    """The fast path's decodes (TurboJPEG) are PIL's pixels exactly, at full size and at 1/2, 1/4 and
    1/8 DCT scaling: baseline, progressive, 4:4:4 and greyscale files; CMYK and non-JPEG files are
    left to PIL."""
    for path in sorted(jpeg_root.glob("train/*/*.jpg")):
        data = path.read_bytes()
        if path.name == "cmyk.jpg":
            assert jpeg.turbo_size(data) is None
            continue
        size = jpeg.turbo_size(data)
        assert size == load_rgb(path).size[::-1]
        for reduction in (1, 2, 4, 8):
            assert np.array_equal(jpeg.turbo_decode(data, size, reduction), pil_draft(data, reduction)), path
    img = load_rgb(jpeg_root / "train" / "c0" / "2.jpg")
    for options in ({"progressive": True}, {"subsampling": 0}, {"quality": 75}):
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", **options)
        data = buffer.getvalue()
        for reduction in (1, 2):
            decoded = jpeg.turbo_decode(data, jpeg.turbo_size(data), reduction)
            assert np.array_equal(decoded, pil_draft(data, reduction)), (options, reduction)
    png = io.BytesIO()
    img.save(png, "PNG")
    assert jpeg.turbo_size(png.getvalue()) is None


def test_jpeg_with_a_recoverable_libjpeg_warning_is_decoded_as_pil_decodes_it(tmp_path, jpeg_root):
    """libjpeg's "corrupt data: extraneous bytes" is a warning that PIL (the reference) decodes
    through; TurboJPEG's strict mode rejects the file, so the fast path hands it to PIL."""
    for split in ("train", "val"):
        (tmp_path / split / "c0").mkdir(parents=True)
    good = (jpeg_root / "train" / "c0" / "0.jpg").read_bytes()
    start_of_scan = good.index(b"\xff\xda")
    path = tmp_path / "train" / "c0" / "extra_bytes.jpg"
    path.write_bytes(good[:start_of_scan] + b"\x00\x00\x00" + good[start_of_scan:])
    assert jpeg.turbo_size(path.read_bytes()) is None
    fast, ref = pair(tmp_path, "pretrain")
    torch.manual_seed(0)
    a = fast[0][0]
    torch.manual_seed(0)
    assert mad(a, ref[0][0]) < 1.0


def test_box_sampler_survives_pickling():
    """Spawned loader workers get a copy: same draws after a pickle round trip."""
    sampler = jpeg.BoxSampler(SCALE)
    copy = pickle.loads(pickle.dumps(sampler))
    torch.manual_seed(5)
    a = [sampler.box(375, 500) for _ in range(5)]
    torch.manual_seed(5)
    assert a == [copy.box(375, 500) for _ in range(5)]


def test_without_simplejpeg_pil_decodes_and_the_items_are_the_same(jpeg_root, monkeypatch):
    fast, _ = pair(jpeg_root, "pretrain")
    torch.manual_seed(4)
    turbo = [fast[i][0] for i in range(len(fast))]
    monkeypatch.setattr(jpeg, "simplejpeg", None)
    assert jpeg.turbo_size((jpeg_root / "train" / "c0" / "0.jpg").read_bytes()) is None
    torch.manual_seed(4)
    assert all(torch.equal(a, fast[i][0]) for i, a in enumerate(turbo))


def test_pixels_without_arrow_give_the_same_items(jpeg_root, monkeypatch):
    fast, _ = pair(jpeg_root, "pretrain")
    torch.manual_seed(3)
    arrow = [fast[i][0] for i in range(len(fast))]
    monkeypatch.setattr(jpeg, "_ARROW_EXPORT", False)
    torch.manual_seed(3)
    assert all(torch.equal(a, fast[i][0]) for i, a in enumerate(arrow))


def test_eval_mode_is_the_reference(jpeg_root):
    fast, ref = pair(jpeg_root, "eval")
    reference = folder_transform("eval", SIZE, SCALE)
    for i in range(len(fast)):
        assert torch.equal(fast[i][0], ref[i][0])
        assert torch.equal(fast[i][0], reference(load_rgb(fast.paths[i])))


def test_eval_aug_crops_and_flips_as_the_reference(jpeg_root):
    fast, ref = pair(jpeg_root, "eval_aug")
    flipped = 0
    for i in range(len(fast)):
        torch.manual_seed(100 + i)
        a = fast[i][0]
        torch.manual_seed(100 + i)
        b = ref[i][0]
        assert a.shape == (3, SIZE, SIZE) and a.dtype == torch.uint8
        assert mad(a, b) < 3.0 and mad(a, b) <= mad(a, b.flip(-1))  # the same flip draw
        flipped += mad(a, b.flip(-1)) > mad(a, b) + 1
    assert flipped  # flips happen and differ from the unflipped view
    batch, _ = next(iter(DataLoader(fast, batch_size=4, collate_fn=fast.collate)))
    assert batch.shape == (4, 3, SIZE, SIZE) and batch.is_contiguous(memory_format=torch.channels_last)


def test_png_and_odd_modes_fall_back_to_plain_decoding(tmp_path, jpeg_root):
    for split in ("train", "val"):
        folder = tmp_path / split / "c0"
        folder.mkdir(parents=True)
        photo(90, 70, 1).convert("RGBA").save(folder / "a.png")
        photo(70, 90, 2).convert("P").save(folder / "b.png")
    fast, ref = pair(tmp_path, "pretrain")
    for i in range(len(fast)):
        torch.manual_seed(i)
        a = fast[i][0]
        torch.manual_seed(i)
        assert a.shape == (2, 3, SIZE, SIZE) and mad(a, ref[i][0]) < 1.0
    fast, ref = pair(jpeg_root, "pretrain")  # grayscale and CMYK JPEGs
    for name in ("gray.jpg", "cmyk.jpg"):
        i = fast.paths.index(jpeg_root / "train" / "c1" / name)
        torch.manual_seed(i)
        a = fast[i][0]
        torch.manual_seed(i)
        assert a.shape == (2, 3, SIZE, SIZE) and mad(a, ref[i][0]) < 3.0, name


def test_corrupt_jpeg_fails_naming_the_file(tmp_path, jpeg_root):
    for split in ("train", "val"):
        (tmp_path / split / "c0").mkdir(parents=True)
    good = (jpeg_root / "train" / "c0" / "2.jpg").read_bytes()
    (tmp_path / "train" / "c0" / "a_truncated.jpg").write_bytes(good[: len(good) // 2])
    small = (jpeg_root / "train" / "c0" / "4.jpg").read_bytes()  # 300 x 40: always decoded at full size
    (tmp_path / "train" / "c0" / "a_truncated_near_the_end.jpg").write_bytes(small[: int(len(small) * 0.95)])
    (tmp_path / "train" / "c0" / "b_not_an_image.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    for mode in ("pretrain", "eval_aug"):
        fast = build_dataset(cfg(tmp_path, decode="fast"), "train", mode, SCALE)
        for i, path in enumerate(fast.paths):
            with pytest.raises(CorruptImageError, match=f"cannot decode image file {path}"):
                fast[i]


def test_decode_key_is_checked():
    assert config.defaults()["data"]["decode"] == "fast"
    assert config.resolve(overrides={"data.decode": "pil"}).data.decode == "pil"
    assert config.resolve(overrides={"data.decode": "gpu"}).data.decode == "gpu"
    with pytest.raises(ConfigError, match="data.decode"):
        config.resolve(overrides={"data.decode": "nvjpeg"})
    with pytest.raises(ValueError, match="data.decode"):
        jpeg.check_decode("turbo")


# ------------------------------------------------------------- data.decode: gpu (CPU decode standing in)
def device_decoded(dataset, indices, device="cpu", workers=0):
    """Items of a ``decode: gpu`` dataset, collated and decoded as the training step does (``.to``)."""
    loader = DataLoader(Subset(dataset, list(indices)), batch_size=len(indices), num_workers=workers,
                        collate_fn=dataset.collate)
    batch, labels = next(iter(loader))
    return batch.to(device), labels


@pytest.mark.parametrize("mode", ["pretrain", "eval_aug"])
def test_device_decode_draws_the_reference_boxes_and_flips(jpeg_root, mode):
    """Same seed -> the boxes and flips of the fast path (hence of torchvision's RandomResizedCrop), the
    same RNG state after; the pixels within a grey level and a half of the fast path's (float resize
    of a full-size decode against uint8 resize or a DCT-scaled decode)."""
    gpu = build_dataset(cfg(jpeg_root, decode="gpu"), "train", mode, SCALE)
    fast = build_dataset(cfg(jpeg_root, decode="fast"), "train", mode, SCALE)
    assert isinstance(gpu.reader, EncodedCrops)
    for i in range(len(gpu)):
        torch.manual_seed(i)
        item, label = gpu[i]
        after_gpu = torch.rand(1)
        torch.manual_seed(i)
        expected = fast[i][0]
        after_fast = torch.rand(1)
        assert torch.equal(after_gpu, after_fast) and label == fast.labels[i]
        views = EncodedBatch([item], SIZE, mode == "eval_aug").to("cpu")[0]
        assert views.shape == expected.shape and views.dtype == torch.uint8
        assert mad(views, expected) < 1.5, gpu.paths[i]


def test_device_decode_batches_through_loader_workers(jpeg_root):
    """A batch collated in a worker process and decoded by ``.to``: the shapes the training step takes;
    the CMYK file (not for the device decoder) arrives as views made in the worker."""
    gpu = build_dataset(cfg(jpeg_root, decode="gpu"), "train", "pretrain", SCALE)
    cmyk = [i for i, p in enumerate(gpu.paths) if p.name == "cmyk.jpg"]
    torch.manual_seed(0)
    views, labels = device_decoded(gpu, range(len(gpu)), workers=1)
    assert views.shape == (len(gpu), 2, 3, SIZE, SIZE) and views.dtype == torch.uint8
    assert labels.tolist() == gpu.labels.tolist()
    assert cmyk and gpu[cmyk[0]][0].views is not None and gpu[0][0].views is None
