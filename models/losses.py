"""Contrastive losses of a dual encoder, evaluated on any block of a batch.

A block pairs image rows from one set of examples with text columns from another (possibly overlapping) set. The
positive pairs are marked by key: image row i and text column j are a positive pair iff `img_keys[i] ==
txt_keys[j]`. With no keys, the block is the square batch and the positives are its diagonal.

Sigmoid (SigLIP): logit_ij = t·⟨x_i, y_j⟩ + b, z_ij = ±1, pair loss ℓ_ij = softplus(−z_ij·logit_ij); the batch
loss is Σ_ij ℓ_ij / n, so the loss of any sub-batch is a sum over its block of the pair-loss matrix.
Softmax (CLIP/InfoNCE): the mean of the image→text and text→image cross-entropies, with negatives limited to the
block. Embeddings are expected L2-normalized; `t` is the temperature (already exponentiated), `b` the bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pair_labels(img_keys: jax.Array | None, txt_keys: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """[M, K] float: +1 where the keys match (a positive pair), −1 elsewhere; the diagonal when keys are None."""
    if (img_keys is None) != (txt_keys is None):
        raise ValueError("give both img_keys and txt_keys, or neither")
    if img_keys is None:
        if shape[0] != shape[1]:
            raise ValueError(f"a {shape[0]}x{shape[1]} block needs keys to mark its positive pairs")
        positive = jnp.eye(shape[0], dtype=bool)
    else:
        if (img_keys.shape[0], txt_keys.shape[0]) != tuple(shape):
            raise ValueError(f"keys of lengths {img_keys.shape[0]}, {txt_keys.shape[0]} for a {shape} block")
        positive = img_keys[:, None] == txt_keys[None, :]
    return jnp.where(positive, 1.0, -1.0)


def pair_logits(zimg: jax.Array, ztxt: jax.Array, t: jax.Array, b: jax.Array | float = 0.0) -> jax.Array:
    """[M, d], [K, d] -> [M, K]: t·⟨x_i, y_j⟩ + b."""
    return t * jnp.einsum("md,kd->mk", zimg, ztxt) + b


def sigmoid_pair_losses(
    zimg: jax.Array,
    ztxt: jax.Array,
    t: jax.Array,
    b: jax.Array,
    img_keys: jax.Array | None = None,
    txt_keys: jax.Array | None = None,
) -> jax.Array:
    """[M, K] pair-loss matrix ℓ_ij = softplus(−z_ij · logit_ij)."""
    logits = pair_logits(zimg, ztxt, t, b)
    labels = pair_labels(img_keys, txt_keys, logits.shape)
    return jax.nn.softplus(-labels * logits)


def own_pair_sigmoid(zimg, ztxt, t, b, xp=jnp):
    """Each example with its own caption: (cosine ⟨x_i, y_i⟩, logit t·cosine + b, loss softplus(−logit)), each [n].

    The one definition of the own-pair terms, in numpy (`xp=numpy`: the scoring job's stored `ref_*` scores) or in
    JAX (selection's diagonal S_ii); the loss is the positive pair's ℓ_ii of `sigmoid_pair_losses`.
    """
    cosine = xp.sum(zimg * ztxt, axis=-1)
    logit = t * cosine + b
    return cosine, logit, xp.logaddexp(0.0, -logit)


def sigmoid_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    t: jax.Array,
    b: jax.Array,
    img_keys: jax.Array | None = None,
    txt_keys: jax.Array | None = None,
) -> jax.Array:
    """Scalar SigLIP loss: sum of the block's pair losses divided by its number of image rows."""
    return sigmoid_pair_losses(zimg, ztxt, t, b, img_keys, txt_keys).sum() / zimg.shape[0]


def softmax_example_losses(
    zimg: jax.Array,
    ztxt: jax.Array,
    t: jax.Array,
    img_keys: jax.Array | None = None,
    txt_keys: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-example InfoNCE terms of a block.

    Returns (i2t [M], i2t_valid [M], t2i [K], t2i_valid [K]): −log of the softmax probability of the positive,
    over the row (image→text) or column (text→image) of the block. A row or column without a positive in the block
    has no term: it is marked invalid and its loss is 0. The bias does not enter a softmax.
    """
    logits = pair_logits(zimg, ztxt, t)  # [M, K]
    positive = pair_labels(img_keys, txt_keys, logits.shape) > 0
    pos_logit_sum = jnp.where(positive, logits, 0.0)
    n_pos_row = positive.sum(axis=1)
    n_pos_col = positive.sum(axis=0)
    # With several positives in a row (duplicate keys), each is a separate target: average their terms.
    i2t = jax.nn.logsumexp(logits, axis=1) - pos_logit_sum.sum(axis=1) / jnp.maximum(n_pos_row, 1)
    t2i = jax.nn.logsumexp(logits, axis=0) - pos_logit_sum.sum(axis=0) / jnp.maximum(n_pos_col, 1)
    i2t_valid, t2i_valid = n_pos_row > 0, n_pos_col > 0
    return jnp.where(i2t_valid, i2t, 0.0), i2t_valid, jnp.where(t2i_valid, t2i, 0.0), t2i_valid


def softmax_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    t: jax.Array,
    img_keys: jax.Array | None = None,
    txt_keys: jax.Array | None = None,
) -> jax.Array:
    """Scalar CLIP loss: (mean image→text + mean text→image cross-entropy) / 2 over the rows/columns with a positive."""
    i2t, i2t_valid, t2i, t2i_valid = softmax_example_losses(zimg, ztxt, t, img_keys, txt_keys)
    mean_i2t = i2t.sum() / jnp.maximum(i2t_valid.sum(), 1)
    mean_t2i = t2i.sum() / jnp.maximum(t2i_valid.sum(), 1)
    return 0.5 * (mean_i2t + mean_t2i)


def contrastive_loss(loss_name: str, zimg: jax.Array, ztxt: jax.Array, aux: dict) -> jax.Array:
    """The batch loss a model is trained with: "sigmoid" (with the model's aux t and b) or "softmax" (t)."""
    if loss_name == "sigmoid":
        return sigmoid_loss(zimg, ztxt, aux["t"], aux["b"])
    if loss_name == "softmax":
        return softmax_loss(zimg, ztxt, aux["t"])
    raise ValueError(f"unknown loss {loss_name!r}; expected 'sigmoid' or 'softmax'")
