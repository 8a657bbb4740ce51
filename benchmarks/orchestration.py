"""Benchmark sections that time whole commands: data loading vs the training step, orchestration
overhead (Snakemake + submitit + MLflow around the same `ftcl` commands run directly), and the
demo DAG's wall time. Used by ``benchmarks/bench.py``; every figure is measured in the same run as
its reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from ftcl.constants import STAGES
from ftcl.orchestrate import folders

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def loading_vs_step(cfg: dict, batches: int = 8) -> dict[str, float]:
    """images/s of the data path alone (loader + two views) and of the full training step."""
    from ftcl.config import batch_layout
    from ftcl.methods import build_method
    from ftcl.models.backbones import build_backbone
    from ftcl.train import TrainStep, _loader, preflight

    device = torch.device("cpu")
    data = preflight(cfg)
    loader = _loader(data, cfg.data.num_workers, batch_layout(cfg), device, 0)
    layout, m = batch_layout(cfg), cfg.model
    method = build_method(cfg, build_backbone(m.backbone, m.width, m.small_stem, data.channels), layout.bn_splits)
    step = TrainStep.build(method, data, device, layout, cfg.augment, cfg.optim, cfg.method.momentum)
    bs = cfg.optim.batch_size

    t0, n = time.perf_counter(), 0
    for i, (images, _) in enumerate(loader):
        step.views(images)
        n += images.shape[0]
        if i + 1 == batches:
            break
    load_ips = n / (time.perf_counter() - t0)

    images = next(iter(loader))[0]
    step(images, 0, 0.01)  # warm-up
    t0 = time.perf_counter()
    for _ in range(batches):
        step(images, 0, 0.01)
    step_ips = batches * bs / (time.perf_counter() - t0)
    return {"loading_images_per_s": load_ips, "step_images_per_s": step_ips, "ratio": load_ips / step_ips}


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def _direct_command(stage: str, run_dir: Path) -> list[str]:
    """The by-hand ``ftcl`` command of ``stage`` in a run folder: its config, its pretraining, its folder."""
    args = ["detect" if stage == "detection" else stage, "--config", str(folders.config_path(run_dir, stage))]
    if stage != "pretrain":
        args += ["--checkpoint", str(run_dir / "pretrain")]
    return [*args, "--out", str(run_dir / stage)]


def orchestration_overhead(tiny_config: Path = REPO / "config" / "tiny.yaml") -> dict[str, float]:
    """Wall time per stage through ``snakemake -c1`` (submitit local launcher + MLflow) minus the same
    stages as plain ``ftcl`` commands without tracking, run one after the other."""
    cfg = yaml.safe_load(tiny_config.read_text())
    with tempfile.TemporaryDirectory(prefix="ftcl-bench-") as tmp:
        tmp = Path(tmp)
        cfg["results_dir"] = str(tmp / "results")
        cfg_file = tmp / "tiny.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        t_pipeline = _run([str(BIN / "snakemake"), "-c1", "--configfile", str(cfg_file), "-q"], REPO)
        exp_dir = tmp / "results" / cfg["experiment"]
        direct = tmp / "direct"
        stages = 0
        t_direct = 0.0
        ftcl = str(BIN / "ftcl")
        for row_dir in sorted(p for p in exp_dir.iterdir() if (p / "seed0" / folders.CONFIGS_DIR).is_dir()):
            for seed_dir in sorted(row_dir.glob("seed*")):
                run_dir = direct / row_dir.name / seed_dir.name  # the same configs, a fresh run folder
                shutil.copytree(seed_dir / folders.CONFIGS_DIR, run_dir / folders.CONFIGS_DIR)
                for stage in STAGES:  # pretraining first, then its evaluations
                    if stage in cfg["stages"]:
                        command = _direct_command(stage, run_dir)
                        t_direct += _run([ftcl, *command, "--set", "tracking.enabled=false"], REPO)
                        stages += 1
        t_aggregate = _run([ftcl, "aggregate", "--configfile", str(exp_dir / "pipeline.yaml"), "--no-mlflow"], REPO)
    return {"stages": stages, "pipeline_s": t_pipeline, "direct_s": t_direct + t_aggregate,
            "overhead_per_stage_s": (t_pipeline - t_direct - t_aggregate) / stages,
            "ratio": t_pipeline / (t_direct + t_aggregate)}


def demo_dag(config: Path = REPO / "config" / "config.yaml", cores: int = 2) -> dict[str, float]:
    """Wall time of the whole demo DAG (``snakemake -c2``) into a temporary results folder."""
    cfg = yaml.safe_load(config.read_text())
    with tempfile.TemporaryDirectory(prefix="ftcl-demo-") as tmp:
        cfg["results_dir"] = str(Path(tmp) / "results")
        cfg_file = Path(tmp) / "demo.yaml"
        cfg_file.write_text(yaml.safe_dump(cfg))
        seconds = _run([str(BIN / "snakemake"), f"-c{cores}", "--configfile", str(cfg_file), "-q"], REPO)
        table = (Path(cfg["results_dir"]) / cfg["experiment"] / "tables" / "ablation.md").read_text()
    return {"seconds": seconds, "rows_x_seeds": len(cfg["ablations"]) * len(cfg["seeds"]), "table": table}
