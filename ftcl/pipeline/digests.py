"""What each stage's result depends on: the run-config keys it reads (``x-stages`` in the run
schema) and their fingerprint, so a stage reruns exactly when one of them changes."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from ftcl import config as runconfig
from ftcl.config import RunConfig, reads, to_dict
from ftcl.constants import STAGES


@functools.cache
def _default_items() -> frozenset:
    return frozenset((k, json.dumps(v, sort_keys=True)) for k, v in runconfig.flatten(runconfig.defaults()).items())


def stage_view(run_cfg: RunConfig | Mapping, stage: str) -> dict[str, Any]:
    """The flattened run-config keys ``stage``'s result depends on, leaving out keys at ftcl's
    built-in default: a key that a new ftcl version adds (at its default) reruns nothing, while
    setting it, or changing any value away from or back to the default, does."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    defaults = _default_items()
    return {k: v for k, v in sorted(runconfig.flatten(to_dict(run_cfg)).items())
            if reads(stage, k) and (k, json.dumps(v, sort_keys=True)) not in defaults}


def digest(obj: Any) -> str:
    """A short content fingerprint (sha256 of canonical JSON)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_digest(run_cfg: RunConfig | Mapping, stage: str) -> str:
    """The fingerprint of what ``stage`` reads from ``run_cfg``; a stage reruns when it changes."""
    return digest({"stage": stage, "keys": stage_view(run_cfg, stage)})


def changed_keys(before: RunConfig | Mapping, after: RunConfig | Mapping, stage: str) -> list[str]:
    """``key (old -> new)`` for each key of ``stage`` whose value differs between two run configs."""
    old, new = ({k: v for k, v in runconfig.flatten(to_dict(cfg)).items() if reads(stage, k)}
                for cfg in (before, after))
    return [f"{k} ({old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
