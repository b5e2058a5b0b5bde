"""What the scoring job checks before any work, each failure one line naming the fix (SystemExit): Google
credentials for gs:// paths, the reference, the input globs and the output folder, flags that do not go together.
"""

from __future__ import annotations

import argparse
import glob
import os
import threading
from typing import Any

from pipelines import references
from pipelines.planning import input_patterns

GCLOUD_HINT = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"


def check_gcs_credentials(paths: list[str], timeout_s: float = 10.0) -> None:
    """Refuse gs:// paths without Google credentials at once, not after a minute of retries (no check against a
    local emulator, STORAGE_EMULATOR_HOST)."""
    gcs = [path for path in paths if path.startswith("gs://")]
    if not gcs or os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth

    result: dict[str, Any] = {}

    def probe():
        try:
            result["credentials"] = google.auth.default()
        except Exception as error:  # DefaultCredentialsError, or a transport error
            result["error"] = error

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "credentials" not in result:
        why = (
            f"no Google credentials ({' '.join(str(result['error']).split())[:120]})"
            if "error" in result
            else f"no Google credentials found within {timeout_s:.0f} s"
        )
        raise SystemExit(f"{gcs[0]}: {why}; {GCLOUD_HINT}")


def check_reference(spec: str) -> references.Reference:
    """--reference, resolved from its metadata and checked for damage where that is cheap."""
    try:
        reference = references.resolve(spec)
        reference.check_loadable()
        return reference
    except references.ReferenceSpecError as error:
        raise SystemExit(str(error)) from None
    except Exception as error:
        detail = " ".join(str(error).split())[:160]
        raise SystemExit(
            f"--reference {spec} is damaged or unreadable ({type(error).__name__}: {detail}); save it "
            "again or point at another reference"
        ) from None


def check_paths(args: argparse.Namespace) -> None:
    """--input globs that match folders rather than shards, an --output that is a file."""
    for pattern in input_patterns(args):
        if "://" in pattern:
            continue
        directories = [path for path in sorted(glob.glob(pattern)) if os.path.isdir(path)]
        if directories:
            raise SystemExit(
                f"--input {pattern} matches the directory {directories[0]}, not shard files; give a "
                f"glob of its shards, e.g. --input '{directories[0].rstrip('/')}/*'"
            )
    if os.path.isfile(args.output):
        raise SystemExit(f"--output {args.output} is a file; give a directory")


def check_flag_combinations(args: argparse.Namespace) -> None:
    if args.output_layout == "sidecar" and (args.store_image != "as_stored" or args.num_output_shards):
        raise SystemExit(
            "--store_image and --num_output_shards shape the copied layout; --output_layout sidecar "
            "writes one sidecar per input shard and no image: drop them"
        )
    if args.model_copies < 0:
        raise SystemExit(f"--model_copies {args.model_copies}: give a positive count (or 0 for Beam's default)")


def check_arguments(args: argparse.Namespace) -> references.Reference:
    """Refuse, before any work, inputs that cannot work; returns the reference, resolved."""
    check_gcs_credentials([*input_patterns(args), args.output, args.reference])
    check_paths(args)
    check_flag_combinations(args)
    return check_reference(args.reference)
