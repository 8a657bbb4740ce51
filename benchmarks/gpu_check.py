"""The prepared GPU check: run by ``benchmarks/gpu_check.sh`` on a node with one CUDA GPU and no network
(``--rehearse``: the same parts on the CPU at tiny sizes, the CUDA-only ones reported as skipped).

Parts, in this order, each a subprocess with its own time budget (seconds, on an H100/H200-class node;
``rest``: what is left of the whole check's ``--deadline``, 460 s by default):

==================  ======  =====================================================================
part                budget  what it runs
==================  ======  =====================================================================
environment             40  versions, the GPU, the CPU cores, the JPEG decoder; that the check's
                            modules import none of mlflow, submitit, snakemake, pycocotools
cuda-tests              40  ``pytest -m cuda`` on the test files holding CUDA-marked tests
methods-eager           90  ``bench.py --gpu`` methods: ResNet-50, 224 px, K = 65536, batch 256,
                            bf16 + channels_last: MoCo, MoCo + FT, MoCo + FT + score recording
                            and the supervised step (the speed-of-light reference), paired rounds
data                    35  a generated ImageFolder of JPEGs with ImageNet's sizes (all cores)
loader                  25  ftcl's ``imagefolder`` loader (``data.decode: fast``) with every CPU
                            core as a worker, batches of 256 copied to the GPU: images/s
loader-gpu              25  the same loader with ``data.decode: gpu``: the workers read bytes and
                            draw the crops, the GPU decodes (nvJPEG) and crops: images/s
pretrain                50  ``ftcl pretrain``, two epochs, ResNet-50 MoCo v2 + FT, bf16, on the
                            generated ImageFolder, tracking off (no MLflow, Snakemake, launcher)
smoke                   75  the IN-100 paper config (``config/paper/imagenet100_mocov2.yaml``) in
                            smoke mode, its ``+ft`` row's stage commands as the pipeline resolves
                            them: ``ftcl pretrain``, ``ftcl linear``, ``ftcl knn`` on the ImageFolder
                            smoke mode generates, tracking off
methods-compile       rest  the methods part with ``torch.compile`` (MoCo and MoCo + FT): compile
                            time (first round minus a steady round) apart from steady-state images/s
==================  ======  =====================================================================

A part that runs past its budget is killed with its process group (loader workers, compile
workers) and recorded as timed out; the check goes on with the next part. After every part the
summary (``summary.md``, ``summary.json``) is rewritten in ``--out``, and each part's output is in
``<part>.log`` there as it runs, so a check killed from outside still leaves what finished.

Goals (printed with the summary): ResNet-50 MoCo v2 + FT at K = 65536 >= 2500 images/s; MoCo v2 +
FT >= 0.7 of the supervised step's images/s (a MoCo step does about 4/3 of a supervised step's work:
0.75 is the ideal); FT + score recording within 2 % of MoCo (the 95 % interval's lower bound >= 0.98);
the loader's images/s >= the training step's (the GPU is fed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

#: packages the check must never need: the pipeline's, not a training run's
NOT_NEEDED = ("mlflow", "submitit", "snakemake", "pycocotools")
#: the modules the check's parts import (bench.py and jpeg.py are imported by path)
CHECK_MODULES = ("ftcl.cli", "ftcl.config", "ftcl.pipeline", "ftcl.stages", "ftcl.train", "ftcl.tracking",
                 "ftcl.data.datasets", "ftcl.data.jpeg", "ftcl.methods", "ftcl.scores", "ftcl.results.stats",
                 "bench", "jpeg")
BENCH_VARIANTS = "moco+ft,moco+ft+scores,supervised"  # moco is always timed
COMPILE_VARIANTS = "moco+ft"  # compiling each variant takes a while: MoCo and MoCo + FT
#: the paper config the smoke part runs, its row, and its stages (detection needs pycocotools-free VOC
#: data and minutes of its own: the pipeline's smoke test on the CPU covers it)
SMOKE_CONFIG = REPO / "config" / "paper" / "imagenet100_mocov2.yaml"
SMOKE_ROW = "+ft"
SMOKE_STAGES = ("pretrain", "linear", "knn")


@dataclass
class Sizes:
    """What each part runs at: on the GPU node, or rehearsed on the CPU."""

    files: int  # JPEGs in the generated ImageFolder
    bench: list[str]  # bench.py arguments
    bench_compile: list[str]
    loader_batch: int
    loader_batches: int
    loader_seconds: float
    pretrain: list[str]  # --set overrides
    smoke: dict  # run-config defaults set on the smoke part's paper config (the rehearsal's smaller model)
    deadline: float  # the whole check, seconds
    budgets: dict[str, float] = field(default_factory=dict)


GPU = Sizes(
    files=3000,
    bench=["--gpu", "--steps", "10", "--rounds", "6"],
    bench_compile=["--gpu", "--compile", "--steps", "10", "--rounds", "4"],
    loader_batch=256, loader_batches=40, loader_seconds=15.0,
    pretrain=["device=cuda", "data.image_size=224", "model.backbone=resnet50", "method.queue_size=65536",
              "optim.batch_size=256", "optim.amp=true", "optim.channels_last=true", "log_every=5"],
    smoke={"device": "cuda"},
    deadline=460.0,
    budgets={"environment": 40, "cuda-tests": 40, "methods-eager": 90, "data": 35, "loader": 25, "loader-gpu": 25,
             "pretrain": 50, "smoke": 75, "methods-compile": math.inf},
)
REHEARSAL = Sizes(
    files=24,
    bench=["--batch", "16", "--steps", "1", "--rounds", "2"],
    bench_compile=[],  # not rehearsed: inductor on the CPU takes minutes even for a tiny model
    loader_batch=16, loader_batches=4, loader_seconds=10.0,
    pretrain=["device=cpu", "data.image_size=32", "model.backbone=resnet18", "model.width=8",
              "model.small_stem=true", "model.feature_dim=16", "method.queue_size=64", "optim.batch_size=16",
              "log_every=1"],
    smoke={"device": "cpu", "model": {"backbone": "resnet18", "width": 8, "small_stem": True, "feature_dim": 16},
           "method": {"queue_size": 64}, "data": {"image_size": 32}},
    deadline=1200.0,
    budgets={"environment": 120, "cuda-tests": 180, "methods-eager": 180, "data": 120, "loader": 120,
             "loader-gpu": 120, "pretrain": 240, "smoke": 300, "methods-compile": 60},
)
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


# ------------------------------------------------------------------------------------ the parts
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
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------- the runner
class Killed(Exception):
    """The check itself got SIGTERM or SIGINT (e.g. the outer ``timeout``)."""


def _on_signal(signum, frame):
    raise Killed(signal.Signals(signum).name)


def run_part(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> tuple[int | None, float, bool]:
    """Run ``cmd`` in its own process group, its output to ``log`` and to this console as it comes;
    past ``timeout`` seconds the group is killed. Returns ``(exit code, seconds, timed out)``."""
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, text=True, errors="replace", preexec_fn=_die_with_parent)

        def pump():
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=None if math.isinf(timeout) else max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            if proc.poll() is None:
                _kill_group(proc)
            reader.join(timeout=5)
        secs = time.monotonic() - start
        if timed_out:
            fh.write(f"\n[gpu_check] timed out after {timeout:.0f} s: process group killed\n")
    return proc.returncode, secs, timed_out


def _die_with_parent() -> None:
    """In a part's process: SIGKILL when the check dies (even by SIGKILL); its loader and compile
    workers watch their own parent."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # what is left of the group (loader workers)
        os.killpg(proc.pid, signal.SIGKILL)


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def commands(part: str, sizes: Sizes, out: Path, root: Path, pretrain_dir: Path) -> list[str]:
    py, me = sys.executable, str(Path(__file__).resolve())
    if part == "environment":
        return [py, me, "--part", part, "--out", str(out)]
    if part == "cuda-tests":
        return [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *cuda_test_files()]
    if part in ("methods-eager", "methods-compile"):
        extra = sizes.bench_compile if part == "methods-compile" else sizes.bench
        variants = COMPILE_VARIANTS if part == "methods-compile" else BENCH_VARIANTS
        return [py, str(BENCH / "bench.py"), "--sections", "methods", "--only", variants,
                "--results", str(out / "results"), *extra]
    if part == "data":
        return [py, me, "--part", part, "--out", str(out), "--root", str(root), "--files", str(sizes.files)]
    if part in ("loader", "loader-gpu"):
        return [py, me, "--part", "loader", "--out", str(out), "--root", str(root), "--batch", str(sizes.loader_batch),
                "--batches", str(sizes.loader_batches), "--seconds", str(sizes.loader_seconds),
                "--decode", "gpu" if part == "loader-gpu" else "fast"]
    if part == "smoke":
        return [py, me, "--part", part, "--out", str(out), "--root", str(root.parent / "smoke-work"),
                "--smoke-defaults", json.dumps(sizes.smoke)]
    if part == "pretrain":
        return [py, "-m", "ftcl.cli", "pretrain", "--out", str(pretrain_dir), "--set", "data.dataset=imagefolder",
                f"data.root={root}", "data.decode=fast", f"data.num_workers={_cpus()}", "optim.epochs=2",
                "ft.positive.mode=extrapolate", "ft.negative.mode=interpolate", "tracking.enabled=false",
                *sizes.pretrain]
    raise ValueError(part)


