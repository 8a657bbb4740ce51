"""The GPU check's parts that are this file's own code (``benchmarks/gpu_check.py`` runs each as
``python benchmarks/gpu_parts.py PART ...`` in its own process group, with its own time budget):
``environment``, ``data``, ``loader`` (``--decode fast|gpu``) and ``smoke``. Each writes its
``<part>.json`` into ``--out``, which the summary (``benchmarks/gpu_summary.py``) reads."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: packages the check must never need: the pipeline's, not a training run's
NOT_NEEDED = ("mlflow", "submitit", "snakemake", "pycocotools")
#: the modules the check's parts import (bench.py and jpeg.py are imported by path)
CHECK_MODULES = ("ftcl.cli", "ftcl.config", "ftcl.pipeline", "ftcl.stages", "ftcl.train", "ftcl.tracking",
                 "ftcl.data.datasets", "ftcl.data.jpeg", "ftcl.methods", "ftcl.scores", "ftcl.results.stats",
                 "bench", "jpeg")
#: the paper config the smoke part runs, its row, and its stages (not detection: it needs pycocotools and
#: minutes of its own; tests/test_smoke.py runs a paper config's detection in smoke mode on the CPU)
SMOKE_CONFIG = REPO / "config" / "paper" / "imagenet100_mocov2.yaml"
SMOKE_ROW = "+ft"
SMOKE_STAGES = ("pretrain", "linear", "knn")
#: the check's parts, in order (the others are commands of their own: pytest, bench.py, ftcl pretrain)
PARTS = ("environment", "cuda-tests", "methods-eager", "data", "loader", "loader-gpu", "pretrain", "smoke",
         "methods-compile")
#: parts that have no CPU fallback: reported as skipped in a rehearsal (cuda-tests still runs there:
#: collecting the test files in the image's environment is worth checking; every test skips itself)
CUDA_ONLY = ("methods-compile",)
TITLES = {"environment": "environment", "cuda-tests": "CUDA-marked tests (pytest -m cuda)",
          "methods-eager": "methods, eager (bench.py)", "data": "generated ImageFolder",
          "loader": "JPEG loader, every core", "loader-gpu": "JPEG loader, decode on the device",
          "pretrain": "ftcl pretrain, 2 epochs", "smoke": "IN-100 paper config, smoke mode, +ft row",
          "methods-compile": "methods, torch.compile (bench.py --compile)"}


def part_environment(out: Path) -> int:
    """Versions, the device, the cores, the decoder; whether the check's modules pull in a package
    the check must not need (they must not, even where it is installed)."""
    import importlib
    import importlib.util
    from importlib import metadata

    info: dict = {"python": platform.python_version(), "executable": sys.executable, "cpus": _cpus()}
    for name, dist in (("torch", "torch"), ("torchvision", "torchvision"), ("numpy", "numpy"), ("PIL", "pillow"),
                       ("yaml", "pyyaml"), ("pandas", "pandas"), ("scipy", "scipy"), ("pyarrow", "pyarrow"),
                       ("triton", "triton"), ("jsonschema", "jsonschema"), ("simplejpeg", "simplejpeg")):
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            info[name] = f"missing ({err})"
            continue
        try:
            info[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[name] = getattr(module, "__version__", "?")
    import torch

    info["cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["device"] = torch.cuda.get_device_name() if info["cuda_available"] else "none (CPU)"
    for name in CHECK_MODULES:
        importlib.import_module(name)
    from ftcl.data.jpeg import decoder

    info["decoder"] = decoder()
    info["imported_not_needed"] = sorted(n for n in NOT_NEEDED if n in sys.modules)
    info["installed_not_needed"] = sorted(n for n in NOT_NEEDED if importlib.util.find_spec(n) is not None)
    for key, value in info.items():
        print(f"{key}: {value}")
    _write_json(out / "environment.json", info)
    if info["imported_not_needed"]:
        print(f"[gpu_check] the check's modules import {info['imported_not_needed']}: make those imports lazy")
        return 1
    return 0


def part_data(root: Path, files: int, out: Path) -> int:
    """``root/train/c<k>/*.jpg`` (and ``val/``): ``files`` JPEGs written by every core at once."""
    import multiprocessing

    import jpeg  # noqa: F401  (imported once here: the forked writers inherit torch, PIL and ftcl)

    procs = max(1, min(_cpus(), files // 8))
    start = time.monotonic()
    chunks = [(root / f".chunk{k}", files // procs + (k < files % procs), k) for k in range(procs)]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        stats = pool.starmap(_write_chunk, chunks)
    for sub, _, k in chunks:  # one ImageFolder: the chunks' files side by side, chunk 0's val split
        for path in sorted(sub.glob("train/*/*.jpg")):
            (root / "train" / path.parent.name).mkdir(parents=True, exist_ok=True)
            path.rename(root / "train" / path.parent.name / f"{k:02d}-{path.name}")
        if k == 0:
            (sub / "val").rename(root / "val")
        shutil.rmtree(sub)
    n = sum(s["files"] for s in stats)
    info = {"files": n, "mean_kb": sum(s["mean_kb"] * s["files"] for s in stats) / n, "processes": procs,
            "seconds": time.monotonic() - start}
    print(f"{n} JPEGs, {info['mean_kb']:.0f} KB mean, written by {procs} processes in {info['seconds']:.1f} s")
    _write_json(out / "data.json", info)
    return 0


def _write_chunk(sub: Path, n: int, seed: int) -> dict:
    from jpeg import write_folder

    return write_folder(sub, n, seed=seed)


