"""JEST sub-batch selection from a super-batch of learner and reference embeddings, as pure jit-friendly functions.

A super-batch holds B examples; example i's image and text are a positive pair with each other only. Per pair:
  hard_learner    S_ij = ℓ^θ_ij            (hard for the learner)
  easy_reference  S_ij = −ℓ^θ*_ij          (easy for the reference)
  learnability    S_ij = ℓ^θ_ij − ℓ^θ*_ij  (both)
with ℓ the sigmoid pair loss softplus(−z_ij·(t⟨x_i, y_j⟩ + b)) of `models.losses`.

Joint selection picks n_select = n_chunks·chunk examples in n_chunks chunks. Given the picked set P, a candidate's
conditional score is c_i = S_ii + Σ_{k∈P} (S_ik + S_ki); each chunk is drawn without replacement with probability
∝ softmax(c) over the candidates not yet picked (Gumbel-top-k). After a chunk C only its rows and columns enter:
c += S[:, C].sum(1) + S[C, :].sum(0), so each chunk needs the B×|C| blocks, computed from embeddings: memory
O(B·n_select/n_chunks), compute O(B·n_select·d), and no B×B array exists at any point.

The softmax (CLIP/InfoNCE) variant scores candidate i by the same thing: what adding i adds to the sub-batch's summed
loss L(P) = Σ_{k∈P} ½[(R_k − a_kk) + (C_k − a_kk)], with a_kj = t⟨x_k, y_j⟩, R_k = LSE_{j∈P} a_kj and
C_k = LSE_{j∈P} a_jk. That marginal gain is i's own InfoNCE over P ∪ {i} plus how much each picked member's loss
rises with i as a new negative:
  Δ_i = ½[(LSE_{j∈P∪{i}} a_ij − a_ii) + (LSE_{j∈P∪{i}} a_ji − a_ii)]
        + ½ Σ_{k∈P}[softplus(a_ki − R_k) + softplus(a_ik − C_k)]
(learner minus reference for learnability). The first part comes from running logsumexps over P per candidate; the
second depends on every R_k and C_k, which change as P grows, so it is recounted after each chunk over the picked
chunks one B×|C| block at a time: the same memory as the sigmoid path, O(B·n_select/n_chunks), and up to n_chunks
times its compute. With P empty every Δ_i is 0, so its first chunk is always a uniform draw.

Independent selection (RHO-LOSS style) scores example i, for either loss, by its share ℓ_i of the super-batch's
summed loss L(B) = Σ_i ℓ_i (`example_scores`), the per-example quantity both losses define.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models.losses import own_pair_sigmoid, pair_logits, sigmoid_pair_losses

SCORES = ("learnability", "hard_learner", "easy_reference")
METHODS = ("joint", "independent", "uniform")
LOSSES = ("sigmoid", "softmax")
FIRST_CHUNKS = ("score", "uniform")


class Embeddings(NamedTuple):
    """One model's L2-normalized embeddings of a super-batch and its sigmoid-loss temperature and bias."""

    zimg: jax.Array  # [B, d]
    ztxt: jax.Array  # [B, d]
    t: jax.Array | float  # temperature, already exponentiated
    b: jax.Array | float  # bias (unused by the softmax loss)


def _as_float(e: Embeddings | None) -> Embeddings | None:
    """Promote to at least float32 once (stored reference embeddings are float16)."""
    if e is None:
        return None
    dtype = jnp.promote_types(jnp.result_type(e.zimg), jnp.float32)
    return Embeddings(*(jnp.asarray(x, dtype) for x in e))


