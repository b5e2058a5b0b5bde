"""The scoring job's flags, declared as Beam's own examples declare them, and read strictly.

    args, pipeline_options = parse(argv)      # the job's flags; Beam's options (holding the job's flags too)

Beam gathers the flags of every direct subclass of `PipelineOptions` into one parser (`get_all_options`, which a
runner uses to record and ship the job's options), so two such classes may not declare the same flag, and a
subclass of a subclass is not gathered at all. Hence one class per set of flags, each subclassing PipelineOptions
directly, read with `pipeline_options.view_as(ScoreOptions)`: `CorpusJobOptions` declares, once, what every Beam
job of this project over a corpus shares (--input, --output, the reader's flags, --verbose); `ScoreOptions`
declares only what is the scoring job's own. A later job (a dedup job, say) declares its own flags in a class of its
own beside them and reads --input and --output from `CorpusJobOptions`, never declaring them again.

No flag is declared `required=True` there: Beam parses every registered class whenever it reads any options, and
would exit on a command line of another job. `build_parser()` marks the required ones for this job alone, and
`parse()` checks, each mistake in one line on stderr (exit 2): a bad value, a missing flag, an unknown flag (ours
or Beam's, with the closest known one, a misspelt required flag too), an abbreviated flag (none is taken), a glob
the shell expanded. Beam's own flags (--runner, --project, --temp_location, --setup_file, ...) pass through.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import posixpath
from typing import Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from curation.shared import cli
from curation.shared.manifest import LAYOUTS
from curation.shared.validation import ValidationOptions
from pipelines.corpus_io import add_reader_arguments
from pipelines.stages import STORE_IMAGE

PROG = "python -m pipelines.score"
DESCRIPTION = "Score a web corpus with the reference model (docs: pipelines/score.py)."
REQUIRED = ("--input", "--output", "--reference")
BEAM_FLAGS = "Beam's own flags (--runner, --project, --temp_location, --setup_file, ...) pass through."


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


# A boolean flag that also takes a value (`--incremental`, `--incremental=true`), as Flex Templates pass it.
_flag = dict(type=cli.parse_bool, nargs="?", const=True, default=False)


class CorpusJobOptions(PipelineOptions):
    """What every Beam job of this project over a corpus shares: its input shards, its output folder, how to read
    the shards, and --verbose. (Required here: --input and --output; see `build_parser`.)"""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--input",
            action="append",
            help="glob(s) of input shards (local or gs://), comma-separated or repeated; quote it",
        )
        add_reader_arguments(parser)
        parser.add_argument("--output", help="output directory; each run adds a batch folder to it")
        cli.add_verbose_flag(parser)


class ScoreOptions(PipelineOptions):
    """The scoring job's own flags. (Required here: --reference; see `build_parser`.)"""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--reference",
            "--reference_checkpoint",
            dest="reference",
            help="the reference model: a checkpoint folder of this project, keras_hub:PRESET, or a "
            "keras-hub preset folder (local or gs://)",
        )
        parser.add_argument(
            "--output_format", default="parquet", help="comma-separated: parquet, tfrecord (default parquet)"
        )
        parser.add_argument(
            "--output_layout",
            choices=LAYOUTS,
            default="copied",
            help="copied: scored shards holding the examples (images too, --store_image); sidecar: "
            "one score file per input shard, row i for its record i, beside a corpus that is "
            "not copied (a run that dies resumes from the sidecars it finished)",
        )
        parser.add_argument(
            "--store_image",
            choices=STORE_IMAGE,
            default="as_stored",
            help="image bytes in the scored shards: as stored, re-encoded JPEG, or none",
        )
        parser.add_argument("--stored_image_size", type=int, default=64, help="side of re-encoded images (resized)")
        parser.add_argument(
            "--incremental",
            **_flag,
            help="score only input shards no batch of the same reference under --output has done",
        )
        parser.add_argument(
            "--force_new_reference",
            **_flag,
            help="allow a batch scored by another reference than the batches already under --output",
        )
        parser.add_argument(
            "--inference_batch_size",
            type=int,
            default=256,
            help="rows per forward; every batch is padded to it (one XLA compile)",
        )
        parser.add_argument(
            "--num_output_shards", type=int, default=0, help="scored shards per format (0: runner picks)"
        )
        parser.add_argument("--max_image_pixels", type=int, default=ValidationOptions.max_image_pixels)
        parser.add_argument("--min_image_size", type=int, default=ValidationOptions.min_image_size)
        parser.add_argument("--max_caption_chars", type=int, default=ValidationOptions.max_caption_chars)
        parser.add_argument(
            "--large_model", **_flag, help="one model copy per worker VM shared by its processes (accelerator workers)"
        )
        parser.add_argument(
            "--model_copies",
            type=int,
            default=0,
            help="with an accelerator worker: that many model copies per VM shared by its "
            "processes, e.g. one per GPU (implies sharing; 0: Beam's default)",
        )
        parser.add_argument(
            "--max_bad_fraction",
            type=_fraction,
            default=1.0,
            help="fail, without a manifest, when more than this fraction of the records read is "
            "dead-lettered (default 1.0: never fail; e.g. 0.05 fails above 5%%)",
        )
        parser.add_argument(
            "--allow_failed_shards",
            **_flag,
            help="write the manifest even when input shards could not be read whole (they are "
            "listed as failed, none of their records is kept, and --incremental scores them "
            "again); default: fail the job without a manifest",
        )
        parser.add_argument(
            "--skip_failed_shards",
            **_flag,
            help="with --incremental: do not retry shards an earlier batch listed as failed",
        )
        parser.add_argument(
            "--clean_unfinished",
            **_flag,
            help="first delete the unfinished batch folders of earlier runs under --output (only "
            "when no other run is writing to it)",
        )


