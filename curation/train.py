"""Train a dual encoder:

    python -m curation.train --config NAME --data CORPUS_DIR --workdir DIR [--scored DIR] [--smoke] [--field=value]

The command line of the trainer (`curation.trainer.loop`): flags are a config's fields, checked before any work.
A run killed at any step and started again with the same command resumes from its last checkpoint and ends with
exactly the params of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import jax

from curation.shared import cli
from curation.trainer import configs, distributed, training_step
from curation.trainer.loop import Preempted, train
from curation.trainer.training_data import TrainingData
from curation.trainer.workdir import check_workdir

log = logging.getLogger(__name__)


def _config_field_flags(parser: argparse.ArgumentParser, defaults: configs.TrainConfig) -> None:
    """Every TrainConfig field as `--field` (the field's type); the help shows the value of the chosen --config."""
    group = parser.add_argument_group(
        "config fields",
        f"override fields of --config (defaults shown: {defaults.name}"
        f"{', --smoke' if defaults != configs.CONFIGS[defaults.name]() else ''})",
    )
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        kind = type(value)
        if kind is bool:
            group.add_argument(
                f"--{field.name}",
                type=cli.parse_bool,
                nargs="?",
                const=True,
                default=argparse.SUPPRESS,
                metavar="BOOL",
                help=f"default: {str(value).lower()}",
            )
        else:
            group.add_argument(
                f"--{field.name}",
                type=kind,
                default=argparse.SUPPRESS,
                metavar=kind.__name__.upper(),
                help=f"default: {value}",
            )


def build_parser(defaults: configs.TrainConfig) -> cli.OneLineErrorParser:
    parser = cli.OneLineErrorParser(
        prog="python -m curation.train",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, choices=sorted(configs.CONFIGS))
    parser.add_argument("--data", required=True, help="corpus directory (made by demo.make_corpus)")
    parser.add_argument(
        "--scored",
        default=None,
        help="scored output of python -m pipelines.score to train on (needed by selection configs)",
    )
    parser.add_argument(
        "--dedup",
        default=None,
        help="a dedup output of the --scored set (python -m pipelines.dedup): its duplicates and evaluation leaks "
        "are left out",
    )
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events, model/")
    parser.add_argument("--smoke", action="store_true", help="shrink the run to seconds (tests)")
    parser.add_argument(
        "--start_over",
        action="store_true",
        help="discard the run already in --workdir (its config, checkpoints, metrics) and start anew",
    )
    group = parser.add_argument_group(
        "multi-process runs",
        "one process per host, each started with the same flags "
        "and its own --process_id (or --distributed where the platform sets them)",
    )
    group.add_argument(
        "--coordinator_address",
        default=None,
        metavar="HOST:PORT",
        help="address of process 0, which every process connects to",
    )
    group.add_argument("--num_processes", type=int, default=None, help="how many processes take part")
    group.add_argument("--process_id", type=int, default=None, help="this process's index, 0 to num_processes - 1")
    group.add_argument(
        "--distributed",
        action="store_true",
        help="take the processes from the platform (Cloud TPU pod, SLURM, Open MPI, Kubernetes)",
    )
    cli.add_verbose_flag(parser)
    _config_field_flags(parser, defaults)
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, configs.TrainConfig]:
    """(the flags, the config they give): the named config with --smoke and the fields given on the command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("--config", default=None)
    first.add_argument("--smoke", action="store_true")
    known, _ = first.parse_known_args(argv)
    name = known.config if known.config in configs.CONFIGS else "reference"
    base = configs.get_config(name, known.smoke)
    parser = build_parser(base)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.fail_unknown(unknown)
    fields = {field.name for field in dataclasses.fields(base)}
    try:  # TrainConfig checks --schedule as it is made (one of configs.SCHEDULES)
        config = dataclasses.replace(base, **{name: value for name, value in vars(args).items() if name in fields})
        config.superbatch_size  # validates filter_ratio
        if config.selection_loss not in training_step.SELECTION_LOSSES:
            raise ValueError(
                f"--selection_loss {config.selection_loss!r}: choose from {list(training_step.SELECTION_LOSSES)}"
            )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    if config.needs_scores and not args.scored:
        parser.error(
            f"--config {args.config} selects or filters by score: pass --scored DIR (the output of "
            "python -m pipelines.score)"
        )
    if args.dedup and not args.scored:
        parser.error("--dedup thins a scored set: pass --scored DIR too (the output it was made for)")
    problem = distributed.check_flags(args.coordinator_address, args.num_processes, args.process_id, args.distributed)
    if problem:
        parser.error(problem)
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        parser.error(f"--workdir {args.workdir} is a file; give a directory (new, or a run to resume)")
    return args, config


def main(argv: list[str] | None = None) -> None:
    args, config = parse_args(argv)
    cli.quiet_logging(args.verbose)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, args.distributed)
    try:  # the workdir, the data and the reference's loss family checked against the config before any work
        if not args.start_over:
            check_workdir(
                config,
                args.workdir,
                args.scored,
                start_over=False,
                num_processes=jax.process_count(),
                dedup_dir=args.dedup,
            )
        data = TrainingData.open(config, args.data, args.scored, args.dedup)
        data.check_processes(config, jax.process_count())
    except (ValueError, OSError) as error:
        print(f"python -m curation.train: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    try:
        train(
            config,
            args.data,
            args.workdir,
            scored_dir=args.scored,
            start_over=args.start_over,
            data=data,
            dedup_dir=args.dedup,
        )
    except Preempted as stopped:
        log.warning("%s", stopped.args[0])
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    main(sys.argv[1:])
