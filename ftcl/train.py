"""The pretraining loop: data -> views -> method -> optimiser, with checkpoint/resume and progress.

It knows no specific method (see ``ftcl.methods.base``), no launcher and no tracker: metrics and
files go to a ``RunLogger`` the caller passes in (``ftcl.tracking.Tracker`` in the CLI).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ftcl import checkpoint as ckpt
from ftcl import runtime
from ftcl.config import BatchLayout, RunConfig, batch_layout, dump, flatten, load_yaml, to_dict
from ftcl.config.types import Augment, Optim
from ftcl.data.datasets import build_dataset
from ftcl.data.views import TwoViews
from ftcl.errors import ConfigError, NonFiniteLossError
from ftcl.files import TMP_GLOB, write_json
from ftcl.methods import build_method
from ftcl.methods.base import Method, StepOutput, ema_update
from ftcl.models.backbones import build_backbone
from ftcl.monitor import METRIC as MONITOR_METRIC
from ftcl.monitor import KnnMonitor, due, write_curve
from ftcl.schedules import learning_rate
from ftcl.scores import ScoreRecorder, histogram_range, load_scores, plot_histograms, plot_score_curves


class RunLogger(Protocol):
    def log_params(self, params: Mapping[str, object]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...


class NullLogger:
    def log_params(self, params: Mapping[str, object]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


def _loader(dataset, num_workers: int, layout: BatchLayout, device: torch.device, seed: int) -> DataLoader:
    sampler = DistributedSampler(dataset, seed=seed, drop_last=True) if layout.world > 1 else None
    workers = num_workers if not dataset.crops_on_device else 0
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset, batch_size=layout.per_process, shuffle=sampler is None, sampler=sampler,
        drop_last=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, generator=g, collate_fn=dataset.collate,
    )


class TrainStep:
    """One optimisation step: views -> method (loss) -> backward -> SGD -> EMA -> ``after_step``.

    Shared by the training loop and the benchmarks so both time exactly the same work. Nothing in
    a step synchronises with the host: the returned loss stays on the device.
    """

    def __init__(self, method: Method, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 views: TwoViews, ema_momentum: float, amp: bool, channels_last: bool):
        self.method, self.model, self.optimizer, self.views = method, model, optimizer, views
        self.ema_momentum, self.channels_last = ema_momentum, channels_last
        self.device = next(method.parameters()).device
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if amp else nullcontext

    @classmethod
    def build(cls, method: Method, data, device: torch.device, layout: BatchLayout, augment: Augment, optim: Optim,
              ema_momentum: float, gpu_path_on_cpu: bool = False) -> TrainStep:
        """The step around ``method`` on ``device``: its views (``augment``; ``data`` gives size, channels,
        mean, std), SGD (``optim``), DDP when ``layout`` spans processes, ``torch.compile``.

        ``optim.amp`` (bf16 autocast) and ``optim.channels_last`` apply on CUDA only;
        ``gpu_path_on_cpu`` applies them on the CPU too (tests of the GPU code path)."""
        views = TwoViews(augment.preset, data.image_size, data.channels, data.mean, data.std,
                         augment.crop_scale, data.crops_on_device).to(device)
        method = method.to(device)
        gpu_path = device.type == "cuda" or gpu_path_on_cpu
        channels_last = optim.channels_last and gpu_path
        if channels_last:
            method = method.to(memory_format=torch.channels_last)
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay)
        model: torch.nn.Module = method
        if layout.world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                method, device_ids=[device.index] if device.type == "cuda" else None)
        if optim.compile:  # in place: state-dict keys stay those of the plain modules
            for module in method.children():
                if any(True for _ in module.parameters()):
                    module.compile()
        return cls(method, model, optimizer, views, ema_momentum, optim.amp and gpu_path, channels_last)

    def __call__(self, images: torch.Tensor, epoch: int, lr: float, labels: torch.Tensor | None = None) -> StepOutput:
        """One step on a uint8 batch; ``labels`` reach the method only when it needs them."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(self.device, non_blocking=True)
        if labels is not None and self.method.needs_labels:
            labels = labels.to(self.device, non_blocking=True)
        else:
            labels = None
        v1, v2 = self.views(images)
        if self.channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.model(v1, v2, epoch, labels)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        ema_update(self.method.momentum_pairs(), self.ema_momentum)
        self.method.after_step()
        out.loss = out.loss.detach()
        return out


