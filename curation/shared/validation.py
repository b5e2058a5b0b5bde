"""The record rules both halves apply: decode an image and clean a caption, or say why not.

The scoring job (`pipelines/score.py`) dead-letters a record that fails them, with the reason from
`curation.shared.errors`; the trainer (`curation/trainer/input_pipeline.py`) skips the same records, so a learner never
trains on an example its reference refused. Resizing and normalization are the model's own (`models.preprocessing`).
Pure functions, no Beam.
"""

from __future__ import annotations

import dataclasses
import io
import re
import unicodedata
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from curation.shared.corpus import CorpusRecord
from curation.shared.errors import (
    CAPTION,
    CAPTION_NOT_UTF8,
    CAPTION_TOO_LONG,
    CORRUPT_IMAGE,
    DECODE,
    DECOMPRESSION_BOMB,
    EMPTY_CAPTION,
    EMPTY_IMAGE,
    IMAGE_TOO_SMALL,
    NOT_AN_IMAGE,
    CorpusError,
)
from models.preprocessing import ImagePreprocessing

# The only decoders PIL may use. PIL knows ~40 formats; some run external programs (EPS: Ghostscript) or are rarely
# exercised parsers, and a web corpus has no business needing them. Anything else is "not an image".
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # "I": 16-bit PNGs in some PIL versions


@dataclasses.dataclass(frozen=True)
class ValidationOptions:
    max_image_pixels: int = 64_000_000
    min_image_size: int = 8
    max_caption_chars: int = 1000


@dataclasses.dataclass(frozen=True)
class ValidExample:
    """A record that passed validation: decoded RGB pixels beside the bytes as stored."""

    key: str
    source: str
    caption: str  # cleaned
    image: bytes  # as stored
    pixels: np.ndarray  # [H, W, 3] uint8, EXIF orientation applied
    metadata: dict[str, Any]
    index: int = -1  # the record's place in its shard and the shard's item count (see CorpusRecord)
    shard_items: int = 0
    model_pixels: np.ndarray | None = None  # [S, S, 3] uint8 as a model's preprocessing resized them, when asked


_WHITESPACE = re.compile(r"\s+")
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


def has_image_signature(data: bytes) -> bool:
    """Whether the bytes start like a JPEG, PNG, GIF, WebP, BMP or TIFF file (damaged or not)."""
    return data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def clean_caption(caption: str) -> str:
    """NFC-normalized, control characters dropped, whitespace runs collapsed to one space, stripped."""
    caption = unicodedata.normalize("NFC", caption)
    caption = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in caption)
    return _WHITESPACE.sub(" ", caption).strip()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel; alpha is dropped. 16-bit grey is scaled to 8 bits: PIL's own conversion clips it
    at 255, so most of a 16-bit image would come out white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, np.int64), 0, 65535) >> 8  # [H, W]
        image = Image.fromarray(values.astype(np.uint8))
    return image.convert("RGB")


_OBJECT_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


def _message(error: BaseException) -> str:
    """The error as a dead-letter message, without object addresses (PIL names the BytesIO it read), so that two
    runs over the same data write the same messages."""
    return f"{type(error).__name__}: {_OBJECT_REPR.sub('', str(error))}"