# ------------------------------------------------------------------------------ the summary
def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _interval(r) -> str:
    return f"{r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]"


def _methods(out: Path, compiled: bool, gpu: bool) -> dict | None:
    name = f"methods{'-gpu' if gpu else ''}{'-compile' if compiled else ''}"
    data = _load(out / "results" / f"{name}.json")
    return data["results"] if data else None


def part_result(part: str, out: Path, log: Path, gpu: bool) -> str:
    """The summary's one-line result of a finished part, from its JSON (else its log's last line)."""
    if part == "environment" and (env := _load(out / "environment.json")):
        return (f"Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), {env['device']}, "
                f"{env['cpus']} CPUs; jsonschema {env['jsonschema']}; decoder: {env['decoder']}; "
                f"not imported by the check: {', '.join(NOT_NEEDED)}"
                + (f" (imported: {env['imported_not_needed']})" if env["imported_not_needed"] else ""))
    if part.startswith("methods") and (r := _methods(out, part == "methods-compile", gpu)):
        rows = [f"moco {r['moco']['images_per_s']:.0f}"]
        rows += [f"{n} {r[n]['images_per_s']:.0f} ({_interval(r[n]['ratio_to_moco'])} x moco)"
                 for n in ("moco+ft", "moco+ft+scores", "supervised") if n in r]
        text = "images/s: " + ", ".join(rows)
        if "moco+ft/supervised" in r:
            text += f"; moco+ft / supervised {_interval(r['moco+ft/supervised'])}"
        if part == "methods-compile":
            text += "; compile time, s (first round minus a steady round): " + ", ".join(
                f"{n} {v['compile_s']:.0f}" for n, v in r.items() if isinstance(v, dict) and "compile_s" in v)
        return text
    if part == "data" and (d := _load(out / "data.json")):
        return f"{d['files']} JPEGs, {d['mean_kb']:.0f} KB mean, {d['processes']} processes"
    if part in ("loader", "loader-gpu") and (d := _load(out / ("loader.json" if part == "loader"
                                                                   else "loader-gpu.json"))):
        return (f"{d['images_per_s']:.0f} images/s ({d['workers']} workers, batch {d['batch']}, decode {d['decode']} "
                f"to {d['device']}; {d['decoder'].split(',')[0]})")
    if part == "smoke" and (d := _load(out / "smoke.json")) and d["stages"]:
        done = []
        for stage, r in d["stages"].items():
            score = {"linear": "top1", "knn": "top1"}.get(stage)
            value = r.get("result", {}).get(score) if score else None
            done.append(f"{stage} {r['seconds']:.0f} s" + (f" (top-1 {value:.1f})" if value is not None else "")
                        + ("" if not r["exit"] else f" exit {r['exit']}"))
        return f"{d['row']}, world {d['world']}: planned {d['plan_s']:.0f} s, " + ", ".join(done)
    text = log.read_text(errors="replace") if log.exists() else ""
    if part.startswith("methods"):  # no result file: killed or failed; the first rounds it printed
        first = [line.split("] ", 1)[1].split(" (")[0] for line in text.splitlines()
                 if line.startswith("[bench] ") and "first round" in line]
        if first:
            return "no result; " + ", ".join(first) + " (warm-up: compilation if any)"
    if part == "pretrain":
        epochs = [line.strip() for line in text.splitlines() if line.startswith("[pretrain] epoch ")
                  and "img/s" in line]
        if epochs:
            return epochs[-1].replace("|", "/")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(("[gpu_check]", "$ "))]
    return (lines[-1][:200] if lines else "").replace("|", "/")


