"""This project's own dual-encoder checkpoints (`models/checkpoint.py`) as references: sigmoid loss, t and bias
in the metadata, our tokenizers and per-model preprocessing."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from curation.shared.manifest import ReferenceInfo, reference_from_model
from models import checkpoint as model_checkpoint
from models.tokenizer import tokenizer_from_dict
from models.two_towers import ModelConfig, TwoTower
from pipelines.references import LoadedReference, LossParameters, Reference

log = logging.getLogger(__name__)


class _TextEncoder:
    def __init__(self, state: dict, length: int):
        self._tokenizer, self._length = tokenizer_from_dict(state), length

    def encode(self, caption: str) -> np.ndarray:
        return self._tokenizer.encode(caption, self._length)


class LoadedProjectModel(LoadedReference):
    """A restored checkpoint and its jitted forward (normalization inside the jit)."""

    def __init__(self, checkpoint_dir: str, batch_size: int):
        restored = model_checkpoint.restore(checkpoint_dir)  # onto this worker's first device, whatever saved it
        self.config, self.fingerprint, self.batch_size = restored.config, restored.fingerprint, batch_size
        self.params = restored.params
        self._loss = LossParameters(**model_checkpoint.loss_parameters(restored.params)).check(checkpoint_dir)
        model = TwoTower(restored.config)
        preprocessing = restored.config.preprocessing()

        @jax.jit
        def forward(params, pixels, tokens):  # [N, S, S, 3] uint8, [N, L] int32
            zimg, ztxt, _ = model.apply({"params": params}, preprocessing.normalize(pixels, xp=jnp), tokens)
            return zimg, ztxt

        self._jitted = forward

    def loss_parameters(self) -> LossParameters:
        return self._loss

    def _forward(self, pixels, tokens):
        return self._jitted(self.params, pixels, tokens)


class ProjectReference(Reference):
    def __init__(self, spec: str, info: ReferenceInfo, tokenizer: dict):
        self.spec, self.info, self._tokenizer = spec, info, tokenizer

    @classmethod
    def from_spec(cls, spec: str) -> "ProjectReference":
        meta = model_checkpoint.read_meta(spec)
        LossParameters(meta["temperature"], meta["bias"]).check(spec)
        info = reference_from_model(
            spec,
            meta["fingerprint"],
            ModelConfig.from_dict(meta["model"]),
            meta["tokenizer"]["kind"],
            meta["temperature"],
            meta["bias"],
        )
        return cls(spec, info, meta["tokenizer"])

    def check_loadable(self) -> None:
        if "://" not in self.spec:  # local: read the weights too (cheap), so damage shows now, not on the workers
            model_checkpoint.restore(self.spec)

    def text_encoder(self) -> _TextEncoder:
        return _TextEncoder(self._tokenizer, self.info.text_length)

    def load(self, batch_size: int) -> LoadedProjectModel:
        return LoadedProjectModel(self.spec, batch_size)
