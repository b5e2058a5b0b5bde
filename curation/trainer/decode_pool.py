"""Decoding the trainer's images, in order: on threads of the trainer's process, or in worker processes.

`DecodePool(preprocessing, validation, processes=N).map(encoded)` gives, for each encoded image, the model's uint8
pixels [S, S, 3] (decoded at size where the JPEG allows, resized as `preprocessing` declares) or None where the
scoring job would refuse it; the caller normalizes a whole batch at once. Results come back in input order, so the
stream stays a pure function of (seed, position) whatever the pool.

Threads share the trainer's interpreter: PIL releases the GIL while it decodes, but the Python around each image
does not, and the step's own host work competes with them. Worker processes (`processes` > 0) run in interpreters of
their own, started by a fork server that imports only this module (not the trainer, TensorFlow or jax); images
travel to them as bytes and back as uint8 pixels.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing

import numpy as np

from curation.shared.validation import ValidationOptions, decode_pixels
from models.preprocessing import ImagePreprocessing

_worker_rules: tuple[ImagePreprocessing, ValidationOptions] | None = None


def _start_worker(preprocessing: ImagePreprocessing, validation: ValidationOptions) -> None:
    global _worker_rules
    _worker_rules = (preprocessing, validation)


def _decode_in_worker(data: bytes) -> np.ndarray | None:
    return decode_pixels(data, *_worker_rules)


class DecodePool:
    """Decodes lists of encoded images in order on `threads` threads, or on `processes` worker processes when that
    is > 0. A context manager (the workers stop at its end)."""

    def __init__(
        self, preprocessing: ImagePreprocessing, validation: ValidationOptions, *, threads: int = 2, processes: int = 0
    ):
        self.preprocessing, self.validation, self.processes = preprocessing, validation, processes
        if processes > 0:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self._pool = context.Pool(processes, initializer=_start_worker, initargs=(preprocessing, validation))
            self._threads = None
        else:
            self._pool = None
            self._threads = concurrent.futures.ThreadPoolExecutor(threads)

    def map(self, encoded: list[bytes]) -> list[np.ndarray | None]:
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

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