def goals(out: Path, gpu: bool) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows from the parts' results."""

    def goal_verdict(low: float, high: float, goal: float) -> str:  # ftcl.results.stats's, without its imports
        return "met" if low >= goal else "not met" if high < goal else "undecided"

    rows = []
    modes = {mode: r for mode, compiled in (("eager", False), ("compiled", True))
             if (r := _methods(out, compiled, gpu))}
    if not modes:
        return [("the methods goals", "no methods result", "not measured")]

    def per_mode(label: str, value, verdict) -> None:
        measured, verdicts = [], []
        for mode, r in modes.items():
            v = value(r)
            if v is not None:
                measured.append(f"{mode} {v[0]}")
                verdicts.append(f"{mode}: {verdict(r)}")
        rows.append((label, "; ".join(measured) or "not measured", "; ".join(verdicts) or "not measured"))

    def rate(r):
        return r["moco+ft"]["images_per_s"] if "moco+ft" in r else None

    per_mode("ResNet-50 MoCo v2 + FT at K = 65536 >= 2500 images/s",
             lambda r: (f"{rate(r):.0f} images/s",) if rate(r) else None,
             lambda r: "met" if rate(r) >= 2500 else "not met")
    per_mode("MoCo v2 + FT >= 0.7 x the supervised step's images/s (ideal about 0.75: a MoCo step does about "
             "4/3 of a supervised step's work)",
             lambda r: (_interval(r["moco+ft/supervised"]),) if "moco+ft/supervised" in r else None,
             lambda r: goal_verdict(*r["moco+ft/supervised"][1:], 0.7))
    per_mode("FT + score recording within 2 % of MoCo (lower bound >= 0.98)",
             lambda r: (_interval(r["moco+ft+scores"]["ratio_to_moco"]),) if "moco+ft+scores" in r else None,
             lambda r: goal_verdict(*r["moco+ft+scores"]["ratio_to_moco"][1:], 0.98))
    loader = _load(out / "loader.json")
    steps = {mode: rate(r) for mode, r in modes.items() if rate(r)}
    if loader and steps:
        mode, step = max(steps.items(), key=lambda kv: kv[1])
        ratio = loader["images_per_s"] / step
        rows.append(("loader images/s >= training step images/s",
                     f"{loader['images_per_s']:.0f} / {step:.0f} (MoCo + FT, {mode}) = {ratio:.2f}",
                     "met" if ratio >= 1 else "not met"))
    else:
        rows.append(("loader images/s >= training step images/s", "not measured", "not measured"))
    on_device = _load(out / "loader-gpu.json")
    if loader and on_device:
        rows.append(("decode: gpu against decode: fast (loader images/s, every CPU core)",
                     f"{on_device['images_per_s']:.0f} / {loader['images_per_s']:.0f} = "
                     f"{on_device['images_per_s'] / loader['images_per_s']:.2f}", "measured (no goal)"))
    return rows


