"""keras-hub presets as references (SigLIP, SigLIP 2, CLIP), run on keras' JAX backend in the job's own process.

A preset is a folder: config.json (the backbone), preprocessor.json (tokenizer, image converter, text length),
tokenizer.json and assets/ (the SentencePiece or BPE files), model.weights.h5. The launcher reads only the JSON
files and the weights' size and CRC32C (from the object store's metadata on gs://, computed on a local disk), so
a fingerprint costs no download of the weights; a hub preset (`keras_hub:NAME`) is fingerprinted by its versioned
Kaggle handle and its JSON files. Each worker copies a gs:// preset to its local disk once per process (Beam's
FileSystems) and loads it with keras-hub.

What the job takes from the preset, so that its scores are the model's own:
  - pixels: the image converter's size, crop, interpolation, antialias and `x·scale + offset` as an
    `ImagePreprocessing` (mean = −offset/scale, std = 1/scale in 0–255 units);
  - tokens: the preprocessor's own text path (lower-casing or SigLIP's canonicalization, tokenizer, start/end
    packing to its sequence length);
  - loss: SigLIPBackbone -> sigmoid with t = exp(logit_scale) and its logit_bias; CLIPBackbone -> softmax with
    t = exp(logit_scale).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import posixpath
import tempfile
import uuid

import numpy as np
from apache_beam.io.filesystems import FileSystems

from curation.shared.manifest import ReferenceInfo
from models.environment import keep_tensorflow_off_accelerators
from models.flops import encoder_flops
from models.preprocessing import INTERPOLATIONS, ImagePreprocessing
from pipelines.references import KERAS_HUB_PREFIX, LoadedReference, LossParameters, Reference, ReferenceSpecError

log = logging.getLogger(__name__)

LOSS_OF_BACKBONE = {"SigLIPBackbone": "sigmoid", "CLIPBackbone": "softmax"}
JSON_FILES = ("config.json", "preprocessor.json", "tokenizer.json", "metadata.json")
_WEIGHT_SUFFIXES = (".weights.h5", ".weights.json")


def check_backend() -> None:
    import keras

    if keras.backend.backend() != "jax":
        raise ReferenceSpecError(
            f"keras-hub references run on keras' JAX backend, but keras started on "
            f"{keras.backend.backend()!r}: set KERAS_BACKEND=jax before anything imports "
            "tensorflow or keras"
        )


def _is_weights(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def _crc32c(path: str) -> str:
    """base64 of the big-endian CRC32C, as GCS reports an object's checksum."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with FileSystems.open(path) as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode()


def _preset_files(folder: str) -> dict[str, int]:
    """Relative name -> size of every file in a preset folder (local or gs://)."""
    folder = folder.rstrip("/")
    metadata = FileSystems.match([posixpath.join(folder, "**")])[0].metadata_list
    return {m.path[len(folder) + 1 :]: m.size_in_bytes for m in metadata if not m.path.endswith("/")}


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _hub_file(name: str, file: str) -> str:
    """A preset file of a hub preset, fetched alone by keras-hub (a JSON file, never the weights)."""
    from keras_hub.src.utils import preset_utils

    return preset_utils.get_file(name, file)


def local_copy(folder: str, weights: bool) -> str:
    """A local folder with the preset's files (those of the weights only when `weights`): the folder itself when
    local, else a copy on this machine's disk, made once (atomically) per preset content."""
    if "://" not in folder:
        return os.path.abspath(folder)
    files = _preset_files(folder)
    wanted = sorted(name for name in files if weights or not _is_weights(name))
    key = hashlib.sha256(json.dumps([folder, [(name, files[name]) for name in wanted]]).encode()).hexdigest()[:16]
    target = os.path.join(tempfile.gettempdir(), "jest-presets", f"{key}-{'full' if weights else 'text'}")
    if os.path.isdir(target):
        return target
    partial = f"{target}.{uuid.uuid4().hex}.partial"
    for name in wanted:
        destination = os.path.join(partial, name)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        with FileSystems.open(posixpath.join(folder.rstrip("/"), name)) as source, open(destination, "wb") as out:
            for block in iter(lambda: source.read(1 << 24), b""):
                out.write(block)
    try:
        os.rename(partial, target)
    except OSError:  # another process of this worker made it first
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    log.info("copied preset %s to %s", folder, target)
    return target


