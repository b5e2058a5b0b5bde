"""What a model expects of its image input: the square size, how an image of another shape reaches it, and the
per-channel normalization. A model declares it (`ModelConfig.preprocessing()`); the scoring job and the trainer
both apply it through the methods here, so a learner and its reference see the same pixels.

    squash            resize straight to size x size (any aspect ratio is squashed; SigLIP, FlexiViT)
    crop              resize the shorter side to `size`, then take the centred size x size square (OpenAI CLIP)
    crop_then_resize  take the largest centred square, then resize it (keras' `crop_to_aspect_ratio`)

`interpolation` is bilinear or bicubic. With `antialias` (PIL's resize, the default) a downscale averages over the
source pixels it covers; without it (TF / JAX / keras-hub image converters, big_vision) each output pixel samples
the 2 or 4 nearest source pixels per axis with the same half-pixel-centred kernel, as `jax.image.scale_and_translate`
does with antialias=False. Upscaling is the same either way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

RESIZE_MODES = ("squash", "crop", "crop_then_resize")
INTERPOLATIONS = ("bilinear", "bicubic")


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
    interpolation: str = "bilinear"
    antialias: bool = True

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"image size must be positive, got {self.size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize!r}; known: {list(RESIZE_MODES)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; known: {list(INTERPOLATIONS)}")
        for name in ("mean", "std"):
            values = tuple(float(value) for value in getattr(self, name))
            if len(values) != 3:
                raise ValueError(f"{name} needs one value per RGB channel, got {values}")
            object.__setattr__(self, name, values)  # lists from JSON become tuples: hashable, comparable
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        values = {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std)}
        if (self.interpolation, self.antialias) != ("bilinear", True):  # the version-2 defaults stay unwritten
            values.update(interpolation=self.interpolation, antialias=self.antialias)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ImagePreprocessing":
        return dataclass_from_dict(cls, values, "image preprocessing")

    def resize_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """[H, W, 3] uint8 -> [size, size, 3] uint8 (rounded); returned as is when already that size."""
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"expected [H, W, 3] uint8 pixels, got {pixels.shape} {pixels.dtype}")
        height, width = pixels.shape[:2]
        if (height, width) == (self.size, self.size):
            return pixels
        if self.resize == "squash":
            return self._resize(pixels, self.size, self.size)
        if self.resize == "crop_then_resize":
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            return self._resize(
                np.ascontiguousarray(pixels[top : top + side, left : left + side]), self.size, self.size
            )
        # crop: the shorter side becomes `size`, the longer keeps the aspect ratio (truncated, as torchvision does).
        short, long = min(height, width), max(height, width)
        long = int(self.size * long / short)
        new_height, new_width = (self.size, long) if height <= width else (long, self.size)
        if (new_height, new_width) != (height, width):
            pixels = self._resize(pixels, new_width, new_height)
        top, left = round((new_height - self.size) / 2), round((new_width - self.size) / 2)
        return np.ascontiguousarray(pixels[top : top + self.size, left : left + self.size])

    def normalize(self, pixels, xp=np):
        """uint8 [..., 3] -> float32 (pixels - mean) / std. `xp` is numpy, or jax.numpy (works inside jit)."""
        mean, std = xp.asarray(self.mean, xp.float32), xp.asarray(self.std, xp.float32)
        return (xp.asarray(pixels).astype(xp.float32) - mean) / std

    def _resize(self, pixels: np.ndarray, width: int, height: int) -> np.ndarray:
        if self.antialias:
            method = Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC
            return np.asarray(Image.fromarray(pixels).resize((width, height), method), np.uint8)
        kernel = _KERNELS[self.interpolation]
        rows = _sample_along(pixels.astype(np.float32), height, kernel, axis=0)
        resized = _sample_along(rows, width, kernel, axis=1)
        return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1.0 - np.abs(x))


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


_KERNELS = {"bilinear": (_triangle, 1), "bicubic": (_keys_cubic, 2)}  # kernel, radius in source pixels


def _sample_along(values: np.ndarray, size: int, kernel, axis: int) -> np.ndarray:
    """Resample `values` to `size` along `axis` without antialiasing: output i sits at source coordinate
    (i + 0.5)·n/size − 0.5 and takes the kernel-weighted source pixels within its radius (weights renormalised at
    the borders)."""
    function, radius = kernel
    n = values.shape[axis]
    centres = (np.arange(size, dtype=np.float64) + 0.5) * n / size - 0.5
    taps = np.floor(centres)[:, None] + np.arange(-radius + 1, radius + 1)[None, :]  # [size, 2·radius]
    weights = function(taps - centres[:, None]) * ((taps >= 0) & (taps < n))
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    taps = np.clip(taps, 0, n - 1).astype(np.int64)
    moved = np.moveaxis(values, axis, 0)  # [n, ...]
    out = np.einsum("sk,sk...->s...", weights, moved[taps])
    return np.moveaxis(out, 0, axis)
