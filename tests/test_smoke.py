"""Smoke mode (ftcl/pipeline/smoke.py): a paper config with `smoke: true` keeps every row and every
setting that decides the code path, shrinks the amounts, caps the launcher, writes to its own
experiment, generates the data of missing roots (once, deterministically), uses existing roots as a
subset, and its tables say it is a smoke run; `snakemake --config smoke=true` plans it and runs it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ftcl import config as runconfig
from ftcl import pipeline
from ftcl.config import rules
from ftcl.constants import STAGES
from ftcl.errors import ConfigError
from ftcl.pipeline import smoke, smoke_data

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAPER = sorted(p.name for p in (REPO / "config" / "paper").glob("*.yaml"))

#: the run-config keys smoke mode may change (amounts, paths, the experiment); every other key, and with
#: them every key that decides the code path (model, method, ft modes, fa, hsg, augment, precision, data
#: set, protocols, detection head and norm), must come out as the paper config has it
AMOUNT_KEYS = {
    "experiment", "tracking.tags", "optim.epochs", "optim.warmup_epochs", "optim.milestones", "optim.batch_size",
    "ft.start_epoch", "data.root", "data.train_subset", "data.test_subset", "data.image_size", "data.num_workers",
    "eval.linear.epochs", "eval.linear.batch_size", "eval.linear.milestones", "eval.knn.k", "eval.monitor.k",
    "scores.histogram_every", "log_every", "detection.root", "detection.test_root", "detection.iterations",
    "detection.warmup_iterations", "detection.milestones", "detection.batch_size", "detection.eval_batch_size",
    "detection.min_size", "detection.max_size", "detection.precise_bn_iterations", "detection.rpn_batch_size",
    "detection.roi_batch_size", "detection.rpn_pre_nms_top_n", "detection.rpn_post_nms_top_n",
    "detection.checkpoint_every", "detection.log_every", "detection.num_workers", "detection.scenes.num_train",
    "detection.scenes.num_test", "detection.scenes.folder",
}


def paper(name: str, tmp_path: Path, smoke_value=True) -> dict:
    """Paper config ``name`` with its results under ``tmp_path``, dataset roots that do not exist there,
    the class list found from any working folder, and ``smoke`` set (as Snakemake may hand it: text)."""
    cfg = yaml.safe_load((REPO / "config" / "paper" / name).read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    data = cfg["defaults"]["data"]
    data["root"] = str(tmp_path / "missing" / "data")
    if data.get("class_list"):
        data["class_list"] = str(REPO / data["class_list"])
    if (cfg["defaults"].get("detection") or {}).get("root"):
        cfg["defaults"]["detection"]["root"] = str(tmp_path / "missing" / "voc")
    if smoke_value is not None:
        cfg["smoke"] = smoke_value
    return cfg


def flat(run_cfg) -> dict:
    return runconfig.flatten(runconfig.to_dict(run_cfg))


def files_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- the paper configs
@pytest.mark.parametrize("name", PAPER)
def test_a_paper_config_in_smoke_mode_keeps_its_code_paths_and_shrinks_its_amounts(tmp_path, name):
    real = pipeline.load(paper(name, tmp_path, smoke_value=None), check_paths=False)
    smoked = pipeline.load(paper(name, tmp_path, smoke_value="true"))  # Snakemake's `--config smoke=true`
    # its own experiment (results folder and MLflow experiment), the first seed, every row
    assert smoked.experiment == real.experiment + "-smoke"
    assert smoked.exp_dir == real.results_dir / f"{real.experiment}-smoke"
    assert smoked.seeds == real.seeds[:1]
    assert smoked.row_names == real.row_names and smoked.stages == real.stages
    assert smoked.run_configs["moco_v2"].experiment == smoked.experiment
    # the launcher: same name, every stage on at most one GPU and one node, 30 minutes, 16 GB
    launcher = smoked.config["launcher"]
    assert launcher["name"] == real.config["launcher"]["name"]
    for stage in STAGES:
        settings = pipeline.stage_settings(launcher, launcher["name"], stage)
        assert pipeline.stage_world(smoked.config, stage) == 1
        assert settings.get("gpus_per_node", 0) <= 1 and settings.get("nodes", 1) == 1
        assert settings.get("timeout_min", 0) <= 30 and settings.get("mem_gb", 0) <= 16
    for row in real.row_names:
        before, after = flat(real.run_configs[row]), flat(smoked.run_configs[row])
        changed = {key for key in before if before[key] != after[key]}
        assert changed <= AMOUNT_KEYS, f"{row}: smoke changed {sorted(changed - AMOUNT_KEYS)}"
        cfg = smoked.run_configs[row]
        assert cfg.optim.epochs == min(real.run_configs[row].optim.epochs, 2)
        assert cfg.optim.batch_size <= 32 and cfg.data.train_subset <= 256 and cfg.data.test_subset <= 100
        assert (cfg.data.image_size or 32) <= 64 and cfg.eval.linear.epochs <= 2 and cfg.eval.knn.k <= 20
        assert cfg.data.root.startswith(str(smoked.exp_dir / "smoke-data")) and Path(cfg.data.root).is_dir()
        if "detection" in smoked.stages:
            det = cfg.detection
            assert det.iterations <= 10 and det.batch_size <= 4 and max(det.min_size) <= 128
            assert det.warmup_iterations < det.iterations and all(m < det.iterations for m in det.milestones)
            assert Path(det.root).is_dir()
    assert "smoke" not in real.config  # a config that does not ask for smoke reads as before the key existed


def test_the_amounts_that_happen_in_the_paper_run_still_happen_in_the_smoke_run(tmp_path):
    cfg = paper("imagenet1k_moco.yaml", tmp_path)
    cfg["ablations"].append({"name": "floor", "role": "floor", "overrides": {"optim.epochs": 0}})
    cfg["ablations"].append({"name": "+ft_late", "overrides": {"ft.positive.mode": "extrapolate",
                                                                "ft.start_epoch": 100}})
    smoked = pipeline.load(cfg)
    # MoCo v1's step schedule (x 0.1 at epochs 120 and 160 of 200): both steps inside the 2 epochs
    v1 = smoked.run_configs["moco_v1"].optim
    assert v1.schedule == "step" and v1.epochs == 2 and list(v1.milestones) == [1, 1]
    # the linear probe's milestones 60 and 80 of 100 epochs: they fire in the paper's run, so in the smoke run
    linear = smoked.run_configs["moco_v2"].eval.linear
    assert linear.epochs == 2 and list(linear.milestones) == [1, 1]
    # detection's steps at 18k and 22k of 24k iterations, inside the 10
    assert list(smoked.run_configs["moco_v2"].detection.milestones) == [8, 9]
    assert smoked.run_configs["floor"].optim.epochs == 0  # the floor stays untrained
    assert smoked.run_configs["+ft_late"].ft.start_epoch == 1  # FT from epoch 100 of 200: from epoch 1 of 2


def test_the_paper_run_milestones_that_never_fire_still_do_not(tmp_path):
    smoked = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path))
    linear = smoked.run_configs["moco_v2"].eval.linear  # 60 epochs, steps at 60 and 80: the lr stays 30
    assert linear.epochs == 2 and all(m >= linear.epochs for m in linear.milestones)


@pytest.mark.parametrize(("bn_splits", "gpus", "world"),
                         [(None, None, 1), (16, None, 1), (3, None, 1), (None, 2, 2), (4, 2, 2), (3, 2, 2)])
def test_the_smoke_batch_meets_the_batch_rules_for_the_capped_processes(tmp_path, bn_splits, gpus, world):
    cfg = paper("imagenet100_mocov2.yaml", tmp_path, smoke_value={"gpus": gpus} if gpus else True)
    if bn_splits:
        cfg["defaults"]["method"]["bn_splits"] = bn_splits
    smoked = pipeline.load(cfg)
    assert pipeline.stage_world(smoked.config, "pretrain") == world  # 4 GPUs in the paper, capped
    for row, run_cfg in smoked.run_configs.items():
        layout = rules.check_batch(run_cfg, world)  # raises on a batch the rules reject
        assert layout.global_batch <= max(32, 2 * layout.bn_splits * world), row
        # what the launcher will start: the same processes the batch was made for
        assert runconfig.resolved.text(run_cfg, world)


def test_smoke_gpus_caps_every_stage_of_both_launchers(tmp_path):
    cfg = paper("imagenet1k_moco.yaml", tmp_path, smoke_value="{gpus: 2}")  # Snakemake hands it as text
    cfg["launcher"]["local"] = {"gpus_per_node": 8, "tasks_per_node": 8, "timeout_min": 600}
    smoked = pipeline.load(cfg)
    launcher = smoked.config["launcher"]
    assert launcher["stages"]["pretrain"] == {"gpus_per_node": 2, "mem_gb": 16, "timeout_min": 30}  # 8, 400, 4320
    assert launcher["slurm"]["nodes"] == 1 and launcher["slurm"]["gpus_per_node"] == 1  # 1 stays 1
    assert launcher["local"] == {"gpus_per_node": 2, "tasks_per_node": 2, "timeout_min": 30, "max_num_timeout": 3}
    assert launcher["slurm"]["partition"] is None and launcher["slurm"]["cpus_per_task"] == 10  # kept
    assert smoked.config["smoke"]["gpus"] == 2


def test_smoke_off_leaves_the_config_as_it_was(tmp_path):
    absent = pipeline.load(paper("hsg_cifar10.yaml", tmp_path, smoke_value=None), check_paths=False)
    for value in (False, "false", "False"):
        off = pipeline.load(paper("hsg_cifar10.yaml", tmp_path, smoke_value=value), check_paths=False)
        assert off.experiment == absent.experiment and off.seeds == absent.seeds
        # aggregation reads the same text, so adding the key reran no finished aggregation
        assert off.aggregation_text() == absent.aggregation_text()
        assert "smoke" not in yaml.safe_load(off.aggregation_text())
    assert not (tmp_path / "results").exists()


def test_the_applied_config_loads_to_the_same_pipeline_as_aggregation_reads_it(tmp_path):
    smoked = pipeline.load(paper("hsg_imagenet100.yaml", tmp_path))
    again = pipeline.load(smoked.config)
    assert again.experiment == smoked.experiment == "in100-hsg-200ep-smoke"  # not ...-smoke-smoke
    assert again.run_configs == smoked.run_configs
    aggregation = pipeline.load(yaml.safe_load(smoked.aggregation_text()), resolve_runs=False)
    assert aggregation.experiment == smoked.experiment and aggregation.seeds == smoked.seeds
    assert smoke.note(aggregation.config) == "Smoke run of in100-hsg-200ep: amounts shrunk, not results"


def test_hsg_keeps_its_generator_at_the_smoke_size(tmp_path):
    from ftcl.transforms import hsg

    assert smoke.NATIVE_SIZE == hsg.NATIVE_SIZE
    smoked = pipeline.load(paper("hsg_imagenet100.yaml", tmp_path))
    cfg = smoked.run_configs["+hsg"]
    assert cfg.hsg.enabled and cfg.data.image_size == 64
    assert hsg.auto_stages(64) == hsg.auto_stages(224) == 3  # the same generator as at 224 px
    cifar = pipeline.load(paper("hsg_cifar10.yaml", tmp_path)).run_configs["+hsg"]
    assert cifar.data.image_size == 32  # CIFAR's 32 px stay


def test_the_demos_scenes_are_composed_in_the_smoke_runs_folder(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["results_dir"], cfg["smoke"] = str(tmp_path / "results"), True
    assert cfg["defaults"]["detection"]["scenes"]["folder"] == "results/fmnist-demo/scenes"  # the real run's
    smoked = pipeline.load(cfg, check_paths=False)
    for run_cfg in smoked.run_configs.values():
        assert run_cfg.detection.scenes.folder == str(smoked.exp_dir / "smoke-data" / "scenes")
        assert run_cfg.detection.scenes.num_train <= 32


def test_a_row_named_like_the_data_folder_is_rejected(tmp_path):
    cfg = paper("hsg_cifar10.yaml", tmp_path)
    cfg["ablations"].append({"name": "smoke-data", "overrides": {}})
    with pytest.raises(ConfigError, match="'smoke-data'"):
        pipeline.load(cfg)


# ------------------------------------------------------------------------------------------- data
def test_a_missing_imagefolder_root_is_generated_with_the_class_list_and_read_by_the_loader(tmp_path):
    from ftcl.data.datasets import build_dataset

    smoked = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path))
    cfg = smoked.run_configs["moco_v2"]
    root = Path(cfg.data.root)
    classes = (REPO / "config" / "imagenet100.txt").read_text().split()
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(classes)
    assert sorted(p.name for p in (root / "val").iterdir()) == sorted(classes)
    train = build_dataset(cfg.data, "train", "pretrain", crop_scale=(0.2, 1.0))
    test = build_dataset(cfg.data, "test", "eval")
    assert (len(train), len(test), train.num_classes) == (256, 100, 100)
    assert tuple(test[0][0].shape) == (3, 64, 64)


def test_without_a_class_list_ten_classes_are_generated(tmp_path):
    smoked = pipeline.load(paper("imagenet1k_moco.yaml", tmp_path))
    root = Path(smoked.run_configs["moco_v2"].data.root)
    assert len(list((root / "train").iterdir())) == 10


def test_a_class_list_that_is_not_there_stops_the_plan(tmp_path):
    cfg = paper("imagenet100_mocov2.yaml", tmp_path)
    cfg["defaults"]["data"]["class_list"] = str(tmp_path / "nowhere.txt")
    with pytest.raises(ConfigError, match="data.class_list"):
        pipeline.load(cfg)


@pytest.mark.parametrize(("name", "classes"), [("hsg_cifar10.yaml", 10), ("hsg_cifar100.yaml", 100)])
def test_a_missing_cifar_root_is_generated_in_the_python_pickle_layout(tmp_path, name, classes):
    from ftcl.data.datasets import build_dataset

    cfg = pipeline.load(paper(name, tmp_path)).run_configs["moco_v2"]
    train = build_dataset(cfg.data, "train", "pretrain", crop_scale=(0.2, 1.0))
    test = build_dataset(cfg.data, "test", "eval")
    assert (len(train), len(test), train.num_classes) == (256, 100, classes)
    assert len(set(test.labels.tolist())) == min(classes, 100)  # class-balanced


def test_a_missing_voc_root_is_generated_with_the_configs_image_sets(tmp_path):
    from ftcl.detection.data import voc_devkit_annotations

    cfg = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path)).run_configs["moco_v2"]
    det = cfg.detection
    assert [list(s) for s in det.train_sets] == [[2007, "trainval"], [2012, "trainval"]]
    train, test = voc_devkit_annotations(det.root, det.train_sets), voc_devkit_annotations(det.root, det.test_sets)
    assert (len(train), len(test)) == (2 * smoke.VOC_IMAGES, smoke.VOC_IMAGES)
    assert (Path(det.root) / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "trainval.txt").is_file()
    orientations = set()
    for ann in train + test:
        assert ann.image.is_file() and ann.boxes and set(ann.names) <= set(smoke.VOC_CLASSES)
        orientations.add(ann.width > ann.height)
        for x1, y1, x2, y2 in ann.boxes:
            assert 0 <= x1 < x2 <= ann.width and 0 <= y1 < y2 <= ann.height
    assert orientations == {True, False}  # the sampler's two orientation groups


def test_generated_data_is_written_once_and_the_same_everywhere(tmp_path):
    first = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path / "a")).run_configs["moco_v2"]
    root = Path(first.data.root)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    time.sleep(0.01)
    again = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path / "a")).run_configs["moco_v2"]
    assert again.data.root == first.data.root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps  # nothing rewritten
    other = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path / "b")).run_configs["moco_v2"]
    for a, b in ((first.data.root, other.data.root), (first.detection.root, other.detection.root)):
        assert Path(a).name == Path(b).name and files_digest(Path(a)) == files_digest(Path(b))  # deterministic


def test_an_unfinished_data_folder_is_written_again(tmp_path):
    cfg = pipeline.load(paper("hsg_cifar10.yaml", tmp_path)).run_configs["moco_v2"]
    root = Path(cfg.data.root)
    (root / smoke_data.MANIFEST).unlink()  # as a kill before the manifest leaves it
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    pipeline.load(paper("hsg_cifar10.yaml", tmp_path))
    assert (root / "cifar-10-batches-py" / "test_batch").is_file() and (root / smoke_data.MANIFEST).is_file()


def test_a_plan_without_path_checks_generates_nothing(tmp_path):
    smoked = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path), check_paths=False)
    assert smoked.run_configs["moco_v2"].data.root.startswith(str(smoked.exp_dir / "smoke-data"))
    assert not (tmp_path / "results").exists()


def test_existing_roots_are_used_as_a_subset(tmp_path, monkeypatch):
    # a first smoke run's generated ImageFolder and VOC devkit stand in for the user's copies
    made = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path / "made")).run_configs["moco_v2"]
    cfg = paper("imagenet100_mocov2.yaml", tmp_path)
    cfg["defaults"]["data"]["root"] = made.data.root
    cfg["defaults"]["detection"]["root"] = made.detection.root
    monkeypatch.setattr(smoke, "DET_REAL_IMAGES", 5)
    smoked = pipeline.load(cfg)
    run_cfg = smoked.run_configs["+ft"]
    assert run_cfg.data.root == made.data.root and run_cfg.data.train_subset == 256  # as it is, a subset
    assert "data.root" not in smoked.config["smoke"]["overrides"]["+ft"]
    subset = Path(run_cfg.detection.root)
    assert subset.parent == smoked.exp_dir / "smoke-data"
    real = Path(made.detection.root) / "VOCdevkit" / "VOC2007"
    voc = subset / "VOCdevkit" / "VOC2007"
    assert (voc / "JPEGImages").resolve() == (real / "JPEGImages").resolve()  # links, no copies
    for split in ("trainval", "test"):
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert ids == (real / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[:5]
    from ftcl.detection.data import voc_devkit_annotations

    assert len(voc_devkit_annotations(subset, run_cfg.detection.test_sets)) == 5


def test_an_existing_voc_root_without_a_requested_image_set_stops_the_plan(tmp_path):
    made = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path / "made")).run_configs["moco_v2"]
    shutil.rmtree(Path(made.detection.root) / "VOCdevkit" / "VOC2012")
    cfg = paper("imagenet100_mocov2.yaml", tmp_path)
    cfg["defaults"]["detection"]["root"] = made.detection.root
    with pytest.raises(ConfigError, match="VOC2012"):
        pipeline.load(cfg)


# ----------------------------------------------------------------------------------------- tables
def _table() -> pd.DataFrame:
    table = pd.DataFrame({"row": ["a", "b"], "group": ["a", "b"], "n_seeds": [1, 1], "reference": [None, "a"],
                          "protocol": ["linear: epochs=2", "linear: epochs=2"],
                          "linear_top1_mean": [10.0, 12.0], "linear_top1_std": [float("nan")] * 2,
                          "linear_top1_n": [1, 1], "linear_top1_delta": [float("nan"), 2.0],
                          "linear_top1_delta_low": [float("nan")] * 2, "linear_top1_delta_high": [float("nan")] * 2,
                          "linear_top1_delta_method": ["none", "none"],
                          "linear_top1_delta_excludes_zero": [False, False]})
    table.attrs["baseline"] = "a"
    return table


def test_a_smoke_runs_tables_say_so_at_the_top(tmp_path):
    from ftcl.results import render

    smoked = pipeline.load(paper("hsg_cifar10.yaml", tmp_path), check_paths=False)
    smoked.exp_dir.mkdir(parents=True)
    (smoked.exp_dir / "pipeline.yaml").write_text(smoked.aggregation_text())  # as the pipeline_config rule
    table = _table()
    render.write_tables(table, None, None, smoked.exp_dir / "tables")
    line = "Smoke run of cifar10-hsg-200ep: amounts shrunk, not results"
    assert (smoked.exp_dir / "tables" / "ablation.md").read_text().splitlines()[0] == line
    assert (smoked.exp_dir / "tables" / "ablation.tex").read_text().splitlines()[0] == f"% {line}"
    assert pd.read_csv(smoked.exp_dir / "tables" / "ablation.csv")["row"].tolist() == ["a", "b"]  # plain data
    assert render.table_notes(table)[0] == line  # the printed table and report.html start with it
    # a real run's tables do not
    real = pipeline.load(paper("hsg_cifar10.yaml", tmp_path, smoke_value=None), check_paths=False)
    real.exp_dir.mkdir(parents=True)
    (real.exp_dir / "pipeline.yaml").write_text(real.aggregation_text())
    table = _table()
    render.write_tables(table, None, None, real.exp_dir / "tables")
    assert "Smoke" not in (real.exp_dir / "tables" / "ablation.md").read_text()
    assert not any("Smoke" in n for n in render.table_notes(table))


# -------------------------------------------------------------------------------------- Snakemake
def snakemake(workdir: Path, *args: str, timeout: int = 3600) -> subprocess.CompletedProcess:
    """Snakemake on the repository's Snakefile in ``workdir``, where ``config/`` is the repository's (so
    `--configfile config/paper/X.yaml` and the configs' relative class list read as in a checkout)."""
    if not (workdir / "config").exists():
        (workdir / "config").symlink_to(REPO / "config")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=workdir)