#: run-config keys that may change between a run and its resumption (the rest must match)
RESUME_FREE_KEYS = ("experiment", "device", "log_every", "tracking.", "checkpoint.", "scores.", "eval.",
                    "detection.", "data.root", "data.num_workers", "optim.epochs")


def check_resume(cfg: RunConfig, out_dir: str | Path) -> None:
    """Refuse to resume ``out_dir`` under another config (ConfigError naming the keys), before anything is written.

    A folder with checkpoints and a ``config.yaml`` belongs to the run of that config; resuming it
    with, say, another ``model.width`` or ``ft.positive.mode`` would mix two experiments. Keys in
    :data:`RESUME_FREE_KEYS` may change (e.g. more ``optim.epochs`` to train on).
    """
    out_dir = Path(out_dir)
    saved_path = out_dir / "config.yaml"
    if not (saved_path.is_file() and any((out_dir / "checkpoints").glob("*.pt"))):
        return
    saved, current = flatten(load_yaml(saved_path)), flatten(to_dict(cfg))
    changed = [f"{k} ({saved.get(k, '<unset>')!r} -> {current.get(k, '<unset>')!r})"
               for k in sorted(set(saved) | set(current))
               if saved.get(k) != current.get(k) and not k.startswith(RESUME_FREE_KEYS)]
    if changed:
        raise ConfigError(
            f"{out_dir} holds checkpoints of a run with another config; it would resume them with changed keys "
            f"{', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''}. Use another --out, or delete "
            f"{out_dir / 'checkpoints'} to start that folder afresh"
        )


def preflight(cfg: RunConfig, out_dir: str | Path | None = None):
    """The training set, after what must fail before any compute or tracking starts and that no
    config rule can know: the device this machine has, a folder holding another run's checkpoints
    (:func:`check_resume`), a training set smaller than the batch."""
    runtime.select_device(cfg.device)
    if out_dir is not None:
        check_resume(cfg, out_dir)
    data = build_dataset(cfg.data, "train", "pretrain", crop_scale=cfg.augment.crop_scale)
    if len(data) < cfg.optim.batch_size:
        raise ConfigError(
            f"key 'optim.batch_size' is {cfg.optim.batch_size}, more than the {len(data)} training images; "
            "lower optim.batch_size or use more data"
        )
    return data


