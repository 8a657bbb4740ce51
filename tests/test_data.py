"""Datasets (ftcl.data.datasets) and the batched two-view augmentation (ftcl.data.views)."""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import shutil
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from ftcl.config import resolve
from ftcl.config.types import Data
from ftcl.data import views
from ftcl.data.datasets import (
    DATASETS,
    FASHION_MNIST_DEFAULT_ROOT,
    DatasetNotFoundError,
    balanced_subset,
    build_dataset,
)


def cfg(dataset: str, **kw) -> Data:
    """The typed ``data`` section of a run config, the defaults but for ``kw``."""
    return dataclasses.replace(resolve().data, **{"dataset": dataset, "root": None, "num_workers": 0, **kw})


@pytest.fixture(scope="module")
def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return np.rint(d.images * 255 / 16).astype(np.uint8), d.target


# ------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_dataset():
    assert DATASETS.names() == ["cifar10", "cifar100", "digits", "fashion-mnist", "imagefolder"]
    with pytest.raises(KeyError, match="known: cifar10, cifar100, digits, fashion-mnist, imagefolder"):
        build_dataset(cfg("mnist"), "train", "pretrain")


def test_bad_split_and_mode():
    with pytest.raises(ValueError, match="split"):
        build_dataset(cfg("digits"), "val", "eval")
    with pytest.raises(ValueError, match="mode"):
        build_dataset(cfg("digits"), "train", "finetune")


# --------------------------------------------------------------------------------------- digits


def test_digits_shapes_classes_labels(digits_uint8):
    train = build_dataset(cfg("digits"), "train", "pretrain")
    test = build_dataset(cfg("digits"), "test", "eval")
    assert (len(train), len(test)) == (1347, 450)
    for ds in (train, test):
        assert (ds.num_classes, ds.channels, ds.image_size, ds.crops_on_device) == (10, 1, 8, True)
        assert ds.labels.dtype == torch.int64 and set(ds.labels.tolist()) == set(range(10))
        image, label = ds[3]
        assert image.shape == (1, 8, 8) and image.dtype == torch.uint8 and isinstance(label, int)
    assert train.mean == test.mean and train.std == test.std
    assert 0.25 < train.mean[0] < 0.35 and 0.3 < train.std[0] < 0.45
    # the two splits partition the 1797 digits, each image keeping its label
    images, targets = digits_uint8
    original = Counter((img.tobytes(), int(t)) for img, t in zip(images, targets))
    split = Counter(
        (img.tobytes(), lab)
        for ds in (train, test)
        for img, lab in zip(ds.images[:, 0].numpy(), ds.labels.tolist())
    )
    assert split == original


