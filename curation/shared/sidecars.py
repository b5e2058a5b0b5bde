"""Score sidecars (`--output_layout sidecar`): one Parquet file per input shard, its footer saying what it is, so a
finished sidecar is adopted by a resumed run without a manifest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from curation.shared.batches import unfinished_batches, write_atomically
from curation.shared.corpus import shard_stem
from curation.shared.manifest import PARQUET_COMPRESSION, SIDECAR_DIR, SIDECAR_KEY, ScoredShardsError, _typed
from curation.shared.schema import SCHEMA_VERSION
from curation.shared.scored_set import read_scored_parquet


@dataclasses.dataclass(frozen=True)
class SidecarInfo:
    """What a sidecar's footer says of it: enough to adopt it, without a manifest, in a resumed run."""

    input_shard: str  # canonical path of the input shard
    size_bytes: int
    modified: float
    reference_fingerprint: str
    scoring: dict[str, Any]  # Options.scoring() of the run that wrote it
    read: int  # rows = items of the input shard
    scored: int
    dead_letter: dict[str, int]
    batch: str  # name of the batch folder it was written in
    schema_version: int = 2  # of its columns (footers before version 3 did not say: 1 and 2 have the same columns)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "SidecarInfo":
        return _typed(cls, json.loads(text), where)


def sidecar_name(input_shard: str) -> str:
    """File name of an input shard's sidecar: its stem and a hash of its path (stems repeat across folders)."""
    return f"{shard_stem(input_shard)}-{hashlib.sha1(input_shard.encode('utf-8')).hexdigest()[:8]}"


def write_sidecar(path: str, table: pa.Table, info: SidecarInfo, row_group_rows: int = 16384) -> str:
    """Write a sidecar table (zstd, row groups of `row_group_rows`) with `info` in its footer, atomically: to a
    temporary name, then renamed, so that a sidecar that exists is whole."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SIDECAR_KEY: info.to_json().encode()})
    return write_atomically(
        path, lambda f: pq.write_table(table, f, compression=PARQUET_COMPRESSION, row_group_size=row_group_rows)
    )


def read_sidecar_info(path: str) -> SidecarInfo:
    """The SidecarInfo in a sidecar's footer (reads the footer only)."""
    try:
        with FileSystems.open(path) as f:
            metadata = pq.read_schema(f).metadata or {}
    except (OSError, pa.ArrowException) as error:
        raise ScoredShardsError(f"score sidecar {path} cannot be read: {error}") from error
    if SIDECAR_KEY not in metadata:
        raise ScoredShardsError(f"{path} is not a score sidecar (no {SIDECAR_KEY.decode()} in its footer)")
    return SidecarInfo.from_json(metadata[SIDECAR_KEY].decode("utf-8"), path)


def resumable_sidecars(output: str, fingerprint: str, scoring: dict[str, Any]) -> dict[str, tuple[str, SidecarInfo]]:
    """Finished sidecars that runs which never wrote their manifest left under `output` (they died, or were killed)
    and that were scored by reference `fingerprint` under `scoring` (Options.scoring()): input shard -> (its path
    relative to `output`, what its footer says); the newest where a shard has several."""
    found: dict[str, tuple[str, SidecarInfo]] = {}
    output = output.rstrip("/")
    for folder in unfinished_batches(output):
        pattern = posixpath.join(folder, SIDECAR_DIR, "*.parquet")
        for metadata in FileSystems.match([pattern])[0].metadata_list:
            if posixpath.basename(metadata.path).startswith("."):
                continue
            try:
                info = read_sidecar_info(metadata.path)
            except ScoredShardsError:
                continue
            if (
                info.reference_fingerprint == fingerprint
                and info.scoring == scoring
                and info.schema_version == SCHEMA_VERSION  # an older one lacks columns: its shard is scored again
            ):
                found[info.input_shard] = (metadata.path[len(output) + 1 :], info)
    return found


def read_sidecar(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet score sidecar as a pyarrow Table (through FileSystems)."""
    return read_scored_parquet(path, columns)
