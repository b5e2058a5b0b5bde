"""The dead letter's vocabulary: what went wrong with a record, at which stage, spelled once for both halves.

A record either continues or becomes a `CorpusError` (key, source, stage, reason, message). The scoring job writes
them to its dead-letter shards and counts them per reason; the trainer skips the same records for the same reasons.
"""

from __future__ import annotations

import dataclasses

# Stages, in the order a record meets them.
READ, CAPTION, DECODE, EMBED = "read", "caption", "decode", "embed"

# Reasons of the read stage: what cannot become a record.
MISSING_IMAGE = "missing_image"  # a sample or row has a caption but no image bytes
MISSING_CAPTION = "missing_caption"  # ... or an image but no caption
DUPLICATE_KEY = "duplicate_key"  # a key seen before in the same shard
CORRUPT_RECORD = "corrupt_record"  # a TFRecord frame with a bad CRC, or data that is not a tf.train.Example
TRUNCATED_SHARD = "truncated_shard"  # the file ends early: records before the break were emitted
UNREADABLE_SHARD = "unreadable_shard"  # not a tar / Parquet file, no image or caption column, or unreadable past a row
READ_REASONS = (MISSING_IMAGE, MISSING_CAPTION, DUPLICATE_KEY, CORRUPT_RECORD, TRUNCATED_SHARD, UNREADABLE_SHARD)

# Reasons of the caption stage.
CAPTION_NOT_UTF8 = "caption_not_utf8"
EMPTY_CAPTION = "empty_caption"  # nothing left after whitespace cleanup
CAPTION_TOO_LONG = "caption_too_long"  # more than --max_caption_chars after cleanup
CAPTION_REASONS = (CAPTION_NOT_UTF8, EMPTY_CAPTION, CAPTION_TOO_LONG)

# Reasons of the decode stage.
EMPTY_IMAGE = "empty_image"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # no allowed image decoder recognizes the bytes (HTML, EPS, random bytes, ...)
CORRUPT_IMAGE = "corrupt_image"  # recognized but cannot be decoded: truncated or damaged data
DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than --max_image_pixels
IMAGE_TOO_SMALL = "image_too_small"  # a side shorter than --min_image_size
DECODE_REASONS = (EMPTY_IMAGE, NOT_AN_IMAGE, CORRUPT_IMAGE, DECOMPRESSION_BOMB, IMAGE_TOO_SMALL)

# Reasons of the embed stage.
NON_FINITE_EMBEDDING = "non_finite_embedding"  # NaN or Inf from the model
EMBED_REASONS = (NON_FINITE_EMBEDDING,)

REASONS = {READ: READ_REASONS, CAPTION: CAPTION_REASONS, DECODE: DECODE_REASONS, EMBED: EMBED_REASONS}


@dataclasses.dataclass(frozen=True)
class CorpusError:
    """A record that goes to the dead letter instead of on: key, source, stage, reason, message."""

    key: str  # the sample's key, or the shard stem for shard-level problems
    source: str
    reason: str  # one of REASONS[stage]
    message: str
    stage: str = READ
    # Its place in its shard's read order (`corpus.read_shard`) and the shard's item count: a score sidecar's row.
    index: int = dataclasses.field(default=-1, compare=False)
    shard_items: int = dataclasses.field(default=0, compare=False)


class CorpusReadError(RuntimeError):
    """Raised by `iter_corpus(..., errors="raise")` on the first `CorpusError`."""

    def __init__(self, error: CorpusError):
        super().__init__(f"{error.source}: {error.reason} ({error.key}): {error.message}")
        self.error = error
