import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from models.preprocessing import ImagePreprocessing
from models.two_towers import ModelConfig

CLIP = ImagePreprocessing(
    16,
    "crop",
    mean=tuple(255 * v for v in (0.48145466, 0.4578275, 0.40821073)),
    std=tuple(255 * v for v in (0.26862954, 0.26130258, 0.27577711)),
)


def test_crop_takes_the_centred_square_of_a_wide_image():
    pixels = np.zeros((16, 48, 3), np.uint8)  # the shorter side is already 16: nothing is resampled
    pixels[..., 0] = np.arange(48, dtype=np.uint8)[None, :]  # red = column index
    cropped = ImagePreprocessing(16, "crop").resize_pixels(pixels)
    assert cropped.shape == (16, 16, 3)
    np.testing.assert_array_equal(cropped[0, :, 0], np.arange(16, 32))  # columns 16..31 of 48


def test_crop_resizes_the_shorter_side_then_crops_a_tall_image():
    pixels = np.zeros((64, 32, 3), np.uint8)  # H 64, W 32 -> 32 x 16 -> rows 8..23 of it = rows 16..47 here
    pixels[16:48] = 200
    cropped = ImagePreprocessing(16, "crop").resize_pixels(pixels)
    assert cropped.shape == (16, 16, 3)
    assert (cropped[1:-1] == 200).all()  # the band, except where bilinear blends in its neighbours at the edges
    squashed = ImagePreprocessing(16).resize_pixels(pixels)
    assert (squashed[0] == 0).all() and (squashed[-1] == 0).all()  # squashing keeps the whole height


def test_crop_offsets_follow_clip():
    # 25 x 10 to size 4: the longer side is int(4 * 25 / 10) = 10, the crop starts at round((10 - 4) / 2) = 3.
    pixels = np.random.default_rng(0).integers(0, 256, (10, 25, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(pixels).resize((10, 4), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(ImagePreprocessing(4, "crop").resize_pixels(pixels), resized[:, 3:7])


def test_resize_is_a_no_op_at_the_model_size():
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for mode in ("squash", "crop"):
        assert ImagePreprocessing(16, mode).resize_pixels(pixels) is pixels
    assert ImagePreprocessing(8).resize_pixels(pixels).shape == (8, 8, 3)


def test_default_normalization_maps_pixels_to_minus_one_one():
    pixels = np.array([[0, 127, 255]], np.uint8).reshape(1, 1, 3)
    out = ImagePreprocessing(1).normalize(pixels)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-1.0, 127 / 127.5 - 1, 1.0], rtol=1e-6)


@pytest.mark.parametrize("preprocessing", [ImagePreprocessing(16), CLIP], ids=["default", "clip"])
def test_normalize_in_numpy_and_under_jit_agree(preprocessing):
    pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    expected = preprocessing.normalize(pixels)
    got = jax.jit(lambda p: preprocessing.normalize(p, xp=jnp))(pixels)
    assert got.dtype == jnp.float32 and got.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_dict_round_trip_and_refusals():
    assert ImagePreprocessing.from_dict(json.loads(json.dumps(CLIP.to_dict()))) == CLIP
    with pytest.raises(ValueError, match="unknown keys.*'sharpen'"):
        ImagePreprocessing.from_dict({"size": 16, "sharpen": True})
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        ImagePreprocessing.from_dict({"size": 16, "interpolation": "lanczos"})
    with pytest.raises(ValueError, match="unknown resize mode 'pad'"):
        ImagePreprocessing.from_dict({"size": 16, "resize": "pad"})
    with pytest.raises(ValueError, match="one value per RGB channel"):
        ImagePreprocessing(16, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="std must be positive"):
        ImagePreprocessing(16, std=(1.0, 0.0, 1.0))


def test_the_model_declares_what_it_does_today():
    assert ModelConfig(image_size=32).preprocessing() == ImagePreprocessing(32, "squash", (127.5,) * 3, (127.5,) * 3)
