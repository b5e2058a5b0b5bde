"""The training step, one for every config: the pure update on a batch and, with selection, the JEST step in three
jitted parts so each can be timed. The learner scores the super-batch (no gradient), selection picks the sub-batch
from learner and stored reference embeddings, and the update trains on it.

    embed(params, images, tokens)                     -> learner zimg [B, d], ztxt [B, d], (t, b)
    choose(rng, learner..., ref_zimg, ref_ztxt, truth) -> indices [b], diagnostics
    update(state, images, tokens, indices)            -> state, metrics

The super-batch and its embeddings are sharded over the mesh's `data` axis; selection is global over the whole
super-batch (XLA gathers what it needs), so the same RNG gives the same indices on any number of devices.
`make_step` wraps either kind in one callable, `state, metrics, seconds = step(state, inputs, step_number)`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from curation.trainer import selection
from curation.trainer.configs import TrainConfig
from curation.trainer.truth import BUCKET_UNKNOWN, BUCKETS, CLEAN, NOISE_KINDS, split_bucket
from models.flops import example_forward_flops, example_train_flops
from models.losses import contrastive_loss
from models.two_towers import ModelConfig, TwoTower

if TYPE_CHECKING:
    from curation.shared.scored_set import ScoredSet

log = logging.getLogger(__name__)

# (state, inputs, step_number) -> (state, metrics, seconds spent in each timed part, by metric name)
Step = Callable[[dict, dict, int], tuple[dict, dict, dict[str, float]]]


def train_step(
    state: dict, batch: dict, *, model: TwoTower, optimizer, loss_name: str, flexi_patch: int | None = None
) -> tuple[dict, dict]:
    """One update on the batch: pure, jitted by the caller. With `flexi_patch`, the second half of the batch's
    images go through the image tower at that patch size (Flexi-JEST) and the first half at the model's own."""

    def loss_fn(params):
        if flexi_patch is None:
            zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["tokens"])
        else:
            half = batch["image"].shape[0] // 2
            fine, ztxt, aux = model.apply({"params": params}, batch["image"][:half], batch["tokens"])
            coarse, _, _ = model.apply({"params": params}, batch["image"][half:], None, patch_size=flexi_patch)
            zimg = jnp.concatenate([fine, coarse])
        return contrastive_loss(loss_name, zimg, ztxt, aux), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "t": aux["t"], "b": aux["b"], "grad_norm": optax.global_norm(grads)}


class JestFunctions(NamedTuple):
    embed: callable | None  # None when the config needs no learner pass
    choose: callable
    update: callable


def off_diagonal_share(traces: jax.Array, indices: jax.Array, diagonal: jax.Array, n_chunks: int) -> jax.Array:
    """How much of the conditional scores joint selection drew by came from the picked set rather than from each
    candidate alone: Σ|c_i − S_ii| / (Σ|S_ii| + Σ|c_i − S_ii|) over the picks of every chunk after the first.

    traces [n_chunks, B]: the scores each chunk was drawn from; indices [b] in pick order; diagonal [B]: S_ii.
    0 means joint selection draws by each candidate's S_ii alone; it grows as the pair terms matter."""
    if n_chunks < 2:
        return jnp.zeros([])
    chunk = indices.shape[0] // n_chunks
    picks = indices[chunk:].reshape(n_chunks - 1, chunk)  # [N-1, n]
    conditional = jnp.take_along_axis(traces[1:], picks, axis=1)  # [N-1, n]
    own = diagonal[picks]
    off = jnp.abs(conditional - own).sum()
    return off / (jnp.abs(own).sum() + off)


def flexi_order(rng: jax.Array, indices: jax.Array) -> jax.Array:
    """The selected sub-batch in a random order drawn from the step's RNG: its first half trains at the fine patch
    and its second at the coarse one, so which examples go to each resolution does not depend on pick order."""
    return jax.random.permutation(rng, indices)


SELECTION_LOSSES = ("auto", "sigmoid", "softmax")


