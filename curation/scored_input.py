"""Training input from scored shards: super-batches carrying the reference embeddings the scoring job stored.

The same deterministic, resumable stream as `input_pipeline.make_dataset` (seeded shard and record order, a data
position on every batch), over the Parquet shards the manifests under a scored output list. Besides the image and
tokens each example brings `ref_zimg`, `ref_ztxt` (float32 of the stored float16) and `clean` (1/0 from the demo
corpus's hidden truth, −1 when a corpus has none: analysis only, never an input to selection).
"""

from __future__ import annotations

import dataclasses
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
    ref_loss: float
    clean: int  # 1 clean, 0 noisy, −1 unknown (from metadata "truth")


def _clean_flag(metadata: str) -> int:
    try:
        truth = json.loads(metadata).get("truth") if metadata else None
    except ValueError:
        truth = None
    return -1 if truth is None else int(truth == "clean")


def read_scored_examples(path: str) -> list[ScoredExample]:
    """The rows of one scored Parquet shard, in file order."""
    table = scored_shards.read_scored_parquet(path)
    zimg = schema.embedding_matrix(table, schema.REF_IMAGE_EMBEDDING)
    ztxt = schema.embedding_matrix(table, schema.REF_TEXT_EMBEDDING)
    names = (schema.KEY, schema.IMAGE, schema.CAPTION, schema.REF_LOSS, schema.METADATA)
    keys, images, captions, losses, metadata = (table.column(name).to_pylist() for name in names)
    return [ScoredExample(keys[i], images[i], captions[i], zimg[i], ztxt[i], losses[i], _clean_flag(metadata[i]))
            for i in range(table.num_rows)]


def ref_loss_threshold(shards: list[str], keep_fraction: float) -> float:
    """The stored own-pair reference loss at or under which the easiest `keep_fraction` of examples lie (offline
    filtering, DataComp's CLIP-score filter); inf keeps everything."""
    if keep_fraction >= 1.0:
        return float("inf")
    losses = np.concatenate([scored_shards.read_scored_parquet(path, [schema.REF_LOSS]).column(schema.REF_LOSS)
                             .to_numpy() for path in shards])
    keep = offline_filter(-losses, keep_fraction)  # higher score = easier = lower loss
    if not keep.any():
        raise ValueError(f"keep fraction {keep_fraction} keeps none of {len(losses)} examples")
    return float(losses[keep].max())


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
    max_ref_loss: float = float("inf"),
    preprocessing: ImagePreprocessing | None = None,
    validation: ValidationOptions | None = None,
) -> tf.data.Dataset:
    """Batches {"image", "tokens", "position", "ref_zimg": [B, d] f32, "ref_ztxt": [B, d] f32, "clean": [B] i32}.

    Images are decoded by the scoring job's rules (`validation`: pass the batch's own, `scored_shards.Options.
    validation()`, so that nothing it scored is refused here) and resized as `preprocessing` declares. Examples
    with a stored reference loss over `max_ref_loss` are skipped (offline filtering) and counted as skipped like
    unreadable records.
    """
    signature = {"ref_zimg": tf.TensorSpec([embed_dim], tf.float32), "ref_ztxt": tf.TensorSpec([embed_dim], tf.float32),
                 "clean": tf.TensorSpec([], tf.int32)}

    def examples():
        for item, position in record_stream(shards, "parquet", seed, start, reader=read_scored_examples):
            if item.ref_loss > max_ref_loss:
                yield None, None, position, {}
                continue
            extras = {"ref_zimg": item.ref_zimg.astype(np.float32), "ref_ztxt": item.ref_ztxt.astype(np.float32),
                      "clean": np.int32(item.clean)}
            yield item.image, tokenizer.encode(item.caption, text_length), position, extras

    return decoded_batches(examples, signature, batch_size=batch_size, image_size=image_size, text_length=text_length,
                           preprocessing=preprocessing, validation=validation)
