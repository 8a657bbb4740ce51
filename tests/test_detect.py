"""Detection transfer: backbone loading, VOC/scene data, VOC07 AP, and a short fine-tune that learns."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops.misc import FrozenBatchNorm2d

from ftcl import config
from ftcl.checkpoint import FORMAT, CheckpointError, atomic_save
from ftcl.config import ConfigError
from ftcl.config.types import Detection
from ftcl.detection import data as ddata
from ftcl.detection import scenes
from ftcl.detection.metrics import evaluate_detections, voc07_ap, voc_precision_recall
from ftcl.detection.model import AlignedRoIAlign, backbone_weights, build_detector
from ftcl.detection.norm import BatchLayout, VirtualSyncBatchNorm2d, feature_extent
from ftcl.detection.train import hflip, lr_at, precise_bn, train_detector, update_bn_stats
from ftcl.models.backbones import build_backbone

SMALL_MODEL = {"model.backbone": "resnet18", "model.width": 16, "model.small_stem": True}
SMALL_DETECTOR = {"min_size": [64], "max_size": 64, "anchor_sizes": [16, 32], "aspect_ratios": [1.0],
                  "rpn_pre_nms_top_n": [300, 300], "rpn_post_nms_top_n": [100, 50], "rpn_batch_size": 64,
                  "roi_batch_size": 32, "roi_pool_size": 7}


def write_pretrain_checkpoint(folder: Path, overrides: dict, in_channels: int = 1, seed: int = 0,
                              weights_of: dict | None = None) -> tuple[Path, dict]:
    """A pretraining checkpoint (contract "ftcl-pretrain/1"): seeded random convolutions and BatchNorm
    tensors moved off their defaults (so a comparison is not vacuous); the weights belong to the
    ``weights_of`` model config when given (a mismatched checkpoint)."""
    cfg = config.resolve(overrides={**overrides, "data.dataset": "digits", "tracking.enabled": False})
    torch.manual_seed(seed)
    model = weights_of or config.to_dict(cfg.model)
    state = build_backbone(model["backbone"], model["width"], model["small_stem"], in_channels).state_dict()
    for key, value in state.items():
        if key.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "running_var", "downsample.1.weight")):
            value.uniform_(0.8, 1.2)
        elif key.endswith(("bias", "running_mean")):
            value.normal_(0.0, 0.05)
    path = atomic_save({"format": FORMAT, "epoch": 3, "config": config.to_dict(cfg), "in_channels": in_channels,
                        "backbone": state}, folder / "checkpoints" / "last.pt")
    return path, state


def small_settings(**extra) -> Detection:
    overrides = {f"detection.{k}": v for k, v in {**SMALL_DETECTOR, **extra}.items()}
    return config.resolve(overrides=overrides).detection


# ------------------------------------------------------------------ (i) the checkpoint's weights
@pytest.mark.parametrize("head", ["c4", "fpn"])
@pytest.mark.parametrize("norm", ["frozen", "sync", "train"])
def test_detector_holds_the_checkpoint_backbone_weights(tmp_path, head, norm):
    path, state = write_pretrain_checkpoint(tmp_path, SMALL_MODEL)
    settings = small_settings(anchor_sizes=[8, 16, 32, 64, 128] if head == "fpn" else [16, 32])
    model = build_detector("pretrained", tmp_path, head, 3, norm, settings=settings)
    weights = backbone_weights(model)
    compared = [k for k in state if not k.endswith("num_batches_tracked")]
    assert len(compared) > 50
    for key in compared:
        assert torch.equal(weights[key], state[key]), key
    small_model = config.to_dict(config.resolve(overrides=SMALL_MODEL).model)
    random_model = build_detector("random", None, head, 3, norm, model_cfg=small_model, in_channels=1,
                                  settings=settings)
    assert not torch.equal(backbone_weights(random_model)["conv1.weight"], state["conv1.weight"])


def test_one_channel_backbone_detects_on_rgb_images(tmp_path):
    write_pretrain_checkpoint(tmp_path, SMALL_MODEL, in_channels=1)
    model = build_detector("pretrained", tmp_path, "c4", 3, "frozen", settings=small_settings()).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])
    assert out[0]["boxes"].shape[1] == 4


def test_frozen_norm_and_freeze_at_leave_early_stages_untrainable(tmp_path):
    write_pretrain_checkpoint(tmp_path, SMALL_MODEL)
    model = build_detector("pretrained", tmp_path, "c4", 3, "train", settings=small_settings(freeze_at=2))
    assert not model.backbone.conv1.weight.requires_grad
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert model.backbone.layer2[0].conv1.weight.requires_grad
    assert isinstance(model.backbone.bn1, FrozenBatchNorm2d)
    assert isinstance(model.backbone.layer2[0].bn1, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("norm", ["frozen", "sync", "train"])
def test_c4_box_head_is_mocos_res5_extra_norm_and_aligned_roialign(tmp_path, norm):
    write_pretrain_checkpoint(tmp_path, SMALL_MODEL)
    torch.manual_seed(0)
    model = build_detector("pretrained", tmp_path, "c4", 3, norm, settings=small_settings(roi_pool_size=14))
    head = model.roi_heads.box_head
    assert [name for name, _ in head.named_children()] == ["layer4", "norm", "pool", "flatten"]
    channels = head.layer4[-1].conv2.out_channels  # resnet18 basic blocks: res5's output channels
    expected = {"frozen": FrozenBatchNorm2d, "sync": VirtualSyncBatchNorm2d, "train": torch.nn.BatchNorm2d}[norm]
    assert type(head.norm) is expected and head.norm.weight.shape == (channels,)
    x = torch.randn(2, channels, 3, 3)
    if norm == "frozen":  # Detectron2's FrozenBatchNorm2d defaults: identity
        assert torch.allclose(head.norm(x), x, atol=1e-6)
    else:
        assert torch.equal(head.norm.running_mean, torch.zeros(channels)) and head.norm.weight.requires_grad
    assert any(k.startswith("roi_heads.box_head.norm.") for k in model.state_dict())

    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, AlignedRoIAlign) and pool.output_size == (14, 14) and pool.sampling_ratio == 0
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.25)
    assert predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.25)
    assert not predictor.cls_score.bias.any() and not predictor.bbox_pred.bias.any()
    model.eval()
    with torch.no_grad():
        assert model([torch.rand(3, 64, 64)])[0]["boxes"].shape[1] == 4


def test_aligned_roialign_samples_at_half_pixel_centres_with_the_inferred_scale():
    # feature value = the continuous x coordinate of the feature pixel's centre (index + 0.5)
    feature = (torch.arange(8.0) + 0.5).expand(1, 1, 8, 8).contiguous()
    box = torch.tensor([[16.0, 16.0, 80.0, 48.0]])  # image pixels; the image is 128 x 128, scale 1/16
    pool = AlignedRoIAlign("0", output_size=2, sampling_ratio=0)
    assert pool.infer_scale(feature, [(128, 128), (120, 100)]) == 1 / 16
    out = pool({"0": feature}, [box], [(128, 128)])
    # aligned=True: bin j's centre is at x1 + (j + 0.5) * width / 2 in continuous image coordinates
    centres = (16.0 + (torch.arange(2.0) + 0.5) * 64 / 2) / 16
    assert torch.allclose(out[0, 0, 0], centres) and torch.allclose(out[0, 0, 1], centres)
    from torchvision.ops import roi_align

    legacy = roi_align(feature, [box], 2, spatial_scale=1 / 16, sampling_ratio=0, aligned=False)
    assert torch.allclose(legacy[0, 0, 0], centres + 0.5)  # the half-pixel shift aligned=True removes


@pytest.mark.parametrize("mismatch", ["width", "arch", "ddp_prefix"])
def test_a_checkpoint_that_does_not_fit_fails_loudly(tmp_path, mismatch):
    if mismatch == "ddp_prefix":
        path, state = write_pretrain_checkpoint(tmp_path, SMALL_MODEL)
        saved = torch.load(path, weights_only=False)
        saved["backbone"] = {f"module.{k}": v for k, v in state.items()}
        atomic_save(saved, path)
    else:
        key, value = ("model.width", 32) if mismatch == "width" else ("model.backbone", "resnet50")
        wrong = config.to_dict(config.resolve(overrides={**SMALL_MODEL, key: value}).model)
        write_pretrain_checkpoint(tmp_path, SMALL_MODEL, weights_of=wrong)
    with pytest.raises(CheckpointError, match=r"last\.pt does not fit this backbone"):
        build_detector("pretrained", tmp_path, "c4", 3, "frozen", settings=small_settings())


def test_pretrained_init_without_checkpoint_and_supervised_without_weights_are_config_errors():
    with pytest.raises(ConfigError, match="checkpoint"):
        build_detector("pretrained", None, "c4", 3, "frozen", settings=small_settings())
    with pytest.raises(ConfigError, match="supervised_weights"):
        build_detector("supervised", None, "c4", 3, "frozen", settings=small_settings())


def test_unknown_detection_key_or_value_is_rejected():
    with pytest.raises(ConfigError, match="detection.iteration"):
        config.resolve(overrides={"detection.iteration": 5})
    with pytest.raises(ConfigError, match="detection.head"):
        config.resolve(overrides={"detection.head": "c5"})


# ------------------------------------------------------------------ (ii) VOC loader on real files
def deepforest_data() -> Path:
    spec = importlib.util.find_spec("deepforest")
    if spec is None or spec.origin is None:
        pytest.skip("deepforest is not installed (pip install --no-deps deepforest)")
    return Path(spec.origin).parent / "data"


def boxes_by_regex(xml_text: str) -> list[tuple[str, tuple[float, ...]]]:
    """An independent reading of a VOC file: the name and bndbox of every <object>."""
    found = []
    for obj in re.findall(r"<object>(.*?)</object>", xml_text, flags=re.S):
        name = re.search(r"<name>\s*(.*?)\s*</name>", obj).group(1)
        coords = [float(re.search(rf"<{k}>\s*([-\d.]+)\s*</{k}>", obj).group(1))
                  for k in ("xmin", "ymin", "xmax", "ymax")]
        found.append((name, (coords[0] - 1, coords[1] - 1, coords[2], coords[3])))
    return found


def test_voc_loader_reads_the_deepforest_annotations():
    folder = deepforest_data()
    xml_files = sorted(folder.glob("*.xml"))
    expected = {p.stem: boxes_by_regex(p.read_text()) for p in xml_files}
    annotations = ddata.voc_folder_annotations(folder)
    classes = ddata.discover_classes(annotations)
    dataset = ddata.DetectionDataset(annotations, classes)

    assert len(dataset) == len(xml_files) == 4
    assert sum(len(v) for v in expected.values()) == 951
    assert classes == sorted({name for objs in expected.values() for name, _ in objs})
    for i, ann in enumerate(annotations):
        objs = expected[Path(ann.source).stem]
        target = dataset.target(i)
        assert len(target["boxes"]) == len(objs)
        assert [classes[k - 1] for k in target["labels"].tolist()] == [name for name, _ in objs]
        assert np.allclose(target["boxes"].numpy(), [box for _, box in objs])
        assert not target["difficult"].any()
    small = next(i for i, a in enumerate(annotations) if a.image.name == "SOAP_061.png")
    image, _ = dataset[small]
    assert image.shape == (3, annotations[small].height, annotations[small].width)
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_voc_devkit_loader_names_the_missing_path(tmp_path):
    (tmp_path / "VOCdevkit" / "VOC2007").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"VOC2012/ImageSets/Main/trainval\.txt"):
        ddata.voc_devkit_annotations(tmp_path, [("2012", "trainval")])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere")):
        ddata.voc_devkit_annotations(tmp_path / "elsewhere", [("2007", "test")])


def test_difficult_flag_and_one_based_voc_coordinates(tmp_path):
    xml = ("<annotation><filename>a.png</filename><size><width>20</width><height>10</height></size>"
           "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>2</ymin>"
           "<xmax>5</xmax><ymax>6</ymax></bndbox></object></annotation>")
    (tmp_path / "a.xml").write_text(xml)
    (tmp_path / "a.png").write_bytes(b"")
    ann = ddata.parse_voc_xml(tmp_path / "a.xml", tmp_path)
    assert ann.boxes == ((0.0, 1.0, 5.0, 6.0),) and ann.difficult == (True,) and ann.names == ("cat",)


def test_image_size_comes_from_the_annotation_else_the_file_header(tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    obj = "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>"
    (tmp_path / "a.xml").write_text(f"<annotation><filename>a.png</filename>{obj}</annotation>")
    (tmp_path / "b.xml").write_text(f"<annotation><filename>a.png</filename><size><width>7</width>"
                                    f"<height>9</height></size>{obj}</annotation>")
    data = ddata.DetectionDataset(ddata.voc_folder_annotations(tmp_path), ["cat"])
    assert [data.image_size(i) for i in range(2)] == [(20, 10), (7, 9)]  # b: the XML's, the file is not read


def test_coco_loader_converts_boxes_classes_and_crowds(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    instances = {
        "images": [{"id": 5, "file_name": "a.png", "width": 40, "height": 30}],
        "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 7, "bbox": [2, 3, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 4, 4], "iscrowd": 1},
            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [1, 1, 0, 4], "iscrowd": 0},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    annotations, classes = ddata.coco_annotations(tmp_path / "instances.json", tmp_path)
    assert classes == ["cat", "dog"]  # by category id
    image, target = ddata.DetectionDataset(annotations, classes)[0]
    assert image.shape == (3, 30, 40)
    assert target["boxes"].tolist() == [[2.0, 3.0, 12.0, 8.0], [0.0, 0.0, 4.0, 4.0]]  # zero-width box dropped
    assert target["labels"].tolist() == [2, 1] and target["difficult"].tolist() == [False, True]


# ------------------------------------------------------------------ scenes
def digit_items(n: int = 60) -> list[tuple[torch.Tensor, int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images[:n] * (255 / 16)).astype(np.uint8)
    return [(torch.from_numpy(img)[None], int(label)) for img, label in zip(images, digits.target[:n])]


def test_composed_scenes_are_deterministic_valid_voc_and_reused(tmp_path):
    spec = scenes.SceneSpec(canvas=48, items=(2, 3), item_size=(12, 18), noise=0.1, num_train=8, num_test=4, seed=3)
    classes = [str(k) for k in range(10)]
    first = scenes.compose_scenes(digit_items(), classes, tmp_path / "a", spec)
    second = scenes.compose_scenes(digit_items(), classes, tmp_path / "b", spec)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 2 * (8 + 4) + 2 + 1
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)

    train = ddata.voc_devkit_annotations(first, [("2007", "trainval")])
    test = ddata.voc_devkit_annotations(first, [("2007", "test")])
    assert len(train) == 8 and len(test) == 4
    boxes = np.array([b for a in train + test for b in a.boxes])
    assert len(boxes) >= 2 * 12 and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 48).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all() and set(ddata.discover_classes(train + test)) <= set(classes)

    stamp = (first / "scenes.json").stat().st_mtime_ns
    scenes.compose_scenes(digit_items(), classes, first, spec)
    assert (first / "scenes.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other settings|not composed with these settings"):
        scenes.compose_scenes(digit_items(), classes, first, scenes.SceneSpec(canvas=64))


# ------------------------------------------------------------------ (iii) fine-tuning learns
@pytest.fixture
def one_torch_thread():
    """Small convolutions gain nothing from a second thread, and on a busy machine OpenMP threads
    waiting for each other cost several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_short_cpu_finetune_on_scenes_beats_the_untrained_detector(tmp_path, capsys, one_torch_thread):
    from ftcl.cli import main

    start = time.perf_counter()
    write_pretrain_checkpoint(tmp_path / "pretrain", SMALL_MODEL, seed=0)
    run_cfg = {"data": {"dataset": "digits"}, "model": {"backbone": "resnet18", "width": 16, "small_stem": True},
               "tracking": {"enabled": False}, "device": "cpu",
               "detection": {**SMALL_DETECTOR, "dataset": "scenes", "norm": "frozen",
                             "scenes": {"folder": str(tmp_path / "scenes"), "canvas": 64, "items": [2, 3],
                                        "item_size": [16, 24], "noise": 0.1, "num_train": 200, "num_test": 50,
                                        "seed": 0},
                             "batch_size": 4, "lr_per_16": 0.08, "warmup_iterations": 10, "milestones": [240],
                             "num_workers": 0, "log_every": 100}}
    (tmp_path / "detect.yaml").write_text(yaml.safe_dump(run_cfg))
    results = {}
    for name, iterations in (("untrained", 0), ("trained", 300)):
        code = main(["detect", "--config", str(tmp_path / "detect.yaml"), "--set", f"detection.iterations={iterations}",
                     "--checkpoint", str(tmp_path / "pretrain"), "--out", str(tmp_path / name)])
        assert code == 0
        results[name] = json.loads((tmp_path / name / "detection.json").read_text())
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[scenes fine-tune] untrained VOC07 AP50 {results['untrained']['voc07_AP50']:.1f} -> trained "
              f"{results['trained']['voc07_AP50']:.1f} (COCO AP50 {results['trained']['coco_AP50']:.1f}), "
              f"{elapsed:.0f} s")

    trained, untrained = results["trained"], results["untrained"]
    assert trained["voc07_AP50"] > untrained["voc07_AP50"] + 10.0
    assert trained["coco_AP50"] > untrained["coco_AP50"] + 10.0
    assert trained["voc07_AP50"] >= trained["voc07_AP"] >= 0 and trained["coco_AP50"] >= trained["coco_AP"] >= 0
    assert trained["protocol"]["iterations"] == 300 and trained["checkpoint"].endswith("last.pt")
    assert trained["protocol"]["primary"] == "voc07" and trained["protocol"]["precise_bn_iterations"] == 0
    assert trained["protocol"]["lr"] == pytest.approx(0.08 * 4 / 16) and trained["protocol"]["batch_size"] == 4
    assert set(trained["per_class"]) == {str(k) for k in range(10)}
    rows = (tmp_path / "trained" / "per_class_ap.csv").read_text().splitlines()
    assert rows[0] == "class,num_boxes,voc07_AP50,voc07_AP,voc07_AP75,coco_AP,coco_AP50,coco_AP75" and len(rows) == 11
    assert (tmp_path / "trained" / "config.yaml").is_file()


