"""Training input: a deterministic, resumable tf.data pipeline over the corpus readers.

Order: each epoch visits the shards in a seeded permutation, and the records of each shard in a seeded permutation,
so the stream is a pure function of (seed, position). Every batch carries the position just after its last example;
a run restored from a checkpoint restarts the stream there and sees exactly the batches an uninterrupted run would.
Decoding and resizing run on a thread pool and tf.data prefetches the batches; broken records (undecodable
images, empty or non-UTF-8 captions, read errors) are skipped and counted: skipped = raw records consumed −
examples delivered.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import posixpath
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from PIL import Image

from curation.corpus import CorpusRecord, match_shards, read_shard

tf.config.set_visible_devices([], "GPU")  # tf.data only: accelerators belong to JAX

_EXTENSIONS = {".tar": "wds", ".parquet": "parquet", ".tfrecord": "tfrecord"}
MAX_IMAGE_PIXELS = 64_000_000


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: epoch, index into that epoch's shard order, records of that shard consumed, and
    raw records consumed in total."""

    epoch: int = 0
    shard: int = 0
    record: int = 0
    raw_seen: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_array(cls, values) -> "DataPosition":
        return cls(*(int(v) for v in values))


def split_shards(corpus_dir: str, split: str) -> tuple[list[str], str]:
    """Shard paths of a split and their format (from `_SPLITS.json` when present, else from the extension)."""
    format = None
    splits_file = posixpath.join(corpus_dir, "_SPLITS.json")
    if FileSystems.exists(splits_file):
        with FileSystems.open(splits_file) as f:
            format = json.loads(f.read().decode("utf-8")).get("format")
    shards = [path for path in match_shards(posixpath.join(corpus_dir, split, "*")) if not path.endswith(".json")]
    if format is None:
        formats = {_EXTENSIONS.get(posixpath.splitext(path)[1]) for path in shards}
        if len(formats) != 1 or None in formats:
            raise ValueError(f"cannot tell the corpus format of {corpus_dir}/{split} from {sorted(formats, key=str)}")
        format = formats.pop()
    return shards, format


def caption_ok(caption: str | bytes) -> bool:
    return isinstance(caption, str) and bool(caption.strip())


def has_usable_caption(item) -> bool:
    """A record (not a read error) whose caption is non-empty UTF-8 text."""
    return isinstance(item, CorpusRecord) and caption_ok(item.caption)


def decode_image(data: bytes, size: int) -> np.ndarray | None:
    """Encoded image -> [size, size, 3] float32 in [-1, 1], or None when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                return None
            image = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(image, np.float32) / 127.5 - 1.0
    except Exception:  # any decoder failure means a broken record, which the trainer skips
        return None


def record_stream(shards: list[str], format: str, seed: int, start: DataPosition,
                  reader: Callable[[str], list] | None = None) -> Iterator[tuple[object, tuple]]:
    """Endless (item, position after it) in the seeded order, from `start`. `reader(path)` gives a shard's items
    (default: the corpus parser for `format`)."""
    reader = reader or (lambda path: list(read_shard(path, format)))
    epoch, first_shard, first_record, raw_seen = start.epoch, start.shard, start.record, start.raw_seen
    while True:
        shard_order = np.random.default_rng([seed, epoch]).permutation(len(shards))
        for shard_index in range(first_shard, len(shards)):
            shard = int(shard_order[shard_index])
            items = reader(shards[shard])
            record_order = np.random.default_rng([seed, epoch, shard]).permutation(len(items))
            for record_index in range(first_record, len(items)):
                raw_seen += 1
                yield items[record_order[record_index]], (epoch, shard_index, record_index + 1, raw_seen)
            first_record = 0
        first_shard = 0
        epoch += 1


def make_dataset(
    shards: list[str],
    format: str,
    tokenizer,
    *,
    batch_size: int,
    image_size: int,
    text_length: int,
    seed: int,
    start: DataPosition = DataPosition(),
) -> tf.data.Dataset:
    """Batches {"image": [B, S, S, 3] f32, "tokens": [B, L] i32, "position": [B, 4] i64} from `start` on."""

    def examples():
        for item, position in record_stream(shards, format, seed, start):
            if has_usable_caption(item):
                yield item.image, tokenizer.encode(item.caption, text_length), position, {}
            else:
                yield None, None, position, {}

    return decoded_batches(examples, {}, batch_size=batch_size, image_size=image_size, text_length=text_length)


def decoded_batches(examples: Callable[[], Iterator[tuple]], extra_signature: dict[str, tf.TensorSpec], *,
                    batch_size: int, image_size: int, text_length: int, workers: int = 2) -> tf.data.Dataset:
    """Batches of decoded examples from `examples()`, which yields (image bytes, tokens, position, extras): image
    bytes None for a record to skip, extras a dict matching `extra_signature`.

    Images are decoded and resized by a pool of `workers` threads (PIL releases the GIL while decoding), a batch's
    worth at a time, and batches are assembled in Python: per-example tf.data overhead would cost more than the
    decoding. Undecodable images are skipped; they show up as raw records consumed without an example delivered.
    A batch's `position` rows are the stream positions just after each of its examples.
    """
    names = ["image", "tokens", "position", *extra_signature]

    def generate():
        ready: list[tuple] = []  # decoded examples not yet batched: (image, tokens, position, *extras)
        group: list[tuple] = []
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for image_bytes, tokens, position, extras in examples():
                if image_bytes is not None:
                    group.append((image_bytes, tokens, np.asarray(position, np.int64),
                                  *(extras[name] for name in extra_signature)))
                if len(group) < batch_size:
                    continue
                images = pool.map(lambda item: decode_image(item[0], image_size), group)
                ready.extend((image, *item[1:]) for image, item in zip(images, group) if image is not None)
                group = []
                while len(ready) >= batch_size:
                    batch, ready = ready[:batch_size], ready[batch_size:]
                    yield {name: np.stack([example[i] for example in batch]) for i, name in enumerate(names)}

    signature = {
        "image": tf.TensorSpec([batch_size, image_size, image_size, 3], tf.float32),
        "tokens": tf.TensorSpec([batch_size, text_length], tf.int32),
        "position": tf.TensorSpec([batch_size, 4], tf.int64),
        **{name: tf.TensorSpec([batch_size, *spec.shape], spec.dtype) for name, spec in extra_signature.items()},
    }
    # No autotuning: nothing here is tuned by it, and its background thread made deleting the iterator at the end of
    # a run block for 15-60 s.
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_generator(generate, output_signature=signature).prefetch(2).with_options(options)


def load_examples(corpus_dir: str, split: str, image_size: int, limit: int = 0) -> list[tuple[np.ndarray, str, dict]]:
    """Decoded (image, caption, metadata) of the readable records of a split, in file order (for evaluation)."""
    shards, format = split_shards(corpus_dir, split)
    examples = []
    for path in shards:
        for item in read_shard(path, format):
            if has_usable_caption(item):
                image = decode_image(item.image, image_size)
                if image is not None:
                    examples.append((image, item.caption, item.metadata))
                    if limit and len(examples) >= limit:
                        return examples
    return examples