def _models(learner: Embeddings | None, reference: Embeddings | None, score: str):
    """(learner or None, reference or None): only the models `score` needs, checked and promoted."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; known: {SCORES}")
    needs_learner, needs_reference = score != "easy_reference", score != "hard_learner"
    if needs_learner and learner is None:
        raise ValueError(f"score {score!r} needs the learner's embeddings")
    if needs_reference and reference is None:
        raise ValueError(f"score {score!r} needs the reference's embeddings")
    learner, reference = (learner if needs_learner else None), (reference if needs_reference else None)
    shapes = {e.zimg.shape[0] for e in (learner, reference) if e is not None}
    shapes |= {e.ztxt.shape[0] for e in (learner, reference) if e is not None}
    if len(shapes) != 1:
        raise ValueError(f"learner and reference embeddings must cover the same examples, got sizes {sorted(shapes)}")
    return _as_float(learner), _as_float(reference)


def _combine(score: str, learner_value, reference_value):
    """The score from per-model values: learner − reference, learner, or −reference."""
    if score == "hard_learner":
        return learner_value
    if score == "easy_reference":
        return -reference_value
    return learner_value - reference_value


def _size(learner: Embeddings | None, reference: Embeddings | None) -> int:
    if learner is None and reference is None:
        raise ValueError("give the learner's or the reference's embeddings")
    return (learner if learner is not None else reference).zimg.shape[0]


# ---------------------------------------------------------------------------------------------------------------
# Pair scores of any block, and the diagonal.


def _pair_losses(e: Embeddings, rows: jax.Array | None, cols: jax.Array | None) -> jax.Array:
    """[R, K] sigmoid pair losses of image rows `rows` vs text columns `cols` (None: all B); positives where i = j."""
    if rows is None and cols is None:
        return sigmoid_pair_losses(e.zimg, e.ztxt, e.t, e.b)
    all_examples = jnp.arange(e.zimg.shape[0])
    rows = all_examples if rows is None else rows
    cols = all_examples if cols is None else cols
    return sigmoid_pair_losses(e.zimg[rows], e.ztxt[cols], e.t, e.b, rows, cols)


def pair_scores(
    learner: Embeddings | None,
    reference: Embeddings | None,
    score: str = "learnability",
    rows: jax.Array | None = None,
    cols: jax.Array | None = None,
) -> jax.Array:
    """[R, K] block S[rows][:, cols] of the pair-score matrix; S[:, C] is `cols=C`, S[C, :] is `rows=C`."""
    learner, reference = _models(learner, reference, score)
    values = [None if e is None else _pair_losses(e, rows, cols) for e in (learner, reference)]
    return _combine(score, *values)


def _own_logits(e: Embeddings) -> jax.Array:
    """[B] softmax logit of each example with its own caption: t⟨x_i, y_i⟩ (no bias)."""
    return e.t * jnp.sum(e.zimg * e.ztxt, axis=-1)


def diagonal_scores(learner: Embeddings | None, reference: Embeddings | None, score: str = "learnability") -> jax.Array:
    """[B] S_ii: the score of each example with its own caption (sigmoid loss), without building B×B."""
    learner, reference = _models(learner, reference, score)
    values = [None if e is None else own_pair_sigmoid(e.zimg, e.ztxt, e.t, e.b)[2] for e in (learner, reference)]
    return _combine(score, *values)


# ---------------------------------------------------------------------------------------------------------------
# Conditional scores of joint selection, as (init, scores, update) on a small per-candidate state.


def _sigmoid_conditional(learner, reference, score, n_chunks, chunk_size):
    """State c [B]: c_i = S_ii + Σ_{k∈P}(S_ik + S_ki), updated by one chunk's rows and columns."""
    del n_chunks, chunk_size  # c holds all that the picked chunks contribute

    def update(c, chunk):  # chunk: [n] indices
        return (
            c
            + pair_scores(learner, reference, score, cols=chunk).sum(1)
            + pair_scores(learner, reference, score, rows=chunk).sum(0)
        )

    return diagonal_scores(learner, reference, score), (lambda c: c), update


def _softmax_conditional(learner, reference, score, n_chunks, chunk_size):
    """The marginal gain Δ_i of the summed InfoNCE. State: the picked chunks [n_chunks, chunk_size] and how many there
    are, and per model the running logsumexps over P of every example's row logits (image vs texts in P: R) and
    column logits (text vs images in P: C)."""
    models = {name: e for name, e in (("learner", learner), ("reference", reference)) if e is not None}
    n_examples = _size(learner, reference)
    empty = jnp.full([n_examples], -jnp.inf, next(iter(models.values())).zimg.dtype)
    init = {
        "members": jnp.zeros([n_chunks, chunk_size], jnp.int32),
        "n_picked_chunks": jnp.zeros([], jnp.int32),
        "logsumexp": {name: (empty, empty) for name in models},  # (R [B], C [B])
    }

    def gain(e, state, row, col):
        own = _own_logits(e)  # [B]
        own_loss = 0.5 * ((jnp.logaddexp(row, own) - own) + (jnp.logaddexp(col, own) - own))

        def members_rise(total, chunk_number):  # the picked chunk's members' losses, with each candidate added
            members = state["members"][chunk_number]  # [n]
            as_image = pair_logits(e.zimg[members], e.ztxt, e.t) - row[members][:, None]  # [n, B]: a_ki − R_k
            as_text = pair_logits(e.zimg, e.ztxt[members], e.t) - col[members][None, :]  # [B, n]: a_ik − C_k
            rise = jax.nn.softplus(as_image).sum(0) + jax.nn.softplus(as_text).sum(1)  # [B]
            return total + jnp.where(chunk_number < state["n_picked_chunks"], rise, 0.0), None

        rises, _ = jax.lax.scan(members_rise, jnp.zeros_like(own), jnp.arange(n_chunks))
        return own_loss + 0.5 * rises

    def scores(state):
        values = {name: gain(e, state, *state["logsumexp"][name]) for name, e in models.items()}
        return _combine(score, values.get("learner"), values.get("reference"))

    def update(state, chunk):  # chunk: [n] indices
        logsumexp = {}
        for name, e in models.items():
            row, col = state["logsumexp"][name]
            row = jnp.logaddexp(row, jax.nn.logsumexp(pair_logits(e.zimg, e.ztxt[chunk], e.t), axis=1))  # [B]
            col = jnp.logaddexp(col, jax.nn.logsumexp(pair_logits(e.zimg[chunk], e.ztxt, e.t), axis=0))  # [B]
            logsumexp[name] = (row, col)
        return {
            "members": state["members"].at[state["n_picked_chunks"]].set(chunk),
            "n_picked_chunks": state["n_picked_chunks"] + 1,
            "logsumexp": logsumexp,
        }

    return init, scores, update