def _image_preprocessing(converter: dict, where: str) -> ImagePreprocessing:
    size = converter.get("image_size")
    if not size or size[0] != size[1]:
        raise ReferenceSpecError(f"{where}: image converter size {size!r}; a square image size is needed")
    if converter.get("pad_to_aspect_ratio"):
        raise ReferenceSpecError(f"{where}: pad_to_aspect_ratio image converters are not supported")
    interpolation = converter.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        raise ReferenceSpecError(f"{where}: interpolation {interpolation!r}; supported: {list(INTERPOLATIONS)}")
    scale = np.broadcast_to(np.asarray(converter.get("scale") or 1.0, np.float64), [3])
    offset = np.broadcast_to(np.asarray(converter.get("offset") or 0.0, np.float64), [3])
    return ImagePreprocessing(
        size=int(size[0]),
        resize="crop_then_resize" if converter.get("crop_to_aspect_ratio", True) else "squash",
        mean=tuple(-offset / scale),
        std=tuple(1.0 / scale),
        interpolation=interpolation,
        antialias=bool(converter.get("antialias", False)),
    )


def _forward_flops(backbone: dict, loss: str) -> int:
    """Analytic forward FLOPs per image-caption pair (as models/flops.py counts our own towers)."""
    vision, text = backbone["vision_encoder"]["config"], backbone["text_encoder"]["config"]
    patch, width = vision["patch_size"], vision["hidden_dim"]
    tokens = (vision["image_shape"][0] // patch) ** 2 + (1 if loss == "softmax" else 0)  # CLIP has a class token
    image = 2 * tokens * patch * patch * 3 * width + encoder_flops(
        tokens, width, vision["num_layers"], vision["intermediate_dim"]
    )
    length = text["max_sequence_length"]
    caption = encoder_flops(length, text["hidden_dim"], text["num_layers"], text["intermediate_dim"])
    if loss == "softmax":
        projection = backbone["projection_dim"]
        image += 2 * width * projection
        caption += 2 * text["hidden_dim"] * projection
    else:  # SigLIP: the attention-pooling head (keys, values, one query, its MLP) and the text projection
        image += 2 * tokens * width * 2 * width + 2 * 2 * width * vision["intermediate_dim"]
        caption += 2 * text["hidden_dim"] * text.get("projection_dim", text["hidden_dim"])
    return int(image + caption)


class _TextEncoder:
    """The preset's preprocessor, on its text path only."""

    def __init__(self, preset: str, class_name: str, length: int):
        import keras_hub

        check_backend()
        self._preprocessor = getattr(keras_hub.models, class_name).from_preset(preset)
        self._length = length
        if not self._preprocessor.built:
            self._preprocessor.build(None)

    def encode(self, caption: str) -> np.ndarray:
        return self.encode_batch([caption])[0]

    def encode_batch(self, captions: list[str]) -> np.ndarray:
        import tensorflow as tf

        preprocessor = self._preprocessor
        prompts = tf.constant(list(captions))
        if getattr(preprocessor, "canonicalize_text", False):
            prompts = preprocessor.canonicalize_inputs(prompts)
        if getattr(preprocessor, "to_lower", False):
            prompts = tf.strings.lower(prompts)
        token_ids, _ = preprocessor.packer(
            preprocessor.tokenizer(prompts),
            sequence_length=self._length,
            add_start_value=preprocessor.add_start_token,
            add_end_value=preprocessor.add_end_token,
        )
        return np.asarray(token_ids, np.int32)


class LoadedKerasHubModel(LoadedReference):
    """A keras-hub backbone on this worker; its embeddings run under one jax.jit through keras' stateless scope."""

    def __init__(self, preset: str, info: ReferenceInfo, batch_size: int):
        import jax
        import jax.numpy as jnp
        import keras
        import keras_hub

        check_backend()
        keep_tensorflow_off_accelerators()
        self.batch_size, self.info = batch_size, info
        self.backbone = backbone = keras_hub.models.Backbone.from_preset(preset)
        head = backbone.siglip_head if info.loss == "sigmoid" else backbone.clip_head
        t = float(np.exp(np.asarray(head.logit_scale.value, np.float64)))
        bias = float(np.asarray(head.logit_bias.value)) if info.loss == "sigmoid" else 0.0
        self._loss = LossParameters(t, bias).check(info.id)
        preprocessing = info.preprocessing
        variables = list(backbone.variables)
        self._values = [variable.value for variable in variables]

        @jax.jit
        def forward(values, pixels, tokens):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                zimg = backbone.get_vision_embeddings(preprocessing.normalize(pixels, xp=jnp))
                ztxt = backbone.get_text_embeddings(tokens)
            zimg = zimg / jnp.linalg.norm(zimg, axis=-1, keepdims=True)
            ztxt = ztxt / jnp.linalg.norm(ztxt, axis=-1, keepdims=True)
            return zimg.astype(jnp.float32), ztxt.astype(jnp.float32)

        self._jitted = forward

    def loss_parameters(self) -> LossParameters:
        return self._loss

    def _forward(self, pixels, tokens):
        return self._jitted(self._values, pixels, tokens)


class KerasHubReference(Reference):
    def __init__(self, spec: str, source: str, info: ReferenceInfo, preprocessor_class: str):
        self.spec, self._source, self.info, self._preprocessor_class = spec, source, info, preprocessor_class

    @classmethod
    def from_spec(cls, spec: str) -> "KerasHubReference":
        if spec.startswith(KERAS_HUB_PREFIX):
            name = spec[len(KERAS_HUB_PREFIX) :]
            handle = _builtin_handle(name)
            documents = {file: _read(_hub_file(name, file)) for file in JSON_FILES if file != "metadata.json"}
            identity = {"kaggle_handle": handle}
            source = name
        else:
            files = _preset_files(spec)
            missing = [file for file in ("config.json", "preprocessor.json") if file not in files]
            if missing:
                raise ReferenceSpecError(
                    f"--reference {spec} is not a keras-hub preset: it lacks {missing} (save "
                    "the backbone and its preprocessor with save_to_preset)"
                )
            documents = {file: _read(posixpath.join(spec.rstrip("/"), file)) for file in JSON_FILES if file in files}
            identity = {}
            for name, size in sorted(files.items()):
                path = posixpath.join(spec.rstrip("/"), name)
                if name in documents:
                    continue
                if _is_weights(name):
                    checksum = FileSystems.checksum(path) if "://" in spec else _crc32c(path)
                    identity[name] = {"size": size, "crc32c": checksum}
                else:  # tokenizer assets: small, hashed whole
                    identity[name] = hashlib.sha256(_read(path)).hexdigest()
            source = spec
        return cls(spec, source, _describe(spec, documents, identity), "")._with_preprocessor_class(documents)

    def _with_preprocessor_class(self, documents: dict[str, bytes]) -> "KerasHubReference":
        self._preprocessor_class = json.loads(documents["preprocessor.json"])["class_name"]
        return self

    def _preset(self, weights: bool) -> str:
        return self._source if self.spec.startswith(KERAS_HUB_PREFIX) else local_copy(self._source, weights)

    def text_encoder(self) -> _TextEncoder:
        return _cached_text_encoder(self._preset(weights=False), self._preprocessor_class, self.info.text_length)

    def load(self, batch_size: int) -> LoadedKerasHubModel:
        return LoadedKerasHubModel(self._preset(weights=True), self.info, batch_size)


@functools.lru_cache(maxsize=4)
def _cached_text_encoder(preset: str, class_name: str, length: int) -> _TextEncoder:
    return _TextEncoder(preset, class_name, length)


def _builtin_handle(name: str) -> str:
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    if name not in BUILTIN_PRESETS:
        import difflib

        known = sorted(preset for preset in BUILTIN_PRESETS if preset.startswith(("siglip", "clip")))
        close = difflib.get_close_matches(name, list(BUILTIN_PRESETS), n=1)
        hint = f"did you mean {KERAS_HUB_PREFIX}{close[0]}? " if close else ""
        raise ReferenceSpecError(
            f"--reference {KERAS_HUB_PREFIX}{name}: keras-hub has no such preset; {hint}"
            f"image-text presets: {', '.join(known[:8])}, ..."
        )
    return BUILTIN_PRESETS[name]["kaggle_handle"]


def _describe(spec: str, documents: dict[str, bytes], identity: dict) -> ReferenceInfo:
    backbone = json.loads(documents["config.json"])
    preprocessor = json.loads(documents["preprocessor.json"])
    backbone_class = backbone.get("class_name")
    loss = LOSS_OF_BACKBONE.get(backbone_class)
    if loss is None:
        raise ReferenceSpecError(
            f"--reference {spec}: a {backbone_class} is not an image-text dual encoder this job "
            f"scores with; supported: {sorted(LOSS_OF_BACKBONE)}"
        )
    config, pre = backbone["config"], preprocessor["config"]
    converter = (pre.get("image_converter") or {}).get("config")
    if converter is None:
        raise ReferenceSpecError(f"--reference {spec}: its preprocessor has no image converter")
    preprocessing = _image_preprocessing(converter, f"--reference {spec}")
    width = config["vision_encoder"]["config"]["hidden_dim"] if loss == "sigmoid" else config["projection_dim"]
    digest = hashlib.sha256()
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for name in sorted(documents):
        if name != "metadata.json":  # when it was saved, not what it is
            digest.update(f"\n{name}\n".encode() + documents[name])
    tokenizer = (pre.get("tokenizer") or {}).get("class_name", "unknown")
    return ReferenceInfo(
        id=spec,
        fingerprint=digest.hexdigest(),
        width=int(width),
        loss=loss,
        temperature=float("nan"),
        bias=float("nan"),  # from the weights, on a worker
        image_preprocessing=preprocessing.to_dict(),
        text_length=int(pre["sequence_length"]),
        tokenizer=tokenizer,
        forward_flops_per_example=_forward_flops(config, loss),
        model={
            "keras_hub": backbone_class,
            "preprocessor": preprocessor.get("class_name"),
            **({"kaggle_handle": identity["kaggle_handle"]} if "kaggle_handle" in identity else {}),
        },
    )