def selection_loss(config: TrainConfig, reference_loss: str) -> str:
    """The loss selection scores learner and reference with: `config.selection_loss`, where "auto" is the learner's
    own loss, or softmax for a softmax (CLIP) reference. Raises ValueError for a combination that cannot work."""
    if config.selection_loss not in SELECTION_LOSSES:
        raise ValueError(f"--selection_loss {config.selection_loss!r}: choose from {list(SELECTION_LOSSES)}")
    if reference_loss not in ("sigmoid", "softmax"):
        raise ValueError(
            f"the reference's loss family {reference_loss!r} is not one selection knows (sigmoid or softmax)"
        )
    if config.selection_loss == "auto":
        return "softmax" if reference_loss == "softmax" else config.loss
    if config.selection_loss == "sigmoid" and reference_loss == "softmax":
        raise ValueError(
            "--selection_loss sigmoid needs a sigmoid (SigLIP) reference: a softmax (CLIP) reference has "
            "no bias and no own-pair sigmoid loss; use --selection_loss auto (softmax for both)"
        )
    return config.selection_loss


def make_jest_functions(
    config: TrainConfig,
    model: TwoTower,
    train_step,
    mesh: jax.sharding.Mesh,
    reference_t: float,
    reference_bias: float,
    loss: str | None = None,
) -> JestFunctions:
    """The jitted parts of a JEST step for `config` (train_step: the trainer's pure update on a batch). The
    learner's pass runs only where the score uses it, or where `config.learner_diagnostics` asks for it. `loss`
    is the selection loss (`selection_loss`; default the learner's own)."""
    loss = loss or config.loss
    data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    score_patch = config.coarse_patch_size if config.flexi else config.patch_size
    n_select = config.batch_size

    @functools.partial(jax.jit, in_shardings=(replicated, data, data), out_shardings=(data, data, replicated))
    def embed(params, images, tokens):
        zimg, ztxt, aux = model.apply({"params": params}, images, tokens, patch_size=score_patch)
        return zimg, ztxt, jnp.stack([aux["t"], aux["b"]])

    @functools.partial(jax.jit, out_shardings=(replicated, replicated))
    def choose(rng, learned, ref_zimg, ref_ztxt, truth, bucket=None):  # learned: (zimg, ztxt, [t, b]) or None
        # truth, bucket: [B] hidden-truth and bucket codes (curation.trainer.truth), for the diagnostics only
        learner = None if learned is None else selection.Embeddings(learned[0], learned[1], *learned[2])
        reference = selection.Embeddings(ref_zimg, ref_ztxt, reference_t, reference_bias)
        options = dict(
            score=config.score,
            n_select=n_select,
            n_chunks=config.n_chunks,
            loss=loss,
            first_chunk=config.first_chunk,
            noise=config.selection_noise,
        )
        diagnostics = {}
        if config.selection == "joint":
            indices, traces = selection.joint_selection_trace(rng, learner, reference, **options)
            if loss == "sigmoid":
                diagonal = selection.diagonal_scores(learner, reference, config.score)
                diagnostics["offdiag_share"] = off_diagonal_share(traces, indices, diagonal, config.n_chunks)
        else:
            indices = selection.select(rng, learner, reference, method=config.selection, **options)
        if learner is not None:
            random = jax.random.permutation(jax.random.fold_in(rng, 7919), ref_zimg.shape[0])[:n_select]
            diagnostics["selected_learnability"] = selection.subbatch_score(learner, reference, indices, loss=loss)
            diagnostics["random_learnability"] = selection.subbatch_score(learner, reference, random, loss=loss)
        picked = truth[indices]
        diagnostics["selected_clean"] = jnp.mean(picked == CLEAN)
        diagnostics["superbatch_clean"] = jnp.mean(truth == CLEAN)
        for code, kind in enumerate(NOISE_KINDS, 1):  # what the rest was, by kind
            diagnostics[f"selected/{kind}"] = jnp.mean(picked == code)
            diagnostics[f"superbatch/{kind}"] = jnp.mean(truth == code)
        if bucket is not None:
            diagnostics.update(bucket_shares(bucket[indices], bucket))
        return indices, diagnostics

    def subset_step(state, images, tokens, indices, rng):
        if config.flexi:
            indices = flexi_order(rng, indices)
        batch = {
            "image": jax.lax.with_sharding_constraint(images[indices], data),
            "tokens": jax.lax.with_sharding_constraint(tokens[indices], data),
        }
        return train_step(state, batch)

    update = jax.jit(
        subset_step,
        in_shardings=(replicated, data, data, replicated, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    needs_learner = config.uses_learner_scores or config.learner_diagnostics
    return JestFunctions(embed if needs_learner else None, choose, update)


def bucket_shares(picked: jax.Array, drawn: jax.Array) -> dict[str, jax.Array]:
    """The share of each difficulty and frequency bucket (`truth.BUCKETS`) among the selected and the drawn examples
    whose metadata names that bucket: `selected/difficulty/hard`, `superbatch/frequency/head`, ...; NaN where none
    does (a corpus without buckets; the metrics row leaves NaN diagnostics out)."""
    shares = {}
    for position, (axis, names) in enumerate(BUCKETS.items()):
        for prefix, codes in (("selected", picked), ("superbatch", drawn)):
            index = split_bucket(codes)[position]
            known = jnp.sum(index != BUCKET_UNKNOWN)
            for value, name in enumerate(names):
                count = jnp.sum(index == value)
                shares[f"{prefix}/{axis}/{name}"] = jnp.where(known > 0, count / jnp.maximum(known, 1), jnp.nan)
    return shares


def make_step(
    config: TrainConfig,
    model: TwoTower,
    optimizer: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    scored: ScoredSet | None,
) -> Step:
    """The step of `config`, made once before the loop. Without selection (uniform, offline filtering) it is the
    jitted update on the batch's images and tokens; with selection it runs the three JEST parts on the super-batch,
    waiting for each so that `seconds` splits the step into time/scoring, time/selection and time/update."""
    update = functools.partial(
        train_step,
        model=model,
        optimizer=optimizer,
        loss_name=config.loss,
        flexi_patch=config.coarse_patch_size if config.flexi else None,
    )
    data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    if config.selection == "none":
        jitted = jax.jit(
            update, in_shardings=(replicated, data), out_shardings=(replicated, replicated), donate_argnums=0
        )

        def uniform_step(state: dict, inputs: dict, step_number: int):
            state, metrics = jitted(state, {"image": inputs["image"], "tokens": inputs["tokens"]})
            return state, metrics, {}

        return uniform_step

    if scored is None:
        raise ValueError("selection needs scored shards (--scored)")
    loss = selection_loss(config, scored.reference.loss)
    if loss != config.loss:
        log.info(
            "the reference is a %s model: selection scores learner and reference with the %s loss (the learner "
            "trains with %s)",
            scored.reference.loss,
            loss,
            config.loss,
        )
    parts = make_jest_functions(config, model, update, mesh, scored.reference.temperature, scored.reference.bias, loss)
    selection_rng = jax.random.key(config.seed + 1)

    def selection_step(state: dict, inputs: dict, step_number: int):
        rng = jax.random.fold_in(selection_rng, step_number)
        started = time.perf_counter()
        learned = None
        if parts.embed is not None:
            learned = jax.block_until_ready(parts.embed(state["params"], inputs["image"], inputs["tokens"]))
        scored_at = time.perf_counter()
        indices, diagnostics = jax.block_until_ready(
            parts.choose(rng, learned, inputs["ref_zimg"], inputs["ref_ztxt"], inputs["truth"], inputs.get("bucket"))
        )
        selected_at = time.perf_counter()
        state, metrics = parts.update(state, inputs["image"], inputs["tokens"], indices, jax.random.fold_in(rng, 1))
        metrics = jax.block_until_ready({**metrics, **diagnostics})
        seconds = {
            "time/scoring": scored_at - started,
            "time/selection": selected_at - scored_at,
            "time/update": time.perf_counter() - selected_at,
        }
        return state, metrics, seconds

    return selection_step


def step_flops(config: TrainConfig, model_config: ModelConfig) -> dict[str, int]:
    """Per-step online FLOPs: the update on b examples and, where the method's score uses it, the learner's
    scoring pass over B (a pass run only for diagnostics is not charged)."""
    if config.flexi:
        half = config.batch_size // 2
        train = half * example_train_flops(model_config) + (config.batch_size - half) * example_train_flops(
            model_config, config.coarse_patch_size
        )
    else:
        train = config.batch_size * example_train_flops(model_config)
    scoring = 0
    if config.uses_learner_scores:
        patch = config.coarse_patch_size if config.flexi else config.patch_size
        scoring = config.superbatch_size * example_forward_flops(model_config, patch)
    return {"train": train, "learner_scoring": scoring}
