"""The prepared GPU check (run by benchmarks/gpu_check.sh on a machine with one CUDA GPU, no network).

Parts, each timed and summarised in one table at the end:
1. the CUDA-marked tests (``pytest -m cuda``);
2. ``bench.py --gpu`` methods: ResNet-50, 224 px, K = 65536, global batch 256, bf16 + channels_last,
   MoCo, MoCo + FT, MoCo + FT + score recording, without and with torch.compile (images/s, ratios to
   MoCo with 95 % intervals; goal: FT + recording within 2 %);
3. the JPEG loader (``imagefolder``, ``data.decode: fast``) with every CPU core as a worker, in
   images/s, against the training step (loader / step > 1: the GPU is fed);
4. a two-epoch ``ftcl pretrain`` on a generated ImageFolder with bf16 autocast.
Nothing is downloaded: the images are generated here (benchmarks/jpeg.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))


def run(cmd: list[str], timeout: int, log: Path) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"{err.stdout or ''}{err.stderr or ''}\n[gpu_check] timed out after {timeout} s"
    log.write_text(out if isinstance(out, str) else out.decode())
    print(out[-3000:], flush=True)
    return code, time.monotonic() - start, out


def loader_images_per_s(root: Path, workers: int, batches: int = 12) -> float:
    import torch
    from torch.utils.data import DataLoader

    from ftcl import config
    from ftcl.data.datasets import build_dataset

    cfg = config.resolve(overrides={"data.dataset": "imagefolder", "data.root": str(root), "data.image_size": 224})
    data = build_dataset(cfg.data, "train", "pretrain", crop_scale=cfg.augment.crop_scale)
    loader = DataLoader(data, batch_size=256, shuffle=True, num_workers=workers, pin_memory=True,
                        persistent_workers=True, drop_last=True, prefetch_factor=4, collate_fn=data.collate)
    it = iter(loader)
    next(it)  # workers started, first batch in
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            images, _ = next(it)
        except StopIteration:
            it = iter(loader)
            images, _ = next(it)
        images = images.to("cuda", non_blocking=True)
        n += images.shape[0]
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="folder for logs and results")
    parser.add_argument("--files", type=int, default=1500, help="JPEGs of the generated ImageFolder")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if not torch.cuda.is_available():
        print("[gpu_check] no CUDA device visible: nothing to check")
        return 2
    gpu = torch.cuda.get_device_name()
    print(f"[gpu_check] {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, {os.cpu_count()} CPUs", flush=True)
    summary: list[tuple[str, str, str]] = []
    py = sys.executable

    code, secs, text = run([py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], 240,
                           out / "cuda-tests.log")
    summary.append(("CUDA-marked tests", text.strip().splitlines()[-1] if text.strip() else "", f"{secs:.0f} s"))

    for label, extra in (("methods, eager", []), ("methods, torch.compile", ["--compile"])):
        code, secs, text = run([py, str(BENCH / "bench.py"), "--gpu", "--sections", "methods", "--only",
                                "moco+ft,moco+ft+scores", "--rounds", "6", *extra], 300,
                               out / f"bench-{'compile' if extra else 'eager'}.log")
        lines = [line for line in text.splitlines() if line.startswith(("moco ", "moco+"))]
        summary.append((label, " | ".join(" ".join(line.split()) for line in lines) or f"exit {code}",
                        f"{secs:.0f} s"))

    from jpeg import write_folder

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "imagefolder"
        stats = write_folder(root, args.files)
        from ftcl.data import jpeg as fast_path

        stats = f"{stats['files']} files, {stats['mean_kb']:.0f} KB mean, decoder {fast_path.decoder()}"
        workers = os.cpu_count() or 1
        rate = loader_images_per_s(root, workers)
        step_line = next((s for s in summary if s[0] == "methods, eager"), ("", "", ""))[1]
        summary.append((f"JPEG loader, {workers} workers", f"{rate:.0f} images/s ({stats})", "see ratio below"))
        try:
            step_rate = float(step_line.split("|")[0].split()[1])
            summary.append(("loader / training step (MoCo, eager)", f"{rate / step_rate:.2f}", "> 1: the GPU is fed"))
        except (IndexError, ValueError):
            pass
        code, secs, text = run([py, "-m", "ftcl.cli", "pretrain", "--out", str(out / "pretrain"), "--set",
                                "data.dataset=imagefolder", f"data.root={root}", "data.image_size=224",
                                f"data.num_workers={workers}", "model.backbone=resnet50", "method.queue_size=16384",
                                "optim.epochs=2", "optim.batch_size=256", "optim.amp=true", "optim.channels_last=true",
                                "ft.positive.mode=extrapolate", "ft.negative.mode=interpolate",
                                "tracking.enabled=false", "log_every=5"], 300, out / "pretrain.log")
        epochs = [line for line in text.splitlines() if line.startswith("[pretrain] epoch ") and "img/s" in line]
        summary.append(("ftcl pretrain, 2 epochs, bf16", epochs[-1] if epochs else f"exit {code}", f"{secs:.0f} s"))

    print(f"\n# GPU check on {gpu} ({time.strftime('%Y-%m-%d')}; command: benchmarks/gpu_check.sh)")
    print("| part | result | time |\n|---|---|---|")
    for part, result, secs in summary:
        print(f"| {part} | {result} | {secs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
