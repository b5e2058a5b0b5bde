"""The scored-shard contract: what the scoring job (`pipelines/score.py`) writes and the trainer reads.

An output directory holds one folder per scoring batch (a run of the job), each with its own manifest:

    OUTPUT/batch-20261126T101500Z-3f9a/
        scored-00000-of-00004.parquet     scored examples (the columns of curation/schema.py)
        scored-00000-of-00004.tfrecord    the same as tf.train.Example (embeddings widened to float32)
        dead_letter-00000-of-00001.parquet  what could not be scored, with a reason
        _MANIFEST.json                    written last and atomically: the batch exists once this file does

or, with `--output_layout sidecar`, beside a corpus that is never copied, one score sidecar per input shard:

    OUTPUT/batch-20261126T101500Z-3f9a/
        sidecars/00012-5be1c0d2.parquet   a row per item of input shard …/00012.tar, in its order
                                          (schema.SIDECAR_COLUMNS)
        _MANIFEST.json                    input shard -> its sidecar (path relative to OUTPUT)

A sidecar is written atomically as soon as its shard is scored and records in its own footer what it is (the input
shard's path, size and modification time, the reference fingerprint, the options, its counts), so it counts as done
by itself: a run that dies leaves finished sidecars that the next run of the same reference and options adopts
instead of scoring their shards again (`resumable_sidecars`). When a shard is scored again the newest batch's
sidecar wins.

Readers open only the shards a manifest lists and refuse batches of an unknown schema version or of another
reference fingerprint. A batch folder without a manifest is unfinished (its run died, failed its
--max_bad_fraction check, or is still running): no reader opens it, `--incremental` does not count its input
shards as done, and `remove_unfinished` deletes it. So are temporary files ignored: Beam's `beam-temp-*` folders and
the manifest's own `._MANIFEST.json.*.tmp`. Files go through Beam's `FileSystems`, so `gs://` outputs read like
local ones.

The manifest is typed (`Manifest` and the records it holds). Version 2 added the reference's loss family,
preprocessing, width and FLOPs, shard counts, and each input shard's status and output files; a version-1
manifest is read by filling those from what it recorded (its reference was always one of our sigmoid checkpoints,
and any of its output files may hold an input shard's records). The shard columns did not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import uuid
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from curation import schema, tfrecord
from curation.corpus import DEFAULT_FIELDS, FieldNames, shard_stem
from curation.preprocess import ValidationOptions
from models.flops import example_forward_flops
from models.preprocessing import ImagePreprocessing, dataclass_from_dict
from models.two_towers import ModelConfig

MANIFEST_NAME = "_MANIFEST.json"
BATCH_PREFIX = "batch-"
SCORED_PREFIX = "scored"
DEAD_LETTER_PREFIX = "dead_letter"
OUTPUT_FORMATS = ("parquet", "tfrecord")
_SUFFIX = {"parquet": ".parquet", "tfrecord": ".tfrecord"}
TEMPORARY_PREFIXES = ("beam-temp-", f".{MANIFEST_NAME}.")  # Beam's FileBasedSink, write_manifest
DONE, FAILED = "done", "failed"  # status of an input shard
# Parquet as the job writes it: zstd, and row groups large enough for scans (see README, "Output layouts").
PARQUET_COMPRESSION = "zstd"
ROW_GROUP_BYTES = 64 << 20
LAYOUTS = ("copied", "sidecar")  # --output_layout
SIDECAR_DIR = "sidecars"
SIDECAR_KEY = b"jest_sidecar"  # Parquet key-value metadata of a sidecar: its SidecarInfo as JSON


class ScoredShardsError(ValueError):
    """Scored shards that must not be read together, or a manifest that does not match the files."""


def _typed(cls, values: dict[str, Any], where: str):
    """`cls(**values)`, refusing unknown fields with their names."""
    try:
        return dataclass_from_dict(cls, values, f"the {cls.__name__} of the manifest in {where}")
    except (TypeError, ValueError) as error:
        raise ScoredShardsError(str(error)) from error


@dataclasses.dataclass(frozen=True)
class ReferenceInfo:
    """The model the batch was scored with: all a reader needs of it, and how to recognise it."""

    id: str  # what the job was given (a checkpoint folder)
    fingerprint: str  # sha256 over its weights, config and tokenizer
    width: int  # embedding width d
    loss: str  # "sigmoid" (t and bias) or "softmax" (t)
    temperature: float  # t*, exponentiated
    bias: float  # bias* of the sigmoid loss
    image_preprocessing: dict[str, Any]  # models.preprocessing.ImagePreprocessing.to_dict()
    text_length: int
    tokenizer: str  # the tokenizer's kind
    forward_flops_per_example: int
    model: dict[str, Any] = dataclasses.field(default_factory=dict)  # its own config (ModelConfig for ours)

    @property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.from_dict(self.image_preprocessing)


@dataclasses.dataclass(frozen=True)
class Counts:
    """read = scored + dead-lettered (per reason); shards = done + failed."""

    read: int
    scored: int
    dead_letter: dict[str, int]
    shards: int = 0
    shards_done: int = 0
    shards_failed: int = 0

    @property
    def dead_lettered(self) -> int:
        return sum(self.dead_letter.values())


@dataclasses.dataclass(frozen=True)
class InputShard:
    path: str
    status: str = DONE  # DONE, or FAILED: not scored, to be scored again by an --incremental run
    reason: str = ""  # why it failed
    size_bytes: int = -1  # -1: not recorded; with `modified`, what makes --incremental score a changed shard again
    outputs: list[str] = dataclasses.field(default_factory=list)  # scored files (in the batch) holding its records
    modified: float = -1.0  # modification time (seconds since the epoch) as the filesystem reported it; -1: not known
    sidecar: str = ""  # sidecar layout: its score sidecar, relative to the output folder (maybe another batch's)


@dataclasses.dataclass(frozen=True)
class Options:
    """The job's flags that shaped the batch."""

    store_image: str = "as_stored"
    stored_image_size: int = 64
    input_format: str = "wds"
    max_caption_chars: int = 1000
    min_image_size: int = 8
    max_image_pixels: int = 64_000_000
    # Embeddings are byte-identical between runs at the same inference batch size (pipelines/jax_inference.py).
    inference_batch_size: int = 256
    note: str = ""  # how a batch was derived, when not by the job
    output_layout: str = "copied"  # or "sidecar": scores beside the corpus, one file per input shard
    # How the corpus was read (--key_field, --image_field, --caption_field; empty: the format's defaults), so that
    # a reader of sidecars reads the input shards item for item as the job did.
    key_field: str = ""
    image_field: list[str] = dataclasses.field(default_factory=list)
    caption_field: list[str] = dataclasses.field(default_factory=list)

    def validation(self) -> ValidationOptions:
        """The decode and caption rules the batch was scored under (a reader decoding its images applies them)."""
        return ValidationOptions(self.max_image_pixels, self.min_image_size, self.max_caption_chars)

    def fields(self) -> FieldNames:
        """The corpus FieldNames the job read the input shards with."""
        default = DEFAULT_FIELDS[self.input_format]
        return FieldNames(self.key_field or default.key, tuple(self.image_field) or default.image,
                          tuple(self.caption_field) or default.caption)

    def scoring(self) -> dict[str, Any]:
        """What decides a sidecar's content besides its shard and reference: a sidecar written under other values
        is not adopted by a resumed run."""
        values = dataclasses.asdict(self)
        for name in ("store_image", "stored_image_size", "note", "output_layout"):
            values.pop(name)
        return values


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The `_MANIFEST.json` of one batch. `shards` and `dead_letter_shards` are file names inside the batch folder."""

    schema_version: int
    created: str
    reference: ReferenceInfo
    counts: Counts
    input_shards: list[InputShard]
    shards: list[str]
    dead_letter_shards: list[str]
    output_formats: list[str]
    options: Options = dataclasses.field(default_factory=Options)
    batch_dir: str = ""  # where it was read from (not stored)

    def to_json(self) -> str:
        values = dataclasses.asdict(self)
        values.pop("batch_dir")
        return json.dumps(values, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, batch_dir: str = "") -> "Manifest":
        values = json.loads(text)
        where = batch_dir or "?"
        version = values.get("schema_version")
        if version not in schema.READABLE_VERSIONS:
            raise ScoredShardsError(f"manifest in {where} has schema version {version!r}; this reader reads "
                                    f"{list(schema.READABLE_VERSIONS)} (a newer batch needs a newer jest-curation)")
        if version == 1:
            values = _upgrade_version_1(values)
        values = dict(values)
        values["reference"] = _typed(ReferenceInfo, values.get("reference", {}), where)
        values["counts"] = _typed(Counts, values.get("counts", {}), where)
        values["input_shards"] = [_typed(InputShard, shard, where) for shard in values.get("input_shards", [])]
        values["options"] = _typed(Options, values.get("options", {}), where)
        return _typed(cls, {**values, "batch_dir": batch_dir}, where)

    @property
    def reference_fingerprint(self) -> str:
        return self.reference.fingerprint

    def done_input_shards(self) -> list[str]:
        return [shard.path for shard in self.input_shards if shard.status == DONE]

    def shard_paths(self, format: str = "parquet") -> list[str]:
        suffix = _SUFFIX[format]
        return [posixpath.join(self.batch_dir, name) for name in self.shards if name.endswith(suffix)]

    @property
    def output(self) -> str:
        """The output folder the batch is in."""
        return posixpath.dirname(self.batch_dir.rstrip("/"))

    def sidecars(self) -> dict[str, str]:
        """Sidecar layout: input shard path -> the full path of its Parquet sidecar (shards done only)."""
        return {shard.path: posixpath.join(self.output, shard.sidecar) for shard in self.input_shards
                if shard.status == DONE and shard.sidecar}


def reference_from_model(id: str, fingerprint: str, config: ModelConfig, tokenizer: str, temperature: float,
                         bias: float) -> ReferenceInfo:
    """The ReferenceInfo of one of our dual-encoder checkpoints."""
    return ReferenceInfo(id=id, fingerprint=fingerprint, width=config.embed_dim, loss="sigmoid",
                         temperature=float(temperature), bias=float(bias),
                         image_preprocessing=config.preprocessing().to_dict(), text_length=config.text_length,
                         tokenizer=tokenizer, forward_flops_per_example=example_forward_flops(config),
                         model=config.to_dict())


def _upgrade_version_1(values: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest's dict in the version-2 layout (what it did not record is filled as its job did it)."""
    old = values["reference"]
    config = ModelConfig.from_dict(old["model"])
    reference = reference_from_model(old["checkpoint"], values["reference_fingerprint"], config, "unrecorded",
                                     old["t"], old["c"])
    shards = list(values["shards"])
    counts = {**values["counts"], "shards": len(values["input_shards"]), "shards_done": len(values["input_shards"])}
    return {
        "schema_version": 1, "created": values["created"], "reference": dataclasses.asdict(reference),
        "counts": counts, "input_shards": [{"path": path, "outputs": shards} for path in values["input_shards"]],
        "shards": shards, "dead_letter_shards": values["dead_letter_shards"],
        "output_formats": values["output_formats"], "options": values.get("options", {}),
    }


