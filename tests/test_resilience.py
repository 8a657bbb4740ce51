"""Resilience: kills at random points, many writers on one MLflow store, and a sweep of bad inputs."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ftcl import checkpoint as ckpt
from ftcl import config
from ftcl.cli import main
from ftcl.models.backbones import build_backbone

TINY = {"data.dataset": "digits", "model.width": 8, "model.small_stem": True, "method.queue_size": 128,
        "optim.epochs": 1, "optim.batch_size": 64, "tracking.enabled": False, "log_every": 1000}


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


# --- crash safety --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_points_always_resumes_from_a_complete_checkpoint(tmp_path):
    epochs = 5
    cmd = [sys.executable, "-m", "ftcl.cli", "pretrain", "--out", str(tmp_path),
           *sets({**TINY, "data.image_size": 24, "model.width": 16, "optim.epochs": epochs})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    completed = []
    for _ in range(4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(2.0, 7.0))  # import + start-up takes ~3 s: some kills land before epoch 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for f in (tmp_path / "checkpoints").glob("*.pt"):
            ckpt.load(f)  # every visible checkpoint is complete (temp files are the only partial writes)
        state = ckpt.latest_good(tmp_path / "checkpoints") if (tmp_path / "checkpoints").exists() else None
        completed.append(state["epoch"] if state else 0)
        if completed[-1] == epochs:
            break
    assert completed == sorted(completed)  # progress is never lost
    final = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert final.returncode == 0, final.stderr
    if completed[-1]:
        assert f"at epoch {completed[-1]}/{epochs}" in final.stdout
    state = ckpt.load(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == epochs
    stats = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "scores").glob("epoch_*.parquet")))
    assert sorted(stats["epoch"].unique()) == list(range(epochs))
    assert list(stats["iteration"]) == list(range(len(stats)))
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


# --- many writers on one store -------------------------------------------------------------------------------

WRITER = """
import sys, pathlib
from ftcl import config
from ftcl.tracking import Tracker
i, uri, out = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
cfg = config.resolve(overrides={"experiment": "concurrency", "tracking.uri": uri,
                                "tracking.tags": {"row": f"row{i % 4}", "seed": i // 4}})
out.mkdir(parents=True, exist_ok=True)
(out / "result.txt").write_text(str(i))
with Tracker(cfg, out, "pretrain") as t:
    t.log_params(config.flatten(config.to_dict(cfg)))
    for step in range(20):
        t.log_metrics({"pretrain/loss": 1.0 / (step + 1), "scores/pos_mean": step / 20}, step=step)
    t.log_artifact(out / "result.txt", "score_distribution")
"""


@pytest.mark.slow
def test_eight_stages_logging_at_once_lose_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = [subprocess.Popen([sys.executable, str(script), str(i), uri, str(tmp_path / f"run{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(8)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("concurrency")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    stages = [r for r in runs if r.data.tags.get("ftcl.stage") == "pretrain"]
    parents = [r for r in runs if r.data.tags.get("ftcl.stage") == "parent"]
    assert len(stages) == 8
    assert len(parents) == 8  # one per row x seed, never duplicated
    for run in stages:
        history = client.get_metric_history(run.info.run_id, "pretrain/loss")
        assert sorted(m.step for m in history) == list(range(20))
        assert [a.path for a in client.list_artifacts(run.info.run_id, "score_distribution")] == [
            "score_distribution/result.txt"]
        assert run.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}


# --- the bad-input sweep -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "malformed.yaml").write_text("optim: [epochs: 3\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "unknown.yaml").write_text("optim:\n  epoch: 3\n")
    (d / "empty_root").mkdir()
    (d / "afile").write_text("not a folder")
    folder = d / "folder"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / split / cls / f"{i}.png")
    (folder / "train" / "c").mkdir()  # a class folder with no images
    corrupt = d / "corrupt"
    for split in ("train", "val"):
        (corrupt / split / "a").mkdir(parents=True)
        for name in ("bad.png", "worse.png"):
            (corrupt / split / "a" / name).write_bytes(b"\x89PNG not really")
    cfg = config.resolve(overrides={"model.width": 8})
    ckpt.atomic_save({"weights": {}}, d / "foreign.pt")
    good = {"format": ckpt.FORMAT, "epoch": 1, "config": config.to_dict(cfg), "in_channels": 1,
            "backbone": build_backbone("resnet18", 8, False, 1).state_dict()}
    ckpt.atomic_save(good, d / "ckpt" / "checkpoints" / "last.pt")
    data = (d / "ckpt" / "checkpoints" / "last.pt").read_bytes()
    (d / "truncated" / "checkpoints").mkdir(parents=True)
    (d / "truncated" / "checkpoints" / "last.pt").write_bytes(data[: len(data) // 3])
    wrong = {**good, "backbone": build_backbone("resnet50", 8, False, 1).state_dict()}
    ckpt.atomic_save(wrong, d / "wrongarch" / "checkpoints" / "last.pt")
    # a run folder of TINY with FT on, resumable: a rerun with FT off must not resume it
    ft_run = config.resolve(overrides={**TINY, "ft.positive.mode": "extrapolate"})
    config.dump(ft_run, d / "ft_run" / "config.yaml")
    ckpt.atomic_save(good, d / "ft_run" / "checkpoints" / "last.pt")
    return d


def pretrain_args(**overrides):
    return ["pretrain", *sets({**TINY, **overrides})]


BAD_INPUTS = {
    "malformed YAML": (lambda d: ["pretrain", "--config", str(d / "malformed.yaml")],
                       "malformed.yaml is not valid YAML (line 2, column 1"),
    "YAML that is not a mapping": (lambda d: ["pretrain", "--config", str(d / "list.yaml")], "must hold a mapping"),
    "missing config file": (lambda d: ["pretrain", "--config", str(d / "nope.yaml")], "nope.yaml does not exist"),
    "unknown key in file": (lambda d: ["pretrain", "--config", str(d / "unknown.yaml")], "unknown key 'optim.epoch'"),
    "unknown --set key": (lambda d: pretrain_args(**{"model.depth": 3}), "unknown key 'model.depth'"),
    "override without =": (lambda d: ["pretrain", "--set", "optim.epochs"], "must look like key=value"),
    "wrong type": (lambda d: pretrain_args(**{"optim.epochs": "three"}), "'optim.epochs' has value 'three'"),
    "alpha <= 0": (lambda d: pretrain_args(**{"ft.positive.alpha": 0}), "'ft.positive.alpha' has value 0"),
    "negative epochs": (lambda d: pretrain_args(**{"optim.epochs": -2}), "'optim.epochs' has value -2"),
    "zero temperature": (lambda d: pretrain_args(**{"method.temperature": 0}), "'method.temperature' has value 0"),
    "crop scale above 1": (lambda d: pretrain_args(**{"augment.crop_scale": "[0.2, 2]"}), "augment.crop_scale.1"),
    "unknown dataset": (lambda d: pretrain_args(**{"data.dataset": "imagenet"}), "'data.dataset' has value 'imagenet'"),
    "missing dataset root": (lambda d: pretrain_args(**{"data.dataset": "fashion-mnist",
                                                        "data.root": "/nonexistent/fm"}), "/nonexistent/fm"),
    "empty dataset root": (lambda d: pretrain_args(**{"data.dataset": "cifar10", "data.root": str(d / "empty_root")}),
                           "empty_root"),
    "class folder without images": (lambda d: pretrain_args(**{"data.dataset": "imagefolder",
                                                               "data.root": str(d / "folder")}), "train/c"),
    "missing class list": (lambda d: pretrain_args(**{"data.dataset": "imagefolder", "data.root": str(d / "folder"),
                                                      "data.class_list": str(d / "classes.txt")}), "classes.txt"),
    "corrupt image file": (lambda d: pretrain_args(**{"data.dataset": "imagefolder", "data.root": str(d / "corrupt"),
                                                      "data.num_workers": 0, "optim.batch_size": 2,
                                                      "method.shuffle_bn": False,
                                                      "data.image_size": 16}), "cannot decode image file"),
    "batch larger than the data": (lambda d: pretrain_args(**{"data.train_subset": 10}), "'optim.batch_size' is 64"),
    "batch the BatchNorm sub-batches cannot share": (lambda d: pretrain_args(**{"optim.batch_size": 60}),
                                                      "does not divide the per-process batch 60"),
    "a Shuffle-BN that cannot happen": (lambda d: pretrain_args(**{"method.bn_splits": 1}),
                                        "'method.bn_splits' is 1 in a single process"),
    "cuda without a GPU": (lambda d: pretrain_args(device="cuda"), "'device' is 'cuda'"),
    "unwritable output folder": (lambda d: ["pretrain", "--out", str(d / "afile" / "sub"), *sets(TINY)],
                                 "cannot be written"),
    "unreachable MLflow server": (lambda d: pretrain_args(**{"tracking.enabled": True,
                                                            "tracking.uri": "http://127.0.0.1:9"}),
                                  "http://127.0.0.1:9 cannot be reached"),
    "foreign checkpoint": (lambda d: ["knn", "--checkpoint", str(d / "foreign.pt")], "not an ftcl pretraining"),
    "truncated checkpoint": (lambda d: ["knn", "--checkpoint", str(d / "truncated")], "truncated or corrupted"),
    "checkpoint of another architecture": (lambda d: ["knn", "--checkpoint", str(d / "wrongarch")],
                                           "does not fit this backbone"),
    "missing checkpoint": (lambda d: ["knn", "--checkpoint", str(d / "nothing")], "no pretraining checkpoint"),
    "resuming a run folder of another config": (lambda d: [*pretrain_args(), "--out", str(d / "ft_run")],
                                                "ft.positive.mode ('extrapolate' -> 'none')"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_fails_with_a_clear_message_and_touches_no_results(case, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results" / "run"
    out.mkdir(parents=True)
    (out / "linear.json").write_text('{"top1": 71.5}')
    before = {p: p.read_bytes() for p in out.rglob("*")}
    make_args, needle = BAD_INPUTS[case]
    args = make_args(files)
    if "--out" not in args:
        args = [*args, "--out", str(out)]
    # "Fails fast" as a property, not a stopwatch: nothing on the way to the error waits (MLflow's client
    # retries an unreachable server with back-off sleeps for minutes; ftcl's preflight must not get there)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.startswith("ftcl ") and "Traceback" not in err  # a message, not a stack trace
    assert all(p.read_bytes() == content for p, content in before.items())  # existing results untouched
    assert not (out / "checkpoints").exists()
    assert slept == [], f"slept {slept} s before failing"


def test_a_run_folder_resumes_only_under_its_own_config(files):
    from ftcl.train import check_resume

    folder = files / "ft_run"
    saved = (folder / "config.yaml").read_bytes()
    same = config.load_yaml(folder / "config.yaml")
    check_resume(same, folder)  # its own config
    longer = config.resolve(overrides={**TINY, "ft.positive.mode": "extrapolate", "optim.epochs": 5,
                                       "tracking.enabled": True, "log_every": 1})
    check_resume(longer, folder)  # more epochs, other tracking and logging: still the same run
    with pytest.raises(config.ConfigError, match=r"model.width \(8 -> 16\)"):
        check_resume(config.resolve(overrides={**TINY, "ft.positive.mode": "extrapolate", "model.width": 16}), folder)
    assert (folder / "config.yaml").read_bytes() == saved


def test_the_sweep_has_at_least_twenty_cases():
    assert len(BAD_INPUTS) >= 20