def pretrain(cfg: RunConfig, out_dir: str | Path, logger: RunLogger | None = None, echo=print,
             data=None) -> dict:
    """Pretrain ``cfg``'s method into ``out_dir``, resuming from its last good checkpoint; ``data``:
    the training set :func:`preflight` returned (built here when not given).

    Returns the summary also written to ``out_dir/pretrain.json`` (written last: its presence means
    the run is complete). Raises ``NonFiniteLossError`` on a NaN/inf loss, before any checkpoint
    of the broken state is written.
    """
    out_dir, logger = Path(out_dir), logger or NullLogger()
    rank, world = runtime.setup_distributed()
    main = rank == 0
    if not main:
        echo = _silent
    runtime.apply_determinism(cfg.deterministic.enabled, cfg.deterministic.threads)
    device = runtime.select_device(cfg.device)
    runtime.seed_everything(cfg.seed + rank)
    ckpt_dir, score_dir = out_dir / "checkpoints", out_dir / "scores"
    data = data if data is not None else preflight(cfg, out_dir)
    if main:
        dump(cfg, out_dir / "config.yaml")
        for stale in ckpt_dir.glob(TMP_GLOB):  # left by a kill during a write; never a checkpoint
            stale.unlink(missing_ok=True)

    layout = batch_layout(cfg, world)  # checked for this world when the config was resolved
    loader = _loader(data, cfg.data.num_workers, layout, device, cfg.seed)
    iters = len(loader)
    m = cfg.model
    method = build_method(cfg, build_backbone(m.backbone, m.width, m.small_stem, data.channels), layout.bn_splits,
                          num_classes=getattr(data, "num_classes", None))
    step = TrainStep.build(method, data, device, layout, cfg.augment, cfg.optim, cfg.method.momentum)
    method, optimizer = step.method, step.optimizer
    o = cfg.optim

    start_epoch, iteration = 0, 0
    state = ckpt.latest_good(ckpt_dir, map_location=device, warn=echo) if ckpt_dir.exists() else None
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        runtime.set_rng_state(state["rng"])
        if "loader_rng" in state:  # the shuffle continues where it stopped (not from epoch 0's order)
            loader.generator.set_state(state["loader_rng"])
        start_epoch, iteration = state["epoch"], state["iteration"]
        echo(f"[pretrain] resumed from {ckpt_dir} at epoch {start_epoch}/{o.epochs}")

    monitor, curve = None, []
    if main and cfg.eval.monitor.every > 0:
        monitor = KnnMonitor(cfg.data, cfg.eval.monitor, cfg.eval.knn.batch_size, device)
        curve = list(state.get("monitor", [])) if state is not None else []
        if state is None:  # the initialisation's point
            curve = [{"epoch": 0, "knn_top1": monitor(method.backbone)}]
            logger.log_metrics({MONITOR_METRIC: curve[0]["knn_top1"]}, step=0)
            write_curve(out_dir, curve)

    recorder = None
    if cfg.scores.enabled and o.epochs > 0:
        recorder = ScoreRecorder.from_section(cfg.scores, iters, o.epochs, device,
                                              histogram_range(cfg.scores.range, cfg.ft.positive))
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    logger.log_params(layout.params())
    echo(f"[pretrain] {cfg.method.name} {cfg.model.backbone}(width {cfg.model.width}) on "
         f"{cfg.data.dataset} ({len(data)} images, {iters} it/epoch, device {device}, world {world}, "
         f"batch {layout.global_batch} = {world} x {layout.per_process}, BN in {layout.bn_splits} sub-batch(es)); "
         f"checkpoints in {ckpt_dir}")
    summary: dict = {}
    for epoch in range(start_epoch, o.epochs):
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        method.train()
        if recorder:
            recorder.start_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        lrs: list[float] = []
        t0 = time.perf_counter()
        for i, (images, labels) in enumerate(loader):
            lr = learning_rate(o, epoch, i, iters)
            lrs.append(lr)
            out = step(images, epoch, lr, labels)
            loss = out.loss
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), iteration, bad_step)
            loss_sum += loss
            if recorder:
                recorder.record(i, loss, out.pos, out.neg, out.temperature)
            iteration += 1
            if main and (i + 1) % cfg.log_every == 0:
                _check_finite(bad_step, epoch)
                echo(f"[pretrain] epoch {epoch + 1} it {i + 1}/{iters} loss {loss.item():.4f} lr {lr:.4g}")
        _check_finite(bad_step, epoch)
        seconds = time.perf_counter() - t0
        metrics = {"pretrain/loss": float(loss_sum.item() / iters), "pretrain/lr": lrs[-1],
                   "pretrain/images_per_s": iters * layout.global_batch / seconds,
                   "pretrain/epoch_seconds": seconds}
        if recorder and main:
            stats = recorder.flush(epoch, iteration - iters, lrs, score_dir)
            metrics.update({f"scores/{k}": v for k, v in stats.items() if k != "loss"})
        if monitor is not None and due(epoch + 1, o.epochs, cfg.eval.monitor.every):
            value = monitor(method.backbone)
            curve = [c for c in curve if c["epoch"] <= epoch] + [{"epoch": epoch + 1, "knn_top1": value}]
            metrics[MONITOR_METRIC] = value
        if main:  # metrics first: a kill between the two repeats a point rather than losing one
            logger.log_metrics(metrics, step=epoch + 1)
            ckpt.save_epoch({
                "epoch": epoch + 1, "iteration": iteration, "config": to_dict(cfg), "in_channels": data.channels,
                "backbone": method.backbone.state_dict(), "method": method.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": runtime.rng_state(), "monitor": curve,
                "loader_rng": loader.generator.get_state(),
            }, ckpt_dir, cfg.checkpoint.keep)
            if monitor is not None:  # after the checkpoint that holds the same curve
                write_curve(out_dir, curve)
            echo(_progress_line(epoch, o.epochs, metrics))
        summary = metrics
    if main and o.epochs == 0 and state is None:  # no pretraining: keep the seeded initialisation
        ckpt.save_epoch({
            "epoch": 0, "iteration": 0, "config": to_dict(cfg), "in_channels": data.channels,
            "backbone": method.backbone.state_dict(), "method": method.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": runtime.rng_state(), "monitor": curve,
        }, ckpt_dir, cfg.checkpoint.keep)
        echo(f"[pretrain] optim.epochs is 0: saved the random initialisation (seed {cfg.seed}) as {ckpt_dir}")
        summary = {"pretrain/epochs": 0}
    if main:
        summary = _finish(cfg, out_dir, score_dir, summary, logger, ckpt.weights_digest(method.backbone.state_dict()))
    if world > 1:
        dist.barrier()
    return summary