def test_digits_resized_at_load():
    ds = build_dataset(cfg("digits", image_size=16), "train", "eval")
    assert ds.images.shape == (1347, 1, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.image_size == 16


def test_balanced_subset_counts_and_determinism():
    ds = build_dataset(cfg("digits", train_subset=100, test_subset=35), "train", "pretrain")
    again = build_dataset(cfg("digits", train_subset=100), "train", "pretrain")
    assert len(ds) == 100 and torch.equal(ds.labels.bincount(), torch.full((10,), 10))
    assert torch.equal(ds.images, again.images)
    test = build_dataset(cfg("digits", train_subset=100, test_subset=35), "test", "eval")
    counts = test.labels.bincount(minlength=10)
    assert len(test) == 35 and counts.max() - counts.min() <= 1


def test_balanced_subset_with_a_short_class():
    labels = np.array([0] * 50 + [1] * 3 + [2] * 50)
    keep = balanced_subset(labels, 30)
    assert len(keep) == 30 and np.all(np.diff(keep) > 0)
    assert np.bincount(labels[keep]).tolist() == [14, 3, 13]
    assert np.array_equal(balanced_subset(labels, None), np.arange(len(labels)))
    assert np.array_equal(balanced_subset(labels, 1000), np.arange(len(labels)))


# --------------------------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_fashion_mnist_torchvision_layout(tmp_path, digits_uint8, suffix):
    images, targets = digits_uint8
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    big = np.kron(images, np.ones((1, 2, 2), dtype=np.uint8))  # 16x16 "clothes"
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", big[:300])
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", targets[:300])
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", big[300:400])
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", targets[300:400])
    test = build_dataset(cfg("fashion-mnist", root=str(tmp_path)), "test", "eval")
    train = build_dataset(cfg("fashion-mnist", root=str(tmp_path)), "train", "pretrain")
    assert (len(train), len(test), test.channels, test.image_size) == (300, 100, 1, 16)
    assert np.array_equal(test.images[:, 0].numpy(), big[300:400])
    assert test.labels.tolist() == targets[300:400].tolist()
    assert test.mean == train.mean  # test split normalised with the training split's statistics
    assert train.mean[0] == pytest.approx(big[:300].mean() / 255)


@pytest.mark.skipif(not FASHION_MNIST_DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_package():
    test = build_dataset(cfg("fashion-mnist", test_subset=500), "test", "eval")
    assert (len(test), test.channels, test.image_size, test.num_classes) == (500, 1, 28, 10)
    assert torch.equal(test.labels.bincount(), torch.full((10,), 50))
    assert test.mean[0] == pytest.approx(0.2860, abs=1e-3) and test.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_fashion_mnist_missing_root_names_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(cfg("fashion-mnist", root=str(missing)), "train", "pretrain")
    msg = str(err.value)
    assert isinstance(err.value, DatasetNotFoundError)
    assert str(missing / "train-images-idx3-ubyte") in msg
    assert str(missing / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg


def test_bad_idx_file_is_named(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        build_dataset(cfg("fashion-mnist", root=str(tmp_path)), "train", "pretrain")


# ---------------------------------------------------------------------------------------- cifar


def write_cifar(root: Path, folder: str, files: dict[str, int], label_key: str, classes: int) -> None:
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    for name, n in files.items():
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(i % classes) for i in range(n)],
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        if label_key == "fine_labels":
            batch["coarse_labels"] = [0] * n
        with open(root / folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)


def test_cifar10_fake_pickles(tmp_path):
    files = {f"data_batch_{i}": 20 for i in range(1, 6)} | {"test_batch": 30}
    write_cifar(tmp_path, "cifar-10-batches-py", files, "labels", 10)
    train = build_dataset(cfg("cifar10", root=str(tmp_path)), "train", "pretrain")
    test = build_dataset(cfg("cifar10", root=str(tmp_path), image_size=16), "test", "eval")
    assert (len(train), train.channels, train.image_size, train.num_classes) == (100, 3, 32, 10)
    assert (len(test), test.image_size) == (30, 16) and test[0][0].shape == (3, 16, 16)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f)
    assert torch.equal(train.images[0], torch.from_numpy(first["data"][0].reshape(3, 32, 32)))
    assert train.labels[:20].tolist() == first["labels"]
    train16 = build_dataset(cfg("cifar10", root=str(tmp_path), image_size=16), "train", "pretrain")
    assert len(test.mean) == 3 and train16.mean == test.mean and train16.std == test.std


def test_cifar100_fake_pickles_fine_labels(tmp_path):
    write_cifar(tmp_path, "cifar-100-python", {"train": 200, "test": 100}, "fine_labels", 100)
    test = build_dataset(cfg("cifar100", root=str(tmp_path / "cifar-100-python")), "test", "eval")
    assert (len(test), test.num_classes) == (100, 100) and test.labels.tolist() == list(range(100))


def test_cifar_missing_files_named(tmp_path):
    write_cifar(tmp_path, "cifar-10-batches-py", {"data_batch_1": 4}, "labels", 10)
    with pytest.raises(FileNotFoundError, match="data_batch_5") as err:
        build_dataset(cfg("cifar10", root=str(tmp_path)), "train", "pretrain")
    assert "data.root" in str(err.value)
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        build_dataset(cfg("cifar100"), "train", "pretrain")


# ---------------------------------------------------------------------------------- imagefolder


@pytest.fixture
def png_folder(tmp_path, digits_uint8) -> Path:
    """root/{train,val}/c<digit>/*.png: RGB 24x20 images made from real digits."""
    images, targets = digits_uint8
    for split, first, last in (("train", 0, 4), ("val", 4, 6)):
        for c in (0, 1, 2, 3):
            folder = tmp_path / split / f"c{c}"
            folder.mkdir(parents=True)
            picks = np.flatnonzero(targets == c)[first:last]
            for k, i in enumerate(picks):
                gray = Image.fromarray(images[i]).resize((20, 24))
                rgb = Image.merge("RGB", (gray, gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gray))
                rgb.save(folder / f"img{k}.png")
    (tmp_path / "train" / "c2" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagefolder_modes_and_labels(png_folder):
    sets = {
        mode: build_dataset(cfg("imagefolder", root=str(png_folder), image_size=16), "train", mode)
        for mode in ("pretrain", "eval", "eval_aug")
    }
    shapes = {mode: tuple(ds[0][0].shape) for mode, ds in sets.items()}
    assert shapes == {"pretrain": (2, 3, 16, 16), "eval": (3, 16, 16), "eval_aug": (3, 16, 16)}
    ds = sets["pretrain"]
    assert (len(ds), ds.num_classes, ds.channels, ds.image_size, ds.crops_on_device) == (16, 4, 3, 16, False)
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert ds[0][0].dtype == torch.uint8 and ds.mean == (0.485, 0.456, 0.406)
    batch, labels = next(iter(DataLoader(ds, batch_size=5, shuffle=False)))
    assert batch.shape == (5, 2, 3, 16, 16) and labels.tolist() == [0, 0, 0, 0, 1]
    assert pickle.loads(pickle.dumps(ds)).paths == ds.paths  # workers started by spawn get it too
    val = build_dataset(cfg("imagefolder", root=str(png_folder), test_subset=4), "test", "eval")
    assert len(val) == 4 and val.labels.tolist() == [0, 1, 2, 3] and val.image_size == 224


def test_imagefolder_class_list(png_folder):
    class_list = png_folder / "classes.txt"
    class_list.write_text("c3\n\nc1\n")
    ds = build_dataset(cfg("imagefolder", root=str(png_folder), class_list=str(class_list)), "test", "eval")
    assert ds.num_classes == 2 and ds.labels.tolist() == [0, 0, 1, 1]
    assert [p.parent.name for p in ds.paths] == ["c1", "c1", "c3", "c3"]
    class_list.write_text("c1\nc9\n")
    with pytest.raises(FileNotFoundError, match=str(png_folder / "val" / "c9")):
        build_dataset(cfg("imagefolder", root=str(png_folder), class_list=str(class_list)), "test", "eval")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        build_dataset(cfg("imagefolder", root=str(png_folder), class_list="nope.txt"), "test", "eval")


def test_imagefolder_empty_class_folder(png_folder):
    (png_folder / "train" / "c5").mkdir()
    with pytest.raises(FileNotFoundError, match=str(png_folder / "train" / "c5")):
        build_dataset(cfg("imagefolder", root=str(png_folder)), "train", "pretrain")


def test_imagefolder_corrupt_image(png_folder):
    bad = png_folder / "train" / "c0" / "img1.png"
    bad.write_bytes(bad.read_bytes()[:40])
    ds = build_dataset(cfg("imagefolder", root=str(png_folder), image_size=16), "train", "eval")
    ds[0]
    with pytest.raises(OSError, match=str(bad)):
        ds[1]


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "val")):
        build_dataset(cfg("imagefolder", root=str(tmp_path)), "test", "eval")
    with pytest.raises(FileNotFoundError, match="data.root is not set"):
        build_dataset(cfg("imagefolder"), "train", "eval")


def test_imagenet100_class_list_file():
    path = Path(__file__).resolve().parents[1] / "config" / "imagenet100.txt"
    names = path.read_text().split()
    assert len(names) == 100 and len(set(names)) == 100 and names == sorted(names)
    assert all(len(n) == 9 and n.startswith("n") and n[1:].isdigit() for n in names)
    assert "n02869837" in names and "n01749939" in names


# ---------------------------------------------------------------------------------------- views


@pytest.mark.parametrize("preset", ["v1", "v2"])
@pytest.mark.parametrize("channels", [1, 3])
def test_two_views_shapes_dtype_and_difference(preset, channels):
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (8, channels, 20, 20), dtype=torch.uint8)
    aug = views.TwoViews(preset, 16, channels, [0.5] * channels, [0.25] * channels)
    v1, v2 = aug(batch)
    assert v1.shape == v2.shape == (8, channels, 16, 16)
    assert v1.dtype == v2.dtype == torch.float32
    assert not torch.allclose(v1, v2)
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_two_views_from_loader_crops(preset):
    batch = torch.randint(0, 256, (6, 2, 3, 16, 16), dtype=torch.uint8)
    aug = views.TwoViews(preset, 16, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), crops_on_device=False)
    v1, v2 = aug(batch)
    assert v1.shape == v2.shape == (6, 3, 16, 16) and not torch.allclose(v1, v2)


