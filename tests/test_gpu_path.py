"""The code paths a GPU run takes, exercised on the CPU wherever the CPU can: bf16 autocast through
TrainStep, channels_last, torch.compile, and score statistics under bf16. The feature transform,
the logits and the loss stay float32 under autocast (ftcl.methods.base.fp32)."""

import os

import pytest
import torch
from helpers import make_backbone

from ftcl import config
from ftcl.config import batch_layout
from ftcl.methods import build_method
from ftcl.scores import ScoreRecorder, histogram_range
from ftcl.train import TrainStep


class Digits:
    """What TrainStep.build needs about a dataset, for a random uint8 batch."""

    image_size, channels, mean, std, crops_on_device, num_classes = 16, 1, (0.5,), (0.25,), True, 10


def build(gpu_path: bool, **overrides):
    cfg = config.resolve(overrides={"data.dataset": "digits", "model.width": 8, "model.small_stem": True,
                                    "model.feature_dim": 16, "method.queue_size": 64, "optim.batch_size": 16,
                                    "method.bn_splits": 2, "optim.amp": True, "optim.channels_last": True,
                                    "ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate",
                                    **overrides})
    torch.manual_seed(0)
    layout = batch_layout(cfg)
    method = build_method(cfg, make_backbone(cfg), layout.bn_splits)
    return cfg, TrainStep.build(method, Digits(), torch.device("cpu"), layout, cfg.augment, cfg.optim,
                                cfg.method.momentum, gpu_path_on_cpu=gpu_path)


def images(n=16, seed=0):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_bf16_autocast_trains_with_finite_losses_close_to_float32():
    _, amp = build(gpu_path=True, **{"optim.channels_last": False})
    _, ref = build(gpu_path=False)
    losses = {}
    for name, step in (("bf16", amp), ("fp32", ref)):
        torch.manual_seed(1)
        losses[name] = [float(step(images(seed=i), 0, 0.01).loss) for i in range(4)]
    assert all(torch.isfinite(torch.tensor(losses["bf16"])))
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05), losses  # measured: within 3 %


def test_under_autocast_the_logits_the_scores_and_the_loss_are_float32():
    cfg, step = build(gpu_path=True)
    v1, v2 = step.views(images().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = step.method(v1, v2, 0)
        q = step.method.encoder_q(v1)
    assert q.dtype == torch.bfloat16  # the encoder itself does run in bf16
    assert out.pos.dtype == out.neg.dtype == out.loss.dtype == torch.float32
    recorder = ScoreRecorder(1, 1, [0], 1, cfg.scores.bins, torch.device("cpu"), cfg.scores.rows,
                             histogram_range(cfg.scores.range, cfg.ft.positive))
    recorder.start_epoch(0)
    recorder.record(0, out.loss, out.pos, out.neg, out.temperature)
    assert torch.isfinite(recorder._stats[0]).all()


def test_channels_last_reaches_the_encoders_and_trains():
    _, step = build(gpu_path=True, **{"optim.amp": False})
    assert step.channels_last
    conv = step.method.encoder_q.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    seen = {}

    def note_layout(module, args):
        seen["x"] = args[0].is_contiguous(memory_format=torch.channels_last)

    step.method.encoder_q.backbone.conv1.register_forward_pre_hook(note_layout)
    assert torch.isfinite(step(images(), 0, 0.01).loss)
    assert seen["x"]


def _compiled_steps(monkeypatch, backend: str | None) -> list[float]:
    if backend is not None:  # TrainStep.build calls module.compile(): route it to another backend
        original = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend=backend, **kw))
    torch._dynamo.reset()
    _, step = build(gpu_path=False, **{"optim.compile": True})
    assert "encoder_q.backbone.conv1.weight" in step.method.state_dict()  # compiled in place: same keys
    return [float(step(images(seed=i), 0, 0.01).loss) for i in range(3)]


@pytest.mark.slow
def test_compiled_encoders_trace_and_train_a_few_steps(monkeypatch):
    """optim.compile through TorchDynamo and AOTAutograd (graph capture, backward graphs, the state
    dict), with the aot_eager backend so that it fits CI; inductor's code generation is what
    benchmarks/gpu_check.sh compiles on a GPU, and the test below on the CPU."""
    losses = _compiled_steps(monkeypatch, "aot_eager")
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FTCL_TEST_INDUCTOR") != "1", reason="set FTCL_TEST_INDUCTOR=1: 9 minutes of C++ "
                    "code generation on 2 cores with an empty inductor cache (docs/TESTING.md)")
@pytest.mark.timeout(3600)
def test_inductor_compiled_encoders_train_a_few_steps(monkeypatch):
    losses = _compiled_steps(monkeypatch, None)
    assert all(torch.isfinite(torch.tensor(losses)))

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_the_gpu_path_on_cuda_trains_with_bf16_channels_last_and_split_bn():
    cfg = config.resolve(overrides={"data.dataset": "digits", "model.width": 16, "model.small_stem": True,
                                    "method.queue_size": 4096, "optim.batch_size": 256, "optim.amp": True,
                                    "optim.channels_last": True, "ft.positive.mode": "extrapolate",
                                    "ft.negative.mode": "interpolate"})
    torch.manual_seed(0)
    layout = batch_layout(cfg)
    method = build_method(cfg, make_backbone(cfg), layout.bn_splits)
    step = TrainStep.build(method, Digits(), torch.device("cuda"), layout, cfg.augment, cfg.optim, cfg.method.momentum)
    assert step.channels_last and step.method.bn_splits == 8
    batch = images(256).cuda()
    outs = [step(batch, 0, 0.03) for _ in range(5)]
    torch.cuda.synchronize()
    assert all(torch.isfinite(o.loss) for o in outs)
    assert outs[-1].neg.dtype == torch.float32 and outs[-1].neg.device.type == "cuda"


@pytest.mark.cuda
@cuda
def test_score_recording_on_cuda_makes_one_host_copy_per_epoch():
    cfg, _ = build(gpu_path=True)
    recorder = ScoreRecorder(4, 1, [0], 1, cfg.scores.bins, torch.device("cuda"), cfg.scores.rows,
                             histogram_range(cfg.scores.range, cfg.ft.positive))
    recorder.start_epoch(0)
    for i in range(4):
        recorder.record(i, torch.ones((), device="cuda"), torch.rand(8, device="cuda"),
                        torch.rand(8, 64, device="cuda") * 2 - 1, 0.2)
    assert recorder._stats.device.type == "cuda"
