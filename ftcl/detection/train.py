"""Fine-tuning a detector: the lr schedule, the SGD loop with exact resume, Precise BN, inference.

The schedule is Detectron2's (``WarmupMultiStepLR``, :func:`lr_at`); ``detection.batch_size`` is the
whole job's batch (detection runs as one process) and lr = ``lr_per_16 * batch_size / 16``
(:func:`base_lr`). Batches are drawn as Detectron2's loader draws them on 8 GPUs x 2 images
(:func:`_draws`): consecutive same-orientation pairs, one per virtual GPU, which ``detection.norm:
sync`` takes its per-GPU BatchNorm statistics over (:mod:`ftcl.detection.norm`). After the last
iteration, :func:`precise_bn` recomputes the BatchNorm statistics as Detectron2's ``TEST.PRECISE_BN``
hook does before it evaluates, from batches drawn the same way and statistics defined the same way.
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler
from torchvision.models.detection import FasterRCNN

from ftcl import checkpoint as ckpt
from ftcl.config.types import Detection
from ftcl.detection import data as ddata
from ftcl.detection.norm import IMAGES_PER_GPU, group_sizes

#: OUT/checkpoints/last.pt while fine-tuning runs; 3: batches of same-orientation pairs (:func:`_draws`), so a
#: run saved under 2 drew other batches and is not resumed
DETECTION_FORMAT = "ftcl-detection-resume-3"
PRECISE_BN_SEED_OFFSET = 2  # Precise BN draws its batches from seed + 2 (the order) and seed + 3 (flips)


def base_lr(det: Detection) -> float:
    """The peak learning rate: ``lr_per_16 * batch_size / 16`` (linear scaling with the global batch)."""
    return det.lr_per_16 * det.batch_size / 16


def lr_at(iteration: int, base_lr: float, warmup_iterations: int, warmup_factor: float,
          milestones: Sequence[int], gamma: float) -> float:
    """Learning rate at an iteration, as detectron2's ``WarmupMultiStepLR`` (linear warm-up of Goyal
    et al. 2017): ``base_lr * w * gamma ** #{m in milestones: m <= iteration}``, where ``w`` rises
    linearly from ``warmup_factor`` at iteration 0 to 1 at ``warmup_iterations``."""
    warm = 1.0
    if iteration < warmup_iterations:
        alpha = iteration / warmup_iterations
        warm = warmup_factor * (1.0 - alpha) + alpha
    return base_lr * warm * gamma ** bisect_right(sorted(milestones), iteration)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters, with no weight decay on normalisation layers (detectron2's
    ``SOLVER.WEIGHT_DECAY_NORM = 0``)."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if id(p) not in norm_ids], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in norm_ids], "weight_decay": 0.0},
    ]


def hflip(image: Tensor, target: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an image and its xyxy boxes left-right (continuous coordinates: x -> W - x)."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def _collate(batch: Sequence) -> tuple:
    return tuple(zip(*batch))


def _orientation_groups(stream: Iterable[int], landscape: Sequence[bool], size: int) -> Iterator[list[int]]:
    """Detectron2's ``AspectRatioGroupedDataset`` on one GPU: two buckets (``w > h``, and the rest,
    squares included); each index of ``stream`` joins its bucket, and a bucket that holds ``size``
    indices is yielded as a group and emptied."""
    buckets: tuple[list[int], list[int]] = ([], [])
    for index in stream:
        bucket = buckets[0 if landscape[index] else 1]
        bucket.append(index)
        if len(bucket) == size:
            yield bucket[:]
            bucket.clear()


def _draws(dataset: ddata.DetectionDataset, batches: int, batch_size: int,
           seed: int) -> tuple[list[int], list[bool]]:
    """The image indices of ``batches`` batches of ``batch_size``, in batch order, and a flip per
    position, all from ``seed`` (the order from ``seed``, the flips from ``seed + 1``).

    Detectron2's training loader over virtual GPUs (:func:`~ftcl.detection.norm.group_sizes`: 8 x 2
    for a batch of 16): one seeded stream of indices, permutation after permutation (sampling without
    replacement, epoch after epoch), is dealt round-robin to the GPUs (``TrainingSampler``:
    ``islice(stream, rank, None, world_size)``); each GPU groups its share by orientation
    (:func:`_orientation_groups`, orientation from :meth:`DetectionDataset.image_size`, no image
    decoded), and a batch is the GPUs' next groups in GPU order, so images ``2g, 2g + 1`` of a batch
    are virtual GPU ``g``'s same-orientation pair, the group :class:`~ftcl.detection.norm.VirtualSyncBatchNorm2d`
    takes its statistics over. Everything is drawn up front, so a run resumed at an iteration sees
    the batches the uninterrupted run sees.
    """
    sizes = group_sizes(batch_size)
    per_gpu = (batches + 1) * IMAGES_PER_GPU  # enough: between groups each bucket holds < IMAGES_PER_GPU indices
    stream = list(RandomSampler(dataset, num_samples=len(sizes) * per_gpu,
                                generator=torch.Generator().manual_seed(seed)))
    landscape = [w > h for w, h in (dataset.image_size(i) for i in range(len(dataset)))]
    gpus = [_orientation_groups(stream[rank::len(sizes)], landscape, size) for rank, size in enumerate(sizes)]
    order = [index for _ in range(batches) for gpu in gpus for index in next(gpu)]
    flips = (torch.rand(batches * batch_size, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).tolist()
    return order, flips


def _inputs(images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], flips: Sequence[bool],
            use_flip: bool, device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    pairs = [hflip(i, t) if use_flip and f else (i, t) for i, t, f in zip(images, targets, flips)]
    return ([i.to(device) for i, _ in pairs],
            [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in pairs])


def train_detector(model: FasterRCNN, dataset: ddata.DetectionDataset, det: Detection,
                   device: torch.device, seed: int, log: Callable[[str], None] = print,
                   ckpt_dir: str | Path | None = None, fingerprint: str = "") -> None:
    """Fine-tune ``model`` for ``det.iterations`` SGD steps of ``det.batch_size`` images.

    lr = :func:`base_lr` following :func:`lr_at`; momentum, weight decay
    (:func:`parameter_groups`), random horizontal flips, batches of same-orientation pairs drawn
    without replacement epoch after epoch (:func:`_draws`), all seeded by ``seed``; gradients clipped
    to ``clip_grad_norm`` when set (short, high-lr CPU schedules). A non-finite loss stops the run
    with an error.

    With ``ckpt_dir``, every ``checkpoint_every`` iterations the model, the optimiser, the iteration
    and the global RNG state are saved atomically to ``ckpt_dir/last.pt``, and a run that finds that
    file resumes after its iteration: the image order and the flips are drawn up front from
    ``seed``, so the resumed run sees exactly the batches the uninterrupted one would have. A file
    saved under another ``fingerprint`` (other settings or another pretrained backbone) or by
    another version of this format is not resumed from: training starts afresh and says so. The
    file is removed once training ends.
    """
    iterations, batch_size = det.iterations, det.batch_size
    if iterations == 0:
        return
    model.to(device).train()
    lr0 = base_lr(det)
    optimizer = torch.optim.SGD(parameter_groups(model, det.weight_decay), lr=lr0,
                                momentum=det.momentum)
    order, flips = _draws(dataset, iterations, batch_size, seed)
    done, rng = _resume_detector(model, optimizer, ckpt_dir, fingerprint, device, log)
    every = det.checkpoint_every
    batches = iter(DataLoader(dataset, batch_size, sampler=order[done * batch_size:], collate_fn=_collate,
                              num_workers=det.num_workers))
    if rng is not None:  # after the loader's own draw from the global RNG, as in the uninterrupted run
        torch.set_rng_state(rng)
    start = time.perf_counter()
    for it, (images, targets) in enumerate(batches, start=done + 1):
        lr = lr_at(it - 1, lr0, det.warmup_iterations, det.warmup_factor, det.milestones, det.gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = model(*_inputs(images, targets, flips[(it - 1) * batch_size:it * batch_size], det.hflip,
                                device))
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"detection loss is {loss.item()} at iteration {it} ({_fmt(losses)})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if det.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), det.clip_grad_norm)
        optimizer.step()
        if it == done + 1 or it % det.log_every == 0 or it == iterations:
            rate = (time.perf_counter() - start) / (it - done)
            log(f"[detect] iter {it}/{iterations} loss {loss.item():.3f} ({_fmt(losses)}) lr {lr:.2e} "
                f"{rate:.2f} s/it")
        if ckpt_dir is not None and every and it % every == 0 and it < iterations:
            ckpt.atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": it,
                              "rng": torch.get_rng_state(), "fingerprint": fingerprint,
                              "format": DETECTION_FORMAT}, Path(ckpt_dir) / "last.pt")
    if ckpt_dir is not None:
        (Path(ckpt_dir) / "last.pt").unlink(missing_ok=True)


def _resume_detector(model: nn.Module, optimizer: torch.optim.Optimizer, ckpt_dir: str | Path | None,
                     fingerprint: str, device: torch.device,
                     log: Callable[[str], None]) -> tuple[int, Tensor | None]:
    """Load ``ckpt_dir/last.pt`` into ``model`` and ``optimizer`` if it exists and was saved under
    ``fingerprint``; the iterations it holds (0: start afresh) and the global RNG state to go on with."""
    path = Path(ckpt_dir) / "last.pt" if ckpt_dir is not None else None
    if path is None or not path.exists():
        return 0, None
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as err:  # torch raises several types for truncated/corrupt zips
        log(f"[detect] not resuming: {path} is truncated or corrupted ({err}); training from the start")
        return 0, None
    if not isinstance(state, dict) or state.get("format") != DETECTION_FORMAT:
        log(f"[detect] not resuming: {path} is not a detection checkpoint of format {DETECTION_FORMAT}; "
            "training from the start")
        return 0, None
    if state.get("fingerprint") != fingerprint:
        log(f"[detect] not resuming from {path}: it was saved with other detection settings or another "
            "pretrained backbone; training from the start")
        return 0, None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log(f"[detect] resumed from {path} after iteration {state['iteration']}")
    return int(state["iteration"]), state["rng"]


def _fmt(losses: Mapping[str, Tensor]) -> str:
    return " ".join(f"{k.removeprefix('loss_')} {v.item():.3f}" for k, v in losses.items())


# -------------------------------------------------------------------------------------- Precise BN
def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers whose running statistics training updates (fvcore's ``get_bn_modules``
    on a model in train mode; FrozenBatchNorm2d is not one)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable[Sequence[Any]], num_batches: int) -> int:
    """Recompute every BatchNorm's running mean and variance as the plain average of its batch
    statistics over ``num_batches`` batches (fvcore's ``update_bn_stats``, which Detectron2's Precise
    BN hook calls): the model runs in train mode as ``model(*batch)`` without gradients, each BN's
    momentum is 1 meanwhile (its running buffers hold the last batch's statistics as the layer
    defines them: mean and unbiased variance for ``nn.BatchNorm2d``, the equal-weight per-pair mean
    and variance of ``NaiveSyncBatchNorm`` for :class:`~ftcl.detection.norm.VirtualSyncBatchNorm2d`)
    and those are averaged cumulatively; no parameter changes. Returns the batches used (fewer
    when ``batches`` runs out). Momentum and train/eval mode are restored afterwards.
    """
    layers = batchnorm_layers(model)
    if not layers or num_batches <= 0:
        return 0
    was_training = model.training
    model.train()
    momenta = [bn.momentum for bn in layers]
    means = [torch.zeros_like(bn.running_mean) for bn in layers]
    variances = [torch.zeros_like(bn.running_var) for bn in layers]
    used = 0
    try:
        for bn in layers:
            bn.momentum = 1.0
        for used, batch in enumerate(itertools.islice(batches, num_batches), start=1):
            model(*batch)
            for i, bn in enumerate(layers):
                means[i] += (bn.running_mean - means[i]) / used
                variances[i] += (bn.running_var - variances[i]) / used
        if used:
            for i, bn in enumerate(layers):
                bn.running_mean.copy_(means[i])
                bn.running_var.copy_(variances[i])
    finally:
        for bn, momentum in zip(layers, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return used


def precise_bn(model: FasterRCNN, dataset: ddata.DetectionDataset, det: Detection,
               device: torch.device, seed: int, log: Callable[[str], None] = print) -> int:
    """Detectron2's ``TEST.PRECISE_BN`` after fine-tuning: :func:`update_bn_stats` over
    ``det.precise_bn_iterations`` training batches of ``batch_size`` images (same-orientation
    pairs in random order, :func:`_draws`, and flips, from ``seed + 2``; the training data's own
    multi-scale resize), the detector in training mode with its targets (so each BatchNorm computes
    its training statistics, per pair canvas for ``sync``, and the box head's sees training RoIs, as
    in Detectron2). Does nothing (returns 0) when the setting is 0, no iteration was trained, or the
    detector has no trainable BatchNorm (norm ``frozen``); else returns the batches used."""
    count, batch_size = det.precise_bn_iterations, det.batch_size
    if count == 0 or det.iterations == 0 or not batchnorm_layers(model):
        return 0
    model.to(device)
    order, flips = _draws(dataset, count, batch_size, seed + PRECISE_BN_SEED_OFFSET)
    loader = DataLoader(dataset, batch_size, sampler=order, collate_fn=_collate, num_workers=det.num_workers)
    batches = (_inputs(images, targets, flips[k * batch_size:(k + 1) * batch_size], det.hflip, device)
               for k, (images, targets) in enumerate(loader))
    start = time.perf_counter()
    used = update_bn_stats(model, batches, count)
    log(f"[detect] precise BN: statistics of {len(batchnorm_layers(model))} BatchNorm layers recomputed over "
        f"{used} training batches ({time.perf_counter() - start:.0f} s)")
    return used


# --------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict(model: FasterRCNN, dataset: ddata.DetectionDataset, batch_size: int, device: torch.device,
            num_workers: int = 0) -> list[dict[str, np.ndarray]]:
    """Detections (``boxes`` xyxy, ``scores``, ``labels``) for every image of ``dataset``, in order."""
    model.to(device).eval()
    loader = DataLoader(dataset, batch_size, shuffle=False, collate_fn=_collate, num_workers=num_workers)
    out = []
    for images, _ in loader:
        for pred in model([i.to(device) for i in images]):
            out.append({k: pred[k].cpu().numpy() for k in ("boxes", "scores", "labels")})
    return out
