"""The web split's hidden noise: each kind a share of the examples, the rest clean (`demo.make_corpus` applies it)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NoiseRates:
    """Share of the web split given to each noise kind (exact counts, see plan_noise); the rest is clean."""

    misaligned: float = 0.30  # the caption of another image (of a different shape or colour)
    boilerplate: float = 0.15  # "click here", "IMG_0042.JPG", ...: says nothing about the image
    near_duplicate: float = 0.10  # a near copy of a clean example's image, with its own caption
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
