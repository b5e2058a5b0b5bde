"""A run comparison report: `python -m curation.report --run uniform=runs/uniform --run jest=runs/jest ...`.

Reads each run's `metrics.jsonl` and writes `report.md` with a summary table and PNG plots (matplotlib):
  curves.png     zero-shot and retrieval against examples seen, online FLOPs and wall-clock
  selection.png  learnability of selected vs random sub-batches, and the share of clean examples selected
FLOPs come in two figures, counted the same way for every method: online, the learner's
updates plus its scoring passes where the method's score uses them; and offline, the reference's forward once per
example scored, counted for the runs that use the scores. The reference's training is offline too, amortised over
every run on the same scores, and reported on its own row. "To reach" is interpolated linearly between the two
evaluations around the crossing, and the table states the evaluation spacing it resolves. The first run given is
the baseline the others are measured against.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from curation.shared import cli
from curation.trainer.report import write_report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=WORKDIR; the first is the baseline")
    parser.add_argument("--reference", default=None, help="workdir of the reference model's training run")
    parser.add_argument("--out", required=True, help="folder for report.md and the plots")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    cli.quiet_logging(args.verbose)
    runs = dict(item.split("=", 1) for item in args.run)
    print(write_report(runs, args.out, args.reference))


if __name__ == "__main__":
    main()
