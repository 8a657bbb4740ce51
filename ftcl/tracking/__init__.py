"""MLflow at the edge: the store (:mod:`~ftcl.tracking.store`), the row runs and their row x seed
parent runs (:mod:`~ftcl.tracking.parents`), the row runs' table numbers (:mod:`~ftcl.tracking.rows`)
and one stage's run (:mod:`~ftcl.tracking.tracker`). The names the rest of ftcl uses are here."""

from ftcl.errors import TrackingError
from ftcl.tracking.parents import HEADLINE_METRICS, PARENT_RUN_TAG, ensure_parent_run, ensure_row_run, supersede_run
from ftcl.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    artifact_root,
    create_experiment,
    get_or_create_experiment,
    git_commit,
    tracking_uri,
)
from ftcl.tracking.tracker import Tracker

__all__ = [
    "EXPERIMENT_KIND", "EXPERIMENT_KIND_TAG", "HEADLINE_METRICS", "PARENT_RUN_TAG", "Tracker", "TrackingError",
    "artifact_root", "create_experiment", "ensure_parent_run", "ensure_row_run", "get_or_create_experiment",
    "git_commit", "supersede_run", "tracking_uri",
]
