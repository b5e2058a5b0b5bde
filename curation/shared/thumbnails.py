"""An image's thumbnail: what of its pixels near-duplicate detection compares (`pipelines/pixel_match.py`).

SIZE × SIZE RGB, uint8, row-major (SIZE·SIZE·3 bytes): the decoded image (EXIF orientation applied) squashed to a
square by box averaging, so that an image and its re-encoded, resized or slightly recoloured copies give nearly the
same thumbnail whatever their size or aspect ratio. 768 bytes, about what a 384-wide float16 embedding takes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIZE = 16
BYTES = SIZE * SIZE * 3


def make_thumbnail(pixels: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> [SIZE, SIZE, 3] uint8 (box averaging)."""
    image = Image.fromarray(np.asarray(pixels, np.uint8), "RGB")
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BOX), np.uint8)


def to_bytes(thumbnail: np.ndarray) -> bytes:
    if thumbnail.shape != (SIZE, SIZE, 3) or thumbnail.dtype != np.uint8:
        raise ValueError(f"a thumbnail is [{SIZE}, {SIZE}, 3] uint8, not {list(thumbnail.shape)} {thumbnail.dtype}")
    return thumbnail.tobytes()


def from_bytes(data: bytes) -> np.ndarray:
    if len(data) != BYTES:
        raise ValueError(f"a thumbnail is {BYTES} bytes ({SIZE}x{SIZE} RGB), not {len(data)}")
    return np.frombuffer(data, np.uint8).reshape(SIZE, SIZE, 3)
