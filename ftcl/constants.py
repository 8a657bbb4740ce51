"""Names shared by the pipeline, the stages, tracking and aggregation: one definition each."""

from __future__ import annotations

#: the stages of a row and seed, in pipeline order; every one but ``pretrain`` reads a pretraining
STAGES: tuple[str, ...] = ("pretrain", "linear", "knn", "detection")
PRETRAIN = "pretrain"
DETECTION = "detection"
EVAL_STAGES: tuple[str, ...] = tuple(s for s in STAGES if s != PRETRAIN)
#: the result file a finished stage leaves in its folder (run-folder contract, docs/ARCHITECTURE.md)
RESULT_FILES: dict[str, str] = {stage: f"{stage}.json" for stage in STAGES}
#: where a stage's folder keeps its MLflow run id, so a requeued job continues the same run
RUN_ID_FILE = ".mlflow_run_id"
#: how stages are submitted (the pipeline schema's ``launcher.name``; tests/test_launch.py checks they agree)
LAUNCHERS: tuple[str, ...] = ("local", "debug", "slurm")
#: the default root of every output (run folders, tables, plots, logs, the MLflow store)
RESULTS_DIR = "results"

#: MLflow tags (tracking contract)
TAG_ROW = "ftcl.row"
TAG_SEED = "ftcl.seed"
TAG_STAGE = "ftcl.stage"
TAG_SUPERSEDED = "ftcl.superseded"
#: ``ftcl.stage`` of a row x seed parent run and of the aggregation run
PARENT_STAGE = "parent"
AGGREGATE_STAGE = "aggregate"
#: ``ftcl.stage`` of a row run: one top-level run per ablation row, its row x seed parent runs nested under it
ROW_STAGE = "row"
