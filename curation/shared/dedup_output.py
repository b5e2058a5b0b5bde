"""The deduplication contract: what the dedup job (`pipelines/dedup.py`) writes and the trainer reads.

A dedup output folder holds, for one scored output, one Parquet file per scored file (a scored shard in the copied
layout, a score sidecar in the sidecar layout), row-aligned with it: row i says of row i of the scored file whether
training keeps it. Its `_DEDUP.json` is written last and atomically: the output exists once it does.

    DEDUP/
        dedup-00000.parquet      row i: the verdict on row i of the first scored file
        ...
        _DEDUP.json              the scored set it was made for (reference, batches, files), settings, counts

An example's id is `file index × 2^32 + row` (file index: its scored file's place in the manifest's `files`), so
that ids sort by file order and then by row: a group's representative is its smallest id, deterministic whatever
the runner (left out too when an evaluation image leaks into it: a leak is left out whatever its group). Read with
plain pyarrow; `open_dedup` checks that a dedup output was made for the scored set a reader opened.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from curation.shared.manifest import ScoredShardsError, _typed

DEDUP_VERSION = 1
DEDUP_MANIFEST = "_DEDUP.json"
ROW_BITS = 32  # an id is file index << ROW_BITS | row

KEY = "key"
GROUP = "group"
KEPT = "kept"
REASON = "reason"
EVAL_KEY = "eval_key"
EVAL_SIMILARITY = "eval_similarity"
# why a row is left out
EXACT, NEAR, LEAK = "exact_duplicate", "near_duplicate", "eval_leak"

COLUMNS = (
    (KEY, pa.string(), "the row's key in its scored file (keys are unique only within a file)"),
    (GROUP, pa.int64(), "the id of its duplicate group's representative (its own id when it has no duplicate)"),
    (KEPT, pa.bool_(), "training keeps it: it represents its group and no evaluation image leaks into it"),
    (REASON, pa.string(), f"why it is left out ({EXACT}, {NEAR} or {LEAK}); null when kept"),
    (EVAL_KEY, pa.string(), "the nearest evaluation image, where it is a copy or its similarity is at the threshold"),
    (
        EVAL_SIMILARITY,
        pa.float32(),
        "its pixel similarity to that image (`pipelines/pixel_match.py`; 1.0 for a byte copy); else null",
    ),
)
SCHEMA = pa.schema([(name, kind) for name, kind, _ in COLUMNS], metadata={b"dedup_version": str(DEDUP_VERSION)})


class DedupError(ScoredShardsError):
    """A dedup output that cannot be read, or that was made for another scored set."""


def example_id(file_index: int, row: int) -> int:
    return (file_index << ROW_BITS) | row


def split_id(example: int) -> tuple[int, int]:
    return example >> ROW_BITS, example & ((1 << ROW_BITS) - 1)


@dataclasses.dataclass(frozen=True)
class DedupFile:
    scored: str  # the scored file, relative to the scored output
    dedup: str  # its dedup file, in the dedup folder
    rows: int


@dataclasses.dataclass(frozen=True)
class DedupCounts:
    examples: int  # scored rows (a sidecar's dead-lettered rows are not counted)
    groups: int  # duplicate groups of two or more
    removed_exact: int  # left out as a byte-identical copy of their representative
    removed_near: int  # left out as a near-duplicate
    leaks: int  # rows an evaluation image leaks into (left out whatever their group)

    @property
    def left_out(self) -> int:
        return self.removed_exact + self.removed_near + self.leaks


@dataclasses.dataclass(frozen=True)
class DedupManifest:
    version: int
    created: str
    scored: str  # the scored output it was made for
    reference_fingerprint: str
    layout: str  # the scored set's: "copied" or "sidecar"
    batches: list[str]  # the scored set's batch folders, by name
    files: list[DedupFile]
    settings: dict[str, Any]  # thresholds, bands, the evaluation sets protected
    counts: DedupCounts
    converged: bool = True  # the groups' label propagation had settled within its rounds

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "DedupManifest":
        values = json.loads(text)
        if values.get("version") != DEDUP_VERSION:
            raise DedupError(f"{where} has dedup version {values.get('version')!r}; this reader reads {DEDUP_VERSION}")
        values["files"] = [_typed(DedupFile, entry, where) for entry in values.get("files", [])]
        values["counts"] = _typed(DedupCounts, values.get("counts", {}), where)
        return _typed(cls, values, where)


def scored_file_name(scored_output: str, path: str) -> str:
    """A scored file's path relative to its scored output (how a dedup manifest names it)."""
    root = scored_output.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else path


@dataclasses.dataclass(frozen=True)
class Dedup:
    """An opened dedup output: which rows of each scored file training leaves out."""

    folder: str
    manifest: DedupManifest

    def left_out(self, scored_file: str, scored_output: str | None = None) -> np.ndarray:
        """[rows] bool, True where training leaves the row out, for a scored file: its path under `scored_output`
        (the scored set as the reader opened it; default: as the job was given it), or relative to it."""
        name = scored_file_name(scored_output or self.manifest.scored, scored_file)
        entry = next((f for f in self.manifest.files if f.scored == name), None)
        if entry is None:
            raise DedupError(f"the dedup output {self.folder} has no verdict for {scored_file}")
        table = read_dedup_file(posixpath.join(self.folder, entry.dedup), [KEPT])
        return ~table.column(KEPT).to_numpy(zero_copy_only=False).astype(bool)


def read_dedup_file(path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        with FileSystems.open(path) as f:
            return pq.read_table(f, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise DedupError(f"dedup file {path} cannot be read: {error}") from error


def read_dedup_manifest(folder: str) -> DedupManifest:
    path = posixpath.join(folder, DEDUP_MANIFEST)
    if not FileSystems.exists(path):
        raise DedupError(f"no dedup output in {folder} (no {DEDUP_MANIFEST}): run python -m pipelines.dedup first")
    with FileSystems.open(path) as f:
        return DedupManifest.from_json(f.read().decode("utf-8"), path)


def open_dedup(folder: str, scored) -> Dedup:
    """The dedup output in `folder`, checked against `scored` (a `scored_set.ScoredSet`): made with the same
    reference, for the same batches. Raises DedupError in one line naming the fix otherwise."""
    manifest = read_dedup_manifest(folder)
    again = f"run python -m pipelines.dedup --scored {scored.manifests[0].output} --output {folder} again"
    if manifest.reference_fingerprint != scored.fingerprint:
        raise DedupError(
            f"the dedup output {folder} was made with reference {manifest.reference_fingerprint[:12]}, the scored "
            f"set is scored by {scored.fingerprint[:12]}: {again}"
        )
    names = sorted(posixpath.basename(m.batch_dir) for m in scored.manifests)
    if sorted(manifest.batches) != names:
        raise DedupError(
            f"the dedup output {folder} was made for the scored batches {sorted(manifest.batches)}, the scored set "
            f"holds {names}: {again}"
        )
    return Dedup(folder, manifest)
