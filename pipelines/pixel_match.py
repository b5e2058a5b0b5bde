"""Near-duplicates by their pixels: a coarse vector to find candidates, a windowed correlation to confirm them.

Both read an image's thumbnail (`curation/shared/thumbnails.py`, 16 × 16 RGB).

- `candidate_vector`: the thumbnail smoothed, its central 12 × 12 averaged to 4 × 4 blocks, added to its mirror
  image (so a left-right flip gives the same vector), each colour channel centred, scaled to unit length: 48
  values, compared by cosine. Coarse enough that a crop of a few percent (which moves the edges most) or a
  re-encode barely moves it, fine enough that distinct images seldom meet.
- `similarity`: the normalised cross-correlation of two thumbnails, the best over the image and its mirror and
  over crop windows of either (each side's margin 0, 2.5 or 5% of its length, resampled bilinearly to the full
  size): 1 for the same pixels, unchanged by a global brightness or contrast change, high for a copy re-encoded,
  resized, flipped or cropped by up to about 5% a side.

Thumbnails of (nearly) one colour have no pattern to correlate; two such are similar when their mean colours are
within FLAT_COLOUR of each other (1.0), and one is never similar to a patterned one (0.0).

The correlation ignores any global brightness or contrast change, and a near-duplicate has only a small one (up to
about 10%). So two thumbnails are compared only when their colours agree that far (`colours_agree`): each channel's
mean within MEAN_SHARE of the larger (plus MEAN_SLACK levels, for re-encoding and cropping) and their contrasts (the
values' spread) within a factor SPREAD_RATIO; otherwise their similarity is 0. Without it, two scenes alike in
layout on backgrounds of other greys or colours correlate as copies.
"""

from __future__ import annotations

import functools

import numpy as np

from curation.shared.thumbnails import SIZE

BLOCKS = 4  # candidate vector: BLOCKS × BLOCKS × 3 over the thumbnail less INNER pixels a side
INNER = 2
CANDIDATE_COSINE = 0.95  # a pair whose candidate vectors are at least this close is compared by `similarity`
MARGINS = (0.0, 0.025, 0.05)  # crop margins searched, a fraction of the side, on each of the four sides
FLAT_STD = 2.0  # a thumbnail whose values spread less than this (of 255) is flat
FLAT_COLOUR = 8.0
MEAN_SHARE = 0.15  # colours_agree: a brightness change of up to ~10%, and some slack
MEAN_SLACK = 10.0
SPREAD_RATIO = 1.35  # a contrast change of up to ~10% on top of a brightness change: 1 / (0.9 · 0.9) ≈ 1.23, and slack


