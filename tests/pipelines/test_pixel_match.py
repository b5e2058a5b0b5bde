"""The pixel signal of near-duplicate detection: thumbnails, candidate vectors and the windowed correlation."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from curation.shared import thumbnails
from pipelines import pixel_match


def picture(seed: int, size: int = 96) -> Image.Image:
    """A photo-like test image: smooth random colours with a few shapes on top."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB")
    image = coarse.resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size - 30, 2)
        w, h = rng.integers(12, 30, 2)
        draw.ellipse((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def thumb(image: Image.Image) -> np.ndarray:
    return thumbnails.make_thumbnail(np.asarray(image.convert("RGB")))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


COPIES = {
    "jpeg q40": lambda im: jpeg(im, 40),
    "resize 50%": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC),
    "crop 4% a side": lambda im: im.crop((4, 4, im.width - 4, im.height - 4)),
    "crop 5% one side": lambda im: im.crop((0, 0, im.width - 5, im.height)),
    "mirror": ImageOps.mirror,
    "brightness +10%": lambda im: ImageEnhance.Brightness(im).enhance(1.1),
    "contrast -10%": lambda im: ImageEnhance.Contrast(im).enhance(0.9),
}


def test_a_thumbnail_is_16_by_16_rgb_and_round_trips_through_bytes():
    made = thumb(picture(0, size=57))
    assert made.shape == (thumbnails.SIZE, thumbnails.SIZE, 3) and made.dtype == np.uint8
    data = thumbnails.to_bytes(made)
    assert len(data) == thumbnails.BYTES and np.array_equal(thumbnails.from_bytes(data), made)
    with pytest.raises(ValueError, match="768 bytes"):
        thumbnails.from_bytes(data[:-1])


@pytest.mark.parametrize("kind", sorted(COPIES))
def test_a_copy_is_a_candidate_and_similar_and_a_distinct_image_is_neither(kind):
    for seed in range(3):
        source = picture(seed)
        copy = COPIES[kind](source)
        a, b = thumb(source), thumb(copy)
        assert pixel_match.candidate_vector(a) @ pixel_match.candidate_vector(b) >= pixel_match.CANDIDATE_COSINE
        assert pixel_match.similarity(a, b) >= 0.9, (kind, seed)
        other = thumb(picture(seed + 100))
        assert pixel_match.similarity(a, other) < 0.7


def test_the_candidate_vector_ignores_a_mirror_and_the_similarity_is_symmetric_and_one_for_itself():
    a, b = thumb(picture(1)), thumb(picture(2))
    np.testing.assert_allclose(pixel_match.candidate_vector(a), pixel_match.candidate_vector(a[:, ::-1]), atol=1e-6)
    assert np.linalg.norm(pixel_match.candidate_vector(a)) == pytest.approx(1.0)
    assert pixel_match.similarity(a, a) == pytest.approx(1.0, abs=1e-5)
    assert pixel_match.similarity(a, b) == pytest.approx(pixel_match.similarity(b, a))
    # best_matches is one direction of similarity; both directions together are similarity
    one_way = pixel_match.best_matches(a, b[None])[0]
    other_way = pixel_match.best_matches(b, a[None])[0]
    assert max(one_way, other_way) == pytest.approx(pixel_match.similarity(a, b), abs=1e-5)
    others = np.stack([b, a, a[:, ::-1]])
    np.testing.assert_allclose(
        pixel_match.similarities(a, others), [pixel_match.similarity(a, other) for other in others], atol=1e-5
    )


def test_flat_images_match_only_flat_images_of_about_their_colour():
    grey = np.full((16, 16, 3), 120, np.uint8)
    assert pixel_match.similarity(grey, grey + 5) == 1.0
    assert pixel_match.similarity(grey, grey + 30) == 0.0
    assert pixel_match.similarity(grey, thumb(picture(3))) == 0.0
    assert not pixel_match.candidate_vector(grey).any()
    assert pixel_match.best_matches(thumb(picture(3)), np.stack([grey, thumb(picture(3))])).tolist()[0] == 0.0


def test_one_layout_on_another_background_grey_or_with_other_contrast_is_not_a_copy():
    """The correlation alone ignores brightness and contrast: a shape on a light grey and the same shape on a dark
    grey correlate perfectly. Beyond a near-duplicate's ~10% change, the colours must agree."""

    def scene(background: int, shape: tuple[int, int, int]) -> np.ndarray:
        image = Image.new("RGB", (64, 64), (background,) * 3)
        ImageDraw.Draw(image).ellipse((16, 16, 48, 48), fill=shape)
        return thumb(image)

    light, dark = scene(200, (230, 230, 230)), scene(60, (90, 90, 90))  # the same pattern, 140 levels darker
    assert float(pixel_match.candidate_vector(light) @ pixel_match.candidate_vector(dark)) > 0.99
    assert pixel_match.similarity(light, dark) == 0.0
    flatter = scene(200, (215, 215, 215))  # half the contrast
    assert pixel_match.similarity(light, flatter) == 0.0
    assert not pixel_match.colours_agree(light, np.stack([dark, flatter])).any()
    brighter = thumb(ImageEnhance.Brightness(Image.fromarray(dark)).enhance(1.1))
    assert pixel_match.similarity(dark, brighter) > 0.98
    to_dark, to_itself = pixel_match.best_matches(light, np.stack([dark, light]))
    assert to_dark == 0.0 and to_itself > 0.999
