"""The hidden ground truth some corpora carry in their metadata (`truth`: "clean" or a noise kind, as the demo
generator writes it; the emoji corpus adds each example's `difficulty` and concept `frequency` bucket), as the integer
codes training batches carry: for analysis only (what selection chose), never an input to selection. Pure Python, so
the JAX side imports it without TensorFlow."""

from __future__ import annotations

import json

# Code k is TRUTH_KINDS[k]; a kind not listed is OTHER; a corpus without truth gives UNKNOWN.
TRUTH_KINDS = ("clean", "misaligned", "boilerplate", "near_duplicate", "degraded", "repeat")
OTHER = len(TRUTH_KINDS)
UNKNOWN = -1
CLEAN = TRUTH_KINDS.index("clean")
NOISE_KINDS = TRUTH_KINDS[1:] + ("other",)  # the names of codes 1 .. OTHER


# The buckets a batch's `bucket` code packs: BUCKET_BASE * (difficulty index) + (frequency index); an index of
# BUCKET_UNKNOWN is an example whose metadata does not name that bucket.
BUCKETS = {"difficulty": ("easy", "medium", "hard"), "frequency": ("head", "torso", "tail")}
BUCKET_UNKNOWN = 3
BUCKET_BASE = 4


def _parsed(metadata: str | dict | None) -> dict:
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata else {}
        except ValueError:
            metadata = {}
    return metadata if isinstance(metadata, dict) else {}


def hidden_codes(metadata: str | dict | None) -> tuple[int, int]:
    """(truth code, bucket code) from an example's metadata, parsed once."""
    metadata = _parsed(metadata)
    return truth_code(metadata), bucket_code(metadata)


def bucket_code(metadata: str | dict | None) -> int:
    """The difficulty and frequency buckets, packed (BUCKETS); BUCKET_UNKNOWN in a place the metadata leaves out."""
    metadata = _parsed(metadata)
    difficulty, frequency = (
        names.index(metadata[axis]) if metadata.get(axis) in names else BUCKET_UNKNOWN
        for axis, names in BUCKETS.items()
    )
    return BUCKET_BASE * difficulty + frequency


def split_bucket(code):
    """(difficulty index, frequency index) of bucket codes (ints or arrays)."""
    return code // BUCKET_BASE, code % BUCKET_BASE


def truth_code(metadata: str | dict | None) -> int:
    """From an example's metadata (a dict, or its JSON as a scored shard stores it)."""
    truth = _parsed(metadata).get("truth")
    if truth is None:
        return UNKNOWN
    return TRUTH_KINDS.index(truth) if truth in TRUTH_KINDS else OTHER


def clean_flag(code: int) -> int:
    """1 clean, 0 noisy, −1 unknown."""
    return UNKNOWN if code == UNKNOWN else int(code == CLEAN)
