import json
import os

import numpy as np

from curation.corpus import CorpusRecord, iter_corpus
from curation.input_pipeline import DataPosition, caption_ok, decode_image, make_dataset, split_shards
from models.tokenizer import ByteTokenizer


def _dataset(corpus, batch_size, start=DataPosition(), seed=0):
    shards, format = split_shards(corpus, "web")
    return make_dataset(shards, format, ByteTokenizer(), batch_size=batch_size, image_size=32, text_length=24,
                        seed=seed, start=start).as_numpy_iterator()


def test_one_epoch_delivers_every_usable_record_once_and_counts_the_rest(tiny_corpus):
    shards, format = split_shards(tiny_corpus, "web")
    assert format == "wds" and len(shards) == 3
    items = list(iter_corpus([s for s in shards], format))
    usable = [
        item for item in items
        if isinstance(item, CorpusRecord) and caption_ok(item.caption) and decode_image(item.image, 32) is not None
    ]
    assert 0 < len(usable) < len(items)  # the web split has broken records
    delivered, last = [], None
    for batch in _dataset(tiny_corpus, batch_size=1):
        last = DataPosition.from_array(batch["position"][-1])
        if last.epoch > 0 or last.raw_seen > len(items):
            break
        delivered.append(batch["tokens"][0].tobytes())
        if last.raw_seen == len(items):
            break
    assert last.raw_seen == len(items)
    expected = {ByteTokenizer().encode(item.caption, 24).tobytes() for item in usable}
    assert len(delivered) == len(usable)
    assert set(delivered) == expected
    assert len(items) - len(delivered) == len(items) - len(usable)  # skipped = raw - delivered


def test_restarting_at_a_batch_position_continues_the_same_stream(tiny_corpus):
    stream = _dataset(tiny_corpus, batch_size=16, seed=5)
    batches = [next(stream) for _ in range(20)]  # crosses shard and epoch boundaries (~230 usable per epoch)
    assert DataPosition.from_array(batches[-1]["position"][-1]).epoch >= 1
    resume_at = DataPosition.from_array(batches[7]["position"][-1])
    resumed = _dataset(tiny_corpus, batch_size=16, start=resume_at, seed=5)
    for expected in batches[8:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], expected["tokens"])
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["position"], expected["position"])


def test_batches_have_static_shapes_and_normalized_pixels(tiny_corpus):
    batch = next(_dataset(tiny_corpus, batch_size=8))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (8, 24) and batch["tokens"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.05


def test_decode_image_rejects_broken_bytes():
    assert decode_image(b"", 32) is None
    assert decode_image(b"not an image at all", 32) is None
    assert not caption_ok("   ") and not caption_ok(b"\xff") and caption_ok("a red circle")


def test_split_format_comes_from_the_splits_file(tiny_corpus):
    with open(os.path.join(tiny_corpus, "_SPLITS.json")) as f:
        assert json.load(f)["format"] == split_shards(tiny_corpus, "curated")[1]
