"""Pretraining end to end on real data: it learns, it records scores, it resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.evaluate import knn_eval, linear_probe
from ftcl.methods import moco
from ftcl.train import NonFiniteLossError, pretrain

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def small_fmnist(tmp_path: Path, **extra) -> config.RunConfig:
    return config.resolve(overrides={
        "data.dataset": "fashion-mnist", "data.train_subset": 2048, "data.test_subset": 1000,
        "model.width": 16, "method.queue_size": 1024, "optim.epochs": 4, "optim.batch_size": 128,
        "optim.lr_per_256": 0.06, "tracking.enabled": False, "log_every": 1000,
        "eval.linear.epochs": 20, "eval.linear.lr": 1.0, "eval.knn.k": 50, **extra,
    })


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (apt-get install it)")
def test_short_pretraining_learns_features_well_above_chance(tmp_path):
    cfg = small_fmnist(tmp_path, **{"ft.positive.mode": "extrapolate", "ft.negative.mode": "interpolate"})
    pretrain(cfg, tmp_path, echo=lambda *_: None)
    stats = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "scores").glob("epoch_*.parquet")))
    per_epoch = stats.groupby("epoch")["loss"].mean()
    # The first epoch's queue still holds random keys; from the second on the loss must fall.
    assert per_epoch.iloc[-1] < per_epoch.iloc[1] - 0.1, per_epoch.to_dict()
    assert len(stats) == 4 * (2048 // 128) and stats["iteration"].is_monotonic_increasing
    assert stats[["pos_mean", "neg_mean", "neg_var"]].notna().all().all()
    backbone, _ = ckpt.load_backbone(tmp_path)
    knn = knn_eval(backbone, cfg, torch.device("cpu"))
    linear = linear_probe(backbone, cfg, torch.device("cpu"), echo=lambda *_: None)
    assert knn["top1"] > 45 and linear["top1"] > 45  # chance is 10 %
    assert (tmp_path / "scores" / "score_curves.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "pretrain.json").read_text())["epochs"] == 4


def _pretrain_cmd(out: Path, epochs: int) -> list[str]:
    sets = {"data.dataset": "digits", "data.image_size": 32, "model.width": 16, "method.queue_size": 256,
            "optim.epochs": epochs, "optim.batch_size": 64, "tracking.enabled": False, "log_every": 1000}
    return [sys.executable, "-m", "ftcl.cli", "pretrain", "--out", str(out),
            *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_epochs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_pretrain_cmd(tmp_path, 3), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env)
    # no deadline of its own: a run that stops before its first checkpoint fails the poll below, and one
    # that hangs is stopped by pytest's timeout (pyproject.toml); how long an epoch takes is not asserted
    while not (tmp_path / "checkpoints" / "epoch_0001.pt").exists():
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = ckpt.latest_good(tmp_path / "checkpoints")["epoch"]
    assert 1 <= done_before < 3 and not (tmp_path / "pretrain.json").exists()

    second = subprocess.run(_pretrain_cmd(tmp_path, 3), capture_output=True, text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resumed from {tmp_path / 'checkpoints'} at epoch {done_before}/3" in second.stdout
    trained = [line for line in second.stdout.splitlines() if line.startswith("[pretrain] epoch ")]
    assert [line.split()[2] for line in trained] == [f"{e}/3" for e in range(done_before + 1, 4)]
    final = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert final["epoch"] == 3
    iterations = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "scores").glob("epoch_*.parquet")))
    assert list(iterations["iteration"]) == list(range(len(iterations)))  # no gap, no repeat


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = config.resolve(overrides={"data.dataset": "digits", "model.width": 8, "model.small_stem": True,
                                    "method.queue_size": 128, "optim.epochs": 2, "optim.batch_size": 64,
                                    "tracking.enabled": False, "log_every": 1000})
    pretrain(cfg, tmp_path, echo=lambda *_: None)
    good = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    cfg = config.replace(cfg, {"optim.epochs": 3, "log_every": 1})  # one more epoch, which diverges
    real_info_nce = moco.info_nce
    monkeypatch.setattr(moco, "info_nce", lambda pos, neg, t: real_info_nce(pos, neg, t) * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"NaN/inf at iteration \d+ \(epoch 3\)"):
        pretrain(cfg, tmp_path, echo=lambda *_: None)
    after = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert after["epoch"] == good["epoch"] == 2


@pytest.mark.slow
def test_ddp_with_torchrun_trains_two_processes_into_one_run(tmp_path):
    """optim.batch_size is the whole job's batch: 2 processes x 32 for 64, and the lr of batch 64."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "ftcl.cli", "pretrain", "--out", str(tmp_path),
           "--set", "data.dataset=digits", "--set", "model.width=8", "--set", "model.small_stem=true",
           "--set", "method.queue_size=256", "--set", "optim.epochs=2", "--set", "optim.batch_size=64",
           "--set", "optim.lr_per_256=0.04", "--set", "tracking.enabled=false"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "world 2" in run.stdout and run.stdout.count("[pretrain] epoch 2/2") == 1  # rank 0 reports alone
    assert "batch 64 = 2 x 32, BN in 1 sub-batch(es)" in run.stdout  # under DDP the shuffle is across processes
    first_epoch = next(line for line in run.stdout.splitlines() if line.startswith("[pretrain] epoch 1/2"))
    assert " lr 0.01 " in first_epoch  # 0.04 x 64 / 256, whatever the number of processes
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    # each process sees half of the 1347 training digits (673) in batches of 32: 21 steps per epoch
    assert state["epoch"] == 2 and state["iteration"] == 2 * ((1347 // 2) // 32)


def test_paper_configs_train_at_lr_003_for_a_global_batch_of_256_whatever_the_gpu_count():
    from ftcl.config import batch_layout
    from ftcl.schedules import learning_rate

    for path in sorted(Path("config/paper").glob("*.yaml")):
        pipeline = config.load_yaml(path)
        gpus = pipeline.get("launcher", {}).get("stages", {}).get("pretrain", {}).get(
            "gpus_per_node", pipeline.get("launcher", {}).get("slurm", {}).get("gpus_per_node", 1))
        cfg = config.resolve(base=pipeline["defaults"], world=gpus)
        layout = batch_layout(cfg, world=gpus)
        assert layout.global_batch == cfg.optim.batch_size, path
        assert layout.per_process * gpus == layout.global_batch, path
        assert learning_rate(cfg.optim, 0, 0, 100) == pytest.approx(cfg.optim.lr_per_256 * layout.global_batch / 256)
        if cfg.optim.batch_size == 256 and cfg.method.name == "moco" and "hsg" not in path.name:
            assert learning_rate(cfg.optim, 0, 0, 100) == pytest.approx(0.03), path


def test_a_global_batch_that_does_not_divide_among_processes_is_rejected():
    with pytest.raises(config.ConfigError, match=r"'optim.batch_size' is 100.*3 processes cannot share"):
        config.resolve(overrides={"optim.batch_size": 100}, world=3)


def _backbone_bytes(folder: Path) -> bytes:
    state = ckpt.load(folder / "checkpoints" / "last.pt")["backbone"]
    return b"".join(v.numpy().tobytes() for v in state.values())


@pytest.mark.slow
def test_same_seed_and_thread_count_rerun_bit_identically_and_deterministic_pins_the_threads(tmp_path):
    """What docs/RESULTS.md "Reproducibility" states: one machine, same threads -> identical; the thread count
    changes the numbers; ``deterministic.enabled`` fixes it whatever the launcher's cpus_per_task.

    Whether 2 threads give other bytes than 1 depends on the CPU's kernels (docs/RESULTS.md: measured on one
    machine), so that is printed, not asserted; the pin is checked on the thread count each run
    trained with (torch's, read as the process exits), and on the bytes against the 1-thread run."""
    sets = ["--set", "data.dataset=digits", "model.width=8", "model.small_stem=true", "method.queue_size=128",
            "optim.epochs=1", "optim.batch_size=64", "tracking.enabled=false", "log_every=1000",
            "ft.positive.mode=extrapolate", "ft.negative.mode=interpolate"]
    cli = ("import atexit, sys, torch; atexit.register(lambda: print('torch threads', torch.get_num_threads())); "
           "from ftcl.cli import main; sys.exit(main(sys.argv[1:]))")

    def run(out: str, threads: int, *extra: str) -> tuple[bytes, int]:
        cmd = [sys.executable, "-c", cli, "pretrain", "--out", str(tmp_path / out), *sets, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return _backbone_bytes(tmp_path / out), int(done.stdout.rsplit("torch threads ", 1)[1].split()[0])

    one = run("a", 1)
    assert one[1] == 1 and run("b", 1) == one
    two = run("c", 2)
    assert two[1] == 2
    print(f"\n[reproducibility] 2 threads {'change' if two[0] != one[0] else 'do not change'} the weights here")
    pinned = ("deterministic.enabled=true", "deterministic.threads=1")
    assert run("d", 2, *pinned) == one  # 1 thread, whatever OMP_NUM_THREADS: the 1-thread run's bytes


def test_step_schedule_multiplies_the_lr_by_gamma_from_each_milestone_on():
    """MoCo v1's main_moco.py: lr x 0.1 from (0-based) epoch 120 and again from 160, constant within an epoch."""
    from ftcl.schedules import learning_rate

    cfg = config.resolve(overrides={"optim.schedule": "step", "optim.milestones": [120, 160], "optim.gamma": 0.1,
                                    "optim.epochs": 200, "optim.lr_per_256": 0.03})
    lrs = {(e, it): learning_rate(cfg.optim, e, it, 10) for e in (0, 119, 120, 159, 160, 199) for it in (0, 9)}
    assert lrs[(0, 0)] == lrs[(119, 9)] == pytest.approx(0.03)
    assert lrs[(120, 0)] == lrs[(159, 9)] == pytest.approx(0.003)
    assert lrs[(160, 0)] == lrs[(199, 9)] == pytest.approx(0.0003)


def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    """Resume continues every random stream, the loader's shuffle included (it used to start again
    from epoch 1's order)."""
    from helpers import smoke_cfg

    cfg = smoke_cfg(**{"optim.epochs": 3, "deterministic.enabled": True, "deterministic.threads": 1})
    pretrain(cfg, tmp_path / "whole", echo=lambda *_: None)
    real_save = ckpt.save_epoch

    def save_then_die(state, *args, **kwargs):
        real_save(state, *args, **kwargs)
        if state["epoch"] == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(ckpt, "save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg, tmp_path / "resumed", echo=lambda *_: None)
    monkeypatch.setattr(ckpt, "save_epoch", real_save)
    pretrain(cfg, tmp_path / "resumed", echo=lambda *_: None)
    whole, resumed = (ckpt.load(tmp_path / name / "checkpoints" / "last.pt") for name in ("whole", "resumed"))
    assert resumed["epoch"] == 3
    for key, value in whole["method"].items():
        assert torch.equal(value, resumed["method"][key]), key