def test_two_views_deterministic_under_seed():
    batch = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = views.TwoViews("v2", 32, 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.manual_seed(3)
    first = aug(batch)
    torch.manual_seed(3)
    second = aug(batch)
    third = aug(batch)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], third[0])


@pytest.mark.parametrize("preset", ["v1", "v2"])
def test_views_are_roughly_normalised(preset):
    ds = build_dataset(cfg("digits", image_size=16), "train", "pretrain")
    torch.manual_seed(0)
    both = torch.cat(views.TwoViews(preset, 16, 1, ds.mean, ds.std)(ds.images[:512]))
    # crops zoom in on the centred digits, so views are a little brighter than whole images
    assert abs(both.mean().item()) < 0.4 and 0.7 < both.std().item() < 1.3
    noise = torch.randint(0, 256, (256, 3, 16, 16), dtype=torch.uint8)
    both = torch.cat(views.TwoViews(preset, 16, 3, [0.5] * 3, [0.2887] * 3)(noise))
    assert abs(both.mean().item()) < 0.1
    plain = views.normalize(ds.images, ds.mean, ds.std)
    assert abs(plain.mean().item()) < 1e-4 and plain.std().item() == pytest.approx(1.0, abs=1e-3)


def test_crop_flip_identity_and_flip():
    x = torch.rand(4, 3, 12, 12)
    same = views.crop_flip(x, 12, (1.0, 1.0), flip=False, ratio=(1.0, 1.0))
    assert torch.allclose(same, x, atol=1e-5)
    torch.manual_seed(1)
    flipped = views.crop_flip(x, 12, (1.0, 1.0), flip=True, ratio=(1.0, 1.0))
    is_flip = [torch.allclose(f, s.flip(-1), atol=1e-5) for f, s in zip(flipped, x)]
    is_same = [torch.allclose(f, s, atol=1e-5) for f, s in zip(flipped, x)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip)