def new_batch_name(now: str) -> str:
    """batch-{UTC time}-{random}: sorts by time, never collides between concurrent runs."""
    return f"{BATCH_PREFIX}{now}-{uuid.uuid4().hex[:6]}"


def write_atomically(path: str, write: Callable[[Any], None]) -> str:
    """`write(f)` into a temporary `.{name}.{random}.tmp` beside `path`, then renamed to `path` (one object appears
    whole on GCS; a reader never sees it half-written); returns `path`."""
    temporary = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    with FileSystems.create(temporary) as f:
        write(f)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])
    return path


def write_manifest(batch_dir: str, manifest: Manifest) -> str:
    """Write `_MANIFEST.json` atomically (`write_atomically`)."""
    return write_atomically(posixpath.join(batch_dir, MANIFEST_NAME),
                            lambda f: f.write(manifest.to_json().encode("utf-8")))


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


def remove_unfinished(output: str, before: str, keep: Iterable[str] = ()) -> list[str]:
    """Delete the unfinished batch folders named (by time) before the batch name `before`, and the temporary files
    left in finished ones; returns what was deleted. Only safe when no run that started earlier is still writing
    to `output`: its batch folder has no manifest yet either. Sidecars a manifest lists (a resumed run adopts the
    finished sidecars of the run it resumes), and the paths in `keep`, stay: of such a folder only the rest goes."""
    cutoff = before[: len(BATCH_PREFIX) + len("YYYYmmddTHHMMSSZ")]
    kept = set(keep) | {path for manifest in read_manifests(output) for path in manifest.sidecars().values()}
    kept |= {path[: -len(_SUFFIX["parquet"])] + _SUFFIX["tfrecord"] for path in kept}  # a TFRecord twin too
    doomed: dict[str, list[str]] = {}  # file or folder -> the files under it
    for folder, paths in sorted(_batch_folders(output).items()):
        if posixpath.join(folder, MANIFEST_NAME) not in paths:
            if posixpath.basename(folder) < cutoff:
                if any(path in kept for path in paths):
                    doomed.update({path: [path] for path in paths if path not in kept})
                else:
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
        """"copied" or "sidecar"; a reader takes one layout per output (ScoredShardsError when they are mixed)."""
        layouts = {manifest.options.output_layout for manifest in self.manifests}
        if len(layouts) > 1:
            raise ScoredShardsError(f"{self.manifests[0].output} holds batches of both output layouts "
                                    f"{sorted(layouts)}; score into separate outputs")
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


def write_scored_batch(output: str, name: str, table: pa.Table, manifest: Manifest) -> str:
    """A one-shard Parquet batch `output/name` from a table of the scored schema, with its manifest (for batches
    derived outside the job); returns the batch folder."""
    batch_dir = posixpath.join(output, name)
    shard = f"{SCORED_PREFIX}-00000-of-00001{_SUFFIX['parquet']}"
    with FileSystems.create(posixpath.join(batch_dir, shard)) as f:
        pq.write_table(table, f)
    write_manifest(batch_dir, dataclasses.replace(manifest, shards=[shard], dead_letter_shards=[],
                                                  output_formats=["parquet"], batch_dir=""))
    return batch_dir


# --- Score sidecars (--output_layout sidecar) -------------------------------------------------------------------


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
    return write_atomically(path, lambda f: pq.write_table(table, f, compression=PARQUET_COMPRESSION,
                                                           row_group_size=row_group_rows))


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
            if info.reference_fingerprint == fingerprint and info.scoring == scoring:
                found[info.input_shard] = (metadata.path[len(output) + 1:], info)
    return found


def read_sidecar(path: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet score sidecar as a pyarrow Table (through FileSystems)."""
    return read_scored_parquet(path, columns)
