"""The scored-shard contract: what the scoring job (`pipelines/score.py`) writes and the trainer reads.

An output directory holds one folder per scoring batch (a run of the job), each with its own manifest:

    OUTPUT/batch-20261126T101500Z-3f9a/
        scored-00000-of-00004.parquet     scored examples (the columns of curation/shared/schema.py)
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
the atomic writes' `.NAME.HEX.tmp` (the manifest's, and a sidecar's in `sidecars/`), which `remove_unfinished` also
deletes. Files go through Beam's `FileSystems`, so `gs://` outputs read like
local ones.

The manifest is typed (`Manifest` and the records it holds). Version 2 added the reference's loss family,
preprocessing, width and FLOPs, shard counts, and each input shard's status and output files; a version-1
manifest is read by filling those from what it recorded (its reference was always one of our sigmoid checkpoints,
and any of its output files may hold an input shard's records). The shard columns did not change.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Any

from curation.shared import schema
from curation.shared.corpus import DEFAULT_FIELDS, FieldNames
from curation.shared.validation import ValidationOptions
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
# Parquet as the job writes it: zstd, and row groups large enough for scans (docs/scored_output.md).
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
        return FieldNames(
            self.key_field or default.key,
            tuple(self.image_field) or default.image,
            tuple(self.caption_field) or default.caption,
        )

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
            raise ScoredShardsError(
                f"manifest in {where} has schema version {version!r}; this reader reads "
                f"{list(schema.READABLE_VERSIONS)} (a newer batch needs a newer jest-curation)"
            )
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
        return {
            shard.path: posixpath.join(self.output, shard.sidecar)
            for shard in self.input_shards
            if shard.status == DONE and shard.sidecar
        }


def reference_from_model(
    id: str, fingerprint: str, config: ModelConfig, tokenizer: str, temperature: float, bias: float
) -> ReferenceInfo:
    """The ReferenceInfo of one of our dual-encoder checkpoints."""
    return ReferenceInfo(
        id=id,
        fingerprint=fingerprint,
        width=config.embed_dim,
        loss="sigmoid",
        temperature=float(temperature),
        bias=float(bias),
        image_preprocessing=config.preprocessing().to_dict(),
        text_length=config.text_length,
        tokenizer=tokenizer,
        forward_flops_per_example=example_forward_flops(config),
        model=config.to_dict(),
    )


def _upgrade_version_1(values: dict[str, Any]) -> dict[str, Any]:
    """A version-1 manifest's dict in the version-2 layout (what it did not record is filled as its job did it)."""
    old = values["reference"]
    config = ModelConfig.from_dict(old["model"])
    reference = reference_from_model(
        old["checkpoint"], values["reference_fingerprint"], config, "unrecorded", old["t"], old["c"]
    )
    shards = list(values["shards"])
    counts = {**values["counts"], "shards": len(values["input_shards"]), "shards_done": len(values["input_shards"])}
    return {
        "schema_version": 1,
        "created": values["created"],
        "reference": dataclasses.asdict(reference),
        "counts": counts,
        "input_shards": [{"path": path, "outputs": shards} for path in values["input_shards"]],
        "shards": shards,
        "dead_letter_shards": values["dead_letter_shards"],
        "output_formats": values["output_formats"],
        "options": values.get("options", {}),
    }
