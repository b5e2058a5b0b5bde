"""Decoding the trainer's images, in order: on threads of the trainer's process, or in worker processes.

`DecodePool(preprocessing, validation, processes=N).map(encoded)` gives, for each encoded image, the model's uint8
pixels [S, S, 3] (decoded at size where the JPEG allows, resized as `preprocessing` declares) or None where the
scoring job would refuse it; the caller normalizes a whole batch at once. Results come back in input order, so the
stream stays a pure function of (seed, position) whatever the pool.

Threads share the trainer's interpreter: PIL releases the GIL while it decodes, but the Python around each image
does not, and the step's own host work competes with them. Worker processes (`processes` > 0) run in interpreters of
their own, started by a fork server that imports only this module (not the trainer, TensorFlow or jax); images
travel to them as bytes and back as uint8 pixels.

Training passes over a corpus many times (the reference over its curated split, a JEST learner's super-batches over
the web split), and an image's pixels are a pure function of its bytes and the rules: the pool keeps the pixels of
the images it decoded, keyed by their bytes, up to `cache_bytes` (then it stops adding), and decodes only the others.
The stream is the same with or without it; on the demo's corpus the reference decodes each image once instead of
16 times.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import numpy as np

from curation.shared.validation import ValidationOptions, decode_pixels
from models.preprocessing import ImagePreprocessing

# What the pool keeps by default: about 100k images of the demo's size (1.9 KB of JPEG and 3 KB of 32 px pixels
# each). A host training on web-scale shards sees each image about once: it fills the cache with images it will not
# see again, at no cost but the memory.
CACHE_BYTES = 512 * 2**20
_ENTRY_OVERHEAD = 200  # a dict slot, a bytes object's and an array's headers, roughly

_worker_rules: tuple[ImagePreprocessing, ValidationOptions] | None = None


def _start_worker(preprocessing: ImagePreprocessing, validation: ValidationOptions) -> None:
    global _worker_rules
    _worker_rules = (preprocessing, validation)


def _decode_in_worker(data: bytes) -> np.ndarray | None:
    return decode_pixels(data, *_worker_rules)


class DecodePool:
    """Decodes lists of encoded images in order on `threads` threads, or on `processes` worker processes when that
    is > 0, keeping up to `cache_bytes` of what it decoded (0: nothing; None: `CACHE_BYTES`). A context manager (the
    workers stop at its end)."""

    def __init__(
        self,
        preprocessing: ImagePreprocessing,
        validation: ValidationOptions,
        *,
        threads: int = 2,
        processes: int = 0,
        cache_bytes: int | None = None,
    ):
        self.preprocessing, self.validation, self.processes = preprocessing, validation, processes
        self.cache_bytes, self.cached_bytes = CACHE_BYTES if cache_bytes is None else cache_bytes, 0
        self._cache: dict[bytes, np.ndarray | None] = {}
        self.decoded = 0  # images decoded (not found in the cache)
        if processes > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._pool = context.Pool(processes, initializer=_start_worker, initargs=(preprocessing, validation))
            self._threads = None
        else:
            self._pool = None
            self._threads = concurrent.futures.ThreadPoolExecutor(threads)

    def map(self, encoded: list[bytes]) -> list[np.ndarray | None]:
        missing = list(dict.fromkeys(data for data in encoded if data not in self._cache))
        found = dict(zip(missing, self._decode(missing))) if missing else {}
        self.decoded += len(missing)
        for data, pixels in found.items():
            size = len(data) + (0 if pixels is None else pixels.nbytes) + _ENTRY_OVERHEAD
            if self.cached_bytes + size > self.cache_bytes:
                break
            if pixels is not None:
                pixels.setflags(write=False)  # shared by every batch that holds this image
            self._cache[data] = pixels
            self.cached_bytes += size
        return [found[data] if data in found else self._cache[data] for data in encoded]

    def _decode(self, encoded: list[bytes]) -> list[np.ndarray | None]:
        if self._pool is not None:
            chunk = max(1, len(encoded) // (4 * self.processes))
            return self._pool.map(_decode_in_worker, encoded, chunksize=chunk)
        return list(self._threads.map(lambda data: decode_pixels(data, self.preprocessing, self.validation), encoded))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None
        self._cache.clear()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
