"""The web split's hidden noise: each kind a share of the examples, the rest clean (`demo.make_corpus` applies it)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from PIL import Image

from demo import scenes


@dataclasses.dataclass(frozen=True)
class NoiseRates:
    """Share of the web split given to each noise kind (exact counts, see plan_noise); the rest is clean."""

    misaligned: float = 0.30  # the caption of another image (of a different shape or colour)
    boilerplate: float = 0.15  # "click here", "IMG_0042.JPG", ...: says nothing about the image
    near_duplicate: float = 0.10  # a near copy of a clean example's image, with its own caption (the demo corpus
    # counts it clean: redundant, not noisy)
    degraded: float = 0.10  # heavy blur, heavy pixel noise or a tiny crop
    truncated_image: float = 0.006  # broken records, for the scoring job's dead-letter path: ...
    non_image: float = 0.006  # ... bytes that are not an image (an HTML page, random bytes, nothing)
    empty_caption: float = 0.006
    long_caption: float = 0.006  # ~12 KB of spam words after the caption
    bad_utf8: float = 0.006  # caption bytes that are not valid UTF-8

    def __post_init__(self) -> None:
        for name, rate in self.as_dict().items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"noise rate {name}={rate} is outside [0, 1]")
        if sum(self.as_dict().values()) > 1.0 + 1e-9:
            raise ValueError(f"noise rates add up to {sum(self.as_dict().values()):.3f} > 1: {self.as_dict()}")

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


NOISE_KINDS = tuple(field.name for field in dataclasses.fields(NoiseRates))
DEGRADATIONS = ("blur", "noise", "crop")
NON_IMAGES = {
    "html": b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>",
    "empty": b"",
}


def apply_noise(
    kind: str,
    image: Image.Image,
    caption: str,
    noise_rng: np.random.Generator | None,
    image_format: str,
    *,
    near_copy: Callable[[Image.Image, np.random.Generator], Image.Image],
    borrowed_caption: Callable[[], str | None],
) -> tuple[bytes, str | bytes, str]:
    """(image bytes, caption, detail) of an example of truth `kind` (see NoiseRates) made from its clean `image`
    and `caption`: `near_copy` makes a near-duplicate's image from the one it copies, `borrowed_caption()` is the
    caption a misaligned example carries (None: none to borrow); `detail` names the degradation or non-image."""
    detail = ""
    if kind == "near_duplicate":
        image = near_copy(image, noise_rng)
    elif kind == "degraded":
        detail = DEGRADATIONS[noise_rng.integers(len(DEGRADATIONS))]
        image = scenes.degrade(image, detail, noise_rng)
    elif kind == "misaligned":
        borrowed = borrowed_caption()
        caption = caption if borrowed is None else borrowed
    elif kind == "boilerplate":
        caption = scenes.boilerplate_caption(noise_rng)
    elif kind == "empty_caption":
        caption = ""
    elif kind == "long_caption":
        caption = scenes.long_caption(caption, noise_rng)
    elif kind == "bad_utf8":
        raw = caption.encode("utf-8")
        cut = int(noise_rng.integers(len(raw) + 1))
        caption = raw[:cut] + (b"\xff\xfe", b"\xc3\x28", b"\xe2\x82")[noise_rng.integers(3)] + raw[cut:]
    elif kind not in ("clean", "truncated_image", "non_image"):
        raise ValueError(f"unknown example kind {kind!r}")
    image_bytes = scenes.encode_image(image, image_format)
    if kind == "truncated_image":
        image_bytes = image_bytes[: int(len(image_bytes) * noise_rng.uniform(0.3, 0.7))]
    elif kind == "non_image":
        detail = ("html", "random", "empty")[noise_rng.integers(3)]
        image_bytes = noise_rng.bytes(int(noise_rng.integers(64, 2048))) if detail == "random" else NON_IMAGES[detail]
    return image_bytes, caption, detail
