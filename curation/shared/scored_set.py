"""Reading a scored output: the batches a reader uses (`open_scored`), checked to share one reference, and their
shards."""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from curation.shared import schema, tfrecord
from curation.shared.batches import read_manifests
from curation.shared.manifest import (
    _SUFFIX,
    BATCH_PREFIX,
    MANIFEST_NAME,
    Manifest,
    Options,
    ReferenceInfo,
    ScoredShardsError,
)


@dataclasses.dataclass(frozen=True)
class ScoredSet:
    """The batches of one output that a reader uses, checked to share one reference (the newest one's record)."""

    manifests: list[Manifest]
    reference: ReferenceInfo

    @property
    def fingerprint(self) -> str:
        return self.reference.fingerprint

    @property
    def embed_dim(self) -> int:
        return self.reference.width

    def shard_paths(self, format: str = "parquet") -> list[str]:
        return [path for manifest in self.manifests for path in manifest.shard_paths(format)]

    @property
    def layout(self) -> str:
        """ "copied" or "sidecar"; a reader takes one layout per output (ScoredShardsError when they are mixed)."""
        layouts = {manifest.options.output_layout for manifest in self.manifests}
        if len(layouts) > 1:
            raise ScoredShardsError(
                f"{self.manifests[0].output} holds batches of both output layouts "
                f"{sorted(layouts)}; score into separate outputs"
            )
        return layouts.pop()

    def sidecar_pairs(self) -> list[tuple[str, str, Options]]:
        """(input shard, its sidecar, the options it was scored under) for every input shard of the sidecar
        batches, the newest batch's sidecar where a shard was scored more than once; sorted by input shard."""
        newest: dict[str, tuple[str, Options]] = {}
        for manifest in self.manifests:  # oldest first
            newest.update({shard: (sidecar, manifest.options) for shard, sidecar in manifest.sidecars().items()})
        return [(shard, sidecar, options) for shard, (sidecar, options) in sorted(newest.items())]

    @property
    def scored(self) -> int:
        return sum(manifest.counts.scored for manifest in self.manifests)


def open_scored(output: str, fingerprint: str | None = None, check_files: bool = True) -> ScoredSet:
    """All batches under `output` (those of `fingerprint` when given), checked.

    Raises ScoredShardsError when there is no batch, when a batch has a schema version this reader does not know,
    when batches mix reference fingerprints, or (with `check_files`) when a shard a manifest lists is missing.
    Version-1 and version-2 batches read together: their shards have the same columns.
    """
    manifests = read_manifests(output)
    if fingerprint is not None:
        manifests = [manifest for manifest in manifests if manifest.reference_fingerprint == fingerprint]
    if not manifests:
        which = f" scored by reference {fingerprint[:12]}" if fingerprint else ""
        raise ScoredShardsError(f"no scored batch{which} under {output} (no {BATCH_PREFIX}*/{MANIFEST_NAME})")
    fingerprints = {manifest.reference_fingerprint for manifest in manifests}
    if len(fingerprints) > 1:
        by_fingerprint = {
            f[:12]: [posixpath.basename(m.batch_dir) for m in manifests if m.reference_fingerprint == f]
            for f in sorted(fingerprints)
        }
        raise ScoredShardsError(
            f"{output} mixes batches scored by different reference models {by_fingerprint}; "
            "pass the fingerprint of the one to read"
        )
    if check_files:
        for manifest in manifests:
            listed = [
                posixpath.join(manifest.batch_dir, name) for name in manifest.shards + manifest.dead_letter_shards
            ]
            missing = [path for path in listed if not FileSystems.exists(path)]
            if missing:
                raise ScoredShardsError(f"manifest of {manifest.batch_dir} lists missing shards {missing[:5]}")
    return ScoredSet(manifests, manifests[-1].reference)


def read_scored_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """One scored Parquet shard as a pyarrow Table (through FileSystems, so gs:// works). A shard that is
    missing, truncated or corrupt raises ScoredShardsError naming it."""
    try:
        with FileSystems.open(path) as f:
            return pq.read_table(f, columns=columns)
    except (OSError, pa.ArrowException) as error:
        raise ScoredShardsError(f"scored shard {path} cannot be read: {error}") from error


def iter_scored_tfrecord(path: str) -> Iterator[dict[str, Any]]:
    """Rows of one scored TFRecord shard as dicts (embeddings as float32 arrays)."""
    with FileSystems.open(path) as f:
        for frame in tfrecord.iter_frames(f):
            if isinstance(frame, tfrecord.FrameError):
                raise ScoredShardsError(f"{path}: {frame}")
            yield schema.decode_tfrecord_example(frame)


def sources_of(path: str) -> set[str]:
    """The input shards whose records a scored file (Parquet or TFRecord) holds."""
    if path.endswith(_SUFFIX["parquet"]):
        return set(read_scored_parquet(path, [schema.SOURCE]).column(schema.SOURCE).to_pylist())
    return {row[schema.SOURCE] for row in iter_scored_tfrecord(path)}
