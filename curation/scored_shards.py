"""The scored-shard contract: what the scoring job (`pipelines/score.py`) writes and the trainer reads.

An output directory holds one folder per scoring batch (a run of the job), each with its own manifest:

    OUTPUT/batch-20261126T101500Z-3f9a/
        scored-00000-of-00004.parquet     scored examples (SCORED_COLUMNS; embeddings float16)
        scored-00000-of-00004.tfrecord    the same as tf.train.Example (embeddings widened to float32)
        dead_letter-00000-of-00001.parquet  what could not be scored, with a reason (DEAD_LETTER_COLUMNS)
        _MANIFEST.json                    written last and atomically: the batch exists once this file does

Readers open only the shards a manifest lists and refuse batches of another schema version or reference
fingerprint. A batch folder without a manifest is unfinished (its run died, failed its --max_bad_fraction check,
or is still running): no reader opens it, `--incremental` does not count its input shards as done, and
`remove_unfinished` deletes it. So are temporary files ignored: Beam's `beam-temp-*` folders and the manifest's own
`._MANIFEST.json.*.tmp`. Files go through Beam's `FileSystems`, so `gs://` outputs read like local ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import uuid
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from curation import tfrecord

SCHEMA_VERSION = 1
MANIFEST_NAME = "_MANIFEST.json"
BATCH_PREFIX = "batch-"
SCORED_PREFIX = "scored"
DEAD_LETTER_PREFIX = "dead_letter"
OUTPUT_FORMATS = ("parquet", "tfrecord")
_SUFFIX = {"parquet": ".parquet", "tfrecord": ".tfrecord"}
TEMPORARY_PREFIXES = ("beam-temp-", f".{MANIFEST_NAME}.")  # Beam's FileBasedSink, write_manifest

# Column -> meaning. The embeddings are the reference model's, L2-normalized before rounding to float16.
SCORED_COLUMNS = {
    "key": "string: the example's key in the input corpus",
    "caption": "string: the cleaned caption (UTF-8, whitespace collapsed)",
    "image": "binary: image bytes as stored, re-encoded (--store_image=resized) or empty (--store_image=none)",
    "source": "string: the input shard the example came from",
    "metadata": "string: JSON of the input record's other fields (e.g. the demo corpus's hidden truth)",
    "ref_image_embedding": "fixed_size_list<float16>[d] (TFRecord: float32 list of the same float16 values)",
    "ref_text_embedding": "fixed_size_list<float16>[d] (TFRecord: float32 list of the same float16 values)",
    "ref_cosine": "float32: ⟨image, text⟩ of the stored (float16) embeddings",
    "ref_logit": "float32: t*·ref_cosine + c*, the example's own pair logit under the reference",
    "ref_loss": "float32: softplus(−ref_logit), its own-pair sigmoid loss (low = easy for the reference)",
}
DEAD_LETTER_COLUMNS = {
    "key": "string", "source": "string", "stage": "string: read | caption | decode | embed",
    "reason": "string: why it could not be scored", "message": "string: details",
}


def scored_schema(embed_dim: int) -> pa.Schema:
    """The explicit Parquet schema of scored shards for reference embeddings of width `embed_dim`."""
    embedding = pa.list_(pa.float16(), embed_dim)
    return pa.schema(
        [
            ("key", pa.string()), ("caption", pa.string()), ("image", pa.binary()), ("source", pa.string()),
            ("metadata", pa.string()), ("ref_image_embedding", embedding), ("ref_text_embedding", embedding),
            ("ref_cosine", pa.float32()), ("ref_logit", pa.float32()), ("ref_loss", pa.float32()),
        ],
        metadata={"schema_version": str(SCHEMA_VERSION)},
    )


DEAD_LETTER_SCHEMA = pa.schema([(name, pa.string()) for name in DEAD_LETTER_COLUMNS])


def tfrecord_feature_spec(embed_dim: int) -> dict[str, Any]:
    """`tf.io.parse_single_example` spec of a scored TFRecord (TensorFlow imported only when called)."""
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.string) for name in ("key", "caption", "image", "source", "metadata")}
    spec.update({name: tf.io.FixedLenFeature([embed_dim], tf.float32)
                 for name in ("ref_image_embedding", "ref_text_embedding")})
    spec.update({name: tf.io.FixedLenFeature([], tf.float32) for name in ("ref_cosine", "ref_logit", "ref_loss")})
    return spec


def encode_tfrecord_example(row: dict[str, Any]) -> bytes:
    """One scored row (as in the Parquet table) -> serialized tf.train.Example."""
    return tfrecord.encode_example(
        {
            "key": row["key"], "caption": row["caption"], "image": row["image"], "source": row["source"],
            "metadata": row["metadata"],
            "ref_image_embedding": [float(v) for v in np.asarray(row["ref_image_embedding"], np.float32)],
            "ref_text_embedding": [float(v) for v in np.asarray(row["ref_text_embedding"], np.float32)],
            "ref_cosine": float(row["ref_cosine"]), "ref_logit": float(row["ref_logit"]),
            "ref_loss": float(row["ref_loss"]),
        }
    )


def new_batch_name(now: str) -> str:
    """batch-{UTC time}-{random}: sorts by time, never collides between concurrent runs."""
    return f"{BATCH_PREFIX}{now}-{uuid.uuid4().hex[:6]}"


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The `_MANIFEST.json` of one batch. `shards` and `dead_letter_shards` are file names inside the batch folder."""

    schema_version: int
    reference_fingerprint: str
    reference: dict[str, Any]  # {"t": t*, "c": c*, "checkpoint": path, "model": ModelConfig dict}
    counts: dict[str, Any]  # {"read": n, "scored": n, "dead_letter": {reason: n}}
    input_shards: list[str]
    shards: list[str]
    dead_letter_shards: list[str]
    output_formats: list[str]
    created: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_dir: str = ""  # where it was read from (not stored)

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values.pop("batch_dir")
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, batch_dir: str = "") -> "Manifest":
        values = json.loads(text)
        known = {field.name for field in dataclasses.fields(cls)} - {"batch_dir"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"manifest in {batch_dir or '?'} has unknown fields {sorted(unknown)}")
        return cls(**values, batch_dir=batch_dir)

    @property
    def reference_t(self) -> float:
        return float(self.reference["t"])

    @property
    def reference_c(self) -> float:
        return float(self.reference["c"])

    def shard_paths(self, format: str = "parquet") -> list[str]:
        suffix = _SUFFIX[format]
        return [posixpath.join(self.batch_dir, name) for name in self.shards if name.endswith(suffix)]