def _blurred(pixels: np.ndarray) -> np.ndarray:
    """[H, W, C] smoothed by the binomial kernel 1 4 6 4 1 (about a Gaussian of σ = 1 pixel), edges repeated."""
    kernel = np.array([1, 4, 6, 4, 1], np.float32) / 16
    for axis in (0, 1):
        padded = np.pad(pixels, [(2, 2) if a == axis else (0, 0) for a in range(3)], mode="edge")
        pixels = sum(w * np.take(padded, np.arange(i, i + pixels.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return pixels


def _coarse(pixels: np.ndarray) -> np.ndarray:
    """The candidate vector before its scaling to unit length: a linear function of the pixels."""
    inner = _blurred(pixels)[INNER : SIZE - INNER, INNER : SIZE - INNER]
    step = (SIZE - 2 * INNER) // BLOCKS
    blocks = inner.reshape(BLOCKS, step, BLOCKS, step, 3).mean(axis=(1, 3))
    blocks = blocks + blocks[:, ::-1]
    return (blocks - blocks.mean(axis=(0, 1), keepdims=True)).ravel()


@functools.lru_cache(maxsize=1)
def _coarse_matrix() -> np.ndarray:
    """[BLOCKS·BLOCKS·3, SIZE·SIZE·3] `_coarse` as a matrix (it is linear), made once from the unit images."""
    basis = np.eye(SIZE * SIZE * 3, dtype=np.float32).reshape(-1, SIZE, SIZE, 3)
    return np.stack([_coarse(image) for image in basis], axis=1)


def candidate_vector(thumbnail: np.ndarray) -> np.ndarray:
    """[BLOCKS·BLOCKS·3] float32 unit vector (zeros for a flat thumbnail); see the module docstring."""
    coarse = _coarse_matrix() @ thumbnail.astype(np.float32).ravel()
    norm = float(np.linalg.norm(coarse))
    return coarse / norm if norm > 1e-3 else np.zeros_like(coarse)


@functools.lru_cache(maxsize=1)
def _samplers() -> np.ndarray:
    """[M, SIZE, SIZE] linear interpolation matrices, one per (start margin, end margin) of MARGINS: row i of one
    samples the source at the centre of pixel i of the window [start, 1 - end], resized to SIZE pixels."""
    centres = (np.arange(SIZE) + 0.5) / SIZE
    matrices = []
    for start in MARGINS:
        for end in MARGINS:
            at = np.clip((start + centres * (1 - end - start)) * SIZE - 0.5, 0, SIZE - 1)
            low = np.minimum(at.astype(int), SIZE - 2)
            matrix = np.zeros((SIZE, SIZE), np.float32)
            matrix[np.arange(SIZE), low] = 1 - (at - low)
            matrix[np.arange(SIZE), low + 1] += at - low
            matrices.append(matrix)
    return np.stack(matrices)


def _unit(vectors: np.ndarray) -> np.ndarray:
    centred = vectors - vectors.mean(axis=-1, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-6)


def views(thumbnail: np.ndarray) -> np.ndarray:
    """[2·W, SIZE·SIZE·3] unit vectors: every crop window (a margin of MARGINS on each side: W = len(MARGINS)^4) of
    the thumbnail and of its mirror, resampled to SIZE × SIZE."""
    samplers = _samplers()
    count = len(samplers)
    # the columns' samplers side by side: [SIZE (source column), count·SIZE (window, column)]
    across = samplers.transpose(2, 0, 1).reshape(SIZE, count * SIZE)
    out = []
    for image in (thumbnail.astype(np.float32), thumbnail[:, ::-1].astype(np.float32)):
        down = np.einsum("rij,jkc->rick", samplers, image).reshape(-1, SIZE)  # rows sampled: [(r, i, c), k]
        both = (down @ across).reshape(count, SIZE, 3, count, SIZE)  # [r, i, c, q, l]
        out.append(both.transpose(0, 3, 1, 4, 2).reshape(count * count, -1))  # [(r, q), (i, l, c)]
    return _unit(np.concatenate(out))


def is_flat(thumbnail: np.ndarray) -> bool:
    return float(thumbnail.astype(np.float32).std()) < FLAT_STD


def _photometry(thumbnails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, 3] mean of each colour channel, [n] spread of all values) of [n, SIZE, SIZE, 3] thumbnails."""
    values = thumbnails.reshape(len(thumbnails), -1, 3).astype(np.float32)
    return values.mean(axis=1), values.reshape(len(thumbnails), -1).std(axis=1)


def colours_agree(thumbnail: np.ndarray, others: np.ndarray, photometry=None) -> np.ndarray:
    """[n] bool: whether `thumbnail`'s colours are within a near-duplicate's brightness and contrast change of each
    of `others` ([n, SIZE, SIZE, 3]; `photometry`: their `_photometry`, when the caller has it); see the module
    docstring."""
    (mean,), (spread,) = _photometry(thumbnail[None])
    means, spreads = _photometry(others) if photometry is None else photometry
    near = np.abs(means - mean) <= MEAN_SHARE * np.maximum(means, mean) + MEAN_SLACK
    low, high = np.minimum(spreads, spread), np.maximum(spreads, spread)
    return near.all(axis=1) & (high <= SPREAD_RATIO * np.maximum(low, 1e-6))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The pixel similarity of two thumbnails in [-1, 1]; see the module docstring."""
    flat_a, flat_b = is_flat(a), is_flat(b)
    if flat_a or flat_b:
        close = np.abs(a.reshape(-1, 3).mean(0) - b.reshape(-1, 3).mean(0)).max() <= FLAT_COLOUR
        return 1.0 if flat_a and flat_b and close else 0.0
    if not colours_agree(a, b[None])[0]:
        return 0.0
    whole_a, whole_b = _unit(a.astype(np.float32).ravel()), _unit(b.astype(np.float32).ravel())
    return max(float((views(a) @ whole_b).max()), float((views(b) @ whole_a).max()))


def best_matches(thumbnail: np.ndarray, others: np.ndarray) -> np.ndarray:
    """[n] the similarity of `thumbnail` to each of `others` ([n, SIZE, SIZE, 3]), `thumbnail`'s windows only
    (one direction of `similarity`: the other is the same call the other way round)."""
    if is_flat(thumbnail):
        return np.array([similarity(thumbnail, other) for other in others], np.float32)
    scores = np.zeros(len(others), np.float32)
    photometry = _photometry(others)  # its spreads say which are flat too (`is_flat`)
    compared = colours_agree(thumbnail, others, photometry) & (photometry[1] >= FLAT_STD)
    if compared.any():  # the windows only for the pairs whose colours agree
        chosen = _unit(others[compared].reshape(int(compared.sum()), -1).astype(np.float32))
        scores[compared] = (views(thumbnail) @ chosen.T).max(axis=0)
    return scores


def similarities(thumbnail: np.ndarray, others: np.ndarray) -> np.ndarray:
    """[n] `similarity` of `thumbnail` to each of `others` ([n, SIZE, SIZE, 3]): both directions, `thumbnail`'s
    windows computed once."""
    back = [best_matches(other, thumbnail[None])[0] for other in others]
    return np.maximum(best_matches(thumbnail, others), np.asarray(back, np.float32))
