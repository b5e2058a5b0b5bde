"""The JEST step, in three jitted parts so each can be timed: the learner scores the super-batch (no gradient),
selection picks the sub-batch from learner and stored reference embeddings, and the update trains on it.

    embed(params, images, tokens)                     -> learner zimg [B, d], ztxt [B, d], (t, b)
    choose(rng, learner..., ref_zimg, ref_ztxt, clean) -> indices [b], diagnostics
    update(state, images, tokens, indices)            -> state, metrics

The super-batch and its embeddings are sharded over the mesh's `data` axis; selection is global over the whole
super-batch (XLA gathers what it needs), so the same RNG gives the same indices on any number of devices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from curation import selection
from curation.configs import TrainConfig
from models.flops import example_forward_flops, example_train_flops
from models.two_towers import ModelConfig, TwoTower


class JestFunctions(NamedTuple):
    embed: callable
    choose: callable
    update: callable


def make_jest_functions(config: TrainConfig, model: TwoTower, train_step, mesh: jax.sharding.Mesh,
                        reference_t: float, reference_c: float) -> JestFunctions:
    """The jitted parts of a JEST step for `config` (train_step: the trainer's pure update on a batch)."""
    data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    score_patch = config.coarse_patch_size if config.flexi else config.patch_size
    n_select = config.batch_size

    @functools.partial(jax.jit, in_shardings=(replicated, data, data), out_shardings=(data, data, replicated))
    def embed(params, images, tokens):
        zimg, ztxt, aux = model.apply({"params": params}, images, tokens, patch_size=score_patch)
        return zimg, ztxt, jnp.stack([aux["t"], aux["b"]])

    @functools.partial(jax.jit, out_shardings=(replicated, replicated))
    def choose(rng, zimg, ztxt, t_and_b, ref_zimg, ref_ztxt, clean):
        learner = selection.Embeddings(zimg, ztxt, t_and_b[0], t_and_b[1])
        reference = selection.Embeddings(ref_zimg, ref_ztxt, reference_t, reference_c)
        indices = selection.select(
            rng, learner, reference, method=config.selection, n_select=n_select, score=config.score,
            n_chunks=config.n_chunks, loss=config.loss, first_chunk=config.first_chunk, noise=config.selection_noise)
        random = jax.random.permutation(jax.random.fold_in(rng, 7919), zimg.shape[0])[:n_select]
        diagnostics = {
            "selected_learnability": selection.subbatch_score(learner, reference, indices, loss=config.loss),
            "random_learnability": selection.subbatch_score(learner, reference, random, loss=config.loss),
            "selected_clean": jnp.mean(clean[indices] == 1),
            "superbatch_clean": jnp.mean(clean == 1),
        }
        return indices, diagnostics

    def subset_step(state, images, tokens, indices):
        batch = {"image": jax.lax.with_sharding_constraint(images[indices], data),
                 "tokens": jax.lax.with_sharding_constraint(tokens[indices], data)}
        return train_step(state, batch)

    update = jax.jit(subset_step, in_shardings=(replicated, data, data, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=0)
    return JestFunctions(embed, choose, update)


def step_flops(config: TrainConfig, model_config: ModelConfig) -> dict[str, int]:
    """Per-step FLOPs: the update on b examples and, with selection, the learner's scoring pass over B."""
    if config.flexi:
        half = config.batch_size // 2
        train = half * example_train_flops(model_config) + (config.batch_size - half) * example_train_flops(
            model_config, config.coarse_patch_size)
    else:
        train = config.batch_size * example_train_flops(model_config)
    scoring = 0
    if config.selection != "none":
        patch = config.coarse_patch_size if config.flexi else config.patch_size
        scoring = config.superbatch_size * example_forward_flops(model_config, patch)
    return {"train": train, "learner_scoring": scoring}
