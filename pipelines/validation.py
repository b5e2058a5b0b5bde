"""Decode and validate one corpus record: an RGB image and a clean caption, or a dead-letter entry saying why not.

Pure functions (no Beam) so that every rule is unit-testable; `pipelines/score.py` wraps them in the
DecodeAndValidate transform with a counter per reason.
"""

from __future__ import annotations

import dataclasses
import io
import re
import unicodedata
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from curation.corpus import CorpusError, CorpusRecord

# Dead-letter reasons of the decode stage ...
EMPTY_IMAGE = "empty_image"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # no image decoder recognizes the bytes (HTML, random bytes, ...)
CORRUPT_IMAGE = "corrupt_image"  # recognized but cannot be decoded: truncated or damaged data
DECOMPRESSION_BOMB = "decompression_bomb"  # more pixels than --max_image_pixels
IMAGE_TOO_SMALL = "image_too_small"  # a side shorter than --min_image_size
# ... and of the caption stage.
CAPTION_NOT_UTF8 = "caption_not_utf8"
EMPTY_CAPTION = "empty_caption"  # nothing left after whitespace cleanup
CAPTION_TOO_LONG = "caption_too_long"  # more than --max_caption_chars after cleanup
VALIDATION_REASONS = (EMPTY_IMAGE, NOT_AN_IMAGE, CORRUPT_IMAGE, DECOMPRESSION_BOMB, IMAGE_TOO_SMALL,
                      CAPTION_NOT_UTF8, EMPTY_CAPTION, CAPTION_TOO_LONG)

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


def _error(record: CorpusRecord, stage: str, reason: str, message: str) -> CorpusError:
    return CorpusError(key=record.key, source=record.source, reason=reason, message=message, stage=stage)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8 bits a channel; alpha is dropped. 16-bit grey is scaled to 8 bits: PIL's own conversion clips it
    at 255, so most of a 16-bit image would come out white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, np.int64), 0, 65535) >> 8  # [H, W]
        image = Image.fromarray(values.astype(np.uint8))
    return image.convert("RGB")


def decode_image(data: bytes, options: ValidationOptions) -> np.ndarray | tuple[str, str]:
    """[H, W, 3] uint8 RGB with EXIF orientation applied (an animated image: its first frame), or (reason,
    message). Only IMAGE_FORMATS are decoded."""
    if not data:
        return EMPTY_IMAGE, "image has 0 bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return DECOMPRESSION_BOMB, str(error)
    except Exception as error:  # PIL raises UnidentifiedImageError and others for bytes it cannot parse
        reason = CORRUPT_IMAGE if has_image_signature(data) else NOT_AN_IMAGE
        return reason, f"{type(error).__name__}: {error}"
    with image:
        width, height = image.size
        if width * height > options.max_image_pixels:
            return DECOMPRESSION_BOMB, f"{width}x{height} is over {options.max_image_pixels} pixels"
        if min(width, height) < options.min_image_size:
            return IMAGE_TOO_SMALL, f"{width}x{height} has a side under {options.min_image_size} px"
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
        except Exception as error:  # truncated data, bad Huffman tables, broken PNG chunks ...
            return CORRUPT_IMAGE, f"{type(error).__name__}: {error}"
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


def decode_and_validate(record: CorpusRecord, options: ValidationOptions) -> ValidExample | CorpusError:
    """The record decoded and checked, or a CorpusError with stage "caption" or "decode" (caption checked first:
    it is cheap, and a record with a bad caption need not be decoded)."""
    caption = validate_caption(record.caption, options)
    if isinstance(caption, tuple):
        return _error(record, "caption", *caption)
    pixels = decode_image(record.image, options)
    if isinstance(pixels, tuple):
        return _error(record, "decode", *pixels)
    return ValidExample(record.key, record.source, caption, record.image, pixels, dict(record.metadata))


def resize_pixels(pixels: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [size, size, 3] uint8, bilinear (what the trainer's input pipeline does)."""
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR), np.uint8)


def encode_jpeg(pixels: np.ndarray, size: int, quality: int = 90) -> bytes:
    """Re-encode at `size`x`size` (for --store_image=resized)."""
    buffer = io.BytesIO()
    Image.fromarray(resize_pixels(pixels, size)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
