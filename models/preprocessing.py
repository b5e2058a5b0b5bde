"""What a model expects of its image input: the square size, how an image of another shape reaches it, and the
per-channel normalization. A model declares it (`ModelConfig.preprocessing()`); the scoring job and the trainer
both apply it through the methods here, so a learner and its reference see the same pixels.

    squash   resize straight to size x size (any aspect ratio is squashed; SigLIP, FlexiViT)
    crop     resize the shorter side to `size`, then take the centred size x size square (CLIP)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

RESIZE_MODES = ("squash", "crop")


def dataclass_from_dict(cls, values: dict[str, Any], what: str):
    """`cls(**values)` for a config dataclass, refusing (and naming) keys it has no field for."""
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys in {what}: {unknown}; known: {sorted(known)}")
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """Mean and std are per RGB channel in 0-255 units: (127.5, 127.5) maps pixels to [-1, 1]."""

    size: int
    resize: str = "squash"
    mean: tuple[float, float, float] = (127.5, 127.5, 127.5)
    std: tuple[float, float, float] = (127.5, 127.5, 127.5)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; known: {list(RESIZE_MODES)}")
        for name in ("mean", "std"):
            values = tuple(float(value) for value in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs one value per RGB channel, got {values}")
            object.__setattr__(self, name, values)  # lists from JSON become tuples: hashable, comparable
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImagePreprocessing":
        return dataclass_from_dict(cls, values, "image preprocessing")

    def resize_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> [size, size, 3] uint8, PIL bilinear; returned as is when already that size."""
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected [H, W, 3] uint8 pixels, got {pixels.shape} {pixels.dtype}")
        height, width = pixels.shape[:2]
        if (height, width) == (self.size, self.size):
            return pixels
        if self.resize == "squash":
            return _resize(pixels, self.size, self.size)
        # crop: the shorter side becomes `size`, the longer keeps the aspect ratio (truncated, as torchvision does).
        short, long = min(height, width), max(height, width)
        long = int(self.size * long / short)
        new_height, new_width = (self.size, long) if height <= width else (long, self.size)
        if (new_height, new_width) != (height, width):
            pixels = _resize(pixels, new_width, new_height)
        top, left = round((new_height - self.size) / 2), round((new_width - self.size) / 2)
        return np.ascontiguousarray(pixels[top:top + self.size, left:left + self.size])

    def normalize(self, pixels, xp=np):
        """uint8 [..., 3] -> float32 (pixels - mean) / std. `xp` is numpy, or jax.numpy (works inside jit)."""
        mean, std = xp.asarray(self.mean, xp.float32), xp.asarray(self.std, xp.float32)
        return (xp.asarray(pixels).astype(xp.float32) - mean) / std


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR), np.uint8)