def part_loader(root: Path, batch: int, batches: int, seconds: float, out: Path, decode: str = "fast") -> int:
    """images/s of the loader a pretraining builds (``ftcl.train``'s, ``data.decode: decode``) with every
    core as a worker, each batch copied to the device (``gpu``: decoded there); the workers' start and
    first batches excluded."""
    import torch

    from ftcl import config
    from ftcl.data.datasets import build_dataset
    from ftcl.data.jpeg import decoder
    from ftcl.train import _loader

    workers = _cpus()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config.resolve(overrides={"data.dataset": "imagefolder", "data.root": str(root), "data.image_size": 224,
                                    "data.decode": decode, "data.num_workers": workers, "optim.batch_size": batch,
                                    "tracking.enabled": False})
    data = build_dataset(cfg.data, "train", "pretrain", crop_scale=cfg.augment.crop_scale)
    loader = _loader(data, workers, config.batch_layout(cfg), device, 0)
    if len(loader) == 0:
        raise SystemExit(f"{len(data)} files: fewer than one batch of {batch}")
    warm, n, start, epochs = 2, 0, 0.0, 0
    while n < batches * batch and (not start or time.perf_counter() - start < seconds):
        epochs += 1
        for images, _ in loader:
            images = images.to(device, non_blocking=True)
            if warm:  # workers starting, the first batches in
                warm -= 1
                if not warm:
                    _sync(device)
                    start = time.perf_counter()
                continue
            n += images.shape[0]
            if n >= batches * batch or time.perf_counter() - start >= seconds:
                break
    _sync(device)
    rate = n / (time.perf_counter() - start)
    info = {"images_per_s": rate, "workers": workers, "batch": batch, "images": n, "epochs": epochs,
            "files": len(data), "decode": decode, "decoder": decoder(), "device": str(device)}
    print(f"loader (decode {decode}): {rate:.0f} images/s ({n} images in batches of {batch}, {workers} workers, "
          f"{len(data)} files, {epochs} epoch(s), to {device}); decoder: {info['decoder']}")
    _write_json(out / ("loader.json" if decode == "fast" else f"loader-{decode}.json"), info)
    return 0


def part_smoke(out: Path, work: Path, defaults: dict) -> int:
    """:data:`SMOKE_CONFIG` in smoke mode (:mod:`ftcl.pipeline.smoke`: the data generated under ``work``),
    tracking off, ``defaults`` on top of its defaults; :data:`SMOKE_ROW`'s run config as the pipeline
    resolves it, run through the stage commands a job runs (``ftcl pretrain``/``linear``/``knn
    --config``), one process each; their seconds and results into ``smoke.json``."""
    import yaml

    from ftcl import pipeline
    from ftcl.config import resolved
    from ftcl.config.merge import deep_merge

    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(SMOKE_CONFIG.read_text())
    cfg["results_dir"] = str(work / "results")
    cfg["defaults"]["data"]["root"] = str(work / "no-dataset-here")  # smoke mode generates an ImageFolder
    cfg["defaults"]["data"]["class_list"] = str(REPO / cfg["defaults"]["data"]["class_list"])
    cfg["defaults"] = deep_merge(cfg["defaults"], {"tracking": {"enabled": False}, **defaults})
    cfg["stages"] = list(SMOKE_STAGES)
    cfg["smoke"] = True
    start = time.monotonic()
    loaded = pipeline.load(cfg)
    run_cfg = loaded.run_configs[SMOKE_ROW]
    world = pipeline.stage_world(loaded.config, "pretrain")
    config_file = resolved.write(run_cfg, work / "smoke" / "configs" / "pretrain.yaml", world)
    info: dict = {"config": str(SMOKE_CONFIG.relative_to(REPO)), "row": SMOKE_ROW, "world": world,
                  "plan_s": time.monotonic() - start, "stages": {}}
    print(f"[smoke] planned {info['config']} in smoke mode ({info['plan_s']:.1f} s, data generated): row "
          f"{SMOKE_ROW}, {run_cfg.model.backbone}, {run_cfg.optim.epochs} epochs, batch {run_cfg.optim.batch_size}, "
          f"{run_cfg.data.train_subset} images at {run_cfg.data.image_size} px, world {world}", flush=True)
    if world != 1:
        raise SystemExit(f"smoke: the capped pretraining has {world} processes; the check runs one")
    run = work / "smoke" / "run"
    for stage in SMOKE_STAGES:
        cmd = [sys.executable, "-m", "ftcl.cli", stage, "--config", str(config_file), "--out", str(run / stage)]
        if stage != "pretrain":
            cmd += ["--checkpoint", str(run / "pretrain")]
        print("$ " + " ".join(cmd), flush=True)
        began = time.monotonic()
        rc = subprocess.run(cmd).returncode
        info["stages"][stage] = {"seconds": time.monotonic() - began, "exit": rc}
        if rc:
            _write_json(out / "smoke.json", info)
            return rc
        result = _load(run / stage / f"{stage}.json") or {}
        info["stages"][stage]["result"] = {k: v for k, v in result.items() if isinstance(v, int | float)}
    _write_json(out / "smoke.json", info)
    return 0


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("part", choices=("environment", "data", "loader", "smoke"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--files", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--batches", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--decode", default="fast", choices=("fast", "gpu"))
    parser.add_argument("--smoke-defaults", default="{}", help="run-config defaults (JSON) on the smoke config")
    args = parser.parse_args()
    if args.part == "environment":
        return part_environment(args.out)
    if args.part == "data":
        return part_data(args.root, args.files, args.out)
    if args.part == "loader":
        return part_loader(args.root, args.batch, args.batches, args.seconds, args.out, args.decode)
    return part_smoke(args.out, args.root, json.loads(args.smoke_defaults))


if __name__ == "__main__":
    sys.exit(main())
