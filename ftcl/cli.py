"""``ftcl`` command line: one sub-command per stage, each also runnable by hand.

Every stage resolves its config (defaults <- ``--config`` <- ``--set``) and validates it before it
touches data or builds a model; bad input exits with status 2 and a one-line message naming the
culprit.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# module -> the sub-commands its ``register_cli`` adds; only the invoked one's module is imported,
# so light commands (``ftcl submit`` waiting on a job) start without importing torch.
COMMAND_MODULES = {
    "ftcl.launch": ("submit",),
    "ftcl.runfolders": ("stage",),
    "ftcl.detection.stage": ("detect",),
    "ftcl.results.command": ("aggregate", "table"),
    "ftcl.ui": ("ui",),
}

CONFIG_HELP = "run config YAML (keys: ftcl/resources/config.schema.yaml); defaults fill the rest"
SET_HELP = ("override config keys, e.g. --set optim.epochs=10 ft.positive.mode=extrapolate "
            "(each value parsed as YAML; repeatable)")


def add_set_option(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE [KEY=VALUE ...]``, repeatable; all pairs end up in ``args.overrides``."""
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=SET_HELP)


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", type=Path, required=config_required, help=CONFIG_HELP)
    add_set_option(p)
    p.add_argument("--out", type=Path, required=True, help="run folder for outputs (created; resumed if present)")


def _resolve(args: argparse.Namespace, base: dict | None = None) -> dict:
    from ftcl import config

    return config.resolve(args.config, args.overrides, base=base)


def _check_writable(out: Path) -> None:
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = _resolve(args)
    _check_writable(args.out)
    from ftcl.config import flatten
    from ftcl.tracking import Tracker
    from ftcl.train import preflight, pretrain

    preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")), args.out)  # data, sizes, resumability: before tracking

    rank = int(os.environ.get("RANK", "0"))
    with Tracker(cfg, args.out, "pretrain", rank=rank) as tracker:
        tracker.log_params(flatten(cfg))
        summary = pretrain(cfg, args.out, tracker)
    if rank == 0:
        print(f"[pretrain] done: {args.out / 'pretrain.json'} ({summary.get('epochs')} epochs)")
    return 0


def _evaluate(args: argparse.Namespace, stage: str) -> int:
    from ftcl import checkpoint as ckpt

    path = ckpt.resolve_checkpoint_path(args.checkpoint)
    state = ckpt.load(path)
    cfg = _resolve(args, base=None if args.config else state["config"])
    _check_writable(args.out)
    from ftcl.config import dump, flatten
    from ftcl.evaluate import knn_eval, linear_probe, write_result
    from ftcl.models.backbones import build_backbone
    from ftcl.runtime import apply_determinism, select_device
    from ftcl.tracking import Tracker

    apply_determinism(cfg["deterministic"]["enabled"], cfg["deterministic"]["threads"])
    device = select_device(cfg["device"])
    backbone = build_backbone(state["config"]["model"], int(state["in_channels"]))
    ckpt.load_backbone_state(backbone, state["backbone"], path)
    backbone.to(device)
    dump(cfg, args.out / "config.yaml")
    with Tracker(cfg, args.out, stage) as tracker:
        tracker.log_params({k: v for k, v in flatten(cfg).items() if k.startswith(("eval.", "data.", "seed"))})
        result = linear_probe(backbone, cfg, device) if stage == "linear" else knn_eval(backbone, cfg, device)
        result = {**result, "checkpoint": str(path), "pretrain_epochs": state["epoch"]}
        tracker.log_metrics({f"{stage}/{k}": v for k, v in result.items()
                             if k.startswith("top") and isinstance(v, int | float)}, step=state["epoch"])
        tracker.log_params({f"protocol.{k}": v for k, v in result["protocol"].items()})
        write_result(result, args.out / f"{stage}.json")
        tracker.log_artifact(args.out / f"{stage}.json")
    accs = " ".join(f"{k} {v:.2f}" for k, v in result.items() if k in ("top1", "top5"))
    if stage == "linear":
        accs += (f" ({result['protocol']['report']} epoch; best {result['top1_best']:.2f} "
                 f"at epoch {result['best_epoch']})")
    print(f"[{stage}] {accs} -> {args.out / f'{stage}.json'}")
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``ftcl`` parser; with ``command`` given, only the module defining it is imported."""
    parser = argparse.ArgumentParser(
        prog="ftcl",
        description="Contrastive pretraining with feature transformation (MoCo + FT), evaluation, and the "
        "pipeline around it. Every stage takes --config FILE and --set key=value overrides.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain a method (resumes from OUT/checkpoints/last.pt)",
                       description="Pretrain; writes OUT/config.yaml, checkpoints/, scores/, pretrain.json.")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    for stage, what in (("linear", "linear probe on frozen features"), ("knn", "weighted kNN classifier")):
        p = sub.add_parser(stage, help=what, description=f"{what}; writes OUT/{stage}.json. Without --config "
                           "the pretraining run's own config is used.")
        _add_config_args(p)
        p.add_argument("--checkpoint", type=Path, required=True,
                       help="pretraining run folder (holding checkpoints/last.pt) or a checkpoint file")
        p.set_defaults(func=lambda a, s=stage: _evaluate(a, s))

    for name, commands in COMMAND_MODULES.items():
        if command is not None and command not in commands:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ftcl`` console script; returns the exit status."""
    from ftcl.errors import USER_ERRORS

    argv = list(sys.argv[1:] if argv is None else argv)
    known = {c for commands in COMMAND_MODULES.values() for c in commands}
    parser = build_parser(argv[0] if argv and argv[0] in known | {"pretrain", "linear", "knn"} else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"ftcl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
