"""The scoring job and the trainer apply one set of rules: what the reference embedded offline is what the trainer
feeds a model online, and what one side refuses the other refuses too."""

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.shared import errors, schema, scored_set
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_writers import open_shard_writer
from curation.trainer import input_pipeline, scored_input
from models import checkpoint
from models.two_towers import TwoTower
from pipelines import score

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke showpage\n%%EOF\n"


def jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    """A JPEG whose content tells left from right and top from bottom (so a rotation shows)."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1).astype(np.uint8)
    pixels[: height // 3, : width // 3] = (255, 255, 255)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation  # EXIF Orientation: 6 = stored sideways, shown rotated 90° clockwise
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    return buffer.getvalue()


GOOD = {
    "rotated": (jpeg(40, 24, orientation=6), "a sideways photo"),
    "wide": (jpeg(64, 20), "a wide picture of a gradient"),
    "square": (jpeg(32, 32), "a square  one\twith odd\u00a0spacing"),
}
REFUSED = {  # key -> (image, caption, dead-letter reason of the scoring job)
    "eps": (EPS, "an EPS file", errors.NOT_AN_IMAGE),
    "long": (jpeg(32, 32), "word " * 300, errors.CAPTION_TOO_LONG),
    "control": (jpeg(32, 32), "\x00\x07\x1b", errors.EMPTY_CAPTION),
}


@pytest.fixture(scope="module")
def corpus_and_batch(tmp_path_factory, reference_checkpoint):
    root = tmp_path_factory.mktemp("both_halves")
    shard = str(root / "corpus" / "00000.tar")
    with open_shard_writer(shard, "wds") as writer:
        for key, (image, caption, *_) in {**GOOD, **REFUSED}.items():
            writer.write(CorpusRecord(key, image, caption, shard))
    summary = score.run(
        [
            f"--input={shard}",
            f"--output={root / 'scored'}",
            f"--reference_checkpoint={reference_checkpoint}",
            "--min_image_size=8",
        ]
    )
    return shard, scored_set.open_scored(str(root / "scored")), summary


def test_an_eps_file_is_one_pil_would_open():
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # so only the allow-list keeps it out, on both sides


def test_the_scoring_job_refuses_what_it_should(corpus_and_batch):
    _, scored, summary = corpus_and_batch
    (manifest,) = scored.manifests
    dead = pq.read_table(f"{manifest.batch_dir}/{manifest.dead_letter_shards[0]}").to_pylist()
    assert {row[schema.KEY]: row[schema.REASON] for row in dead} == {k: v[2] for k, v in REFUSED.items()}
    assert summary["scored"] == len(GOOD)


def test_stored_bytes_through_the_trainer_give_back_the_stored_embeddings(corpus_and_batch, reference_checkpoint):
    _, scored, _ = corpus_and_batch
    reference = checkpoint.restore(reference_checkpoint)
    config = reference.config
    dataset = scored_input.make_scored_dataset(
        scored.shard_paths(),
        reference.tokenizer,
        batch_size=len(GOOD),
        image_size=config.image_size,
        text_length=config.text_length,
        embed_dim=scored.embed_dim,
        seed=0,
        preprocessing=config.preprocessing(),
    )
    batch = next(dataset.as_numpy_iterator())
    zimg, ztxt, _ = TwoTower(config).apply({"params": reference.params}, batch["image"], batch["tokens"])
    # float16 keeps 11 significant bits: |x − fp16(x)| ≤ 2^-11 |x|, and every |x| ≤ 1 here.
    np.testing.assert_allclose(np.asarray(zimg), batch["ref_zimg"], rtol=0, atol=2**-11)
    np.testing.assert_allclose(np.asarray(ztxt), batch["ref_ztxt"], rtol=0, atol=2**-11)

    # Without EXIF orientation the rotated photo would have been another image to the model.
    rows = {row[schema.KEY]: row for path in scored.shard_paths() for row in pq.read_table(path).to_pylist()}
    sideways = (
        Image.open(io.BytesIO(rows["rotated"][schema.IMAGE]))
        .convert("RGB")
        .resize((config.image_size, config.image_size), Image.Resampling.BILINEAR)
    )
    unrotated = config.preprocessing().normalize(np.asarray(sideways))[None]
    wrong, _, _ = TwoTower(config).apply({"params": reference.params}, unrotated, None)
    stored = np.asarray(rows["rotated"][schema.REF_IMAGE_EMBEDDING], np.float32)
    assert np.abs(np.asarray(wrong)[0] - stored).max() > 50 * 2**-11


def test_the_trainer_refuses_on_the_raw_corpus_what_the_scoring_job_refused(corpus_and_batch, reference_checkpoint):
    shard, scored, _ = corpus_and_batch
    config = checkpoint.restore(reference_checkpoint).config
    tokenizer = checkpoint.restore(reference_checkpoint).tokenizer
    common = dict(batch_size=len(GOOD), image_size=config.image_size, text_length=config.text_length, seed=0)
    raw = next(input_pipeline.make_dataset([shard], "wds", tokenizer, **common).as_numpy_iterator())
    from_scored = next(
        scored_input.make_scored_dataset(
            scored.shard_paths(), tokenizer, embed_dim=scored.embed_dim, **common
        ).as_numpy_iterator()
    )
    # The first batch, all from the first pass over the shard, holds exactly the records the job scored ...
    assert all(position[0] == 0 for position in raw["position"])
    by_pixels = lambda batch: sorted(image.tobytes() for image in batch["image"])  # noqa: E731
    assert by_pixels(raw) == by_pixels(from_scored)
    # ... and it tokenized their cleaned captions, as the job stored them.
    assert sorted(map(tuple, raw["tokens"])) == sorted(map(tuple, from_scored["tokens"]))
    assert "a square one with odd spacing" in {
        row[schema.CAPTION] for path in scored.shard_paths() for row in pq.read_table(path).to_pylist()
    }