def _gumbel_top_k(key: jax.Array, logits: jax.Array, k: int, picked: jax.Array, noise: bool) -> jax.Array:
    """[k] indices drawn without replacement ∝ softmax(logits) over the unpicked ones (greedy top-k without noise)."""
    if noise:
        logits = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
    return jax.lax.top_k(jnp.where(picked, -jnp.inf, logits), k)[1].astype(jnp.int32)


def _check_sizes(n_examples: int, n_select: int, n_chunks: int) -> None:
    if not 0 < n_select <= n_examples:
        raise ValueError(f"cannot select {n_select} of a super-batch of {n_examples}")
    if n_chunks < 1 or n_select % n_chunks:
        raise ValueError(f"n_select {n_select} does not split into {n_chunks} equal chunks")


def joint_selection_trace(
    rng: jax.Array,
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    score: str = "learnability",
    n_select: int,
    n_chunks: int = 16,
    loss: str = "sigmoid",
    first_chunk: str = "score",
    noise: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Joint selection, also returning the conditional scores each chunk was drawn from.

    Returns (indices [n_select] int32 in pick order, scores [n_chunks, B] with already-picked candidates at −inf).
    A uniform first chunk (`first_chunk="uniform"`, and always with the softmax loss) is a random draw even when
    `noise` is off, since there is no score to maximise.
    """
    learner, reference = _models(learner, reference, score)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
    if first_chunk not in FIRST_CHUNKS:
        raise ValueError(f"unknown first_chunk {first_chunk!r}; known: {FIRST_CHUNKS}")
    n_examples = _size(learner, reference)
    _check_sizes(n_examples, n_select, n_chunks)
    chunk_size = n_select // n_chunks
    conditional = _sigmoid_conditional if loss == "sigmoid" else _softmax_conditional
    state, scores_of, update = conditional(learner, reference, score, n_chunks, chunk_size)

    nothing_picked = jnp.zeros([n_examples], bool)
    first_scores = scores_of(state)
    first_uniform = first_chunk == "uniform" or loss == "softmax"
    if first_uniform:
        first_scores = jnp.zeros_like(first_scores)
    first = _gumbel_top_k(jax.random.fold_in(rng, 0), first_scores, chunk_size, nothing_picked, noise or first_uniform)

    def step(carry, chunk_number):
        state, picked, previous = carry
        state = update(state, previous)
        scores = scores_of(state)  # [B]
        chunk = _gumbel_top_k(jax.random.fold_in(rng, chunk_number), scores, chunk_size, picked, noise)
        return (state, picked.at[chunk].set(True), chunk), (chunk, jnp.where(picked, -jnp.inf, scores))

    carry = (state, nothing_picked.at[first].set(True), first)
    _, (chunks, traces) = jax.lax.scan(step, carry, jnp.arange(1, n_chunks))  # [N-1, n], [N-1, B]
    indices = jnp.concatenate([first, chunks.reshape(-1)])
    return indices, jnp.concatenate([first_scores[None], traces])


# ---------------------------------------------------------------------------------------------------------------
# Per-example and per-sub-batch scores for the baselines and for reporting.


def _infonce_against(e: Embeddings, examples: jax.Array, against: jax.Array, block_size: int) -> jax.Array:
    """[n] InfoNCE of each of `examples` ((i2t + t2i) / 2) with the examples `against` (containing it) in the batch."""
    zimg_against, ztxt_against = e.zimg[against], e.ztxt[against]  # [m, d]

    def one(i):
        own = e.t * jnp.dot(e.zimg[i], e.ztxt[i])
        i2t = jax.nn.logsumexp(e.t * (ztxt_against @ e.zimg[i])) - own
        t2i = jax.nn.logsumexp(e.t * (zimg_against @ e.ztxt[i])) - own
        return 0.5 * (i2t + t2i)

    return jax.lax.map(one, examples, batch_size=block_size)


def _sigmoid_share(e: Embeddings, block_size: int) -> jax.Array:
    """[B] ½[Σ_j ℓ_ij + Σ_j ℓ_ji]: each example's row and column of the pair-loss matrix, halved, in B×block blocks."""

    def one(i):
        return 0.5 * (_pair_losses(e, i[None], None).sum() + _pair_losses(e, None, i[None]).sum())

    return jax.lax.map(one, jnp.arange(e.zimg.shape[0]), batch_size=block_size)


def example_scores(
    learner: Embeddings | None,
    reference: Embeddings | None,
    score: str = "learnability",
    loss: str = "sigmoid",
    block_size: int = 256,
) -> jax.Array:
    """[B] per-example scores of independent selection: each example's share ℓ_i of the super-batch's summed loss.

    Softmax ℓ_i = ½[(LSE_{j∈B} a_ij − a_ii) + (LSE_{j∈B} a_ji − a_ii)], its InfoNCE against the whole super-batch;
    sigmoid ℓ_i = ½[Σ_j ℓ_ij + Σ_j ℓ_ji], its row and column of pair losses halved (ℓ_ii counted once). A contrastive
    loss is only defined within a batch (a lone example's InfoNCE is 0); this is the one per-example quantity both
    losses define that sums to the loss the learner trains on, with the whole super-batch (not a picked sub-batch)
    as every example's context. Combined as the pair scores are (learner minus reference for learnability);
    `block_size` examples at a time: O(B²d) compute, O(B·block_size) memory.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
    learner, reference = _models(learner, reference, score)
    everyone = jnp.arange(_size(learner, reference))

    def share(e):
        if loss == "sigmoid":
            return _sigmoid_share(e, block_size)
        return _infonce_against(e, everyone, everyone, block_size)

    return _combine(score, *[None if e is None else share(e) for e in (learner, reference)])


def subbatch_score(
    learner: Embeddings | None,
    reference: Embeddings | None,
    indices: jax.Array,
    *,
    score: str = "learnability",
    loss: str = "sigmoid",
    block_size: int = 256,
) -> jax.Array:
    """Scalar score of the sub-batch `indices` per example, computed `block_size` rows at a time.

    Sigmoid: Σ_{i,j∈I} S_ij / |I| (for learnability, the learner's sub-batch loss minus the reference's).
    Softmax: the mean over I of the learner-minus-reference InfoNCE with negatives in I.
    """
    learner, reference = _models(learner, reference, score)
    if loss == "sigmoid":

        def row_sum(i):
            return pair_scores(learner, reference, score, rows=i[None], cols=indices).sum()

        return jax.lax.map(row_sum, indices, batch_size=block_size).sum() / indices.shape[0]
    if loss != "softmax":
        raise ValueError(f"unknown loss {loss!r}; known: {LOSSES}")
    values = [None if e is None else _infonce_against(e, indices, indices, block_size) for e in (learner, reference)]
    return _combine(score, *values).mean()


# ---------------------------------------------------------------------------------------------------------------
# Entry point and offline filter.


def select(
    rng: jax.Array,
    learner: Embeddings | None,
    reference: Embeddings | None,
    *,
    method: str,
    n_select: int,
    score: str = "learnability",
    n_chunks: int = 16,
    loss: str = "sigmoid",
    first_chunk: str = "score",
    noise: bool = True,
) -> jax.Array:
    """[n_select] unique int32 indices into the super-batch, by `method` joint | independent | uniform.

    `noise=False` makes joint selection a greedy chunk-wise argmax and independent selection a plain top-k; with
    noise, both sample ∝ softmax(score) without replacement. Deterministic given `rng`, whatever the sharding.
    """
    if method == "joint":
        return joint_selection_trace(
            rng,
            learner,
            reference,
            score=score,
            n_select=n_select,
            n_chunks=n_chunks,
            loss=loss,
            first_chunk=first_chunk,
            noise=noise,
        )[0]
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; known: {METHODS}")
    n_examples = _size(learner, reference)
    _check_sizes(n_examples, n_select, 1)
    if method == "uniform":
        return _gumbel_top_k(rng, jnp.zeros([n_examples]), n_select, jnp.zeros([n_examples], bool), noise=True)
    scores = example_scores(learner, reference, score, loss, block_size=max(1, n_select // n_chunks))
    return _gumbel_top_k(rng, scores, n_select, jnp.zeros([n_examples], bool), noise)


def offline_filter(scores: np.ndarray, keep_fraction: float) -> np.ndarray:
    """[n] bool mask keeping the round(q·n) highest stored easy-reference scores (DataComp's CLIP-score filter).

    Higher means easier for the reference (e.g. cosine, or minus the own-pair loss). Halves round up; among equal
    scores the earlier example is kept.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    scores = np.asarray(scores)
    n_keep = int(np.floor(keep_fraction * len(scores) + 0.5))
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[:n_keep]] = True
    return keep
