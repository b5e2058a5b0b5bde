"""Selection against brute force from the full B×B score matrix, written in plain numpy (float64)."""

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from curation.trainer.selection import (
    SCORES,
    Embeddings,
    diagonal_scores,
    example_scores,
    joint_selection_trace,
    offline_filter,
    pair_scores,
    select,
    subbatch_score,
)
from models.losses import contrastive_loss, sigmoid_loss, softmax_loss
from tests.four_devices import run_on_four_cpu_devices


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_pair(seed, n=32, d=8):
    """(learner, reference) of random unit embeddings, float64 numpy, with distinct t and b."""
    rng = np.random.default_rng(seed)
    learner = Embeddings(_unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(n, d))), 6.0, -2.0)
    reference = Embeddings(_unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(n, d))), 9.0, -3.5)
    return learner, reference


def _numpy_pair_losses(e):
    logits = e.t * e.zimg @ e.ztxt.T + e.b
    labels = 2 * np.eye(len(logits)) - 1
    return np.logaddexp(0.0, -labels * logits)  # softplus


def _numpy_scores(learner, reference, score):
    if score == "hard_learner":
        return _numpy_pair_losses(learner)
    if score == "easy_reference":
        return -_numpy_pair_losses(reference)
    return _numpy_pair_losses(learner) - _numpy_pair_losses(reference)


def _numpy_conditional(S, picked):
    """c_i = S_ii + Σ_{k∈P}(S_ik + S_ki), −inf for the picked."""
    picked = list(picked)
    c = np.diag(S) + S[:, picked].sum(1) + S[picked, :].sum(0)
    c[picked] = -np.inf
    return c


def _numpy_combine(score, learner_value, reference_value):
    """Learner − reference, learner, or −reference, as the score asks."""
    values = {"hard_learner": learner_value, "easy_reference": -reference_value}
    return values.get(score, learner_value - reference_value)


def _numpy_shares(e, loss):
    """[B] ℓ_i with L(B) = Σ_i ℓ_i, from the dense B×B matrix: sigmoid ½(row + column of pair losses), softmax
    ½[(LSE_j a_ij − a_ii) + (LSE_j a_ji − a_ii)] with a_kj = t⟨x_k, y_j⟩."""
    if loss == "sigmoid":
        losses = _numpy_pair_losses(e)
        return 0.5 * (losses.sum(1) + losses.sum(0))
    a = e.t * e.zimg @ e.ztxt.T
    own = np.diag(a)
    return 0.5 * ((np.logaddexp.reduce(a, axis=1) - own) + (np.logaddexp.reduce(a, axis=0) - own))


