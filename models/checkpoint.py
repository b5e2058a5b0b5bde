"""Model checkpoints: params through orbax, with the model config and tokenizer saved beside them.

One orbax checkpoint directory (local or gs://) holds two items, written together and atomically:
  params/  the Flax params pytree (orbax StandardSave)
  meta/    JSON: {"model": ModelConfig, "tokenizer": tokenizer state, "fingerprint": sha256, "temperature": t,
           "bias": b}, so that a job needs no weights to know the model's loss parameters
The fingerprint is a sha256 over the canonical JSON of config + tokenizer and every param's path, dtype, shape and
bytes: stable across save/restore, different when any param (or the config) changes. The scoring job records it in
its manifest and the trainer refuses shards scored by a different reference.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from models.tokenizer import ByteTokenizer, WordTokenizer, tokenizer_from_dict
from models.two_towers import ModelConfig, abstract_params

META_VERSION = 2
READABLE_META_VERSIONS = (1, 2)  # version 1 had no temperature and bias in its meta


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    params: Any
    config: ModelConfig
    tokenizer: ByteTokenizer | WordTokenizer
    fingerprint: str


def absolute_path(directory: str) -> str:
    """orbax needs absolute paths: a local relative path is made absolute; gs:// and other URLs stay as they are."""
    return directory if "://" in directory else os.path.abspath(directory)


def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(
        ocp.CompositeCheckpointHandler(params=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    )


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _leaves_by_name(tree) -> dict[str, Any]:
    return {_path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def fingerprint(params, config: ModelConfig, tokenizer: ByteTokenizer | WordTokenizer) -> str:
    """sha256 hex digest over config, tokenizer and params (paths, dtypes, shapes, bytes)."""
    digest = hashlib.sha256()
    header = {"model": config.to_dict(), "tokenizer": tokenizer.to_dict()}
    digest.update(json.dumps(header, sort_keys=True, ensure_ascii=True).encode())
    for name, leaf in sorted(_leaves_by_name(params).items()):
        array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        digest.update(f"\n{name}:{array.dtype.str}:{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _check_params_match(stored: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise naming every unknown, missing or mis-shaped param of `stored` against what `expected` needs."""
    problems = []
    unknown = sorted(set(stored) - set(expected))
    missing = sorted(set(expected) - set(stored))
    if unknown:
        problems.append(f"unknown keys in checkpoint: {unknown}")
    if missing:
        problems.append(f"keys the config needs but the checkpoint lacks: {missing}")
    for name in sorted(set(stored) & set(expected)):
        have, want = stored[name], expected[name]
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            problems.append(
                f"{name}: checkpoint has {np.dtype(have.dtype).name}{tuple(have.shape)}, "
                f"config needs {np.dtype(want.dtype).name}{tuple(want.shape)}"
            )
    if problems:
        raise ValueError(f"checkpoint {where} does not match its model config: " + "; ".join(problems))


def save(
    directory: str, params, config: ModelConfig, tokenizer: ByteTokenizer | WordTokenizer, overwrite: bool = False
) -> str:
    """Write a checkpoint to `directory` (which must not exist unless `overwrite`) and return its fingerprint."""
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model config expects {config.vocab_size}")
    _check_params_match(_leaves_by_name(params), _leaves_by_name(abstract_params(config)), "to save")
    digest = fingerprint(params, config, tokenizer)
    meta = {
        "meta_version": META_VERSION,
        "model": config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "fingerprint": digest,
        **loss_parameters(params),
    }
    _checkpointer().save(
        absolute_path(directory),
        args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)),
        force=overwrite,
    )
    return digest


def loss_parameters(params) -> dict[str, float]:
    """{"temperature": t (exponentiated), "bias": b} of the sigmoid loss, from the params."""
    log_temperature = np.asarray(jax.device_get(params["log_temperature"]), np.float64).reshape(-1)[0]
    bias = np.asarray(jax.device_get(params["bias"]), np.float64).reshape(-1)[0]
    return {"temperature": float(np.exp(log_temperature)), "bias": float(bias)}


def read_meta(directory: str) -> dict:
    """The JSON item of a checkpoint (config, tokenizer, fingerprint, temperature, bias) without the params (a
    version-1 checkpoint, whose meta lacks temperature and bias, is restored once to read them)."""
    meta = _checkpointer().restore(absolute_path(directory), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
        "meta"
    ]
    if meta.get("meta_version") not in READABLE_META_VERSIONS:
        raise ValueError(
            f"checkpoint {directory}: meta_version {meta.get('meta_version')!r}, this code reads "
            f"{list(READABLE_META_VERSIONS)}"
        )
    if "temperature" not in meta:
        meta = {**meta, **loss_parameters(restore(directory, meta=meta).params)}
    return meta


def restore(directory: str, meta: dict | None = None, sharding: jax.sharding.Sharding | None = None) -> Checkpoint:
    """Read a checkpoint; refuses params that do not match the saved config, naming the offending keys.

    The params restore on this process's devices whatever topology saved them: each leaf gets `sharding` (default:
    the first local device; pass a replicated `NamedSharding` over the caller's mesh to place them there), so a
    model trained on N devices restores on 1 or on M.
    """
    meta = meta or read_meta(directory)
    config = ModelConfig.from_dict(meta["model"])
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    target = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    expected_tree = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target), abstract_params(config)
    )
    checkpointer, path = _checkpointer(), absolute_path(directory)
    stored_tree = checkpointer.metadata(path).item_metadata["params"]
    _check_params_match(_leaves_by_name(stored_tree), _leaves_by_name(expected_tree), directory)
    params = checkpointer.restore(path, args=ocp.args.Composite(params=ocp.args.StandardRestore(expected_tree)))[
        "params"
    ]
    digest = fingerprint(params, config, tokenizer)
    if digest != meta["fingerprint"]:
        raise ValueError(
            f"checkpoint {directory} is corrupt: its params hash to {digest}, the saved fingerprint is "
            f"{meta['fingerprint']}"
        )
    return Checkpoint(params=params, config=config, tokenizer=tokenizer, fingerprint=digest)
