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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ftcl import config, stages

    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun / a launcher's tasks
    stages.pretrain(config.resolve(args.config, args.overrides, world=world, stages=("pretrain",)), args.out)
    return 0


def _stage_config(args: argparse.Namespace, stage: str):
    """The run config of an evaluation stage: ``--config`` (and ``--set``), else the config the
    pretraining in ``--checkpoint`` saved (and ``--set``)."""
    from ftcl import checkpoint as ckpt
    from ftcl import config

    base = None
    if args.config is None and args.checkpoint is not None:
        base = ckpt.load(ckpt.resolve_checkpoint_path(args.checkpoint))["config"]
    return config.resolve(args.config, args.overrides, base=base, stages=(stage,))


def cmd_evaluate(args: argparse.Namespace, stage: str) -> int:
    from ftcl import stages

    stages.evaluate(stage, _stage_config(args, stage), args.checkpoint, args.out)
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from ftcl import stages

    stages.detect(_stage_config(args, "detection"), args.checkpoint, args.out)
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
        p.set_defaults(func=lambda a, s=stage: cmd_evaluate(a, s))

    p = sub.add_parser("detect", help="fine-tune Faster R-CNN from a pretrained backbone and report detection AP",
                       description="Detection transfer; writes OUT/config.yaml, OUT/detection.json, "
                       "OUT/per_class_ap.csv. Without --config the pretraining run's own config is used.")
    _add_config_args(p)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="pretraining run folder (holding checkpoints/last.pt) or a checkpoint file; "
                        "required for detection.init=pretrained")
    p.set_defaults(func=cmd_detect)

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
    parser = build_parser(argv[0] if argv and argv[0] in known | {"pretrain", "linear", "knn", "detect"} else None)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"ftcl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
