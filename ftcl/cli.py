"""``ftcl`` command line: the top of the house. One sub-command per stage (each also runnable by hand),
``ftcl stage`` (what the pipeline's rules run), and the commands around results.

Every parser is defined here and nothing imports this module; a handler imports what its command
needs when it runs, so light commands start without torch. Bad input exits with status 2 and a
one-line message naming the culprit, before any compute.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ftcl.constants import DETECTION, LAUNCHERS, PRETRAIN, RESULTS_DIR, STAGES

CONFIG_HELP = "run config YAML (keys: docs/CONFIGURATION.md); defaults fill the rest"
SET_HELP = ("override config keys, e.g. --set optim.epochs=10 ft.positive.mode=extrapolate "
            "(each value parsed as YAML; repeatable)")


# ------------------------------------------------------------------------------------------- stages
def _config_args(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--config", type=Path, help=CONFIG_HELP)
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=SET_HELP)
    p.add_argument("--out", type=Path, required=True, help=out_help)


def cmd_pretrain(args: argparse.Namespace) -> int:
    from ftcl import config, stages

    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun / a launcher's tasks
    stages.pretrain(config.resolve(args.config, args.overrides, world=world, stages=(PRETRAIN,)), args.out)
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ftcl import stages

    if args.stage_name == DETECTION:
        stages.detect(_stage_config(args, DETECTION), args.checkpoint, args.out)
    else:
        stages.evaluate(args.stage_name, _stage_config(args, args.stage_name), args.checkpoint, args.out)
    return 0


def _add_stage_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a method (resumes from OUT/checkpoints/last.pt)",
                       description="Pretrain; writes OUT/config.yaml, checkpoints/, scores/, pretrain.json.")
    _config_args(p, "run folder for outputs (created; resumed if present)")
    p.set_defaults(func=cmd_pretrain)
    for stage, what in (("linear", "linear probe on frozen features"), ("knn", "weighted kNN classifier"),
                        (DETECTION, "fine-tune Faster R-CNN from a pretrained backbone and report detection AP")):
        p = sub.add_parser("detect" if stage == DETECTION else stage, help=what,
                           description=f"{what}; writes OUT/config.yaml and OUT/{stage}.json. Without --config the "
                           "pretraining run's own config is used.")
        _config_args(p, "run folder for outputs (created)")
        p.add_argument("--checkpoint", type=Path, required=stage != DETECTION,
                       help="pretraining run folder (holding checkpoints/last.pt) or a checkpoint file"
                       + ("; required for detection.init=pretrained" if stage == DETECTION else ""))
        p.set_defaults(func=cmd_evaluate, stage_name=stage)


# --------------------------------------------------------------------------------------- ftcl stage
def cmd_stage(args: argparse.Namespace) -> int:
    """``ftcl stage``: the stage's config (resolved at plan time, else resolved here for the launcher's
    processes), its launcher settings checked against the pipeline schema, then the job wrapper."""
    from ftcl import config, pipeline
    from ftcl.orchestrate import job

    overrides = config.dotted_to_nested(dict(config.parse_override(o) for o in args.option))
    settings = pipeline.stage_settings(pipeline.launcher_settings(args.launcher, overrides), args.launcher,
                                       args.stage)
    if args.config_text is not None:
        text = args.config_text
    else:
        content = args.config.read_text() if args.config.is_file() else ""
        try:
            config.resolved.parse(content, str(args.config))
            text = content  # resolved already: its digest holds
        except config.ConfigError:
            world = pipeline.processes(args.launcher, settings) if args.stage == PRETRAIN else 1
            cfg = config.resolve(args.config, world=world, stages=(args.stage,))
            text = config.resolved.text(cfg, world)
    job_dir = args.job_dir or args.run_dir / "jobs" / args.stage
    return job.run_stage(args.stage, args.run_dir, text, args.launcher, settings, job_dir, args.log)


def _add_stage_runner(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage", help="run one stage of a row and seed in its run folder through a launcher (what the pipeline runs)",
        description="Write RUN_DIR/configs/STAGE.yaml, move RUN_DIR/STAGE/ aside to RUN_DIR/.superseded/ when it "
        "holds results of other settings, submit the stage through the launcher (local, debug, SLURM) unless its "
        "result for these settings is already there, stream its logs while waiting, and write RUN_DIR/STAGE.done. "
        f"Stages other than pretrain read RUN_DIR/{PRETRAIN}.",
        epilog="launcher settings (-o KEY=VALUE, values read as YAML): docs/CONFIGURATION.md, launcher.*; e.g. "
        "-o partition=gpu -o gpus_per_node=4 -o timeout_min=2880 -o additional_parameters.mail-type=FAIL")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--run-dir", type=Path, required=True, help="the row and seed folder, <results>/<exp>/<row>/seed<k>")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-text", help="the resolved run config (what the pipeline's rules pass)")
    source.add_argument("--config", type=Path, help="a run config file (resolved here unless it already is)")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: a process on this machine (default); debug: in this process; slurm: a SLURM job")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE", help="one launcher setting")
    p.add_argument("--job-dir", type=Path, help="submitit's folder for the job (default RUN_DIR/jobs/STAGE)")
    p.add_argument("--log", type=Path, help="append the job's streamed log lines to this file instead of printing")
    p.set_defaults(func=cmd_stage)


# ------------------------------------------------------------------------------------------ results
def cmd_aggregate(args: argparse.Namespace) -> int:
    from ftcl.results.command import cmd_aggregate as run

    return run(args)


def cmd_table(args: argparse.Namespace) -> int:
    from ftcl.results.command import cmd_table as run

    return run(args)


def cmd_ui(args: argparse.Namespace) -> int:
    from ftcl.ui import cmd_ui as run

    return run(args)


def _add_result_commands(sub: argparse._SubParsersAction) -> None:
    agg = sub.add_parser(
        "aggregate", help="ablation tables, paper comparison, plots and report.html from the run folders",
        description="Aggregate every row and seed of a pipeline config into results/<experiment>/tables/ "
        "(ablation, floor and paper-comparison tables as CSV, Markdown and LaTeX), results/<experiment>/plots/ "
        "and results/<experiment>/report.html, print the ablation table, and log them all as artifacts "
        "of an MLflow run named 'aggregate'.")
    agg.add_argument("--configfile", required=True, help="the pipeline config (e.g. config/config.yaml)")
    agg.add_argument("--results-dir", default=None, help="results folder (default: the config's results_dir)")
    agg.add_argument("--allow-missing", action="store_true",
                     help="skip rows and seeds whose run folder does not exist instead of failing")
    agg.add_argument("--no-mlflow", action="store_true", help="do not log the outputs to MLflow")
    agg.set_defaults(func=cmd_aggregate)

    tab = sub.add_parser(
        "table", help="print the ablation table from the MLflow store",
        description="Print the ablation table of an experiment from the MLflow store alone (stage runs "
        "tagged ftcl.row and ftcl.seed and not superseded; metrics linear/top1, knn/top1, det/voc07_AP50, ...), "
        "without reading the results folders.")
    tab.add_argument("--experiment", default=None, help="MLflow experiment (default: the config's experiment)")
    tab.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                     "else the config's store, else sqlite:///results/mlflow.db)")
    tab.add_argument("--configfile", default=None, help="pipeline config for the experiment name, row order and "
                     "baseline (default: config/config.yaml when it exists)")
    tab.add_argument("--baseline", default=None,
                     help="row the deltas refer to (default: the config's baseline, else the first row)")
    tab.set_defaults(func=cmd_table)

    ui = sub.add_parser(
        "ui", help="start the MLflow UI on the project's store and print the URL to open",
        description="Start the MLflow UI (mlflow server, one worker, background jobs off) on the store the "
        "stages write, wait until it answers, print the URL to open (the runs table of the experiment: "
        "--experiment, else the pipeline config's, else the one updated last; it says which and why), "
        "and stop every process it started on Ctrl-C.")
    ui.add_argument("--experiment", default=None,
                    help="open this MLflow experiment (default: the pipeline config's experiment, else the "
                    "experiment of the store updated last)")
    ui.add_argument("--configfile", default=None,
                    help="pipeline config whose experiment and store to open (default: config/config.yaml "
                    "when it exists in this folder)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000; 0: a free one)")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    ui.add_argument("--tracking-uri", default=None,
                    help="MLflow store (default: the pipeline config's store, else $MLFLOW_TRACKING_URI, else "
                    "sqlite:///RESULTS_DIR/mlflow.db)")
    ui.add_argument("--results-dir", default=None,
                    help=f"results folder of the default sqlite store (default: the pipeline config's "
                    f"results_dir, else {RESULTS_DIR})")
    ui.add_argument("--log", default=None,
                    help="server log file (default: mlflow-ui.log beside a sqlite store); '-' shows it here")
    ui.add_argument("--timeout", type=float, default=120.0,
                    help="seconds to wait for the server to answer (default 120)")
    ui.set_defaults(func=cmd_ui)


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """The ``ftcl`` parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="ftcl",
        description="Contrastive pretraining with feature transformation (MoCo + FT), evaluation, and the "
        "pipeline around it. Every stage takes --config FILE and --set key=value overrides.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_stage_commands(sub)
    _add_stage_runner(sub)
    _add_result_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ftcl`` console script; returns the exit status."""
    from ftcl.errors import USER_ERRORS

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"ftcl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