@pytest.mark.slow
def test_snakemake_plans_a_paper_config_in_smoke_mode(tmp_path):
    proc = snakemake(tmp_path, "-n", "--configfile", "config/paper/imagenet100_mocov2.yaml", "--config", "smoke=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    rows = pipeline.load(paper("imagenet100_mocov2.yaml", tmp_path, smoke_value=None), check_paths=False).row_names
    for stage in STAGES:
        for row in rows:
            assert f"results/in100-mocov2-200ep-smoke/{row}/seed0/{stage}.done" in text, (row, stage)
    assert "in100-mocov2-200ep/" not in text  # nothing of the real experiment
    assert (tmp_path / "results" / "in100-mocov2-200ep-smoke" / "smoke-data").is_dir()  # generated while planning


#: the paper config the end-to-end smoke run takes: every stage (detection on a generated VOC devkit), the
#: ImageFolder path, MoCo v1 and v2, a step schedule, the linear probe's best epoch; 4 rows of ResNet-50
E2E_CONFIG = "config/paper/imagenet1k_moco.yaml"


@pytest.mark.slow
def test_a_paper_config_runs_end_to_end_in_smoke_mode_on_the_cpu(tmp_path):
    # the paper config says SLURM; here its stages go through the local launcher, on this machine's CPU
    start = time.monotonic()
    proc = snakemake(tmp_path, "-c2", "--configfile", E2E_CONFIG, "--config", "smoke=true", "launcher={name: local}")
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-5000:]
    print(f"smoke run of {E2E_CONFIG}: {wall:.0f} s")
    cfg = yaml.safe_load((REPO / E2E_CONFIG).read_text())
    exp_dir = tmp_path / "results" / f"{cfg['experiment']}-smoke"
    assert not (tmp_path / "results" / cfg["experiment"]).exists()  # the real experiment is untouched
    for row in cfg["ablations"]:
        run_dir = exp_dir / row["name"] / "seed0"
        for stage in cfg["stages"]:
            assert (run_dir / f"{stage}.done").is_file(), (row["name"], stage)
            assert (run_dir / stage / f"{stage}.json").is_file(), (row["name"], stage)
        assert len(list((run_dir / "pretrain" / "checkpoints").glob("*.pt"))) >= 1  # resumable
    table = pd.read_csv(exp_dir / "tables" / "ablation.csv")
    assert table["row"].tolist() == [row["name"] for row in cfg["ablations"]]
    for metric in ("linear_top1_mean", "knn_top1_mean", "det_voc07_AP50_mean"):
        assert table[metric].notna().all(), metric
    line = f"Smoke run of {cfg['experiment']}: amounts shrunk, not results"
    for name in ("ablation.md", "paper.md"):
        assert (exp_dir / "tables" / name).read_text().splitlines()[0] == line, name
    assert line in (exp_dir / "report.html").read_text()
