"""Training input: a deterministic, resumable tf.data pipeline over the corpus readers.

Order: each epoch visits the shards in a seeded permutation, and the records of each shard in a seeded permutation,
so the stream is a pure function of (seed, position). Every batch carries the position just after its last example;
a run restored from a checkpoint restarts the stream there and sees exactly the batches an uninterrupted run would.
Decoding and resizing run on a thread pool or in worker processes (`decode_pool`), and tf.data prefetches the
batches. A record is decoded, its caption cleaned and its image resized and normalized by the rules the scoring job
applies (`curation.shared.validation`, with the model's `ImagePreprocessing`); what the scoring job would dead-letter,
and read errors, are skipped and counted: skipped = raw records consumed − examples delivered.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from curation.shared.corpus import CorpusRecord, match_shards
from curation.shared.corpus_readers import read_shard
from curation.shared.validation import ValidationOptions, prepare_image, training_caption
from curation.trainer.decode_pool import DecodePool
from models.environment import keep_tensorflow_off_accelerators
from models.preprocessing import ImagePreprocessing

keep_tensorflow_off_accelerators()

_EXTENSIONS = {".tar": "wds", ".parquet": "parquet", ".tfrecord": "tfrecord"}


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


def record_caption(item, validation: ValidationOptions | None = None) -> str | None:
    """The cleaned caption of a record (not a read error), or None where the scoring job would refuse it."""
    if not isinstance(item, CorpusRecord):
        return None
    return training_caption(item.caption, validation or ValidationOptions())


def _image_preprocessing(image_size: int, preprocessing: ImagePreprocessing | None) -> ImagePreprocessing:
    """`preprocessing` (the model's), checked against `image_size`; None: squash to `image_size`, [-1, 1]."""
    if preprocessing is None:
        return ImagePreprocessing(image_size)
    if preprocessing.size != image_size:
        raise ValueError(f"image_size {image_size} differs from the preprocessing's size {preprocessing.size}")
    return preprocessing


def record_stream(
    shards: list[str], format: str, seed: int, start: DataPosition, reader: Callable[[str], list] | None = None
) -> Iterator[tuple[object, tuple]]:
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
    preprocessing: ImagePreprocessing | None = None,
    validation: ValidationOptions | None = None,
    processes: int = 0,
    cache_bytes: int | None = None,
) -> tf.data.Dataset:
    """Batches {"image": [B, S, S, 3] f32, "tokens": [B, L] i32, "position": [B, 4] i64} from `start` on: images
    as `preprocessing` declares (default: squashed to `image_size`, in [-1, 1]), tokens of the cleaned caption.
    `processes` > 0 decodes in that many worker processes, keeping up to `cache_bytes` decoded (`decoded_batches`)."""

    def examples():
        for item, position in record_stream(shards, format, seed, start):
            caption = record_caption(item, validation)
            if caption is not None:
                yield item.image, tokenizer.encode(caption, text_length), position, {}
            else:
                yield None, None, position, {}

    return decoded_batches(
        examples,
        {},
        batch_size=batch_size,
        image_size=image_size,
        text_length=text_length,
        preprocessing=preprocessing,
        validation=validation,
        processes=processes,
        cache_bytes=cache_bytes,
    )


class NoUsableExamples(ValueError):
    """The shards give no example a model could train on: the stream would never yield a batch."""


def decoded_batches(
    examples: Callable[[], Iterator[tuple]],
    extra_signature: dict[str, tf.TensorSpec],
    *,
    batch_size: int,
    image_size: int,
    text_length: int,
    workers: int = 2,
    processes: int = 0,
    cache_bytes: int | None = None,
    preprocessing: ImagePreprocessing | None = None,
    validation: ValidationOptions | None = None,
) -> tf.data.Dataset:
    """Batches of decoded examples from `examples()`, which yields (image bytes, tokens, position, extras): image
    bytes None for a record to skip, extras a dict matching `extra_signature`.

    Images are decoded and resized (`preprocess.decode_pixels`, as `preprocess.prepare_image` does) a batch's worth
    at a time, by `workers` threads or, with `processes` > 0, by that many worker processes (`decode_pool`, which
    keeps up to `cache_bytes` of decoded images: None, its default; 0, none); each
    batch is normalized at once and assembled in Python: per-example tf.data overhead would cost more than the
    decoding. Images the scoring job would refuse are skipped; they show
    up as raw records consumed without an example delivered. A batch's `position` rows are the stream positions
    just after each of its examples.
    """
    preprocessing = _image_preprocessing(image_size, preprocessing)
    validation = validation or ValidationOptions()
    names = ["image", "tokens", "position", *extra_signature]

    def generate():
        ready: list[tuple] = []  # decoded examples not yet batched: (image, tokens, position, *extras)
        group: list[tuple] = []
        first_epoch = last_good_epoch = None  # the stream's first epoch, and that of its last usable example
        with DecodePool(
            preprocessing, validation, threads=workers, processes=processes, cache_bytes=cache_bytes
        ) as pool:
            for image_bytes, tokens, position, extras in examples():
                first_epoch = position[0] if first_epoch is None else first_epoch
                if position[0] - (first_epoch if last_good_epoch is None else last_good_epoch) >= 2:
                    raise NoUsableExamples(
                        f"a whole pass over the shards gave no usable example (epoch {position[0]}, {position[3]} "
                        "records read): every record was refused by the decode and caption rules or filtered out"
                    )
                if image_bytes is not None:
                    group.append(
                        (
                            image_bytes,
                            tokens,
                            np.asarray(position, np.int64),
                            *(extras[name] for name in extra_signature),
                        )
                    )
                if len(group) < batch_size:
                    continue
                images = pool.map([item[0] for item in group])
                decoded = [(image, *item[1:]) for image, item in zip(images, group) if image is not None]
                if decoded:
                    last_good_epoch = int(decoded[-1][2][0])
                ready.extend(decoded)
                group = []
                while len(ready) >= batch_size:
                    batch, ready = ready[:batch_size], ready[batch_size:]
                    arrays = {name: np.stack([example[i] for example in batch]) for i, name in enumerate(names)}
                    arrays["image"] = preprocessing.normalize(arrays["image"])
                    yield arrays

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


def load_examples(
    corpus_dir: str,
    split: str,
    image_size: int,
    limit: int = 0,
    *,
    preprocessing: ImagePreprocessing | None = None,
    validation: ValidationOptions | None = None,
) -> list[tuple[np.ndarray, str, dict]]:
    """(image [S, S, 3] f32, cleaned caption, metadata) of the records of a split the scoring job would accept, in
    file order (for evaluation)."""
    preprocessing = _image_preprocessing(image_size, preprocessing)
    validation = validation or ValidationOptions()
    shards, format = split_shards(corpus_dir, split)
    examples = []
    for path in shards:
        for item in read_shard(path, format):
            caption = record_caption(item, validation)
            if caption is not None:
                image = prepare_image(item.image, preprocessing, validation)
                if image is not None:
                    examples.append((image, caption, item.metadata))
                    if limit and len(examples) >= limit:
                        return examples
    return examples
