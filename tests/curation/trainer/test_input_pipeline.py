import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus
from curation.shared.corpus_writers import open_shard_writer
from curation.shared.validation import prepare_image
from curation.trainer.input_pipeline import DataPosition, load_examples, make_dataset, record_caption, split_shards
from models.preprocessing import ImagePreprocessing
from models.tokenizer import ByteTokenizer


def _dataset(corpus, batch_size, start=DataPosition(), seed=0, processes=0):
    shards, format = split_shards(corpus, "web")
    return make_dataset(
        shards,
        format,
        ByteTokenizer(),
        batch_size=batch_size,
        image_size=32,
        text_length=24,
        seed=seed,
        start=start,
        processes=processes,
    ).as_numpy_iterator()


def test_one_epoch_delivers_every_usable_record_once_and_counts_the_rest(tiny_corpus):
    shards, format = split_shards(tiny_corpus, "web")
    assert format == "wds" and len(shards) == 3
    items = list(iter_corpus([s for s in shards], format))
    usable = [
        item
        for item in items
        if record_caption(item) is not None and prepare_image(item.image, ImagePreprocessing(32)) is not None
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
    expected = {ByteTokenizer().encode(record_caption(item), 24).tobytes() for item in usable}
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


def test_worker_processes_give_the_batches_threads_give(tiny_corpus):
    """Decoding in 2 worker processes changes nothing in the stream: the same images, tokens and positions, in
    order, across shard and epoch boundaries; a damaged image is skipped alike."""
    threads = _dataset(tiny_corpus, batch_size=32, seed=2)
    processes = _dataset(tiny_corpus, batch_size=32, seed=2, processes=2)
    for _ in range(9):  # about 1.2 epochs
        expected, got = next(threads), next(processes)
        for name in ("image", "tokens", "position"):
            np.testing.assert_array_equal(got[name], expected[name])
    assert DataPosition.from_array(got["position"][-1]).epoch == 1


def test_batches_have_static_shapes_and_normalized_pixels(tiny_corpus):
    batch = next(_dataset(tiny_corpus, batch_size=8))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (8, 24) and batch["tokens"].dtype == np.int32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.05


def _encoded(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    """A 16x16 JPEG, red strip on its left, whose EXIF Orientation 6 says "rotate 90° clockwise to display"."""
    image = Image.new("RGB", (16, 16), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(image, "JPEG", exif=exif.tobytes(), quality=95)


@pytest.fixture
def rule_corpus(tmp_path):
    """A one-shard corpus: two records the scoring job accepts, four it dead-letters."""
    square = _encoded(Image.new("RGB", (16, 16), (0, 200, 0)))
    records = [
        CorpusRecord("rotated", _rotated_jpeg(), "a rotated photo", "web/00000.tar"),
        CorpusRecord("good", square, "  a  green\tsquare\x00 ", "web/00000.tar"),
        CorpusRecord(
            "eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n", "a drawing", "web/00000.tar"
        ),
        CorpusRecord("too_long", square, "word " * 250, "web/00000.tar"),  # 1249 characters after cleanup
        CorpusRecord("control_only", square, "\x00\x07\x1b\x7f", "web/00000.tar"),
        CorpusRecord("not_utf8", square, b"a \xff\xfe square", "web/00000.tar"),
    ]
    os.makedirs(tmp_path / "web")
    with open_shard_writer(str(tmp_path / "web" / "00000.tar"), "wds") as writer:
        for record in records:
            writer.write(record)
    return str(tmp_path)


def _upright_rotated_pixels() -> np.ndarray:
    """What the rotated JPEG shows: its stored pixels turned 90° clockwise, normalized to [-1, 1]."""
    with Image.open(io.BytesIO(_rotated_jpeg())) as image:
        stored = np.asarray(image.convert("RGB"))  # [16, 16, 3], EXIF not applied
    upright = np.rot90(stored, k=-1)
    assert upright[1, 8, 0] > 200 and upright[-2, 8, 2] > 200  # the left strip is now on top
    return upright.astype(np.float32) / 127.5 - 1.0


def test_load_examples_applies_the_scoring_jobs_rules(rule_corpus):
    examples = load_examples(rule_corpus, "web", 16)
    assert [caption for _, caption, _ in examples] == ["a rotated photo", "a green square"]  # cleaned; rest skipped
    np.testing.assert_allclose(examples[0][0], _upright_rotated_pixels(), atol=1e-6)
    assert examples[1][0].shape == (16, 16, 3) and examples[1][0].dtype == np.float32


def test_make_dataset_applies_the_scoring_jobs_rules(rule_corpus):
    shards, format = split_shards(rule_corpus, "web")
    dataset = make_dataset(shards, format, ByteTokenizer(), batch_size=1, image_size=16, text_length=24, seed=0)
    delivered = {}
    for batch in dataset.as_numpy_iterator():
        if DataPosition.from_array(batch["position"][-1]).epoch > 0:
            break
        delivered[batch["tokens"][0].tobytes()] = batch["image"][0]
    tokenizer = ByteTokenizer()
    rotated, good = (tokenizer.encode(caption, 24).tobytes() for caption in ("a rotated photo", "a green square"))
    assert set(delivered) == {rotated, good}  # one epoch: the eps, too long, control-only and non-UTF-8 are skipped
    np.testing.assert_allclose(delivered[rotated], _upright_rotated_pixels(), atol=1e-6)


def test_a_models_preprocessing_is_used_and_must_match_the_image_size(rule_corpus):
    crop = ImagePreprocessing(8, "crop", mean=(0.0,) * 3, std=(255.0,) * 3)
    examples = load_examples(rule_corpus, "web", 8, preprocessing=crop)
    assert examples[1][0].shape == (8, 8, 3)
    np.testing.assert_allclose(examples[1][0][0, 0], [0.0, 200 / 255, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="image_size 16 differs from the preprocessing's size 8"):
        load_examples(rule_corpus, "web", 16, preprocessing=crop)


def test_split_format_comes_from_the_splits_file(tiny_corpus):
    with open(os.path.join(tiny_corpus, "_SPLITS.json")) as f:
        assert json.load(f)["format"] == split_shards(tiny_corpus, "curated")[1]


def test_a_stream_with_no_usable_example_raises_instead_of_looping(tmp_path):
    from curation.shared.corpus import CorpusRecord
    from curation.shared.corpus_writers import open_shard_writer
    from curation.trainer import input_pipeline
    from models.tokenizer import ByteTokenizer

    path = str(tmp_path / "00000.tar")
    with open_shard_writer(path, "wds") as writer:
        for index in range(5):
            writer.write(CorpusRecord(f"k{index}", b"<html>not an image</html>", "a caption", path))
    dataset = input_pipeline.make_dataset(
        [path], "wds", ByteTokenizer(), batch_size=2, image_size=16, text_length=8, seed=0
    )
    with pytest.raises(Exception, match="no usable example"):
        next(dataset.as_numpy_iterator())
