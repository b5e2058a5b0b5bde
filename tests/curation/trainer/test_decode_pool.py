import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from curation.shared.validation import ValidationOptions, decode_pixels
from curation.trainer import configs, decode_pool
from curation.trainer.decode_pool import DecodePool
from curation.trainer.workdir import other_config, write_run_config
from models.preprocessing import ImagePreprocessing
from tests.curation.trainer.test_input_pipeline import _dataset

RULES = (ImagePreprocessing(32), ValidationOptions())


def _jpegs(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(buffer, "JPEG")
        images.append(buffer.getvalue())
    return images


@pytest.mark.parametrize("processes", [0, 2])
def test_an_image_seen_again_comes_from_the_cache_with_the_same_pixels(processes):
    images = _jpegs(6) + [b"not an image"]
    with DecodePool(*RULES, processes=processes) as pool:
        first = pool.map(images)
        again = pool.map(images[::-1] + images[:2])
        assert pool.decoded == len(images)  # the second call decoded nothing
    assert first[-1] is None and again[0] is None  # a refused image stays refused
    for data, pixels in zip(images[::-1] + images[:2], again):
        expected = decode_pixels(data, *RULES)
        assert (pixels is None) == (expected is None)
        if expected is not None:
            np.testing.assert_array_equal(pixels, expected)
            assert not pixels.flags.writeable  # shared between batches: nobody may change it


def test_the_cache_holds_no_more_than_its_size_and_zero_turns_it_off():
    images = _jpegs(8)
    entry = len(images[0]) + 32 * 32 * 3
    with DecodePool(*RULES, cache_bytes=3 * entry + 3 * 400) as pool:
        pool.map(images)
        pool.map(images)
        assert 0 < pool.cached_bytes <= pool.cache_bytes
        assert len(images) < pool.decoded < 2 * len(images)  # some came from the cache, the rest were decoded again
    with DecodePool(*RULES, cache_bytes=0) as pool:
        pool.map(images)
        pool.map(images)
        assert pool.decoded == 2 * len(images) and pool.cached_bytes == 0


def test_the_training_stream_over_several_epochs_is_the_same_without_the_cache(tiny_corpus, monkeypatch):
    """Three epochs of the tiny corpus's web split (the cache serves the second and third): every batch equals the
    one decoded afresh."""
    batches = 3 * 240 // 32
    cached = [next(stream) for stream in [_dataset(tiny_corpus, batch_size=32, seed=4)] for _ in range(batches)]
    monkeypatch.setattr(decode_pool, "CACHE_BYTES", 0)
    fresh = _dataset(tiny_corpus, batch_size=32, seed=4)
    assert int(cached[-1]["position"][-1][0]) >= 2  # the stream reached its third epoch
    for expected in cached:
        got = next(fresh)
        for name in ("image", "tokens", "position"):
            np.testing.assert_array_equal(got[name], expected[name])


def test_the_cache_size_may_change_when_a_run_resumes(tmp_path):
    config = configs.get_config("uniform", smoke=True)
    write_run_config(str(tmp_path), config, None)
    assert other_config(dataclasses.replace(config, decode_cache_mb=0), str(tmp_path), None) == ""
    assert "seed" in other_config(dataclasses.replace(config, seed=config.seed + 1), str(tmp_path), None)
