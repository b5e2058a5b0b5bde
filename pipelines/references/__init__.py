"""Reference models for the scoring job: what the job needs of any image-text model, and where one comes from.

`--reference SPEC` names one:

    runs/demo/reference/model            one of this project's checkpoints (local or gs://; `project.py`)
    keras_hub:siglip2_base_patch16_224   a keras-hub preset by name, fetched by keras-hub at run time (`keras_hub.py`)
    gs://bucket/presets/siglip2_b16      a keras-hub preset folder (config.json, preprocessor.json, weights), copied
    ./presets/clip_b32                   to each worker's disk through Beam's FileSystems, or a local one

A `Reference` is light and picklable: the launcher makes it from metadata only (configs, never weights) and hands
it to the workers, which load the weights once per process. What the job asks of it:

    info                 the manifest's `ReferenceInfo`: id, fingerprint, width, loss family, preprocessing, text
                         length, tokenizer, forward FLOPs per example (t and bias are filled from `load()`)
    text_encoder()       captions -> [L] int32 token ids, as the model's own preprocessor makes them
    load(batch_size)     a `LoadedReference`: embed(uint8 pixels, token ids) -> L2-normalized float32 embeddings,
                         and the loss parameters t (exponentiated) and bias (sigmoid; 0 for softmax)

Another source (OpenCLIP, Hugging Face) is one more `Reference` subclass and one more branch in `resolve`.
"""

from __future__ import annotations

import abc
import dataclasses
import posixpath
from typing import Protocol

import numpy as np
from apache_beam.io.filesystems import FileSystems

from curation.shared.manifest import ReferenceInfo

KERAS_HUB_PREFIX = "keras_hub:"


class ReferenceSpecError(ValueError):
    """A --reference that names nothing usable; the message says what to pass instead."""


class TextEncoder(Protocol):
    def encode(self, caption: str) -> np.ndarray:  # [text_length] int32
        ...


@dataclasses.dataclass(frozen=True)
class LossParameters:
    temperature: float  # t, exponentiated
    bias: float  # of the sigmoid loss; 0.0 for a softmax reference

    def check(self, id: str) -> "LossParameters":
        if not (np.isfinite(self.temperature) and np.isfinite(self.bias)):
            raise ValueError(
                f"reference {id} has a non-finite temperature or bias (t={self.temperature}, "
                f"bias={self.bias}): every score would be NaN"
            )
        return self


class LoadedReference(abc.ABC):
    """A reference's weights on this worker and its forward at one fixed batch size (every batch is padded to it,
    so XLA compiles once and an example's embedding does not depend on the batch it landed in)."""

    batch_size: int

    @abc.abstractmethod
    def loss_parameters(self) -> LossParameters: ...

    @abc.abstractmethod
    def _forward(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[batch_size, S, S, 3] uint8, [batch_size, L] int32 -> L2-normalized float32 [batch_size, d] twice."""

    def embed(self, pixels: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[n, S, S, 3] uint8, [n, L] int32 -> ([n, d], [n, d]) float32, run in padded chunks of `batch_size`."""
        images_out, texts_out = [], []
        for start in range(0, pixels.shape[0], self.batch_size):
            chunk_pixels, chunk_tokens = (
                pixels[start : start + self.batch_size],
                tokens[start : start + self.batch_size],
            )
            real = chunk_pixels.shape[0]
            if real < self.batch_size:  # pad with copies of the first row; the padding rows are dropped below
                pad = self.batch_size - real
                chunk_pixels = np.concatenate([chunk_pixels, np.repeat(chunk_pixels[:1], pad, axis=0)])
                chunk_tokens = np.concatenate([chunk_tokens, np.repeat(chunk_tokens[:1], pad, axis=0)])
            zimg, ztxt = self._forward(chunk_pixels, chunk_tokens)
            images_out.append(np.asarray(zimg, np.float32)[:real])
            texts_out.append(np.asarray(ztxt, np.float32)[:real])
        return np.concatenate(images_out), np.concatenate(texts_out)


class Reference(abc.ABC):
    """A reference model as the launcher knows it: its description, and how a worker loads it."""

    info: ReferenceInfo

    @abc.abstractmethod
    def text_encoder(self) -> TextEncoder: ...

    @abc.abstractmethod
    def load(self, batch_size: int) -> LoadedReference: ...

    def check_loadable(self) -> None:
        """Cheap checks on the launcher that catch damage before the workers start (default: none)."""


def _exists(path: str) -> bool:
    """A file, or a folder (on an object store: a prefix with objects under it)."""
    if FileSystems.exists(path):
        return True
    try:
        return bool(FileSystems.match([path.rstrip("/") + "/*"], limits=[1])[0].metadata_list)
    except Exception:  # BeamIOError when nothing matches
        return False


def is_project_checkpoint(spec: str) -> bool:
    return _exists(posixpath.join(spec.rstrip("/"), "meta"))


def is_keras_hub_preset(spec: str) -> bool:
    return FileSystems.exists(posixpath.join(spec.rstrip("/"), "config.json"))


# What a trainer's workdir holds beside its config.json (curation/trainer/workdir.py): the final model is in model/.
WORKDIR_ENTRIES = ("model", "checkpoints", "metrics.jsonl")


def is_training_workdir(spec: str) -> bool:
    return any(_exists(posixpath.join(spec.rstrip("/"), entry)) for entry in WORKDIR_ENTRIES)


def _workdir_error(spec: str) -> ReferenceSpecError:
    """A training workdir given for its model (its config.json would make it look like a keras-hub preset)."""
    model = posixpath.join(spec.rstrip("/"), "model")
    if is_project_checkpoint(model):
        return ReferenceSpecError(
            f"--reference {spec} is a training workdir (model/, checkpoints/, metrics.jsonl), "
            f"not a model checkpoint; give its model folder: did you mean --reference {model}?"
        )
    return ReferenceSpecError(
        f"--reference {spec} is a training workdir with no finished model yet (the trainer "
        f"writes {model} when training ends); give --reference {model} once it is there"
    )


def resolve(spec: str) -> Reference:
    """The Reference named by a --reference value, read from metadata only; ReferenceSpecError (one line naming
    what to pass) when it names nothing usable."""
    if spec.startswith(KERAS_HUB_PREFIX):
        from pipelines.references import keras_hub

        return keras_hub.KerasHubReference.from_spec(spec)
    if not _exists(spec):
        raise ReferenceSpecError(
            f"--reference {spec} does not exist; give a model checkpoint folder, a keras-hub "
            f"preset folder, or {KERAS_HUB_PREFIX}PRESET_NAME"
        )
    if is_project_checkpoint(spec):
        from pipelines.references import project

        return project.ProjectReference.from_spec(spec)
    if is_training_workdir(spec):
        raise _workdir_error(spec)
    if is_keras_hub_preset(spec):
        from pipelines.references import keras_hub

        return keras_hub.KerasHubReference.from_spec(spec)
    raise ReferenceSpecError(
        f"--reference {spec} is neither a model checkpoint (no meta item) nor a keras-hub preset "
        "(no config.json); give the model/ folder of the reference's training workdir, a "
        f"preset folder, or {KERAS_HUB_PREFIX}PRESET_NAME"
    )
