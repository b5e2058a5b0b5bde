"""The hidden ground truth some corpora carry in their metadata (`truth`: "clean" or a noise kind, as the demo
generator writes it), as the integer code training batches carry: for analysis only (what selection chose), never
an input to selection. Pure Python, so the JAX side imports it without TensorFlow."""

from __future__ import annotations

import json

# Code k is TRUTH_KINDS[k]; a kind not listed is OTHER; a corpus without truth gives UNKNOWN.
TRUTH_KINDS = ("clean", "misaligned", "boilerplate", "near_duplicate", "degraded", "repeat")
OTHER = len(TRUTH_KINDS)
UNKNOWN = -1
CLEAN = TRUTH_KINDS.index("clean")
NOISE_KINDS = TRUTH_KINDS[1:] + ("other",)  # the names of codes 1 .. OTHER


def truth_code(metadata: str | dict | None) -> int:
    """From an example's metadata (a dict, or its JSON as a scored shard stores it)."""
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata else {}
        except ValueError:
            metadata = {}
    truth = metadata.get("truth") if isinstance(metadata, dict) else None
    if truth is None:
        return UNKNOWN
    return TRUTH_KINDS.index(truth) if truth in TRUTH_KINDS else OTHER


def clean_flag(code: int) -> int:
    """1 clean, 0 noisy, −1 unknown."""
    return UNKNOWN if code == UNKNOWN else int(code == CLEAN)
