"""Launcher settings from the pipeline config: a stage's settings, the processes they give it, and
the guard that stops a ``--profile slurm`` run whose profile ``config:`` did not arrive."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ftcl import config as runconfig
from ftcl.errors import ConfigError
from ftcl.pipeline.schema import validate


def launcher_settings(name: str, settings: Mapping[str, Any]) -> dict:
    """A ``launcher:`` section for launcher ``name`` with ``settings`` (e.g. ``ftcl stage -o`` options),
    checked against the pipeline schema (names, types; text values typed back) with its defaults."""
    probe = {"experiment": "launcher", "ablations": [{"name": "row", "baseline": True}],
             "launcher": {"name": name, name: dict(settings)}}
    return validate(probe, "launcher settings")["launcher"]


def stage_settings(section: Mapping[str, Any], launcher: str, stage: str | None) -> dict[str, Any]:
    """Settings of ``launcher`` for ``stage`` from a validated ``launcher:`` section:
    ``section[launcher]``, and for ``slurm`` ``section["stages"][stage]`` on top (e.g. more GPUs and
    time for pretraining than for the linear probe); unset (``None``) settings left out."""
    settings = dict(section.get(launcher) or {})
    if launcher == "slurm" and stage:
        settings = runconfig.deep_merge(settings, (section.get("stages") or {}).get(stage) or {})
    return {k: v for k, v in settings.items() if v is not None}


def processes(launcher: str, settings: Mapping[str, Any]) -> int:
    """The processes a job with these settings runs: ``nodes`` x ``tasks_per_node`` (default:
    ``gpus_per_node``, one DDP process per GPU, else 1); the debug launcher runs one."""
    if launcher == "debug":
        return 1
    tasks = settings.get("tasks_per_node") or settings.get("gpus_per_node") or 1
    return int(tasks) * int(settings.get("nodes", 1) if launcher == "slurm" else 1)


def stage_world(cfg: Mapping, stage: str) -> int:
    """The processes ``stage``'s job gets from a validated pipeline config's launcher settings."""
    launcher = cfg["launcher"]
    return processes(launcher["name"], stage_settings(launcher, launcher["name"], stage))


def profiles_in_use(argv: Sequence[str], env_profile: str | None) -> list[str]:
    """Names of the Snakemake profiles a run was started with (``--profile NAME`` or a path to it,
    else ``$SNAKEMAKE_PROFILE``); Snakemake does not tell the workflow, so they are read from argv."""
    given = []
    for i, arg in enumerate(argv):
        if arg == "--profile" and i + 1 < len(argv):
            given.append(argv[i + 1])
        elif arg.startswith("--profile="):
            given.append(arg.split("=", 1)[1])
    if not given and env_profile:
        given.append(env_profile)
    paths = [Path(value) for value in given]
    return [path.parent.name if path.suffix in (".yaml", ".yml") else path.name for path in paths]


def check_slurm_profile(argv: Sequence[str], env_profile: str | None, config_settings: Mapping | None) -> None:
    """Stop when ``--profile slurm`` is in use but its ``config:`` did not reach the workflow: a
    ``--config`` on the command line replaces the profile's whole ``config:`` entry, and with it
    ``launcher.name: slurm`` (every stage would run on this host) and the cluster settings."""
    if "slurm" in profiles_in_use(argv, env_profile) and "launcher" not in (config_settings or {}):
        raise ConfigError(
            "--profile slurm is in use, but its `config:` (launcher.name: slurm and your cluster settings) "
            "did not reach the workflow: a --config given on the command line replaces the profile's whole "
            "`config:` entry, so stages would run on this host or without your cluster settings. Put those "
            "--config values in the profile's `config:` (slurm/profile.yaml) instead, or give the launcher "
            "settings in --config too, e.g. launcher='{name: slurm, slurm: {partition: gpu}}' (docs/SLURM.md)."
            + (" For a smoke run, layer config/overlays/smoke.yaml on your config instead of --config smoke=true: "
               "--configfile <your config> config/overlays/smoke.yaml." if "smoke" in (config_settings or {}) else "")
        )
