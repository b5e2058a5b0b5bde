"""Training input from scored shards: super-batches carrying the reference embeddings the scoring job stored.

The same deterministic, resumable stream as `input_pipeline.make_dataset` (seeded shard and record order, a data
position on every batch), over the Parquet shards the manifests under a scored output list, or (sidecar layout)
over the input shards of the corpus, each read together with its score sidecar. Besides the image and
tokens each example brings `ref_zimg`, `ref_ztxt` (float32 of the stored float16), `truth` (the demo corpus's
hidden truth as a `curation.trainer.truth` code, −1 when a corpus has none) and `bucket` (its difficulty and frequency
buckets, packed: `truth.bucket_code`): analysis only, never an input to selection.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import tensorflow as tf

from curation.shared import schema, scored_set, sidecars
from curation.shared.corpus import CorpusRecord, FieldNames
from curation.shared.corpus_readers import read_shard
from curation.shared.manifest import ScoredShardsError
from curation.shared.validation import ValidationOptions
from curation.trainer.input_pipeline import DataPosition, decoded_batches, record_stream
from curation.trainer.selection import offline_filter
from curation.trainer.truth import clean_flag, hidden_codes
from models.preprocessing import ImagePreprocessing


@dataclasses.dataclass(frozen=True)
class ScoredExample:
    key: str
    image: bytes
    caption: str
    ref_zimg: np.ndarray  # [d] float16
    ref_ztxt: np.ndarray  # [d] float16
    difficulty: float  # for the reference: its own-pair loss, or −cosine for a softmax reference (lower: easier)
    truth: int  # the metadata's hidden truth as a code (`curation.trainer.truth`), −1 when it has none
    bucket: int  # its difficulty and frequency buckets, packed (`truth.bucket_code`)

    @property
    def clean(self) -> int:
        """1 clean, 0 noisy, −1 unknown."""
        return clean_flag(self.truth)


def _difficulty(table, loss_family: str) -> np.ndarray:
    """[n] how hard each example is for the reference, lower is easier: the stored own-pair loss of a sigmoid
    reference; minus the stored cosine of a softmax (CLIP) one, which has no per-example loss (DataComp's CLIP
    score). For a sigmoid reference the two order examples alike (the loss falls as the cosine rises, t > 0)."""
    if loss_family == "softmax":
        return -table.column(schema.REF_COSINE).to_numpy(zero_copy_only=False).astype(np.float64)
    return table.column(schema.REF_LOSS).to_numpy(zero_copy_only=False).astype(np.float64)


def read_scored_examples(path: str, loss_family: str = "sigmoid") -> list[ScoredExample]:
    """The rows of one scored Parquet shard, in file order."""
    table = scored_set.read_scored_parquet(path)
    zimg = schema.embedding_matrix(table, schema.REF_IMAGE_EMBEDDING)
    ztxt = schema.embedding_matrix(table, schema.REF_TEXT_EMBEDDING)
    names = (schema.KEY, schema.IMAGE, schema.CAPTION, schema.METADATA)
    keys, images, captions, metadata = (table.column(name).to_pylist() for name in names)
    difficulty = _difficulty(table, loss_family)
    return [
        ScoredExample(
            keys[i], images[i], captions[i], zimg[i], ztxt[i], float(difficulty[i]), *hidden_codes(metadata[i])
        )
        for i in range(table.num_rows)
    ]


@dataclasses.dataclass(frozen=True)
class SidecarShard:
    """An input shard of the corpus and its score sidecar, read together (the sidecar layout): what the scoring job
    read from the shard, item for item, as it read it."""

    corpus: str
    sidecar: str
    format: str
    fields: FieldNames


def read_sidecar_examples(shard: SidecarShard, loss_family: str = "sigmoid") -> list[ScoredExample | None]:
    """The items of an input shard, in its order, as ScoredExamples with the sidecar's scores; None for an item its
    sidecar dead-lettered. Raises ScoredShardsError naming the shard when the two do not line up (a row count or a
    key that differs: the shard changed after it was scored)."""
    items = list(read_shard(shard.corpus, shard.format, shard.fields))
    table = sidecars.read_sidecar(shard.sidecar)
    if table.num_rows != len(items):
        raise ScoredShardsError(
            f"{shard.corpus} gives {len(items)} items but its sidecar {shard.sidecar} has {table.num_rows} rows: the "
            "shard changed after it was scored; score it again (python -m pipelines.score --incremental)"
        )
    keys = table.column(schema.KEY).to_pylist()
    for index, (item, key) in enumerate(zip(items, keys)):
        if item.key != key:
            raise ScoredShardsError(
                f"item {index} of {shard.corpus} has key {item.key!r} but row {index} of its sidecar {shard.sidecar} "
                f"has {key!r}: the shard changed after it was scored; score it again"
            )
    zimg, present = schema.sidecar_embeddings(table, schema.REF_IMAGE_EMBEDDING)
    ztxt, _ = schema.sidecar_embeddings(table, schema.REF_TEXT_EMBEDDING)
    captions = table.column(schema.CAPTION).to_pylist()
    difficulty = _difficulty(table, loss_family)
    return [
        ScoredExample(
            items[i].key,
            items[i].image,
            captions[i],
            zimg[i],
            ztxt[i],
            float(difficulty[i]),
            *hidden_codes(items[i].metadata),
        )
        if present[i] and isinstance(items[i], CorpusRecord)
        else None
        for i in range(len(items))
    ]


def _scores_path(shard: str | SidecarShard) -> str:
    return shard.sidecar if isinstance(shard, SidecarShard) else shard


def read_examples(
    shard: str | SidecarShard, loss_family: str = "sigmoid", left_out: dict[str, np.ndarray] | None = None
) -> list[ScoredExample | None]:
    """The examples of a scored Parquet shard, or of an input shard and its sidecar; None for a row `left_out`
    (scored file -> [rows] bool, `dedup_output.Dedup.left_out`) marks, as for a dead-lettered one."""
    if isinstance(shard, SidecarShard):
        examples = read_sidecar_examples(shard, loss_family)
    else:
        examples = read_scored_examples(shard, loss_family)
    mask = None if left_out is None else left_out[_scores_path(shard)]
    if mask is not None:
        examples = [None if out else example for example, out in zip(examples, mask)]
    return examples


def difficulty_threshold(
    shards: list[str | SidecarShard],
    keep_fraction: float,
    loss_family: str = "sigmoid",
    left_out: dict[str, np.ndarray] | None = None,
) -> float:
    """The difficulty (`_difficulty`) at or under which the easiest `keep_fraction` of examples lie (offline
    filtering, DataComp's CLIP-score filter); inf keeps everything. Dead-lettered rows of sidecars, and the rows
    `left_out` marks (deduplication), do not count."""
    if keep_fraction >= 1.0:
        return float("inf")
    column = schema.REF_COSINE if loss_family == "softmax" else schema.REF_LOSS
    parts = []
    for shard in shards:
        values = _difficulty(scored_set.read_scored_parquet(_scores_path(shard), [column]), loss_family)
        parts.append(values if left_out is None else values[~left_out[_scores_path(shard)]])
    difficulty = np.concatenate(parts)
    difficulty = difficulty[np.isfinite(difficulty)]
    keep = offline_filter(-difficulty, keep_fraction)  # higher score = easier
    if not keep.any():
        raise ValueError(f"keep fraction {keep_fraction} keeps none of {len(difficulty)} examples")
    return float(difficulty[keep].max())


def make_scored_dataset(
    shards: list[str | SidecarShard],
    tokenizer,
    *,
    batch_size: int,
    image_size: int,
    text_length: int,
    embed_dim: int,
    seed: int,
    start: DataPosition = DataPosition(),
    max_difficulty: float = float("inf"),
    loss_family: str = "sigmoid",
    preprocessing: ImagePreprocessing | None = None,
    validation: ValidationOptions | None = None,
    processes: int = 0,
    left_out: dict[str, np.ndarray] | None = None,
    cache_bytes: int | None = None,
) -> tf.data.Dataset:
    """Batches {"image", "tokens", "position", "ref_zimg": [B, d] f32, "ref_ztxt": [B, d] f32, "truth": [B] i32,
    "bucket": [B] i32}.

    Images are decoded by the scoring job's rules (`validation`: pass the batch's own, `Options.
    validation()`, so that nothing it scored is refused here) and resized as `preprocessing` declares. Examples
    harder for the reference than `max_difficulty` (`difficulty_threshold`, under the reference's `loss_family`)
    are skipped (offline filtering) and counted as skipped like unreadable records, as are the rows `left_out`
    marks (deduplication: `read_examples`). `processes` > 0 decodes in that many worker processes; up to
    `cache_bytes` of decoded images are kept for later passes (`decode_pool`).
    """
    signature = {
        "ref_zimg": tf.TensorSpec([embed_dim], tf.float32),
        "ref_ztxt": tf.TensorSpec([embed_dim], tf.float32),
        "truth": tf.TensorSpec([], tf.int32),
        "bucket": tf.TensorSpec([], tf.int32),
    }

    def examples():
        reader = functools.partial(read_examples, loss_family=loss_family, left_out=left_out)
        for item, position in record_stream(shards, "parquet", seed, start, reader=reader):
            if item is None or item.difficulty > max_difficulty:  # dead-lettered (a sidecar's row), or filtered
                yield None, None, position, {}
                continue
            extras = {
                "ref_zimg": item.ref_zimg.astype(np.float32),
                "ref_ztxt": item.ref_ztxt.astype(np.float32),
                "truth": np.int32(item.truth),
                "bucket": np.int32(item.bucket),
            }
            yield item.image, tokenizer.encode(item.caption, text_length), position, extras

    return decoded_batches(
        examples,
        signature,
        batch_size=batch_size,
        image_size=image_size,
        text_length=text_length,
        preprocessing=preprocessing,
        validation=validation,
        processes=processes,
        cache_bytes=cache_bytes,
    )