def test_colour_ops_match_torchvision():
    x = torch.rand(5, 3, 9, 9)
    f = torch.tensor([0.6, 0.8, 1.0, 1.2, 1.4])
    h = torch.tensor([-0.4, -0.1, 0.0, 0.2, 0.45])
    for i in range(5):
        one = x[i : i + 1]
        assert torch.allclose(
            views._brightness(one, f[i : i + 1])[0], TF.adjust_brightness(x[i], float(f[i]))
        )
        assert torch.allclose(
            views._contrast(one, f[i : i + 1])[0], TF.adjust_contrast(x[i], float(f[i])), atol=1e-5
        )
        assert torch.allclose(
            views._saturation(one, f[i : i + 1])[0], TF.adjust_saturation(x[i], float(f[i])), atol=1e-5
        )
        assert torch.allclose(views._hue(one, h[i : i + 1])[0], TF.adjust_hue(x[i], float(h[i])), atol=1e-5)
    gray = views.random_grayscale(x, 1.0)
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-5)


def test_blur_is_identity_when_not_applied_and_kernel_sizes():
    x = torch.rand(3, 2, 10, 10)
    assert torch.allclose(views.random_blur(x, 0.0, 5), x, atol=1e-6)
    blurred = views.random_blur(x, 1.0, 5)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    assert [views.blur_kernel_size(s) for s in (8, 28, 32, 64, 224)] == [3, 3, 3, 7, 23]


def test_eval_aug_and_normalize():
    batch = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = views.eval_aug_batch(batch, 24, (0.3,), (0.35,))
    assert out.shape == (4, 1, 24, 24) and out.dtype == torch.float32
    norm = views.normalize(batch, (0.3,), (0.35,))
    assert torch.allclose(norm, (batch.float() / 255 - 0.3) / 0.35)


def test_two_views_rejects_bad_arguments():
    with pytest.raises(ValueError, match="preset"):
        views.TwoViews("v3", 16, 1, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="3 values"):
        views.TwoViews("v2", 16, 3, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="2 channels"):
        views.TwoViews("v2", 16, 2, (0.5, 0.5), (0.5, 0.5))


def test_crop_aspect_ratio_is_in_pixels_on_non_square_images():
    torch.manual_seed(0)
    rows = torch.linspace(0, 1, 20).view(1, 1, 20, 1).expand(500, 1, 20, 40)
    cols = torch.linspace(0, 1, 40).view(1, 1, 1, 40).expand(500, 1, 20, 40)
    # half the area of a 20 x 40 image as a square crop: 20 x 20 pixels, the full height
    down = views.crop_flip(rows.contiguous(), 8, (0.5, 0.5), flip=False, ratio=(1.0, 1.0))
    assert torch.allclose(down.mean(dim=(1, 2, 3)), torch.full((500,), 0.5), atol=1e-4)
    across = views.crop_flip(cols.contiguous(), 8, (0.5, 0.5), flip=False, ratio=(1.0, 1.0))
    span = across[:, 0, 0, -1] - across[:, 0, 0, 0]
    assert torch.allclose(span, torch.full((500,), 0.5 * 7 / 8), atol=0.02)


def test_copying_torchvision_layout_from_debian(tmp_path):
    """The real idx files, copied into torchvision's layout, read the same as from the package."""
    if not FASHION_MNIST_DEFAULT_ROOT.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(FASHION_MNIST_DEFAULT_ROOT / name, raw / name)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # a small fake train split
        write_idx(raw / name, np.zeros((10, 28, 28) if "images" in name else (10,), dtype=np.uint8))
    copied = build_dataset(cfg("fashion-mnist", root=str(tmp_path), test_subset=200), "test", "eval")
    package = build_dataset(cfg("fashion-mnist", test_subset=200), "test", "eval")
    assert torch.equal(copied.images, package.images) and torch.equal(copied.labels, package.labels)
