"""Training input from scored shards: super-batches carrying the reference embeddings the scoring job stored.

The same deterministic, resumable stream as `input_pipeline.make_dataset` (seeded shard and record order, a data
position on every batch), over the Parquet shards the manifests under a scored output list. Besides the image and
tokens each example brings `ref_zimg`, `ref_ztxt` (float32 of the stored float16) and `clean` (1/0 from the demo
corpus's hidden truth, −1 when a corpus has none: analysis only, never an input to selection).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import tensorflow as tf

from curation import schema, scored_shards
from curation.input_pipeline import DataPosition, decoded_batches, record_stream
from curation.preprocess import ValidationOptions
from curation.selection import offline_filter
from models.preprocessing import ImagePreprocessing


@dataclasses.dataclass(frozen=True)
class ScoredExample:
    key: str
    image: bytes
    caption: str
    ref_zimg: np.ndarray  # [d] float16
    ref_ztxt: np.ndarray  # [d] float16
    difficulty: float  # for the reference: its own-pair loss, or −cosine for a softmax reference (lower: easier)
    clean: int  # 1 clean, 0 noisy, −1 unknown (from metadata "truth")


def _clean_flag(metadata: str) -> int:
    try:
        truth = json.loads(metadata).get("truth") if metadata else None
    except ValueError:
        truth = None
    return -1 if truth is None else int(truth == "clean")


def _difficulty(table, loss_family: str) -> np.ndarray:
    """[n] how hard each example is for the reference, lower is easier: the stored own-pair loss of a sigmoid
    reference; minus the stored cosine of a softmax (CLIP) one, which has no per-example loss (DataComp's CLIP
    score). For a sigmoid reference the two order examples alike (the loss falls as the cosine rises, t > 0)."""
    if loss_family == "softmax":
        return -table.column(schema.REF_COSINE).to_numpy().astype(np.float64)
    return table.column(schema.REF_LOSS).to_numpy(zero_copy_only=False).astype(np.float64)


def read_scored_examples(path: str, loss_family: str = "sigmoid") -> list[ScoredExample]:
    """The rows of one scored Parquet shard, in file order."""
    table = scored_shards.read_scored_parquet(path)
    zimg = schema.embedding_matrix(table, schema.REF_IMAGE_EMBEDDING)
    ztxt = schema.embedding_matrix(table, schema.REF_TEXT_EMBEDDING)
    names = (schema.KEY, schema.IMAGE, schema.CAPTION, schema.METADATA)
    keys, images, captions, metadata = (table.column(name).to_pylist() for name in names)
    difficulty = _difficulty(table, loss_family)
    return [ScoredExample(keys[i], images[i], captions[i], zimg[i], ztxt[i], float(difficulty[i]),
                          _clean_flag(metadata[i])) for i in range(table.num_rows)]


def difficulty_threshold(shards: list[str], keep_fraction: float, loss_family: str = "sigmoid") -> float:
    """The difficulty (`_difficulty`) at or under which the easiest `keep_fraction` of examples lie (offline
    filtering, DataComp's CLIP-score filter); inf keeps everything."""
    if keep_fraction >= 1.0:
        return float("inf")
    column = schema.REF_COSINE if loss_family == "softmax" else schema.REF_LOSS
    difficulty = np.concatenate([_difficulty(scored_shards.read_scored_parquet(path, [column]), loss_family)
                                 for path in shards])
    keep = offline_filter(-difficulty, keep_fraction)  # higher score = easier
    if not keep.any():
        raise ValueError(f"keep fraction {keep_fraction} keeps none of {len(difficulty)} examples")
    return float(difficulty[keep].max())


def make_scored_dataset(
    shards: list[str],
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
) -> tf.data.Dataset:
    """Batches {"image", "tokens", "position", "ref_zimg": [B, d] f32, "ref_ztxt": [B, d] f32, "clean": [B] i32}.

    Images are decoded by the scoring job's rules (`validation`: pass the batch's own, `scored_shards.Options.
    validation()`, so that nothing it scored is refused here) and resized as `preprocessing` declares. Examples
    harder for the reference than `max_difficulty` (`difficulty_threshold`, under the reference's `loss_family`)
    are skipped (offline filtering) and counted as skipped like unreadable records.
    """
    signature = {"ref_zimg": tf.TensorSpec([embed_dim], tf.float32), "ref_ztxt": tf.TensorSpec([embed_dim], tf.float32),
                 "clean": tf.TensorSpec([], tf.int32)}

    def examples():
        reader = functools.partial(read_scored_examples, loss_family=loss_family)
        for item, position in record_stream(shards, "parquet", seed, start, reader=reader):
            if item.difficulty > max_difficulty:
                yield None, None, position, {}
                continue
            extras = {"ref_zimg": item.ref_zimg.astype(np.float32), "ref_ztxt": item.ref_ztxt.astype(np.float32),
                      "clean": np.int32(item.clean)}
            yield item.image, tokenizer.encode(item.caption, text_length), position, extras

    return decoded_batches(examples, signature, batch_size=batch_size, image_size=image_size, text_length=text_length,
                           preprocessing=preprocessing, validation=validation)