def _silent(*_args, **_kwargs) -> None:
    pass


def _check_finite(bad_step: torch.Tensor, epoch: int) -> None:
    step = int(bad_step.item())
    if step >= 0:
        raise NonFiniteLossError(
            f"loss became NaN/inf at iteration {step} (epoch {epoch + 1}); the run stopped and the last good "
            "checkpoint was kept (try a lower optim.lr_per_256, or optim.amp: false)"
        )


def _progress_line(epoch: int, epochs: int, m: Mapping[str, float]) -> str:
    scores = ""
    if "scores/pos_mean" in m:
        scores = f" pos {m['scores/pos_mean']:.3f} neg {m['scores/neg_mean']:.3f}"
    if MONITOR_METRIC in m:
        scores += f" kNN {m[MONITOR_METRIC]:.2f}"
    return (f"[pretrain] epoch {epoch + 1}/{epochs} loss {m['pretrain/loss']:.4f} lr {m['pretrain/lr']:.4g}"
            f"{scores} {m['pretrain/images_per_s']:.0f} img/s ({m['pretrain/epoch_seconds']:.1f} s)")


def _finish(cfg: RunConfig, out_dir: Path, score_dir: Path, last: dict, logger: RunLogger, backbone: str) -> dict:
    """Plots, artifacts and ``pretrain.json`` (written last; ``backbone``: the weights' digest, which
    names this pretraining to the stages that read it, :func:`ftcl.orchestrate.folders.finish`)."""
    done = out_dir / "pretrain.json"
    if done.is_file() and not last:  # nothing was trained in this call: the run was already complete
        return json.loads(done.read_text())
    if score_dir.exists():
        stats, hists = load_scores(score_dir)
        if not stats.empty:
            plot_score_curves(stats, score_dir / "score_curves.png", f"{cfg.experiment}: score curves")
            plot_histograms(hists, score_dir / "score_histograms.png", cfg.scores.plot_epochs,
                            f"{cfg.experiment}: pos/neg scores")
        logger.log_artifact(score_dir, "score_distribution")
    logger.log_artifact(out_dir / "config.yaml", "config")
    summary = {"epochs": cfg.optim.epochs, **last, "checkpoint": str(out_dir / "checkpoints" / ckpt.LAST),
               "backbone_sha256": backbone}
    write_json(done, summary)
    return summary