def build_parser(
    prog: str = PROG,
    description: str = DESCRIPTION,
    classes: Sequence[type[PipelineOptions]] = (),
    required: Sequence[str] = REQUIRED,
) -> cli.OneLineErrorParser:
    """A job's flags (those of `classes`: by default the scoring job's, CorpusJobOptions and ScoreOptions), its
    `required` ones marked required: what `--help` shows and `parse` checks."""
    parser = cli.OneLineErrorParser(
        prog=prog,
        description=description,
        epilog=BEAM_FLAGS,
        allow_abbrev=False,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    for options in classes or (CorpusJobOptions, ScoreOptions):
        options._add_argparse_args(parser)
    for action in parser._actions:
        action.required = bool(set(action.option_strings) & set(required))
    return parser


def parse(argv: Sequence[str], **job) -> tuple[argparse.Namespace, PipelineOptions]:
    """(the job's flags, Beam's pipeline options of the whole command line, the in-process runner unless --runner
    says otherwise). A mistake in them exits with one line on stderr (see the module's docstring). `job`: another
    job's `build_parser` arguments (the scoring job's by default)."""
    argv = list(argv)
    parser = build_parser(**job)
    args, beam_args = parser.parse_known_args(argv)  # --help, bad values and missing flags end here
    expanded = shell_expanded_glob(argv)
    if expanded:
        parser.error(expanded)
    unknown = unknown_beam_arguments(parser, beam_args)
    if unknown:
        parser.fail_unknown(unknown, extra_known=[f"--{name}" for name in PipelineOptions([]).get_all_options()])
    runner = [] if any(cli.option_name(arg) == "--runner" for arg in beam_args) else ["--runner=FnApiRunner"]
    return args, PipelineOptions([*argv, *runner])


def shell_expanded_glob(argv: Sequence[str]) -> str:
    """'quote the glob' when `--input GLOB` came unquoted and the shell expanded it into several paths (all but the
    first then stand alone on the command line); '' otherwise."""
    for i, arg in enumerate(argv[:-1]):
        if arg != "--input":
            continue
        value = argv[i + 1]
        stray = []
        for following in argv[i + 2 :]:
            if following.startswith("-"):
                break
            stray.append(following)
        if stray:
            folder, name = posixpath.split(value)
            extension = posixpath.splitext(name)[1]
            return (
                f"--input {value} is followed by {len(stray)} more path(s) ({', '.join(stray[:2])}"
                f"{', ...' if len(stray) > 2 else ''}): the shell expanded an unquoted glob; quote it, e.g. "
                f"--input '{folder or '.'}/*{extension}'"
            )
    return ""


def unknown_beam_arguments(parser: argparse.ArgumentParser, beam_args: Sequence[str]) -> list[str]:
    """The arguments left over by the job's parser that Beam does not know either: flags no registered
    PipelineOptions class declares, and values with no flag before them. A bad value of one of Beam's flags exits
    with Beam's error, in one line."""
    known = set(PipelineOptions([]).get_all_options())  # the name (dest) of every flag Beam knows
    usage = io.StringIO()
    try:  # Beam's parser prints its usage block on a bad value: only its last line is kept
        with contextlib.redirect_stderr(usage):
            given = PipelineOptions(list(beam_args)).get_all_options(retain_unknown_options=True)
    except SystemExit:
        parser.error(f"Beam option: {usage.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]}")
    unknown_names = set(given) - known
    unknown = []
    for i, arg in enumerate(beam_args):
        if arg.startswith("--"):
            if cli.option_name(arg)[2:].replace("-", "_") in unknown_names:
                unknown.append(arg)
        elif i == 0 or not beam_args[i - 1].startswith("-") or "=" in beam_args[i - 1]:
            unknown.append(arg)  # a value with no flag before it
    return unknown
