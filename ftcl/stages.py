"""The four stages of a row and seed as functions of a resolved run config: what ``ftcl pretrain``,
``ftcl linear``, ``ftcl knn`` and ``ftcl detect`` run by hand, and what a pipeline job runs
(:mod:`ftcl.orchestrate.job`). Each checks what only the running machine can know (the device, the
data, the checkpoint), opens the stage's MLflow run, does the work and writes the stage's result file
(run-folder contract, docs/ARCHITECTURE.md)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ftcl.config import RunConfig, dump, flatten, to_dict
from ftcl.constants import DETECTION, PRETRAIN, RESULT_FILES


def check_writable(out: Path) -> None:
    """Fail before compute when the output folder cannot be created or written."""
    probe = out / ".ftcl_write_test"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"output folder {out} cannot be written ({err.strerror}); give --out a writable folder"
        ) from err


def pretrain(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """Pretraining into ``out``: the training set and the folder are checked before the MLflow run starts."""
    from ftcl.tracking import Tracker
    from ftcl.train import preflight
    from ftcl.train import pretrain as train

    out = Path(out)
    check_writable(out)
    data = preflight(cfg, out)
    rank = int(os.environ.get("RANK", "0"))
    with Tracker(cfg, out, PRETRAIN, rank=rank) as tracker:
        tracker.log_params(flatten(to_dict(cfg)))
        summary = train(cfg, out, tracker, data=data)
    if rank == 0:
        print(f"[pretrain] done: {out / RESULT_FILES[PRETRAIN]} ({summary.get('epochs')} epochs)")
    return summary


def evaluate(stage: str, cfg: RunConfig, checkpoint: str | Path, out: str | Path) -> dict[str, Any]:
    """The ``linear`` probe or ``knn`` of the pretrained backbone in ``checkpoint`` (a pretraining folder
    or file), with ``cfg``'s evaluation settings."""
    from ftcl import checkpoint as ckpt
    from ftcl import runtime
    from ftcl.evaluate import knn_eval, linear_probe, write_result
    from ftcl.tracking import Tracker

    out = Path(out)
    path = ckpt.resolve_checkpoint_path(checkpoint)
    state = ckpt.load(path)
    check_writable(out)
    runtime.apply_determinism(cfg.deterministic.enabled, cfg.deterministic.threads)
    device = runtime.select_device(cfg.device)
    backbone = ckpt.backbone_of(state, path).to(device)
    dump(cfg, out / "config.yaml")
    with Tracker(cfg, out, stage) as tracker:
        tracker.log_params({k: v for k, v in flatten(to_dict(cfg)).items() if k.startswith(("eval.", "data.", "seed"))})
        result = linear_probe(backbone, cfg, device) if stage == "linear" else knn_eval(backbone, cfg, device)
        result = {**result, "checkpoint": str(path), "pretrain_epochs": state["epoch"]}
        tracker.log_metrics({f"{stage}/{k}": v for k, v in result.items()
                             if k.startswith("top") and isinstance(v, int | float)}, step=state["epoch"])
        tracker.log_params({f"protocol.{k}": v for k, v in result["protocol"].items()})
        write_result(result, out / RESULT_FILES[stage])
        tracker.log_artifact(out / RESULT_FILES[stage])
    accs = " ".join(f"{k} {v:.2f}" for k, v in result.items() if k in ("top1", "top5"))
    if stage == "linear":
        accs += (f" ({result['protocol']['report']} epoch; best {result['top1_best']:.2f} "
                 f"at epoch {result['best_epoch']})")
    print(f"[{stage}] {accs} -> {out / RESULT_FILES[stage]}")
    return result


def detect(cfg: RunConfig, checkpoint: str | Path | None, out: str | Path) -> dict[str, Any]:
    """Detection transfer from the pretrained backbone (:func:`ftcl.detection.stage.run_detection`)."""
    from ftcl.detection.stage import run_detection

    return run_detection(cfg, checkpoint, out)


def in_run_folder(stage: str, run_dir: str | Path) -> Callable[[RunConfig], dict[str, Any]]:
    """The function a pipeline job calls with its resolved config for ``stage`` of the run folder
    ``<results>/<experiment>/<row>/seed<k>``: it works in ``run_dir/<stage>`` and reads the pretraining
    in ``run_dir/pretrain``."""
    run_dir = Path(run_dir)
    out, checkpoint = run_dir / stage, run_dir / PRETRAIN
    if stage == PRETRAIN:
        return functools.partial(pretrain, out=out)
    if stage == DETECTION:
        return functools.partial(detect, checkpoint=checkpoint, out=out)
    return functools.partial(evaluate, stage, checkpoint=checkpoint, out=out)