def write_summary(out: Path, status: dict[str, dict], sizes: Sizes, rehearse: bool, started: float,
                  header: str, final: bool) -> str:
    gpu = not rehearse
    lines = [f"# GPU check{' rehearsal (CPU, tiny sizes)' if rehearse else ''}", "", header, "",
             "| part | status | result | budget | time |", "|---|---|---|---|---|"]
    for part in PARTS:
        s = status.get(part, {"status": "not reached" if final else "pending", "result": "", "secs": None})
        budget = "rest" if math.isinf(sizes.budgets[part]) else f"{sizes.budgets[part]:.0f} s"
        secs = "" if s["secs"] is None else f"{s['secs']:.0f} s"
        lines.append(f"| {part}: {TITLES[part]} | {s['status']} | {s['result']} | {budget} | {secs} |")
    lines += ["", f"Whole check: {time.monotonic() - started:.0f} s of a {sizes.deadline:.0f} s deadline.", "",
              "| goal | measured | verdict |", "|---|---|---|"]
    try:
        rows = goals(out, gpu)
    except Exception as err:  # the summary must come out whatever a part left behind
        rows = [("goals", f"could not be read: {err!r}", "")]
    lines += [f"| {g} | {m} | {v} |" for g, m, v in rows]
    if rehearse:
        lines += ["", "Rehearsal: the CPU demo model at tiny sizes; the figures and verdicts say nothing about a GPU."]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    _write_json(out / "summary.json", {"rehearsal": rehearse, "header": header, "parts": status,
                                       "goals": [{"goal": g, "measured": m, "verdict": v} for g, m, v in rows]})
    return text


