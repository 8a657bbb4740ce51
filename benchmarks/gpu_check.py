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

The parts that are not commands of their own (pytest, ``bench.py``, ``ftcl pretrain``) are in
``benchmarks/gpu_parts.py``; the summary and the goals' verdicts in ``benchmarks/gpu_summary.py``.

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

from gpu_parts import CUDA_ONLY, PARTS, TITLES, _cpus, _load  # noqa: E402  (found through sys.path)
from gpu_summary import part_result, write_summary  # noqa: E402

BENCH_VARIANTS = "moco+ft,moco+ft+scores,supervised"  # moco is always timed
COMPILE_VARIANTS = "moco+ft"  # compiling each variant takes a while: MoCo and MoCo + FT


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
    py, me = sys.executable, str(BENCH / "gpu_parts.py")
    if part == "environment":
        return [py, me, part, "--out", str(out)]
    if part == "cuda-tests":
        return [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *cuda_test_files()]
    if part in ("methods-eager", "methods-compile"):
        extra = sizes.bench_compile if part == "methods-compile" else sizes.bench
        variants = COMPILE_VARIANTS if part == "methods-compile" else BENCH_VARIANTS
        return [py, str(BENCH / "bench.py"), "--sections", "methods", "--only", variants,
                "--results", str(out / "results"), *extra]
    if part == "data":
        return [py, me, part, "--out", str(out), "--root", str(root), "--files", str(sizes.files)]
    if part in ("loader", "loader-gpu"):
        return [py, me, "loader", "--out", str(out), "--root", str(root), "--batch", str(sizes.loader_batch),
                "--batches", str(sizes.loader_batches), "--seconds", str(sizes.loader_seconds),
                "--decode", "gpu" if part == "loader-gpu" else "fast"]
    if part == "smoke":
        return [py, me, part, "--out", str(out), "--root", str(root.parent / "smoke-work"),
                "--smoke-defaults", json.dumps(sizes.smoke)]
    if part == "pretrain":
        return [py, "-m", "ftcl.cli", "pretrain", "--out", str(pretrain_dir), "--set", "data.dataset=imagefolder",
                f"data.root={root}", "data.decode=fast", f"data.num_workers={_cpus()}", "optim.epochs=2",
                "ft.positive.mode=extrapolate", "ft.negative.mode=interpolate", "tracking.enabled=false",
                *sizes.pretrain]
    raise ValueError(part)


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
    return orchestrate(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
