"""What the command-line entry points share: quiet logging and one-line errors for mistyped flags."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import sys
from typing import Callable, Iterable, Sequence

# Libraries whose INFO lines drown the project's own progress; `--verbose` lets them through again.
# (Beam's "Converting string literal type hint to Any" comes from apache_beam.typehints.native_type_compatibility.)
THIRD_PARTY_LOGGERS = (
    "absl",
    "orbax",
    "jax",
    "jaxlib",
    "apache_beam",
    "tensorflow",
    "h5py",
    "matplotlib",
    "PIL",
    "urllib3",
    "google",
    "fsspec",
    "gcsfs",
)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_logging(verbose: bool = False) -> None:
    """INFO for the project's loggers; third-party loggers at WARNING unless `verbose` (then everything at INFO)."""
    logging.basicConfig(level=logging.INFO, format=FORMAT, force=True)
    level = logging.NOTSET if verbose else logging.WARNING
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    try:  # absl keeps its own verbosity (orbax logs through it)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass


def job_main(prog: str, run: Callable[[list[str]], dict], argv: Sequence[str] | None = None) -> None:
    """A Beam job's entry point: quiet logging (a failing step's exception reaches `run` whole; Beam's copy of it in
    the log, traceback and all, only with --verbose), `run(argv)`'s summary printed as JSON, and a SystemExit with a
    message (a mistake, a failed write) ended as one line `PROG: error: ...` on stderr, exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = "--verbose" in argv
    quiet_logging(verbose)
    logging.getLogger("apache_beam.runners.common").setLevel(logging.NOTSET if verbose else logging.CRITICAL)
    try:
        summary = run(argv)
    except SystemExit as error:
        if error.code is None or isinstance(error.code, int):
            raise
        print(f"{prog}: error: {' '.join(str(error.code).split())}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(summary, indent=2))


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="also show the INFO logs of the libraries used")


def option_name(arg: str) -> str:
    """'--batch_sise=8' -> '--batch_sise'."""
    return arg.split("=", 1)[0]


def suggestion(flag: str, known: Iterable[str]) -> str:
    """' (did you mean --x?)' for the closest of `known` to `flag`, or '' when none is close."""
    close = difflib.get_close_matches(flag, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def unknown_flag_message(unknown: Iterable[str], known: Iterable[str]) -> str:
    """One line naming the first unknown flag and the closest known one."""
    known = list(known)
    flags = [option_name(arg) for arg in unknown if arg.startswith("-")]
    if not flags:
        return f"unexpected argument(s): {' '.join(unknown)}"
    more = f" (and {len(flags) - 1} more unknown)" if len(flags) > 1 else ""
    return f"unknown flag {flags[0]}{suggestion(flags[0], known)}{more}"


def parser_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def flags_given(argv: Sequence[str]) -> list[str]:
    """The `--flag`s of a command line as typed (`--batch_sise` of `--batch_sise=8`), up to a lone `--`."""
    given = []
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--"):
            given.append(option_name(arg))
    return given


def misspelt_required_flag(parser: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    """'unknown flag --refrence (did you mean --reference?)' when a required flag of `parser` is missing from `argv`
    and an unknown flag given there is close to it (it was misspelt, hence missing); '' otherwise."""
    given = set(flags_given(argv))
    missing = [
        option
        for action in parser._actions
        if action.required and not given & set(action.option_strings)
        for option in action.option_strings
        if option.startswith("--")
    ]
    known = set(parser_flags(parser))
    for flag in flags_given(argv):
        if flag not in known and suggestion(flag, missing):
            return f"unknown flag {flag}{suggestion(flag, missing)}"
    return ""


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (`prog: error: message`, exit code 2), no usage block.

    A required flag that is missing because it was misspelt is reported as the unknown flag it is, with the closest
    required one (`unknown flag --refrence (did you mean --reference?)`), not as "the following arguments are
    required"."""

    _argv: Sequence[str] = ()

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        self._argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._argv, namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:  # named with the closest known flag, where argparse would only list them
            self.fail_unknown(unknown)
        return parsed

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            message = misspelt_required_flag(self, self._argv) or message
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def fail_unknown(self, unknown: list[str], extra_known: Iterable[str] = ()) -> None:
        self.error(unknown_flag_message(unknown, [*parser_flags(self), *extra_known]))


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false/1/0/yes/no, got {text!r}")