class Preempted(Exception):
    pass


@pytest.mark.parametrize("norm", ["frozen", "sync"])
def test_interrupted_finetune_resumes_exactly_and_ignores_a_stale_checkpoint(tmp_path, one_torch_thread, norm):
    spec = scenes.SceneSpec(canvas=48, items=(2, 3), item_size=(12, 18), noise=0.1, num_train=8, num_test=2, seed=3)
    classes = [str(k) for k in range(10)]
    root = scenes.compose_scenes(digit_items(), classes, tmp_path / "scenes", spec)
    data = ddata.DetectionDataset(ddata.voc_devkit_annotations(root, [("2007", "trainval")]), classes)
    det = small_settings(min_size=[48], max_size=48, batch_size=2, iterations=6, warmup_iterations=2,
                         milestones=[5], num_workers=0, log_every=1, checkpoint_every=2, lr_per_16=0.05)
    model_cfg = config.to_dict(config.resolve(overrides=SMALL_MODEL).model)

    def detector():
        torch.manual_seed(0)
        return build_detector("random", None, "c4", len(classes), norm, model_cfg=model_cfg, in_channels=1,
                              settings=det)

    reference = detector()
    train_detector(reference, data, det, torch.device("cpu"), seed=1, log=lambda _: None)

    def stop_after_5(line: str) -> None:
        if line.startswith("[detect] iter 5/"):
            raise Preempted  # after the step of iteration 5; the last checkpoint holds iteration 4

    ckpt_dir = tmp_path / "out" / "checkpoints"
    with pytest.raises(Preempted):
        train_detector(detector(), data, det, torch.device("cpu"), seed=1, log=stop_after_5, ckpt_dir=ckpt_dir,
                       fingerprint="a")
    assert torch.load(ckpt_dir / "last.pt", weights_only=False)["iteration"] == 4

    lines: list[str] = []
    resumed = detector()
    train_detector(resumed, data, det, torch.device("cpu"), seed=1, log=lines.append, ckpt_dir=ckpt_dir,
                   fingerprint="a")
    assert any("resumed from" in line and "after iteration 4" in line for line in lines)
    assert [re.match(r"\[detect\] iter (\d+)/", line)[1] for line in lines if " iter " in line] == ["5", "6"]
    for (key, want), got in zip(reference.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(want.float(), got.float(), atol=1e-5), key
    assert not (ckpt_dir / "last.pt").exists()  # removed once training ended

    with pytest.raises(Preempted):
        train_detector(detector(), data, det, torch.device("cpu"), seed=1, log=stop_after_5, ckpt_dir=ckpt_dir,
                       fingerprint="a")
    lines.clear()
    train_detector(detector(), data, det, torch.device("cpu"), seed=1, log=lines.append, ckpt_dir=ckpt_dir,
                   fingerprint="another backbone")
    assert any("not resuming" in line for line in lines) and lines[1].startswith("[detect] iter 1/")


class SizedDataset(ddata.DetectionDataset):
    """Blank images of the annotations' widths and heights, made without files; item ``i``'s one box
    is ``(0, 0, 1, 1 + i)``, so a batch says which items it holds and which were flipped."""

    def __init__(self, sizes: list[tuple[int, int]]):
        super().__init__([ddata.ImageAnnotation(Path(f"{i}.png"), w, h, ((0.0, 0.0, 1.0, 1.0 + i),), ("a",), (False,),
                                                f"item {i}") for i, (w, h) in enumerate(sizes)], ["a"])

    def __getitem__(self, i):
        ann = self.annotations[i]
        return torch.zeros(3, ann.height, ann.width), self.target(i)


class BatchRecorder(torch.nn.Module):
    """Stands in for the detector in ``train_detector`` and ``precise_bn`` (one BatchNorm, a finite
    loss); records each batch as ``(item, flipped)`` pairs in batch order."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)
        self.batches: list[list[tuple[int, bool]]] = []

    def forward(self, images, targets):
        self.batches.append([(int(t["boxes"][0, 3]) - 1, bool(t["boxes"][0, 0] > 0)) for t in targets])
        return {"loss": self.bn(torch.ones(2, 1)).sum()}


# width x height: landscape (w > h), portrait, and squares (Detectron2 buckets w == h with portraits)
MIXED_SIZES = [(40, 30), (30, 40), (32, 32), (50, 20), (20, 50), (44, 33), (33, 44), (60, 30), (25, 25), (31, 47),
               (47, 31)]


@pytest.mark.parametrize("batch_size", [4, 3])
def test_batches_are_same_orientation_pairs_deterministic_and_resume_exactly(tmp_path, batch_size):
    data = SizedDataset(MIXED_SIZES)
    landscape = [w > h for w, h in MIXED_SIZES]
    det = small_settings(batch_size=batch_size, iterations=6, warmup_iterations=0, num_workers=0, log_every=1,
                         checkpoint_every=2, precise_bn_iterations=4)

    def run(seed: int, **kwargs) -> list[list[tuple[int, bool]]]:
        model = BatchRecorder()
        train_detector(model, data, det, torch.device("cpu"), seed=seed, **{"log": lambda _: None, **kwargs})
        return model.batches

    reference = run(1)
    assert len(reference) == 6 and all(len(b) == batch_size for b in reference)
    for batch in reference:
        for a, b in zip(batch[0::2], batch[1::2]):  # the pairs (0, 1), (2, 3), ...: one GPU's 2 images
            assert landscape[a[0]] == landscape[b[0]], batch
    assert {item for batch in reference for item, _ in batch} == set(range(len(MIXED_SIZES)))
    assert {flip for batch in reference for _, flip in batch} == {False, True}
    assert run(1) == reference and run(2) != reference

    def stop_after_5(line: str) -> None:
        if line.startswith("[detect] iter 5/"):
            raise Preempted  # the last checkpoint holds iteration 4

    with pytest.raises(Preempted):
        run(1, log=stop_after_5, ckpt_dir=tmp_path / "ckpt", fingerprint="a")
    assert run(1, ckpt_dir=tmp_path / "ckpt", fingerprint="a") == reference[4:]

    model = BatchRecorder()
    assert precise_bn(model, data, det, torch.device("cpu"), seed=1, log=lambda _: None) == 4
    assert len(model.batches) == 4
    for batch in model.batches:
        for a, b in zip(batch[0::2], batch[1::2]):
            assert landscape[a[0]] == landscape[b[0]], batch


# ------------------------------------------------------------------ BatchNorm as SyncBN over 8 x 2
def pair_canvases(image_sizes: list[tuple[int, int]], padded: tuple[int, int],
                  feature: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Independent of the implementation: ``(first, stop, h, w)`` per group of 2 consecutive images,
    the pair's max height and width mapped to the feature as ``ceil(size * feature / padded)``
    (exact when the padded size is a multiple of the stride, as torchvision's multiples of 32)."""
    out = []
    for first in range(0, len(image_sizes), 2):
        pair = image_sizes[first:first + 2]
        h, w = max(s[0] for s in pair), max(s[1] for s in pair)
        out.append((first, first + len(pair), math.ceil(h * feature[0] / padded[0]),
                    math.ceil(w * feature[1] / padded[1])))
    return out


def pair_reference(x: torch.Tensor, canvases: list[tuple[int, int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance as naive SyncBN over one GPU per canvas: plain BatchNorm2d (momentum 1) run on
    each canvas crop alone gives that GPU's mean and unbiased variance; the GPUs' means and
    mean squares are averaged with equal weight, var = E[x^2] - E[x]^2 (Detectron2's NaiveSyncBatchNorm)."""
    means, squares = [], []
    for first, stop, h, w in canvases:
        crop = x[first:stop, :, :h, :w].detach().double()
        bn = torch.nn.BatchNorm2d(x.shape[1], momentum=1.0).double()
        bn(crop)
        n = crop.numel() // x.shape[1]
        means.append(bn.running_mean)
        squares.append(bn.running_var * (n - 1) / n + bn.running_mean ** 2)
    mean = torch.stack(means).mean(0)
    return mean, torch.stack(squares).mean(0) - mean ** 2


def test_virtual_sync_bn_uses_equal_weight_statistics_of_each_pairs_own_canvas():
    torch.manual_seed(0)
    sizes = [(20, 31), (23, 18), (9, 14), (16, 16), (11, 5)]  # (h, w) input pixels: pairs (0, 1), (2, 3), and (4,)
    layout = BatchLayout(size_divisibility=0)
    layout.set(sizes, (24, 32))
    canvases = [(0, 2, 12, 16), (2, 4, 8, 8), (4, 5, 6, 3)]  # a stride-2 feature: ceil(pair max / 2)
    assert layout.canvases((12, 16)) == canvases == pair_canvases(sizes, (24, 32), (12, 16))
    x = (torch.randn(5, 3, 12, 16) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 3.0).requires_grad_()
    bn = VirtualSyncBatchNorm2d(3, layout=layout)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    torch.nn.init.uniform_(bn.bias, -0.5, 0.5)
    initial = {k: v.clone() for k, v in bn.state_dict().items()}
    y = bn(x)
    mean, var = (s.float() for s in pair_reference(x, canvases))
    expected = (x - mean.view(1, 3, 1, 1)) / torch.sqrt(var.view(1, 3, 1, 1) + bn.eps) * bn.weight.view(1, 3, 1, 1) \
        + bn.bias.view(1, 3, 1, 1)
    assert torch.allclose(y, expected, atol=1e-5)  # every pixel, padding included, normalised by them
    assert torch.allclose(bn.running_mean, 0.1 * mean, atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * var, atol=1e-6)  # NaiveSyncBatchNorm's var, no Bessel factor

    # pad the batch more, with other values beyond each pair's canvas: nothing on the canvases changes
    more = BatchLayout(size_divisibility=0)
    more.set(sizes, (40, 48))
    x_more = torch.randn(5, 3, 20, 24) * 5
    for first, stop, h, w in canvases:
        x_more[first:stop, :, :h, :w] = x[first:stop, :, :h, :w].detach()
    x_more.requires_grad_()
    bn_more = VirtualSyncBatchNorm2d(3, layout=more)
    bn_more.load_state_dict(initial)
    y_more = bn_more(x_more)
    assert torch.allclose(bn_more.running_mean, bn.running_mean) and torch.allclose(bn_more.running_var, bn.running_var)
    grad = torch.randn(5, 3, 20, 24)
    loss = sum((y[a:b, :, :h, :w] * grad[a:b, :, :h, :w]).sum() for a, b, h, w in canvases)
    loss_more = sum((y_more[a:b, :, :h, :w] * grad[a:b, :, :h, :w]).sum() for a, b, h, w in canvases)
    loss.backward()
    loss_more.backward()
    for a, b, h, w in canvases:
        assert torch.allclose(y_more[a:b, :, :h, :w], y[a:b, :, :h, :w], atol=1e-5)
        assert torch.allclose(x_more.grad[a:b, :, :h, :w], x.grad[a:b, :, :h, :w], atol=1e-5)

    # no layout (the box head's RoI features): one group, the whole batch: plain BatchNorm's output
    plain, whole = torch.nn.BatchNorm2d(3), VirtualSyncBatchNorm2d(3)
    with torch.no_grad():
        assert torch.allclose(whole(x), plain(x), atol=1e-5)
    assert torch.allclose(whole.running_var, 0.9 + 0.1 * x.detach().var(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    assert torch.allclose(whole.running_mean, plain.running_mean, atol=1e-6)
    whole.eval()  # evaluation: nn.BatchNorm2d on the running statistics
    with torch.no_grad():
        assert torch.equal(whole(x), torch.nn.functional.batch_norm(x, whole.running_mean, whole.running_var,
                                                                     whole.weight, whole.bias, eps=whole.eps))


@pytest.mark.parametrize("small_stem", [False, True])
def test_image_regions_map_to_feature_regions_at_every_backbone_level(small_stem, one_torch_thread):
    net = build_backbone("resnet18", 4, small_stem, 3).eval()
    shapes: list[tuple[int, int]] = []
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # every BatchNorm: the stem and each block of res2-res5
            m.register_forward_pre_hook(lambda _, inputs: shapes.append(tuple(inputs[0].shape[-2:])))

    def feature_sizes(h: int, w: int) -> list[tuple[int, int]]:
        shapes.clear()
        with torch.no_grad():
            net(torch.zeros(1, 3, h, w))
        return list(shapes)

    for padded in [(64, 96), (70, 99)]:
        features = feature_sizes(*padded)
        assert len(set(features)) == (4 if small_stem else 5)  # strides 1-8 or 2-32
        for size in [(37, 50), (64, 33), (5, 61), (1, 1), (33, 17), padded]:
            alone = feature_sizes(*size)  # the image's own feature maps, computed without padding
            assert [feature_extent(size, padded, f) for f in features] == alone, (size, padded)
            if padded == (64, 96):  # torchvision pads to multiples of 32: ceil(size * feature / padded)
                assert [(math.ceil(size[0] * f[0] / padded[0]), math.ceil(size[1] * f[1] / padded[1]))
                        for f in features] == alone


@pytest.mark.parametrize("head", ["c4", "fpn"])
def test_sync_norm_in_one_process_reads_the_batch_layout_and_evaluates_as_plain_batchnorm(tmp_path, head,
                                                                                          one_torch_thread):
    write_pretrain_checkpoint(tmp_path, SMALL_MODEL)
    settings = small_settings(anchor_sizes=[8, 16, 32, 64, 128] if head == "fpn" else [16, 32])
    models = {}
    for norm in ("sync", "train"):
        torch.manual_seed(0)
        models[norm] = build_detector("pretrained", tmp_path, head, 3, norm, settings=settings)
    model = models["sync"]
    backbone = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    others = [m for m in model.roi_heads.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(backbone) > 10 and all(type(m) is VirtualSyncBatchNorm2d for m in backbone + others)
    layout = backbone[0].layout
    assert all(m.layout is layout for m in backbone) and all(m.layout is None for m in others)
    assert layout.size_divisibility == (32 if head == "fpn" else 0)  # Detectron2's FPN / ResNet size_divisibility
    assert len(others) == (6 if head == "c4" else 0)  # C4's box head: res5 (resnet18: 2 x 2 + 1) and the extra norm

    images = [torch.rand(3, 64, 80), torch.rand(3, 40, 64), torch.rand(3, 64, 48)]
    with torch.no_grad():  # evaluation: running statistics, exactly plain BatchNorm
        for got, want in zip(model.eval()(images), models["train"].eval()(images)):
            assert torch.allclose(got["boxes"], want["boxes"]) and torch.allclose(got["scores"], want["scores"])
    seen = []
    backbone[-1].register_forward_pre_hook(lambda m, inputs: seen.append((m.layout.image_sizes, m.layout.padded_size)))
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])} for _ in images]
    model.train()(images, targets)
    assert layout.image_sizes is None  # cleared once the backbone has run
    resized = model.transform(images)[0]
    assert seen == [([tuple(s) for s in resized.image_sizes], tuple(resized.tensors.shape[-2:]))]


class BNNet(torch.nn.Module):
    """A model called as ``model(x, target)`` (the detector's training call) with two BatchNorms."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(3, momentum=0.1)
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.bn2 = torch.nn.BatchNorm2d(2)

    def forward(self, x, target=None):
        return {"loss": self.bn2(self.conv(self.bn(x))).mean()}


def test_update_bn_stats_averages_batch_statistics_and_leaves_weights_alone():
    torch.manual_seed(0)
    model = BNNet().eval()
    batches = [(torch.randn(4, 3, 5, 5) * (k + 1) + k, None) for k in range(5)]
    weights = {k: v.clone() for k, v in model.named_parameters()}
    assert update_bn_stats(model, iter(batches), 3) == 3
    first = torch.stack([x for x, _ in batches[:3]])  # batches 0-2 only
    assert torch.allclose(model.bn.running_mean, first.mean(dim=(1, 3, 4)).mean(0), atol=1e-5)
    assert torch.allclose(model.bn.running_var, first.var(dim=(1, 3, 4), unbiased=True).mean(0), atol=1e-4)
    assert model.bn.momentum == 0.1 and not model.training  # restored
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    frozen = torch.nn.Sequential(FrozenBatchNorm2d(3))
    assert update_bn_stats(frozen, iter(batches), 3) == 0


@pytest.mark.parametrize("norm", ["train", "sync"])
def test_precise_bn_recomputes_the_detectors_statistics_over_training_batches(tmp_path, one_torch_thread, norm):
    spec = scenes.SceneSpec(canvas=48, items=(2, 3), item_size=(12, 18), noise=0.1, num_train=6, num_test=2, seed=3)
    classes = [str(k) for k in range(10)]
    root = scenes.compose_scenes(digit_items(), classes, tmp_path / "scenes", spec)
    data = ddata.DetectionDataset(ddata.voc_devkit_annotations(root, [("2007", "trainval")]), classes)
    det = small_settings(min_size=[32, 48], max_size=48, batch_size=4, iterations=1, num_workers=0,
                         precise_bn_iterations=3)  # two scales: pairs of unequal canvases in a batch padded to 64
    model_cfg = config.to_dict(config.resolve(overrides=SMALL_MODEL).model)
    torch.manual_seed(0)
    model = build_detector("random", None, "c4", len(classes), norm, model_cfg=model_cfg, in_channels=1,
                           settings=det).eval()
    bns = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert "roi_heads.box_head.norm" in bns
    seen = {name: [] for name in bns}

    def record(name):
        def hook(module, inputs):
            x = inputs[0].detach().double()
            layout = getattr(module, "layout", None)
            if norm == "train":
                seen[name].append((x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)))
            elif layout is None:  # sync, box head: all RoIs, NaiveSyncBatchNorm's variance
                seen[name].append(pair_reference(x, [(0, x.shape[0], x.shape[-2], x.shape[-1])]))
            else:  # sync, backbone: per pair canvas, equal weight
                canvases = pair_canvases(layout.image_sizes, layout.padded_size, tuple(x.shape[-2:]))
                seen[name].append(pair_reference(x, canvases))
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in bns.items()]
    weights = {k: v.clone() for k, v in model.named_parameters()}
    lines: list[str] = []
    assert precise_bn(model, data, det, torch.device("cpu"), seed=0, log=lines.append) == 3
    for h in handles:
        h.remove()
    assert "over 3 training batches" in lines[0] and not model.training
    for name, bn in bns.items():
        assert len(seen[name]) == 3, name  # one call per batch, in training mode
        mean = torch.stack([m for m, _ in seen[name]]).mean(0)
        var = torch.stack([v for _, v in seen[name]]).mean(0)
        assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-4, atol=1e-5), name
        assert torch.allclose(bn.running_var.double(), var, rtol=1e-4, atol=1e-5), name
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())

    cpu = torch.device("cpu")
    assert precise_bn(model, data, dataclasses.replace(det, precise_bn_iterations=0), cpu, 0, lines.append) == 0
    assert precise_bn(model, data, dataclasses.replace(det, iterations=0), cpu, 0, lines.append) == 0
    frozen = build_detector("random", None, "c4", len(classes), "frozen", model_cfg=model_cfg, in_channels=1,
                            settings=det)
    assert precise_bn(frozen, data, det, torch.device("cpu"), 0, lines.append) == 0


def test_detect_cli_writes_both_metric_families_protocol_and_mlflow(tmp_path, one_torch_thread):
    from mlflow.tracking import MlflowClient

    from ftcl.cli import main

    write_pretrain_checkpoint(tmp_path / "pretrain", SMALL_MODEL, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_cfg = {"data": {"dataset": "digits"}, "model": {"backbone": "resnet18", "width": 16, "small_stem": True},
               "tracking": {"uri": uri}, "experiment": "det", "device": "cpu",
               "detection": {**SMALL_DETECTOR, "min_size": [48], "max_size": 48, "dataset": "scenes", "norm": "train",
                             "scenes": {"folder": str(tmp_path / "scenes"), "canvas": 48, "items": [2, 3],
                                        "item_size": [12, 18], "noise": 0.1, "num_train": 6, "num_test": 3,
                                        "seed": 0},
                             "batch_size": 2, "lr_per_16": 0.02, "iterations": 2, "precise_bn_iterations": 2,
                             "num_workers": 0, "log_every": 1}}
    (tmp_path / "detect.yaml").write_text(yaml.safe_dump(run_cfg))
    out = tmp_path / "out"
    assert main(["detect", "--config", str(tmp_path / "detect.yaml"), "--checkpoint", str(tmp_path / "pretrain"),
                 "--out", str(out)]) == 0
    result = json.loads((out / "detection.json").read_text())
    keys = ["voc07_AP50", "voc07_AP", "voc07_AP75", "coco_AP", "coco_AP50", "coco_AP75"]
    assert all(isinstance(result[k], float) for k in keys)
    assert not {"AP", "AP50", "VOC07_AP50"} & set(result)
    protocol = result["protocol"]
    assert protocol["primary"] == "voc07" and protocol["precise_bn_iterations"] == 2
    assert protocol["batch_size"] == 2 and protocol["lr"] == pytest.approx(0.02 * 2 / 16)
    assert "Detectron2" in protocol["metrics"] and "COCOeval" in protocol["metrics"]
    assert set(next(iter(result["per_class"].values()))) == set(keys)

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("det").experiment_id],
                                filter_string="tags.`ftcl.stage` = 'detection'")
    assert set(run.data.metrics) == {f"det/{k}" for k in keys}
    assert run.data.params["protocol.batch_size"] == "2" and float(run.data.params["protocol.lr"]) == 0.0025
    assert run.data.params["protocol.primary"] == "voc07"


def test_detect_cli_rejects_a_missing_checkpoint_with_exit_code_2(tmp_path, capsys):
    from ftcl.cli import main

    code = main(["detect", "--set", "tracking.enabled=false", "--checkpoint", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert "no pretraining checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------ (iv) VOC07 11-point AP
def test_voc07_ap_of_hand_computed_curves():
    assert voc07_ap([1.0], [1.0]) == pytest.approx(1.0)
    assert voc07_ap([0.5], [1.0]) == pytest.approx(6 / 11)  # t = 0 .. 0.5 reach precision 1, the rest 0
    # Detectron2's np.arange(0, 1.1, 0.1) makes the "0.3" point 0.30000000000000004 (and 0.6, 0.7 likewise):
    # a recall of exactly 0.3 does not reach it, so t = 0.3 takes the precision at recall 0.6
    assert voc07_ap([0.3, 0.6], [1.0, 0.5]) == pytest.approx((3 * 1.0 + 3 * 0.5) / 11)
    assert voc07_ap([0.4, 0.8], [1.0, 0.5]) == pytest.approx((5 * 1.0 + 4 * 0.5) / 11)  # 0.4, 0.8 are exact
    assert voc07_ap([], []) == 0.0


def test_voc_matching_true_false_duplicate_and_difficult():
    gt = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([False, False]))}
    dets = [(0, 0.9, np.array([0, 0, 10, 10])),  # TP
            (0, 0.8, np.array([0, 0, 10, 10])),  # duplicate -> FP
            (0, 0.7, np.array([20, 20, 30, 31]))]  # TP (IoU 100/110)
    recall, precision = voc_precision_recall(dets, gt)
    assert recall.tolist() == [0.5, 0.5, 1.0] and precision == pytest.approx([1.0, 0.5, 2 / 3])
    assert voc07_ap(recall, precision) == pytest.approx((6 * 1.0 + 5 * 2 / 3) / 11)

    with_difficult = {0: (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([True, False]))}
    recall, precision = voc_precision_recall([(0, 0.9, np.array([0, 0, 10, 10])),
                                              (0, 0.5, np.array([20, 20, 30, 30]))], with_difficult)
    assert recall.tolist() == [0.0, 1.0] and voc07_ap(recall, precision) == pytest.approx(1.0)

    iou_exactly_half = voc_precision_recall([(0, 0.9, np.array([0, 0, 10, 20]))],
                                            {0: (np.array([[0, 0, 10, 10]], float), np.array([False]))})
    assert iou_exactly_half[0].tolist() == [0.0]  # the devkit needs IoU > 0.5
    assert voc_precision_recall([], {0: (np.zeros((1, 4)), np.array([True]))}) is None


def test_evaluation_of_perfect_and_empty_predictions():
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 30]]), "labels": torch.tensor([1, 2]),
                "difficult": torch.tensor([False, False])}]
    perfect = [{"boxes": t["boxes"].numpy(), "scores": np.array([0.9, 0.8]), "labels": t["labels"].numpy()}
               for t in targets]
    summary, rows = evaluate_detections(targets, perfect, ["a", "b", "c"])
    keys = ("voc07_AP50", "voc07_AP", "voc07_AP75", "coco_AP", "coco_AP50", "coco_AP75")
    assert summary == pytest.approx(dict.fromkeys(keys, 100.0))
    assert all(np.isnan(rows[2][k]) for k in keys) and rows[0]["num_boxes"] == 1
    empty = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}]
    assert evaluate_detections(targets, empty, ["a", "b", "c"])[0] == pytest.approx(dict.fromkeys(keys, 0.0))


def test_warmup_then_step_learning_rate():
    args = dict(base_lr=0.02, warmup_iterations=100, warmup_factor=0.001, milestones=[18000, 22000], gamma=0.1)
    assert lr_at(0, **args) == pytest.approx(0.02 * 0.001)
    assert lr_at(50, **args) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert [lr_at(i, **args) for i in (100, 17999, 18000, 22000)] == pytest.approx([0.02, 0.02, 0.002, 0.0002])


def test_hflip_mirrors_boxes_and_is_its_own_inverse():
    image = torch.arange(12.0).reshape(1, 3, 4)
    target = {"boxes": torch.tensor([[0.0, 0, 1, 2]]), "labels": torch.tensor([1])}
    flipped_image, flipped = hflip(image, target)
    assert flipped["boxes"].tolist() == [[3.0, 0.0, 4.0, 2.0]]
    again_image, again = hflip(flipped_image, flipped)
    assert torch.equal(again_image, image) and torch.equal(again["boxes"], target["boxes"])
