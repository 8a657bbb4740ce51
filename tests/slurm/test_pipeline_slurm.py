"""`snakemake --profile slurm` on the local SLURM cluster (tests/slurm/cluster.sh): every training
and evaluation stage a SLURM job, a requeued or preempted pretraining resuming from its checkpoint in
one MLflow run, failing and cancelled stages failing their rules with the job's error and log paths,
and a 2-GPU stage training DDP over 2 tasks. The profile tests at the top need no cluster.

The pipeline runs on config/tiny.yaml (digits, a width-8 ResNet-18), its launcher.slurm settings
pointed at the local `debug` partition; Snakemake is started at the repository root, as a user
types it, so `--profile slurm` is the shipped profile (the `slurm` link to workflow/profiles/slurm).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
PROFILE = yaml.safe_load((REPO / "workflow" / "profiles" / "slurm" / "profile.yaml").read_text())
ROWS = [row["name"] for row in TINY["ablations"]]  # moco_v2, +ft
EPOCHS = 16  # an external requeue lets the job train ~5 s more (SIGTERM, then SIGKILL): room to spare
PIPELINE_TIMEOUT_S = 420


def cluster_settings(cluster) -> dict:
    """launcher.slurm for the local cluster: 1 CPU per job (the node advertises 8), no GPU but for
    pretraining (1 fake GPU: launcher.stages), a time limit far from submitit's USR2 (cluster.sh)."""
    return {"partition": cluster.partition, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1,
            "timeout_min": 30}


def write_config(folder: Path, cfg: dict, slurm: dict | None = None, stages: dict | None = None) -> Path:
    """A pipeline config with results (and the MLflow store) under ``folder``."""
    cfg = copy.deepcopy(cfg)
    cfg["results_dir"] = str(folder / "results")
    if slurm is not None:
        cfg["launcher"]["slurm"] = slurm
    if stages is not None:
        cfg["launcher"]["stages"] = stages
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake_cmd(work: Path, config: Path, *args: str, profile: str = "slurm") -> list[str]:
    """`snakemake --profile slurm ...` as typed at the repository root (run it with cwd=REPO)."""
    return [str(BIN / "snakemake"), "--profile", profile, "--directory", str(work), "--configfile", str(config),
            *args]


