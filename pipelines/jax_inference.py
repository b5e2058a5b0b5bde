"""A Beam RunInference `ModelHandler` for the JAX dual encoder (Beam ships handlers for PyTorch, TF and sklearn only).

    embedded = prepared | RunInference(KeyedModelHandler(DualEncoderHandler(checkpoint_dir)))

The handler holds a checkpoint *path*; the weights are restored in `load_model()` on the worker, never pickled
into the job graph. Every batch Beam forms is padded to `batch_size` rows, so XLA compiles the forward once and an
example's embedding does not depend on the batch it landed in: runs at one `batch_size` are byte-identical. Another
`batch_size` is another compiled program whose kernels may round differently (in float32's last bit, which moves a
few stored float16 values by one step).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from models import checkpoint as model_checkpoint
from models.two_towers import TwoTower

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedExample:
    """What the model needs (pixels at the model's size, token ids) and what the output keeps."""

    key: str
    source: str
    caption: str
    image: bytes  # bytes to store in the scored shard (as stored, re-encoded, or empty)
    pixels: np.ndarray  # [S, S, 3] uint8, resized as the model's `config.preprocessing()` declares
    tokens: np.ndarray  # [L] int32
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Embeddings:
    """Per-example model output: L2-normalized float32 embeddings."""

    image: np.ndarray  # [d]
    text: np.ndarray  # [d]


class LoadedModel:
    """A restored checkpoint and its jitted forward at one fixed batch size."""

    def __init__(self, checkpoint_dir: str, batch_size: int):
        restored = model_checkpoint.restore(checkpoint_dir)
        self.config, self.fingerprint, self.batch_size = restored.config, restored.fingerprint, batch_size
        self.params = jax.device_put(restored.params)
        model = TwoTower(restored.config)
        self.preprocessing = preprocessing = restored.config.preprocessing()  # how the model wants its pixels

        @jax.jit
        def forward(params, pixels, tokens):  # [N, S, S, 3] uint8, [N, L] int32
            images = preprocessing.normalize(pixels, xp=jnp)  # [N, S, S, 3] float32
            zimg, ztxt, _ = model.apply({"params": params}, images, tokens)
            return zimg, ztxt

        self._forward = forward

    def embed(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, S, S, 3] uint8, [n, L] int32 -> ([n, d], [n, d]) float32, run in padded chunks of `batch_size`."""
        count = pixels.shape[0]
        images_out, texts_out = [], []
        for start in range(0, count, self.batch_size):
            chunk_pixels, chunk_tokens = pixels[start:start + self.batch_size], tokens[start:start + self.batch_size]
            real = chunk_pixels.shape[0]
            if real < self.batch_size:  # pad with copies of the first row; the padding rows are dropped below
                pad = self.batch_size - real
                chunk_pixels = np.concatenate([chunk_pixels, np.repeat(chunk_pixels[:1], pad, axis=0)])
                chunk_tokens = np.concatenate([chunk_tokens, np.repeat(chunk_tokens[:1], pad, axis=0)])
            zimg, ztxt = self._forward(self.params, chunk_pixels, chunk_tokens)
            images_out.append(np.asarray(zimg)[:real])
            texts_out.append(np.asarray(ztxt)[:real])
        return np.concatenate(images_out), np.concatenate(texts_out)


class DualEncoderHandler(ModelHandler[PreparedExample, PredictionResult, LoadedModel]):
    """RunInference handler: PreparedExample -> PredictionResult(example, Embeddings)."""

    def __init__(self, checkpoint_dir: str, batch_size: int = 256, *, min_batch_size: int = 1,
                 large_model: bool = False):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=batch_size)
        self._checkpoint_dir, self._batch_size, self._large_model = checkpoint_dir, batch_size, large_model

    def load_model(self) -> LoadedModel:
        model = LoadedModel(self._checkpoint_dir, self._batch_size)
        log.info("restored reference %s (%s) on %s", self._checkpoint_dir, model.fingerprint[:12], jax.devices())
        return model

    def run_inference(self, batch: Sequence[PreparedExample], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[PredictionResult]:
        if not batch:
            return []
        pixels = np.stack([example.pixels for example in batch])
        tokens = np.stack([example.tokens for example in batch])
        zimg, ztxt = model.embed(pixels, tokens)
        return [PredictionResult(example, Embeddings(zimg[i], ztxt[i]), self._checkpoint_dir)
                for i, example in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[PreparedExample]) -> int:
        return sum(example.pixels.nbytes + example.tokens.nbytes for example in batch)

    def get_metrics_namespace(self) -> str:
        return "reference_model"

    def share_model_across_processes(self) -> bool:
        # On an accelerator worker one copy of the model per VM, shared by the SDK processes (Beam's large-model mode).
        return self._large_model
