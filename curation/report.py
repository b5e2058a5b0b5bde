"""A run comparison report: `python -m curation.report --run uniform=runs/uniform --run jest=runs/jest ...`.

Reads each run's `metrics.jsonl` and writes `report.md` with a summary table and PNG plots, `curves.png` and
`selection.png` (what they hold, and how FLOPs and "to reach" are counted: `curation/trainer/report.py`). The first
run given is the baseline the others are measured against. Every run is checked before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from curation.shared import cli
from curation.trainer import run_files
from curation.trainer.report import write_report

PROG = "python -m curation.report"


def build_parser() -> cli.OneLineErrorParser:
    parser = cli.OneLineErrorParser(prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--run", action="append", required=True, help="NAME=WORKDIR; the first is the baseline")
    parser.add_argument("--reference", default=None, help="workdir of the reference model's training run")
    parser.add_argument("--out", required=True, help="folder for report.md and the plots")
    cli.add_verbose_flag(parser)
    return parser


def parse_runs(parser: argparse.ArgumentParser, items: list[str], reference: str | None) -> dict[str, str]:
    """--run NAME=WORKDIR, in order, each workdir holding its metrics.jsonl (and --reference's too): checked before
    anything is written."""
    runs: dict[str, str] = {}
    for item in items:
        name, _, workdir = item.partition("=")
        if not name or not workdir:
            parser.error(f"--run {item}: give NAME=WORKDIR, e.g. --run jest=runs/jest")
        if name in runs:
            parser.error(f"--run {name} is given twice; give each run its own name")
        runs[name] = workdir
    for flag, workdir in [
        *((f"--run {name}=", workdir) for name, workdir in runs.items()),
        *((("--reference ", reference),) if reference else ()),
    ]:
        metrics = run_files.join(workdir, "metrics.jsonl")
        if not run_files.exists(metrics):
            parser.error(
                f"{flag}{workdir}: {metrics} does not exist; give the workdir of a training run "
                "(python -m curation.train --workdir)"
            )
    return runs


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = parse_runs(parser, args.run, args.reference)
    cli.quiet_logging(args.verbose)
    try:
        print(write_report(runs, args.out, args.reference))
    except ValueError as error:  # a run's metrics hold no training or no evaluation rows
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