def env() -> dict:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def run_snakemake(work: Path, config: Path, *args: str, profile: str = "slurm",
                  timeout: int = PIPELINE_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_cmd(work, config, *args, profile=profile), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def start_snakemake(work: Path, config: Path, out) -> subprocess.Popen:
    """`snakemake --profile slurm` in the background, in its own process group (see :func:`stop`)."""
    return subprocess.Popen(snakemake_cmd(work, config), cwd=REPO, env=env(), stdout=out, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a terminal sends it to the process group: each waiting `ftcl stage` cancels its job."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)


def submitted_job_id(rule_log: Path) -> str | None:
    """The SLURM job id `ftcl stage` wrote to a rule's log ("pretrain: job 42 submitted; ...")."""
    if not rule_log.is_file():
        return None
    found = re.search(r": job (\d+) submitted", rule_log.read_text())
    return found[1] if found else None


def sacct_rows(job_id: str, *fields: str, duplicates: bool = False) -> list[dict[str, str]]:
    """The job's own rows (no steps) from sacct, every attempt with ``duplicates``."""
    cmd = ["sacct", "-X", "--noheader", "--parsable2", f"--format={','.join(('JobID', *fields))}", "-j", job_id]
    if duplicates:
        cmd.append("--duplicates")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout
    return [dict(zip(("JobID", *fields), line.split("|"))) for line in out.splitlines() if line]


def mlflow_runs(results: Path, experiment: str) -> dict[tuple[str | None, str | None], list]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    by_key: dict[tuple[str | None, str | None], list] = {}
    for run in runs:
        by_key.setdefault((run.data.tags.get("ftcl.row"), run.data.tags.get("ftcl.stage")), []).append(run)
    return by_key


# --------------------------------------------------------------------------- the profile (no cluster)


@pytest.mark.slow
def test_the_profile_resolves_at_the_repository_root_and_switches_stages_to_slurm(tmp_path):
    config = write_config(tmp_path, TINY)  # launcher.name: local
    proc = run_snakemake(tmp_path, config, "-n", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Using profile slurm for setting default command line arguments" in out
    for stage in ("pretrain", "linear", "knn"):
        assert f"ftcl stage {stage} --launcher slurm " in out  # printshellcmds, from the profile
    assert "ftcl aggregate" in out and "ftcl stage aggregate" not in out
    assert (REPO / "slurm" / "profile.yaml").resolve() == REPO / "workflow" / "profiles" / "slurm" / "profile.yaml"


@pytest.mark.slow
def test_settings_in_the_profile_reach_ftcl_stage_with_their_types(tmp_path):
    profile = copy.deepcopy(PROFILE)
    profile["config"]["launcher"]["slurm"] = {"partition": "debug", "account": "lab", "cpus_per_task": 2,
                                              "mem_gb": 1.5, "additional_parameters": {"requeue": True}}
    profile["config"]["launcher"]["stages"] = {"pretrain": {"gpus_per_node": 2, "timeout_min": 90}}
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "profile.yaml").write_text(yaml.safe_dump(profile))
    proc = run_snakemake(tmp_path, write_config(tmp_path, TINY), "-n", profile=str(tmp_path / "slurm"), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Snakemake hands a profile's config: over as text ('2', '1.5', 'True'); ftcl stage gets typed values
    pretrain = re.search(r"ftcl stage pretrain --launcher slurm (.*?) --run-dir", out)[1]
    linear = re.search(r"ftcl stage linear --launcher slurm (.*?) --run-dir", out)[1]
    for option in ("'partition=\"debug\"'", "'account=\"lab\"'", "cpus_per_task=2", "mem_gb=1.5",
                   "additional_parameters.requeue=true"):
        assert option in pretrain and option in linear, (option, pretrain, linear)
    assert "gpus_per_node=2" in pretrain and "timeout_min=90" in pretrain
    assert "gpus_per_node=2" not in linear


@pytest.mark.slow
@pytest.mark.parametrize("pipeline_launcher", ["local", "slurm"])
def test_a_command_line_config_that_replaces_the_profiles_config_stops_the_pipeline(tmp_path, pipeline_launcher):
    cfg = copy.deepcopy(TINY)
    cfg["launcher"]["name"] = pipeline_launcher  # slurm: as in config/paper/*.yaml, then only settings are lost
    config = write_config(tmp_path, cfg)
    proc = run_snakemake(tmp_path, config, "-n", "--config", "tracking={uri: http://localhost:1}", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "--profile slurm is in use, but its `config:`" in out and "replaces the profile's whole" in out, out
    assert not (tmp_path / "results").exists()
    # the launcher settings given in --config too: the run goes ahead
    proc = run_snakemake(tmp_path, config, "-n", "--config", "tracking={uri: http://localhost:1}",
                         "launcher={name: slurm, slurm: {partition: gpu, cpus_per_task: 2}}", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "ftcl stage pretrain --launcher slurm --option 'partition=\"gpu\"' --option cpus_per_task=2" in out


@pytest.mark.slow
def test_a_smoke_switch_on_the_command_line_under_the_slurm_profile_points_to_the_overlay(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["launcher"]["name"] = "slurm"
    config = write_config(tmp_path, cfg)
    proc = run_snakemake(tmp_path, config, "-n", "--config", "smoke=true", timeout=120)
    assert proc.returncode != 0 and "layer config/overlays/smoke.yaml on your config" in proc.stdout + proc.stderr
    # the overlay keeps the profile's config: the smoke experiment is planned as SLURM jobs
    cmd = [*snakemake_cmd(tmp_path, config), str(REPO / "config" / "overlays" / "smoke.yaml"), "-n"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"results/{cfg['experiment']}-smoke/" in out and "ftcl stage pretrain --launcher slurm" in out


# --------------------------------------------------------------------------- on the cluster


def _interrupt(job_id: str, how: str) -> None:
    if how == "scontrol requeue":  # what an admin or a node failure does: SIGTERM, then SIGKILL; no checkpoint()
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    else:  # what a preemption or the time limit sends first (sbatch --signal=USR2@...): submitit checkpoints
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)


@pytest.fixture(scope="module")
def pipeline_run(slurm_cluster, tmp_path_factory):
    """The tiny pipeline through `snakemake --profile slurm`; while it runs, row moco_v2's pretraining
    is requeued with `scontrol requeue` and row +ft's gets USR2 (preemption), each right after its
    first checkpoint."""
    work = tmp_path_factory.mktemp("slurm-pipeline")
    cfg = copy.deepcopy(TINY)
    cfg["defaults"]["optim"]["epochs"] = EPOCHS
    config = write_config(work, cfg, slurm=cluster_settings(slurm_cluster), stages={"pretrain": {"gpus_per_node": 1}})
    exp_dir = work / "results" / cfg["experiment"]
    how = {"moco_v2": "scontrol requeue", "+ft": "USR2"}
    interrupted: dict[str, str] = {}
    output = work / "snakemake.out"
    start = time.monotonic()
    with output.open("w") as out:
        proc = start_snakemake(work, config, out)
        try:
            while proc.poll() is None and time.monotonic() - start < PIPELINE_TIMEOUT_S:
                for row in ROWS:
                    last = exp_dir / row / "seed0" / "pretrain" / "checkpoints" / "last.pt"
                    job_id = submitted_job_id(exp_dir / "logs" / "pretrain" / row / "seed0.log")
                    if row not in interrupted and job_id and last.exists():
                        _interrupt(job_id, how[row])
                        interrupted[row] = job_id
                time.sleep(0.1)
            proc.wait(timeout=max(1.0, PIPELINE_TIMEOUT_S - (time.monotonic() - start)))
        finally:
            stop(proc)
    return SimpleNamespace(work=work, exp_dir=exp_dir, returncode=proc.returncode, output=output.read_text(),
                           elapsed=time.monotonic() - start, interrupted=interrupted, how=how,
                           cluster=slurm_cluster, experiment=cfg["experiment"])


@pytest.mark.slurm
def test_every_stage_runs_as_a_slurm_job_and_the_tables_are_produced(pipeline_run):
    run = pipeline_run
    assert run.returncode == 0, run.output[-6000:]
    assert "Using profile slurm" in run.output
    runs = mlflow_runs(run.work / "results", run.experiment)
    job_ids = set()
    for row in ROWS:
        for stage in ("pretrain", "linear", "knn"):
            [mlflow_run] = runs[(row, stage)]  # one run per stage, requeued or not
            tags = mlflow_run.data.tags
            assert tags["ftcl.launcher"] == "slurm" and mlflow_run.info.status == "FINISHED"
            job_id = tags["slurm.job_id"]
            assert job_id == submitted_job_id(run.exp_dir / "logs" / stage / row / "seed0.log")
            assert run.cluster.wait_for_end(job_id) == "COMPLETED"
            [acct] = sacct_rows(job_id, "JobName", "Partition", "State", "AllocTRES")
            assert (acct["JobName"], acct["Partition"], acct["State"]) == (f"ftcl-{stage}", "debug", "COMPLETED")
            # per-stage settings reach sbatch: pretraining asked for a (fake) GPU, evaluation for none
            assert ("gres/gpu=1" in acct["AllocTRES"]) == (stage == "pretrain"), acct
            job_ids.add(job_id)
    assert len(job_ids) == 6
    # cheap rules ran here: no job folder, no SLURM job for them
    assert sorted(p.name for p in (run.exp_dir / "logs" / "submitit").iterdir()) == sorted(TINY["stages"])
    table = pd.read_csv(run.exp_dir / "tables" / "ablation.csv")
    assert table["row"].tolist() == ROWS
    assert table["linear_top1_mean"].between(0, 100).all() and table["knn_top1_mean"].between(0, 100).all()
    assert all((run.exp_dir / "tables" / f"ablation.{ext}").is_file() for ext in ("md", "tex"))
    assert len(runs[(None, "aggregate")]) == 1


@pytest.mark.slurm
@pytest.mark.parametrize("row", ROWS)
def test_an_interrupted_pretraining_is_requeued_and_resumes_from_its_checkpoint_in_one_run(pipeline_run, row):
    run = pipeline_run
    assert run.returncode == 0, run.output[-6000:]
    job_id = run.interrupted.get(row)
    assert job_id, f"{row}'s pretraining was not interrupted (it ended before its first checkpoint?)"
    assert run.cluster.wait_for_end(job_id) == "COMPLETED"
    attempts = [r["State"].split()[0] for r in sacct_rows(job_id, "State", duplicates=True)]
    assert attempts[0] == "REQUEUED" and attempts[-1] == "COMPLETED", attempts  # same job id, requeued

    # the rule's log holds both attempts (the job log is appended to and followed through the requeue)
    log = (run.exp_dir / "logs" / "pretrain" / row / "seed0.log").read_text()
    resumed = re.findall(rf"\[pretrain\] resumed from \S+ at epoch (\d+)/{EPOCHS}", log)
    assert len(resumed) == 1 and 1 <= int(resumed[0]) < EPOCHS, log
    resumed_at = int(resumed[0])
    if run.how[row] == "USR2":
        assert "requeueing pretrain of" in log  # StageJob.checkpoint(), called by submitit on USR2
    else:
        assert "Bypassing signal SIGTERM" in log  # scontrol requeue: SIGTERM, then SIGKILL
    trained = [int(e) for e in re.findall(rf"\[pretrain\] epoch (\d+)/{EPOCHS} loss", log)]
    assert all(trained.count(epoch) <= 1 for epoch in range(1, EPOCHS + 1)), trained  # none trained twice
    assert all(trained.count(epoch) == 1 for epoch in range(resumed_at + 1, EPOCHS + 1)), trained
    assert "[pretrain] done" in log and f"job {job_id} finished" in log

    # one MLflow run for the stage, holding each epoch before the requeue once
    [mlflow_run] = mlflow_runs(run.work / "results", run.experiment)[(row, "pretrain")]
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["slurm.job_id"] == job_id
    assert (run.exp_dir / row / "seed0" / "pretrain" / ".mlflow_run_id").read_text().strip() == mlflow_run.info.run_id
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{run.work / 'results' / 'mlflow.db'}").get_metric_history(
        mlflow_run.info.run_id, "pretrain/loss")
    steps = [m.step for m in history]
    assert set(steps) == set(range(1, EPOCHS + 1)), steps
    assert all(steps.count(step) == 1 for step in range(1, resumed_at + 1)), steps
    assert len(list((run.exp_dir / row / "seed0" / "pretrain" / "scores").glob("epoch_*.parquet"))) == EPOCHS


@pytest.mark.slurm
def test_a_stage_that_raises_or_is_cancelled_fails_its_rule_with_the_error_and_log_paths(slurm_cluster, tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["ablations"] = [
        {"name": "diverges", "baseline": True, "overrides": {"optim.lr_per_256": 1.0e30, "log_every": 1}},
        {"name": "cancelled", "overrides": {"optim.epochs": 40}},
    ]
    config = write_config(tmp_path, cfg, slurm=cluster_settings(slurm_cluster))
    exp_dir = tmp_path / "results" / cfg["experiment"]
    cancelled_log = exp_dir / "logs" / "pretrain" / "cancelled" / "seed0.log"
    start = time.monotonic()
    with (tmp_path / "snakemake.out").open("w") as out:
        proc = start_snakemake(tmp_path, config, out)
        try:
            cancelled = None
            while proc.poll() is None and time.monotonic() - start < PIPELINE_TIMEOUT_S:
                job_id = submitted_job_id(cancelled_log)
                if cancelled is None and job_id and (exp_dir / "cancelled" / "seed0" / "pretrain" / "checkpoints"
                                                     / "last.pt").exists():
                    subprocess.run(["scancel", job_id], check=True, timeout=30)  # the user cancels it
                    cancelled = job_id
                time.sleep(0.2)
            proc.wait(timeout=max(1.0, PIPELINE_TIMEOUT_S - (time.monotonic() - start)))
        finally:
            stop(proc)
    output = (tmp_path / "snakemake.out").read_text()
    assert proc.returncode != 0 and cancelled, output[-6000:]

    # the Python error raised in the job, in Snakemake's output and the rule's log, with the job's logs
    diverges_log = exp_dir / "logs" / "pretrain" / "diverges" / "seed0.log"
    diverged = submitted_job_id(diverges_log)
    assert re.search(r"Error in rule pretrain:\n(    .*\n)*?    log: \S+/logs/pretrain/diverges/seed0.log", output)
    error = f"pretrain: job {diverged} failed: NonFiniteLossError: loss became NaN/inf at iteration"
    for text in (output, diverges_log.read_text()):
        assert error in text, text[-4000:]
        assert re.search(rf"pretrain: logs: \S+/{diverged}_0_log.out and \S+/{diverged}_0_log.err", text)
    assert slurm_cluster.wait_for_end(diverged) == "FAILED"

    # a job cancelled by the user fails its rule too, saying so, with the job's logs
    assert re.search(r"Error in rule pretrain:\n(    .*\n)*?    log: \S+/logs/pretrain/cancelled/seed0.log", output)
    text = cancelled_log.read_text()
    assert f"pretrain: job {cancelled} failed" in text and "CANCELLED" in text, text[-4000:]
    assert re.search(rf"pretrain: logs: \S+/{cancelled}_0_log.out and \S+/{cancelled}_0_log.err", text)
    assert slurm_cluster.wait_for_end(cancelled) == "CANCELLED"
    assert not (exp_dir / "tables").exists()  # aggregation waits for every row


@pytest.mark.slurm
def test_a_two_gpu_stage_trains_ddp_over_two_tasks_with_gloo_on_the_cpu(slurm_cluster, tmp_path):
    if slurm_cluster.gpus < 2:
        pytest.skip("the local cluster has fewer than 2 fake GPUs")
    cfg = copy.deepcopy(TINY)
    cfg["launcher"]["name"] = "slurm"
    # launcher settings by hand, as -o options: 2 GPUs -> 2 tasks (one DDP process per GPU)
    settings = {**cluster_settings(slurm_cluster), "gpus_per_node": 2,
                "setup": ["echo visible GPUs: $CUDA_VISIBLE_DEVICES"]}
    options = [a for k, v in settings.items() for a in ("-o", f"{k}={json.dumps(v)}")]
    run_config = {**cfg["defaults"], "device": "auto", "experiment": "ddp",
                  "optim": {**cfg["defaults"]["optim"], "epochs": 2},
                  "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    proc = subprocess.run(
        [str(BIN / "ftcl"), "stage", "pretrain", "--run-dir", "run", "--config", "run.yaml", "--launcher", "slurm",
         *options, "--job-dir", "jobs", "--log", "pretrain.log"],
        cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"pretrain: job (\d+) submitted", proc.stderr)[1]
    log = (tmp_path / "pretrain.log").read_text()
    assert "pretrain: 2 tasks" in proc.stderr
    # CUDA_VISIBLE_DEVICES names the 2 fake GPUs, torch sees none: DDP over gloo on the CPU
    assert "visible GPUs: 0,1" in (tmp_path / "jobs" / f"{job_id}_0_log.out").read_text()
    assert re.search(r"\[pretrain\] moco .* device cpu, world 2, batch 64 = 2 x 32, BN in 1 sub-batch", log), log
    assert "[pretrain] epoch 2/2" in log and (tmp_path / "run" / "pretrain" / "pretrain.json").is_file()
    assert (tmp_path / "run" / "configs" / "pretrain.yaml").read_text().startswith(
        "# ftcl resolved run config: world 2, ")  # resolved for the processes the launcher gives the job
    assert "global_rank=1(2)" in (tmp_path / "jobs" / f"{job_id}_1_log.out").read_text()  # the second task
    assert slurm_cluster.wait_for_end(job_id) == "COMPLETED"
    [acct] = sacct_rows(job_id, "State", "AllocTRES", "NTasks")
    assert "gres/gpu=2" in acct["AllocTRES"], acct
    steps = subprocess.run(["sacct", "--noheader", "--parsable2", "--format=JobID,NTasks,State", "-j", job_id],
                           check=True, capture_output=True, text=True, timeout=30).stdout
    assert f"{job_id}.0|2|COMPLETED" in steps, steps  # the srun step ran 2 tasks
    # rank 0 alone tracks: one MLflow run, tagged with the job id
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert mlflow_run.data.tags["slurm.job_id"] == job_id and mlflow_run.info.status == "FINISHED"


@pytest.mark.slurm
def test_a_paper_config_in_smoke_mode_runs_every_stage_as_a_capped_slurm_job(slurm_cluster, tmp_path):
    # config/paper/hsg_cifar10.yaml as a user has it, pointed at this cluster's partition (1 CPU per job
    # here: the machine has 2 cores); smoke mode caps its GPUs, memory and time and generates CIFAR-10
    cfg = yaml.safe_load((REPO / "config" / "paper" / "hsg_cifar10.yaml").read_text())
    cfg["defaults"]["data"]["root"] = str(tmp_path / "no-cifar-here")
    cfg["launcher"]["slurm"] |= {"partition": slurm_cluster.partition, "cpus_per_task": 1}
    config = write_config(tmp_path, cfg)
    start = time.monotonic()
    # --config smoke=true would replace the profile's config: config/overlays/smoke.yaml is layered on instead
    cmd = [*snakemake_cmd(tmp_path, config), str(REPO / "config" / "overlays" / "smoke.yaml")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - start
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    print(f"smoke run of config/paper/hsg_cifar10.yaml on the local SLURM cluster: {wall:.0f} s")
    exp_dir = tmp_path / "results" / f"{cfg['experiment']}-smoke"
    assert not (tmp_path / "results" / cfg["experiment"]).exists()
    jobs = []
    for row in cfg["ablations"]:
        for stage in cfg["stages"]:
            assert (exp_dir / row["name"] / "seed0" / f"{stage}.done").is_file(), (row["name"], stage)
            jobs.append(submitted_job_id(exp_dir / "logs" / stage / row["name"] / "seed0.log"))
    assert all(jobs) and len(set(jobs)) == len(cfg["ablations"]) * len(cfg["stages"])
    for job_id in jobs:  # every stage a SLURM job, within smoke mode's caps
        assert slurm_cluster.wait_for_end(job_id) == "COMPLETED"
        [acct] = sacct_rows(job_id, "AllocTRES", "TimelimitRaw", "ReqMem")
        assert "gres/gpu=2" not in acct["AllocTRES"] and int(acct["TimelimitRaw"]) <= 30, acct
        assert acct["ReqMem"] in ("16G", "16384M", "16Gn"), acct  # the paper's 32 GB, capped
    table = pd.read_csv(exp_dir / "tables" / "ablation.csv")
    assert table["row"].tolist() == [row["name"] for row in cfg["ablations"]]
    assert (exp_dir / "tables" / "ablation.md").read_text().startswith(
        f"Smoke run of {cfg['experiment']}: amounts shrunk, not results")
    runs = mlflow_runs(tmp_path / "results", f"{cfg['experiment']}-smoke")  # its own MLflow experiment
    assert {stage for (_, stage) in runs} >= set(cfg["stages"]), sorted(runs, key=str)