def write_manifest(batch_dir: str, manifest: Manifest) -> str:
    """Write `_MANIFEST.json` atomically: to a temporary name, then renamed (one object appears whole on GCS)."""
    final = posixpath.join(batch_dir, MANIFEST_NAME)
    temporary = posixpath.join(batch_dir, f".{MANIFEST_NAME}.{uuid.uuid4().hex}.tmp")
    with FileSystems.create(temporary) as f:
        f.write(manifest.to_json().encode("utf-8"))
    if FileSystems.exists(final):
        FileSystems.delete([final])
    FileSystems.rename([temporary], [final])
    return final


def read_manifests(output: str) -> list[Manifest]:
    """Every batch manifest under `output`, oldest batch first (an output with none gives [])."""
    pattern = posixpath.join(output, f"{BATCH_PREFIX}*", MANIFEST_NAME)
    manifests = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(metadata.path) as f:
            manifests.append(Manifest.from_json(f.read().decode("utf-8"), posixpath.dirname(metadata.path)))
    return sorted(manifests, key=lambda manifest: manifest.batch_dir)


def _batch_folders(output: str) -> dict[str, list[str]]:
    """Batch folder under `output` -> the paths of every file inside it, at any depth."""
    output = output.rstrip("/")
    folders: dict[str, list[str]] = {}
    filesystem = FileSystems.get_filesystem(output)
    if isinstance(filesystem, LocalFileSystem) and os.path.isdir(output):  # a local disk keeps empty folders too
        folders.update({posixpath.join(output, name): [] for name in os.listdir(output)
                        if name.startswith(BATCH_PREFIX) and os.path.isdir(os.path.join(output, name))})
    for metadata in FileSystems.match([posixpath.join(output, f"{BATCH_PREFIX}*", "**")])[0].metadata_list:
        name = metadata.path[len(output) + 1:].split("/", 1)[0]
        folders.setdefault(posixpath.join(output, name), []).append(metadata.path)
    return folders


