"""A Beam RunInference `ModelHandler` for any reference (Beam ships handlers for PyTorch, TF and sklearn only).

    embedded = prepared | RunInference(KeyedModelHandler(DualEncoderHandler(reference)))

The handler holds a `pipelines.references.Reference` (a description, no weights); the weights are loaded in
`load_model()` on the worker, never pickled into the job graph. Every batch Beam forms is padded to `batch_size`
rows, so XLA compiles the forward once and an example's embedding does not depend on the batch it landed in: runs
at one `batch_size` are byte-identical. Another `batch_size` is another compiled program whose kernels may round
differently (in float32's last bit, which moves a few stored float16 values by one step).

Sharing follows Beam's conventions, passed to the base class: `large_model` shares one copy per worker VM across
its SDK processes (Beam's multi-process shared model), and `model_copies` keeps that many copies instead (one per
accelerator of a multi-GPU worker).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipelines.references import LoadedReference, Reference

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedExample:
    """What the model needs (pixels at the model's size, token ids) and what the output keeps."""

    key: str
    source: str
    caption: str
    image: bytes  # bytes to store in the scored shard (as stored, re-encoded, or empty)
    pixels: np.ndarray  # [S, S, 3] uint8, resized as the reference's preprocessing declares
    tokens: np.ndarray  # [L] int32
    metadata: dict[str, Any]
    index: int = -1  # its place in its shard and the shard's item count (see curation.shared.corpus.CorpusRecord)
    shard_items: int = 0
    image_sha256: str | None = None  # of the image bytes as the corpus stores them (`image` may be re-encoded)
    image_thumbnail: bytes | None = None  # of the decoded pixels (`curation/shared/thumbnails.py`)


@dataclasses.dataclass(frozen=True)
class ReferenceEmbeddings:
    """The reference model's output for one example: its L2-normalized float32 image and text embeddings."""

    image: np.ndarray  # [d]
    text: np.ndarray  # [d]


class DualEncoderHandler(ModelHandler[PreparedExample, PredictionResult, LoadedReference]):
    """RunInference handler: PreparedExample -> PredictionResult(example, ReferenceEmbeddings)."""

    def __init__(
        self,
        reference: Reference,
        batch_size: int = 256,
        *,
        min_batch_size: int = 1,
        large_model: bool = False,
        model_copies: int | None = None,
    ):
        super().__init__(
            min_batch_size=min_batch_size, max_batch_size=batch_size, large_model=large_model, model_copies=model_copies
        )
        self._reference, self._batch_size = reference, batch_size

    def load_model(self) -> LoadedReference:
        model = self._reference.load(self._batch_size)
        log.info(
            "loaded reference %s (%s) on %s",
            self._reference.info.id,
            self._reference.info.fingerprint[:12],
            jax.devices(),
        )
        return model

    def run_inference(
        self, batch: Sequence[PreparedExample], model: LoadedReference, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        # A CorpusError in the batch (errors kept inline, for score sidecars) passes with no inference.
        prepared = [example for example in batch if isinstance(example, PreparedExample)]
        embedded = iter(())
        if prepared:
            zimg, ztxt = model.embed(
                np.stack([example.pixels for example in prepared]), np.stack([example.tokens for example in prepared])
            )
            embedded = (ReferenceEmbeddings(zimg[i], ztxt[i]) for i in range(len(prepared)))
        return [
            PredictionResult(
                example, next(embedded) if isinstance(example, PreparedExample) else None, self._reference.info.id
            )
            for example in batch
        ]

    def get_num_bytes(self, batch: Sequence[PreparedExample]) -> int:
        return sum(
            example.pixels.nbytes + example.tokens.nbytes for example in batch if isinstance(example, PreparedExample)
        )

    def get_metrics_namespace(self) -> str:
        return "reference_model"