def _numpy_greedy(S, n_select, n_chunks):
    picked = []
    for _ in range(n_chunks):
        c = _numpy_conditional(S, picked)
        picked += list(np.argsort(-c, kind="stable")[: n_select // n_chunks])
    return np.array(picked)


def _numpy_infonce(e, i, negatives):
    """InfoNCE of example i ((i2t + t2i) / 2) in the batch {i} ∪ negatives."""
    batch = [i] + [k for k in negatives if k != i]
    own = e.t * e.zimg[i] @ e.ztxt[i]
    i2t = np.logaddexp.reduce(e.t * e.ztxt[batch] @ e.zimg[i]) - own
    t2i = np.logaddexp.reduce(e.t * e.zimg[batch] @ e.ztxt[i]) - own
    return 0.5 * (i2t + t2i)


def _numpy_summed_infonce(e, members):
    """L(P) = Σ_{k∈P} ½[(LSE_{j∈P} a_kj − a_kk) + (LSE_{j∈P} a_jk − a_kk)], a_kj = t⟨x_k, y_j⟩, counted densely."""
    if not members:
        return 0.0
    a = e.t * e.zimg[members] @ e.ztxt[members].T  # [m, m]
    own = np.diag(a)
    return float(np.sum(0.5 * ((np.logaddexp.reduce(a, axis=1) - own) + (np.logaddexp.reduce(a, axis=0) - own))))


def _numpy_softmax_gain(learner, reference, score, picked):
    """L(P ∪ {i}) − L(P) for every unpicked i (−inf for the picked), learner minus reference for learnability."""
    n = len(learner.zimg)
    c = np.full(n, -np.inf)
    for i in set(range(n)) - set(picked):
        values = {
            name: _numpy_summed_infonce(e, picked + [i]) - _numpy_summed_infonce(e, picked)
            for name, e in (("l", learner), ("r", reference))
        }
        c[i] = {"hard_learner": values["l"], "easy_reference": -values["r"]}.get(score, values["l"] - values["r"])
    return c


def _chunks(indices, n_chunks):
    return np.asarray(indices).reshape(n_chunks, -1)


@pytest.mark.parametrize(
    "method, score, loss, first_chunk, noise",
    [
        ("joint", s, loss_name, f, n)
        for s in SCORES
        for loss_name in ("sigmoid", "softmax")
        for f, n in [("score", True), ("score", False), ("uniform", True)]
    ]
    + [("independent", s, loss_name, "score", True) for s in SCORES for loss_name in ("sigmoid", "softmax")]
    + [("uniform", "learnability", "sigmoid", "score", True)],
)
def test_selects_exactly_n_unique_indices_in_range(method, score, loss, first_chunk, noise):
    learner, reference = _random_pair(0, n=40)
    fn = jax.jit(
        functools.partial(
            select, method=method, score=score, n_select=12, n_chunks=4, loss=loss, first_chunk=first_chunk, noise=noise
        )
    )
    indices = np.asarray(fn(jax.random.key(1), learner, reference))
    assert indices.shape == (12,) and indices.dtype == np.int32
    assert len(set(indices.tolist())) == 12
    assert indices.min() >= 0 and indices.max() < 40


@pytest.mark.parametrize("score", SCORES)
def test_pair_score_blocks_and_diagonal_match_numpy(score):
    learner, reference = _random_pair(1, n=24)
    expected = _numpy_scores(learner, reference, score)
    chunk = jnp.array([5, 0, 17, 23])
    with jax.enable_x64(True):
        np.testing.assert_allclose(pair_scores(learner, reference, score), expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(pair_scores(learner, reference, score, cols=chunk), expected[:, chunk], rtol=1e-12)
        np.testing.assert_allclose(pair_scores(learner, reference, score, rows=chunk), expected[chunk, :], rtol=1e-12)
        np.testing.assert_allclose(diagonal_scores(learner, reference, score), np.diag(expected), rtol=1e-12)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("first_chunk", ["score", "uniform"])
def test_blocked_conditional_scores_equal_brute_force_after_every_chunk(score, first_chunk):
    learner, reference = _random_pair(2, n=40)
    S = _numpy_scores(learner, reference, score)
    with jax.enable_x64(True):
        indices, trace = joint_selection_trace(
            jax.random.key(3), learner, reference, score=score, n_select=20, n_chunks=5, first_chunk=first_chunk
        )
    chunks = _chunks(indices, 5)
    for k in range(5):
        expected = _numpy_conditional(S, chunks[:k].ravel())
        if k == 0 and first_chunk == "uniform":
            expected = np.zeros(40)
        np.testing.assert_allclose(np.asarray(trace[k]), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("score", SCORES)
def test_joint_selection_without_noise_is_numpy_greedy_chunkwise_argmax(score):
    learner, reference = _random_pair(4, n=48, d=12)
    expected = _numpy_greedy(_numpy_scores(learner, reference, score), n_select=16, n_chunks=4)
    with jax.enable_x64(True):
        indices = select(
            jax.random.key(0), learner, reference, method="joint", score=score, n_select=16, n_chunks=4, noise=False
        )
    np.testing.assert_array_equal(np.asarray(indices), expected)
    # Conditioning matters: the joint pick differs from independent selection's top 16.
    independent = select(
        jax.random.key(0), learner, reference, method="independent", score=score, n_select=16, noise=False
    )
    assert set(np.asarray(independent).tolist()) != set(expected.tolist())


@pytest.mark.parametrize("score", SCORES)
def test_softmax_conditional_scores_are_the_marginal_gain_of_the_summed_loss(score):
    learner, reference = _random_pair(5, n=32)
    for noise in (True, False):
        with jax.enable_x64(True):
            indices, trace = joint_selection_trace(
                jax.random.key(6), learner, reference, score=score, n_select=12, n_chunks=4, loss="softmax", noise=noise
            )
        chunks = _chunks(indices, 4)
        np.testing.assert_array_equal(np.asarray(trace[0]), np.zeros(32))  # P empty: every gain is 0
        for k in range(1, 4):
            expected = _numpy_softmax_gain(learner, reference, score, chunks[:k].ravel().tolist())
            np.testing.assert_allclose(np.asarray(trace[k]), expected, rtol=1e-10, atol=1e-10)
            if not noise:
                assert set(chunks[k].tolist()) == set(np.argsort(-expected)[:3].tolist())


def test_the_softmax_gain_counts_the_rise_of_the_picked_members_losses():
    """The gain differs from i's own InfoNCE over P ∪ {i} by what the picked members' losses rise: never less."""
    learner, reference = _random_pair(8, n=24)
    with jax.enable_x64(True):
        indices, trace = joint_selection_trace(
            jax.random.key(2), learner, reference, score="hard_learner", n_select=12, n_chunks=3, loss="softmax"
        )
    picked = _chunks(indices, 3)[:2].ravel().tolist()
    unpicked = sorted(set(range(24)) - set(picked))
    own = np.array([_numpy_infonce(learner, i, picked) for i in unpicked])  # i's own InfoNCE over P ∪ {i}
    rise = np.asarray(trace[2])[unpicked] - own
    assert np.all(rise > 0) and rise.max() > 0.1


def test_subbatch_losses_are_sums_of_their_pair_blocks():
    learner, reference = _random_pair(7, n=30)
    subset = np.array([3, 29, 0, 11, 12, 7, 21, 18, 5, 9])
    sub = lambda e: (e.zimg[subset], e.ztxt[subset], e.t)  # noqa: E731
    with jax.enable_x64(True):
        learner_loss = sigmoid_loss(*sub(learner), learner.b)
        reference_loss = sigmoid_loss(*sub(reference), reference.b)
        block = _numpy_pair_losses(learner)[np.ix_(subset, subset)]
        np.testing.assert_allclose(learner_loss * len(subset), block.sum(), rtol=1e-12)
        learnability = subbatch_score(learner, reference, jnp.asarray(subset), block_size=4)
        np.testing.assert_allclose(learnability, learner_loss - reference_loss, rtol=1e-12)
        np.testing.assert_allclose(
            learnability,
            _numpy_scores(learner, reference, "learnability")[np.ix_(subset, subset)].sum() / len(subset),
            rtol=1e-12,
        )
        softmax = subbatch_score(learner, reference, jnp.asarray(subset), loss="softmax", block_size=4)
        np.testing.assert_allclose(softmax, softmax_loss(*sub(learner)) - softmax_loss(*sub(reference)), rtol=1e-12)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("score", SCORES)
def test_example_scores_are_each_examples_share_of_the_summed_loss(score, loss):
    learner, reference = _random_pair(16, n=12)
    shares = {name: _numpy_shares(e, loss) for name, e in (("learner", learner), ("reference", reference))}
    with jax.enable_x64(True):
        scores = np.asarray(example_scores(learner, reference, score, loss, block_size=5))  # 5 does not divide 12
        # The trainer's batch loss is the summed loss over the batch size (sigmoid: Σ_ij ℓ_ij / B; softmax: the mean
        # of the image→text and text→image means), so B times it is the summed loss L(B).
        summed = {
            name: 12 * float(contrastive_loss(loss, e.zimg, e.ztxt, {"t": e.t, "b": e.b}))
            for name, e in (("learner", learner), ("reference", reference))
        }
    np.testing.assert_allclose(scores, _numpy_combine(score, shares["learner"], shares["reference"]), rtol=1e-12)
    np.testing.assert_allclose(scores.sum(), _numpy_combine(score, summed["learner"], summed["reference"]), rtol=1e-12)
    if loss == "sigmoid":  # the row and column count: not the own pair alone
        assert not np.allclose(scores, np.diag(_numpy_scores(learner, reference, score)))


@pytest.mark.parametrize("score", SCORES)
def test_independent_selection_ranks_by_the_share_where_s_ii_ranks_otherwise(score):
    learner, reference = _random_pair(17, n=32)
    shares = _numpy_combine(score, _numpy_shares(learner, "sigmoid"), _numpy_shares(reference, "sigmoid"))
    by_share = np.argsort(-shares)[:8]
    by_own_pair = np.argsort(-np.diag(_numpy_scores(learner, reference, score)))[:8]
    assert set(by_share.tolist()) != set(by_own_pair.tolist())  # the two definitions disagree here
    with jax.enable_x64(True):
        indices = select(
            jax.random.key(0), learner, reference, method="independent", score=score, n_select=8, noise=False
        )
    np.testing.assert_array_equal(np.asarray(indices), by_share)


def test_sampling_frequencies_follow_the_softmax_of_conditional_scores():
    rng = np.random.default_rng(9)
    learner = Embeddings(_unit(rng.normal(size=(4, 6))), _unit(rng.normal(size=(4, 6))), 3.0, 0.0)
    S = _numpy_scores(learner, None, "hard_learner")
    keys = jax.random.split(jax.random.key(10), 8000)

    def draw(method, n_select, n_chunks):
        fn = functools.partial(select, method=method, score="hard_learner", n_select=n_select, n_chunks=n_chunks)
        return np.asarray(jax.jit(jax.vmap(lambda key: fn(key, learner, None)))(keys))

    softmax = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
    first = softmax(np.diag(S))
    # Joint selection's first chunk by S_ii; independent selection by each example's share ½(row + column of S).
    for method, expected in (("joint", first), ("independent", softmax(0.5 * (S.sum(0) + S.sum(1))))):
        frequencies = np.bincount(draw(method, 1, 1)[:, 0], minlength=4) / len(keys)
        np.testing.assert_allclose(frequencies, expected, atol=0.025)
    # Second chunk: ∝ softmax over j ≠ i of S_jj + S_ij + S_ji, given the first pick i.
    pairs = draw("joint", 2, 2)
    for i in range(4):
        others = [j for j in range(4) if j != i]
        conditional = softmax(np.array([S[j, j] + S[i, j] + S[j, i] for j in others]))
        for j, p in zip(others, conditional):
            frequency = np.mean((pairs[:, 0] == i) & (pairs[:, 1] == j))
            assert abs(frequency - first[i] * p) < 0.025, (i, j, frequency, first[i] * p)


def test_learnability_prefers_examples_the_reference_aligns_and_the_learner_does_not():
    rng = np.random.default_rng(11)
    n, d, group = 48, 32, 12
    images = _unit(rng.normal(size=(n, d)))
    aligned = _unit(images + 0.1 * rng.normal(size=(n, d)))
    unrelated = _unit(rng.normal(size=(n, d)))
    # Groups of 12: learnable (reference aligned only), noise (neither), learned (both), odd (learner only).
    # Where neither model aligns a pair, both see the same unrelated caption, so only alignment tells them apart.
    learnable, noise = np.arange(0, 12), np.arange(12, 24)
    reference_aligned = np.isin(np.arange(n), np.r_[0:12, 24:36])[:, None]
    learner_aligned = np.isin(np.arange(n), np.r_[24:48])[:, None]
    reference = Embeddings(images, np.where(reference_aligned, aligned, unrelated), 20.0, -10.0)
    learner = Embeddings(images, np.where(learner_aligned, aligned, unrelated), 20.0, -10.0)
    picked = {}
    for method, score in [("joint", "learnability"), ("independent", "learnability"), ("joint", "hard_learner")]:
        indices = select(jax.random.key(12), learner, reference, method=method, score=score, n_select=group, n_chunks=3)
        picked[method, score] = np.asarray(indices)
    assert np.isin(picked["joint", "learnability"], learnable).sum() >= 11
    assert np.isin(picked["independent", "learnability"], learnable).sum() >= 11
    # The learner alone cannot tell the learnable from the noise.
    assert np.isin(picked["joint", "hard_learner"], np.r_[learnable, noise]).sum() >= 11
    assert np.isin(picked["joint", "hard_learner"], noise).sum() >= 2


def _walk_shapes(jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _walk_shapes(inner)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_joint_selection_never_builds_a_superbatch_square(loss):
    learner, reference = _random_pair(13, n=64)
    fn = functools.partial(select, method="joint", n_select=16, n_chunks=4, loss=loss)
    shapes = list(_walk_shapes(jax.make_jaxpr(fn)(jax.random.key(0), learner, reference).jaxpr))
    assert (64, 4) in shapes or (4, 64) in shapes  # the blocks are there
    assert max(int(np.prod(shape)) for shape in shapes) <= 64 * 8


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_independent_selection_never_builds_a_superbatch_square(loss):
    learner, reference = _random_pair(13, n=64)
    fn = functools.partial(select, method="independent", n_select=16, n_chunks=4, loss=loss)
    shapes = list(_walk_shapes(jax.make_jaxpr(fn)(jax.random.key(0), learner, reference).jaxpr))
    assert any(int(np.prod(shape)) == 64 * 4 and {4, 64} <= set(shape) for shape in shapes)  # B×block blocks
    assert max(int(np.prod(shape)) for shape in shapes) <= 64 * 8


def test_four_cpu_devices_give_the_same_indices_as_one():
    script = textwrap.dedent("""
        import functools, json, sys
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from curation.trainer.selection import Embeddings, select

        assert jax.device_count() == 4, jax.devices()
        rng = np.random.default_rng(0)
        unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        make = lambda t, b: Embeddings(unit(rng.normal(size=(64, 8))), unit(rng.normal(size=(64, 8))),
                                       np.float32(t), np.float32(b))
        learner, reference = make(5.0, -2.0), make(8.0, -4.0)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
        shard = lambda e: Embeddings(jax.device_put(e.zimg, data), jax.device_put(e.ztxt, data),
                                     jax.device_put(e.t, replicated), jax.device_put(e.b, replicated))
        results = {}
        for name, kwargs in {"joint": dict(method="joint"), "joint_greedy": dict(method="joint", noise=False),
                             "joint_softmax": dict(method="joint", loss="softmax"),
                             "independent": dict(method="independent"),
                             "independent_softmax": dict(method="independent", loss="softmax"),
                             "uniform": dict(method="uniform")}.items():
            fn = jax.jit(functools.partial(select, n_select=16, n_chunks=4, **kwargs))
            one = fn(jax.random.key(7), learner, reference)
            sharded_learner, sharded_reference = shard(learner), shard(reference)
            assert len(sharded_learner.zimg.sharding.device_set) == 4
            four = fn(jax.random.key(7), sharded_learner, sharded_reference)
            results[name] = [np.asarray(one).tolist(), np.asarray(four).tolist()]
        json.dump(results, sys.stdout)
    """)
    results = run_on_four_cpu_devices(script)
    assert len(results) == 6
    for name, (one, four) in results.items():
        assert one == four, name
        assert len(set(one)) == 16, name


@pytest.mark.parametrize("keep_fraction", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_offline_filter_keeps_the_highest_round_q_n_scores(keep_fraction):  # 0.5·37 = 18.5 rounds up
    scores = np.random.default_rng(14).normal(size=37)
    keep = offline_filter(scores, keep_fraction)
    assert keep.dtype == bool and keep.shape == (37,)
    assert keep.sum() == int(np.floor(keep_fraction * 37 + 0.5))
    if 0 < keep.sum() < 37:
        assert scores[keep].min() > scores[~keep].max()


def test_bad_arguments_raise_with_the_numbers():
    learner, reference = _random_pair(15, n=16)
    with pytest.raises(ValueError, match="12 does not split into 5"):
        select(jax.random.key(0), learner, reference, method="joint", n_select=12, n_chunks=5)
    with pytest.raises(ValueError, match="cannot select 20 of a super-batch of 16"):
        select(jax.random.key(0), learner, reference, method="independent", n_select=20)
    with pytest.raises(ValueError, match="needs the reference"):
        select(jax.random.key(0), learner, None, method="joint", n_select=4, n_chunks=2)
    with pytest.raises(ValueError, match="unknown selection method"):
        select(jax.random.key(0), learner, reference, method="greedy", n_select=4)
    with pytest.raises(ValueError, match="keep_fraction"):
        offline_filter(np.zeros(3), 1.5)