def decode_image(data: bytes, options: ValidationOptions, size: int = 0) -> np.ndarray | tuple[str, str]:
    """[H, W, 3] uint8 RGB with EXIF orientation applied (an animated image: its first frame), or (reason,
    message). Only IMAGE_FORMATS are decoded. With `size`, a JPEG at least twice as large on both sides is decoded
    already scaled down by 2, 4 or 8 (libjpeg's DCT scaling, PIL's draft mode) as far as both sides stay at or
    above `size`: what a model resizing to `size` needs, at a fraction of the decoding work.

    The pixel cap is the lower of `options.max_image_pixels` and PIL's own `Image.MAX_IMAGE_PIXELS`, checked on the
    header before any pixel is decoded. (No warnings filter turns PIL's bomb warning into an error: filters are
    process-wide, and the trainer decodes on a thread pool.)
    """
    if not data:
        return EMPTY_IMAGE, "image has 0 bytes"
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as error:  # over twice PIL's limit
        return DECOMPRESSION_BOMB, str(error)
    except Exception as error:  # PIL raises UnidentifiedImageError and others for bytes it cannot parse
        reason = CORRUPT_IMAGE if has_image_signature(data) else NOT_AN_IMAGE
        return reason, _message(error)
    max_pixels = min(options.max_image_pixels, Image.MAX_IMAGE_PIXELS or options.max_image_pixels)
    with image:
        width, height = image.size
        if width * height > max_pixels:
            return DECOMPRESSION_BOMB, f"{width}x{height} is over {max_pixels} pixels"
        if min(width, height) < options.min_image_size:
            return IMAGE_TOO_SMALL, f"{width}x{height} has a side under {options.min_image_size} px"
        try:
            if size and image.format == "JPEG" and min(width, height) >= 2 * size:
                image.draft(None, (size, size))
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except Exception as error:  # truncated data, bad Huffman tables, broken PNG chunks ...
            return CORRUPT_IMAGE, _message(error)
    return np.asarray(rgb, np.uint8)


def validate_caption(caption: str | bytes, options: ValidationOptions) -> str | tuple[str, str]:
    """The cleaned caption, or (reason, message)."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as error:
            return CAPTION_NOT_UTF8, str(error)
    cleaned = clean_caption(caption)
    if not cleaned:
        return EMPTY_CAPTION, f"caption {caption[:40]!r} is empty after cleanup"
    if len(cleaned) > options.max_caption_chars:
        return CAPTION_TOO_LONG, f"{len(cleaned)} characters, over {options.max_caption_chars}"
    return cleaned


def decode_and_validate(record: CorpusRecord, options: ValidationOptions, size: int = 0) -> ValidExample | CorpusError:
    """The record decoded and checked, or a CorpusError with stage "caption" or "decode" (caption checked first:
    it is cheap, and a record with a bad caption need not be decoded). `size`: see `decode_image` (the rules are
    checked on the image as stored)."""
    place = dict(index=record.index, shard_items=record.shard_items)
    caption = validate_caption(record.caption, options)
    if isinstance(caption, tuple):
        return CorpusError(record.key, record.source, *caption, stage=CAPTION, **place)
    pixels = decode_image(record.image, options, size)
    if isinstance(pixels, tuple):
        return CorpusError(record.key, record.source, *pixels, stage=DECODE, **place)
    return ValidExample(record.key, record.source, caption, record.image, pixels, dict(record.metadata), **place)


def encode_jpeg(pixels: np.ndarray, size: int, quality: int = 90) -> bytes:
    """Re-encode squashed to `size`x`size` (for --store_image=resized)."""
    buffer = io.BytesIO()
    Image.fromarray(ImagePreprocessing(size).resize_pixels(pixels)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# The trainer's side: the same rules, with a refused record as None (it is skipped, not dead-lettered).


def training_caption(caption: str | bytes, options: ValidationOptions = ValidationOptions()) -> str | None:
    """The cleaned caption to tokenize, or None where the scoring job would dead-letter the record."""
    cleaned = validate_caption(caption, options)
    return None if isinstance(cleaned, tuple) else cleaned


def decode_pixels(
    data: bytes, preprocessing: ImagePreprocessing, options: ValidationOptions = ValidationOptions()
) -> np.ndarray | None:
    """Encoded image -> [S, S, 3] uint8 as `preprocessing` resizes it, or None where the scoring job would
    dead-letter it."""
    pixels = decode_image(data, options, preprocessing.size)
    if isinstance(pixels, tuple):
        return None
    return preprocessing.resize_pixels(pixels)


def prepare_image(
    data: bytes, preprocessing: ImagePreprocessing, options: ValidationOptions = ValidationOptions()
) -> np.ndarray | None:
    """Encoded image -> [S, S, 3] float32 as `preprocessing` declares, or None where the scoring job would
    dead-letter it."""
    pixels = decode_pixels(data, preprocessing, options)
    return None if pixels is None else preprocessing.normalize(pixels)
