import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from curation.shared import errors, validation
from curation.shared.corpus import CorpusRecord
from curation.shared.errors import CorpusError
from curation.shared.validation import ValidationOptions, decode_and_validate
from models.preprocessing import ImagePreprocessing

OPTIONS = ValidationOptions(max_image_pixels=1_000_000, min_image_size=8, max_caption_chars=50)


def encoded(image: Image.Image, format: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def record(image: bytes, caption: str | bytes = "a red circle") -> CorpusRecord:
    return CorpusRecord("k1", image, caption, "shard-0.tar", {"truth": "clean"})


def reason(item) -> str:
    assert isinstance(item, CorpusError), item
    assert item.key == "k1" and item.source == "shard-0.tar" and item.message
    return item.reason


def test_a_good_record_is_decoded_to_rgb_with_its_caption_cleaned():
    image = Image.new("RGB", (20, 12), (200, 10, 30))
    item = decode_and_validate(record(encoded(image), "  a\tred\n\ncircle\x00 "), OPTIONS)
    assert item.caption == "a red circle"
    assert item.pixels.shape == (12, 20, 3) and item.pixels.dtype == np.uint8
    assert tuple(item.pixels[0, 0]) == (200, 10, 30)
    assert item.metadata == {"truth": "clean"} and item.image == encoded(image)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = Image.new(mode, (10, 10))
    format = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I;16" else "PNG"
    item = decode_and_validate(record(encoded(image, format)), OPTIONS)
    assert item.pixels.shape == (10, 10, 3)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (30, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 5, 10))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    item = decode_and_validate(record(encoded(image, "JPEG", exif=exif.tobytes(), quality=95)), OPTIONS)
    assert item.pixels.shape == (30, 10, 3)  # displayed upright: 10 wide, 30 high
    assert item.pixels[2, 5, 0] > 200 and item.pixels[-3, 5, 2] > 200  # the left strip is now on top


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (a decompression bomb's header) with no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def test_broken_images_are_dead_lettered_with_their_reason():
    jpeg = encoded(Image.new("RGB", (64, 64), (9, 200, 9)), "JPEG")
    assert reason(decode_and_validate(record(b""), OPTIONS)) == errors.EMPTY_IMAGE
    assert reason(decode_and_validate(record(b"<html>404</html>"), OPTIONS)) == errors.NOT_AN_IMAGE
    assert reason(decode_and_validate(record(np.random.default_rng(0).bytes(500)), OPTIONS)) == errors.NOT_AN_IMAGE
    assert reason(decode_and_validate(record(jpeg[: len(jpeg) // 2]), OPTIONS)) == errors.CORRUPT_IMAGE
    assert reason(decode_and_validate(record(jpeg[:40]), OPTIONS)) == errors.CORRUPT_IMAGE
    assert reason(decode_and_validate(record(png_header_only(4000, 4000)), OPTIONS)) == errors.DECOMPRESSION_BOMB
    tiny = encoded(Image.new("RGB", (7, 100)))
    assert reason(decode_and_validate(record(tiny), OPTIONS)) == errors.IMAGE_TOO_SMALL


def test_broken_captions_are_dead_lettered_before_decoding():
    image = encoded(Image.new("RGB", (10, 10)))
    for caption, expected in [
        (b"a \xff\xfe circle", errors.CAPTION_NOT_UTF8),
        (" \n\t ", errors.EMPTY_CAPTION),
        ("", errors.EMPTY_CAPTION),
        ("word " * 20, errors.CAPTION_TOO_LONG),
    ]:
        item = decode_and_validate(record(image, caption), OPTIONS)
        assert reason(item) == expected and item.stage == "caption"
    assert decode_and_validate(record(image, "é".encode("utf-8")), OPTIONS).caption == "é"
    # The caption is checked first: a record with both problems is dead-lettered for its caption.
    assert reason(decode_and_validate(record(b"", ""), OPTIONS)) == errors.EMPTY_CAPTION


def test_resize_and_reencode():
    pixels = np.zeros((40, 20, 3), np.uint8)
    assert ImagePreprocessing(16).resize_pixels(pixels).shape == (16, 16, 3)
    with Image.open(io.BytesIO(validation.encode_jpeg(pixels, 24))) as image:
        assert image.size == (24, 24) and image.format == "JPEG"


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped():
    ramp = np.linspace(0, 65535, 10 * 40).reshape(10, 40).astype(np.uint16)  # I;16
    for format in ("PNG", "TIFF"):
        item = decode_and_validate(record(encoded(Image.fromarray(ramp), format)), OPTIONS)
        np.testing.assert_array_equal(item.pixels[..., 0], ramp >> 8, err_msg=format)
        assert (item.pixels[..., 0] == item.pixels[..., 2]).all()


@pytest.mark.parametrize("format", ["GIF", "WEBP", "PNG"])
def test_an_animated_image_gives_its_first_frame(format):
    red, blue = Image.new("RGB", (16, 12), (255, 0, 0)), Image.new("RGB", (16, 12), (0, 0, 255))
    data = encoded(red, format, save_all=True, append_images=[blue], duration=50)
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames == 2
    pixels = decode_and_validate(record(data), OPTIONS).pixels
    assert pixels.shape == (12, 16, 3) and pixels[..., 0].min() > 240 and pixels[..., 2].max() < 15


def test_only_common_web_formats_are_decoded():
    # PIL would hand PostScript to Ghostscript; it and the other formats a web corpus never needs are not images.
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    assert reason(decode_and_validate(record(eps), OPTIONS)) == errors.NOT_AN_IMAGE
    for format in ("ICO", "TGA", "PPM", "PCX"):
        item = decode_and_validate(record(encoded(Image.new("RGB", (16, 16)), format)), OPTIONS)
        assert reason(item) == errors.NOT_AN_IMAGE, format
    for format in ("BMP", "TIFF", "GIF", "WEBP", "JPEG", "PNG"):
        assert decode_and_validate(record(encoded(Image.new("RGB", (16, 16)), format)), OPTIONS).pixels.shape == (
            16,
            16,
            3,
        ), format


def test_the_trainer_side_refuses_what_the_scoring_job_dead_letters():
    for caption in (b"a \xff\xfe circle", " \x00\x07\x1b ", "word " * 20, ""):
        assert validation.training_caption(caption, OPTIONS) is None, caption
    assert validation.training_caption("  a\tred\n\ncircle\x00 ", OPTIONS) == "a red circle"
    size = ImagePreprocessing(8)
    red = validation.prepare_image(encoded(Image.new("RGB", (20, 12), (255, 0, 0))), size, OPTIONS)
    assert red.shape == (8, 8, 3) and red.dtype == np.float32
    np.testing.assert_allclose(red.reshape(-1, 3), [[1.0, -1.0, -1.0]] * 64)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    for data in (b"", eps, encoded(Image.new("RGB", (7, 100))), png_header_only(4000, 4000)):
        assert validation.prepare_image(data, size, OPTIONS) is None


def scene(side: int) -> Image.Image:
    """A smooth colour ramp with a disc: enough structure for resampling differences to show."""
    y, x = np.mgrid[0:side, 0:side] / side
    pixels = np.stack([x, y, ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)], -1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def test_a_large_jpeg_is_decoded_at_the_models_size_and_resizes_alike():
    data = encoded(scene(512), "JPEG", quality=95)
    full = decode_and_validate(record(data), ValidationOptions(min_image_size=8), 0)
    reduced = decode_and_validate(record(data), ValidationOptions(min_image_size=8), 64)
    assert full.pixels.shape == (512, 512, 3) and reduced.pixels.shape == (64, 64, 3)  # libjpeg's 1/8 scale
    assert decode_and_validate(record(data), ValidationOptions(min_image_size=8), 100).pixels.shape == (
        128,
        128,
        3,
    )  # 1/4: the largest scale keeping 100 px
    model = ImagePreprocessing(32)
    difference = np.abs(model.resize_pixels(full.pixels).astype(int) - model.resize_pixels(reduced.pixels).astype(int))
    assert difference.mean() < 2.0 and difference.max() < 40, (difference.mean(), difference.max())
    # The rules are checked on the image as stored: a JPEG too small is refused whatever the target size.
    small = encoded(scene(6), "JPEG")
    assert reason(decode_and_validate(record(small), OPTIONS, 64)) == errors.IMAGE_TOO_SMALL


def test_what_is_not_a_large_jpeg_decodes_as_stored_whatever_the_size():
    for data in (encoded(scene(512), "PNG"), encoded(scene(100), "JPEG")):  # not JPEG; under twice the size
        np.testing.assert_array_equal(
            decode_and_validate(record(data), OPTIONS, 64).pixels, decode_and_validate(record(data), OPTIONS, 0).pixels
        )