def _save_pretrain(run: Path, dest: Path) -> None:
    """The pretraining's small files (config, summary, scores, plots) into ``dest``; not the checkpoints."""
    if not run.exists():
        return
    for path in run.rglob("*"):
        if path.is_file() and "checkpoints" not in path.relative_to(run).parts and path.stat().st_size < 2**21:
            target = dest / path.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def orchestrate(args: argparse.Namespace) -> int:
    sizes = REHEARSAL if args.rehearse else GPU
    deadline = args.deadline or sizes.deadline
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.rehearse:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a rehearsal is the CPU's, whatever the machine has
    from record import commit  # git only: this process imports no torch and never touches the GPU

    try:
        revision = commit()  # "unknown" in a copy of the tree without .git
    except OSError:
        revision = "unknown (no git)"
    header = (f"{time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()}; commit {revision}; command: "
              f"bash benchmarks/gpu_check.sh{' --rehearse' if args.rehearse else ''} (the environment row: "
              "the machine)")
    status: dict[str, dict] = {}
    cuda = False
    tmp = Path(tempfile.mkdtemp(prefix="ftcl-gpu-check-"))
    root, pretrain_dir = tmp / "imagefolder", tmp / "pretrain"
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    code, current = 0, None
    try:
        for part in PARTS:
            current = part
            left = deadline - (time.monotonic() - started)
            budget = min(sizes.budgets[part], left)
            if part != "environment" and not cuda and not args.rehearse:
                status[part] = {"status": "skipped: no CUDA device visible", "result": "", "secs": None}
                code = 2
            elif part in CUDA_ONLY and not cuda:
                status[part] = {"status": "skipped: no CUDA", "result": "", "secs": None}
            elif part in ("loader", "loader-gpu", "pretrain") and status.get("data", {}).get("status") != "ok":
                status[part] = {"status": "skipped: no generated data", "result": "", "secs": None}
            elif left < 5:
                status[part] = {"status": "skipped: the check's deadline passed", "result": "", "secs": None}
            else:
                print(f"\n[gpu_check] {part}: {TITLES[part]} (budget {budget:.0f} s)", flush=True)
                log = out / f"{part}.log"
                rc, secs, timed_out = run_part(commands(part, sizes, out, root, pretrain_dir), budget, log, env)
                if part == "pretrain":
                    _save_pretrain(pretrain_dir, out / "pretrain")
                if timed_out:
                    state = f"timed out after {budget:.0f} s"
                elif part == "cuda-tests" and not cuda and rc in (0, 5):
                    state = "skipped: no CUDA"  # collected in this environment; each test skipped itself
                else:
                    state = "ok" if rc == 0 else f"failed (exit {rc})"
                if part == "environment":
                    cuda = bool((_load(out / "environment.json") or {}).get("cuda_available"))
                    if not cuda and not args.rehearse:
                        print("[gpu_check] no CUDA device visible; for a CPU rehearsal: "
                              "bash benchmarks/gpu_check.sh --rehearse", flush=True)
                if not state.startswith(("ok", "skipped")):
                    code = code or 1
                status[part] = {"status": state, "result": part_result(part, out, log, cuda), "secs": secs}
            write_summary(out, status, sizes, args.rehearse, started, header, final=False)
    except Killed as err:
        print(f"\n[gpu_check] stopped by {err}: the summary holds what finished", flush=True)
        if current is not None and current not in status:
            status[current] = {"status": f"killed ({err}: the check was stopped)", "result": "", "secs": None}
        code = 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        text = write_summary(out, status, sizes, args.rehearse, started, header, final=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n" + text, flush=True)
    print(f"[gpu_check] logs, results and this summary: {out}", flush=True)
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check", help="folder for logs and results")
    parser.add_argument("--rehearse", action="store_true",
                        help="on the CPU at tiny sizes: every part that does not need CUDA, the rest skipped")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds for the whole check (default 450; a rehearsal 900)")
    parser.add_argument("--part", choices=("environment", "data", "loader", "smoke"), help=argparse.SUPPRESS)
    parser.add_argument("--decode", default="fast", help=argparse.SUPPRESS)
    parser.add_argument("--smoke-defaults", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--files", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    if args.part == "environment":
        return part_environment(out)
    if args.part == "data":
        return part_data(args.root, args.files, out)
    if args.part == "loader":
        return part_loader(args.root, args.batch, args.batches, args.seconds, out, args.decode)
    if args.part == "smoke":
        return part_smoke(out, args.root, json.loads(args.smoke_defaults))
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