def unfinished_batches(output: str) -> list[str]:
    """Batch folders under `output` that hold no manifest: never read, never counted as done."""
    return sorted(folder for folder, paths in _batch_folders(output).items()
                  if posixpath.join(folder, MANIFEST_NAME) not in paths)


def remove_unfinished(output: str, before: str) -> list[str]:
    """Delete the unfinished batch folders named (by time) before the batch name `before`, and the temporary files
    left in finished ones; returns what was deleted. Only safe when no run that started earlier is still writing
    to `output`: its batch folder has no manifest yet either."""
    cutoff = before[: len(BATCH_PREFIX) + len("YYYYmmddTHHMMSSZ")]
    doomed: dict[str, list[str]] = {}  # file or folder -> the files under it
    for folder, paths in sorted(_batch_folders(output).items()):
        if posixpath.join(folder, MANIFEST_NAME) not in paths:
            if posixpath.basename(folder) < cutoff:
                doomed[folder] = paths
            continue
        for path in paths:
            top = path[len(folder) + 1:].split("/", 1)[0]
            if top.startswith(TEMPORARY_PREFIXES):
                doomed.setdefault(posixpath.join(folder, top), []).append(path)
    local = isinstance(FileSystems.get_filesystem(output), LocalFileSystem)
    for path, files in doomed.items():
        # A local folder goes as a whole (empty subfolders too); an object store has only the files.
        FileSystems.delete([path] if local else files)
    return sorted(doomed)


class ScoredShardsError(ValueError):
    """Scored shards that must not be read together, or a manifest that does not match the files."""


@dataclasses.dataclass(frozen=True)
class ScoredSet:
    """The batches of one output that a reader uses, checked to share schema version and reference."""

    manifests: list[Manifest]
    fingerprint: str
    reference_t: float
    reference_c: float
    embed_dim: int

    def shard_paths(self, format: str = "parquet") -> list[str]:
        return [path for manifest in self.manifests for path in manifest.shard_paths(format)]

    @property
    def scored(self) -> int:
        return sum(int(manifest.counts["scored"]) for manifest in self.manifests)


def open_scored(output: str, fingerprint: str | None = None, check_files: bool = True) -> ScoredSet:
    """All batches under `output` (those of `fingerprint` when given), checked.

    Raises ScoredShardsError when there is no batch, when batches mix schema versions or reference fingerprints,
    or (with `check_files`) when a shard a manifest lists is missing.
    """
    manifests = read_manifests(output)
    if fingerprint is not None:
        manifests = [manifest for manifest in manifests if manifest.reference_fingerprint == fingerprint]
    if not manifests:
        which = f" scored by reference {fingerprint[:12]}" if fingerprint else ""
        raise ScoredShardsError(f"no scored batch{which} under {output} (no {BATCH_PREFIX}*/{MANIFEST_NAME})")
    versions = {manifest.schema_version for manifest in manifests}
    if versions != {SCHEMA_VERSION}:
        raise ScoredShardsError(
            f"{output} holds schema versions {sorted(versions)}; this reader reads version {SCHEMA_VERSION} only")
    fingerprints = {manifest.reference_fingerprint for manifest in manifests}
    if len(fingerprints) > 1:
        by_fingerprint = {f[:12]: [posixpath.basename(m.batch_dir) for m in manifests if m.reference_fingerprint == f]
                          for f in sorted(fingerprints)}
        raise ScoredShardsError(
            f"{output} mixes batches scored by different reference models {by_fingerprint}; "
            "pass the fingerprint of the one to read")
    if check_files:
        for manifest in manifests:
            listed = [posixpath.join(manifest.batch_dir, name)
                      for name in manifest.shards + manifest.dead_letter_shards]
            missing = [path for path in listed if not FileSystems.exists(path)]
            if missing:
                raise ScoredShardsError(f"manifest of {manifest.batch_dir} lists missing shards {missing[:5]}")
    first = manifests[0]
    return ScoredSet(manifests, first.reference_fingerprint, first.reference_t, first.reference_c,
                     int(first.reference["model"]["embed_dim"]))


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
            features = tfrecord.decode_example(frame)
            yield {name: (np.asarray(values, np.float32) if name.startswith("ref_") and name.endswith("embedding")
                          else values[0]) for name, values in features.items()}
