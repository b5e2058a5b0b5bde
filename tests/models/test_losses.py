"""Block losses against plain numpy reference implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.losses import (
    pair_labels,
    pair_logits,
    sigmoid_loss,
    sigmoid_pair_losses,
    softmax_example_losses,
    softmax_loss,
)


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _numpy_sigmoid_pair_losses(zimg, ztxt, t, b, img_keys, txt_keys):
    out = np.zeros((len(zimg), len(ztxt)))
    for i in range(len(zimg)):
        for j in range(len(ztxt)):
            logit = t * float(np.dot(zimg[i].astype(np.float64), ztxt[j])) + b
            label = 1.0 if img_keys[i] == txt_keys[j] else -1.0
            out[i, j] = np.log1p(np.exp(-label * logit))
    return out


def _numpy_softmax_loss(zimg, ztxt, t, img_keys, txt_keys):
    logits = t * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    i2t, t2i = [], []
    for i in range(len(zimg)):
        cols = [j for j in range(len(ztxt)) if txt_keys[j] == img_keys[i]]
        if cols:
            lse = np.log(np.exp(logits[i]).sum())
            i2t.append(np.mean([lse - logits[i, j] for j in cols]))
    for j in range(len(ztxt)):
        rows = [i for i in range(len(zimg)) if img_keys[i] == txt_keys[j]]
        if rows:
            lse = np.log(np.exp(logits[:, j]).sum())
            t2i.append(np.mean([lse - logits[i, j] for i in rows]))
    return 0.5 * (np.mean(i2t) + np.mean(t2i))


@pytest.mark.parametrize("seed", range(3))
def test_block_pair_losses_match_numpy(seed):
    rng = np.random.default_rng(seed)
    # Image rows from examples {0..5}, text columns from an overlapping set {3..9}: positives only where keys meet.
    img_keys, txt_keys = np.arange(0, 6), np.arange(3, 10)
    zimg, ztxt = _unit(rng, 6, 16), _unit(rng, 7, 16)
    t, b = rng.uniform(1, 20), rng.uniform(-12, 2)
    got = sigmoid_pair_losses(zimg, ztxt, t, b, jnp.asarray(img_keys), jnp.asarray(txt_keys))
    expected = _numpy_sigmoid_pair_losses(zimg, ztxt, t, b, img_keys, txt_keys)
    assert got.shape == (6, 7)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    labels = np.asarray(pair_labels(jnp.asarray(img_keys), jnp.asarray(txt_keys), (6, 7)))
    assert (labels > 0).sum() == 3  # keys 3, 4, 5
    np.testing.assert_allclose(pair_logits(zimg, ztxt, t, b), t * zimg @ ztxt.T + b, rtol=1e-5, atol=1e-5)


def test_sigmoid_batch_loss_is_the_sum_over_the_pair_loss_block():
    rng = np.random.default_rng(7)
    n = 12
    zimg, ztxt = _unit(rng, n, 8), _unit(rng, n, 8)
    t, b = 10.0, -10.0
    keys = jnp.arange(n)
    full = sigmoid_pair_losses(zimg, ztxt, t, b)  # [n, n], diagonal positives
    assert float(sigmoid_loss(zimg, ztxt, t, b)) == pytest.approx(float(full.sum()) / n, rel=1e-6)
    np.testing.assert_allclose(full, sigmoid_pair_losses(zimg, ztxt, t, b, keys, keys), rtol=1e-6)
    # Any sub-batch's loss is the sum over its block of the big matrix (what JEST's selection relies on).
    subset = np.array([1, 4, 5, 9])
    sub_loss = sigmoid_loss(zimg[subset], ztxt[subset], t, b)
    block_sum = full[np.ix_(subset, subset)].sum() / len(subset)
    assert float(sub_loss) == pytest.approx(float(block_sum), rel=1e-6)
    # And a block's losses come out the same whether computed alone or cut from the big matrix.
    rows, cols = np.array([0, 2, 3]), np.array([2, 3, 8, 11])
    block = sigmoid_pair_losses(zimg[rows], ztxt[cols], t, b, keys[rows], keys[cols])
    np.testing.assert_allclose(block, full[np.ix_(rows, cols)], rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_softmax_loss_matches_direct_reference(seed):
    rng = np.random.default_rng(seed)
    n = 9
    zimg, ztxt = _unit(rng, n, 16), _unit(rng, n, 16)
    t = rng.uniform(1, 50)
    keys = np.arange(n)
    got = float(softmax_loss(zimg, ztxt, t))
    assert got == pytest.approx(_numpy_softmax_loss(zimg, ztxt, t, keys, keys), rel=1e-5)
    # The same as CLIP's usual formulation with cross-entropy on the diagonal.
    logits = t * zimg.astype(np.float64) @ ztxt.T.astype(np.float64)
    log_p_rows = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    log_p_cols = logits - np.log(np.exp(logits).sum(0, keepdims=True))
    assert got == pytest.approx(-0.5 * (np.diag(log_p_rows).mean() + np.diag(log_p_cols).mean()), rel=1e-5)


def test_softmax_block_with_partial_and_duplicate_positives():
    rng = np.random.default_rng(3)
    img_keys = np.array([0, 1, 2, 2, 5])  # key 2 twice (a duplicate), key 5 has no caption in the block
    txt_keys = np.array([1, 2, 0, 7])  # key 7 has no image in the block
    zimg, ztxt = _unit(rng, 5, 8), _unit(rng, 4, 8)
    got = softmax_loss(zimg, ztxt, 5.0, jnp.asarray(img_keys), jnp.asarray(txt_keys))
    assert float(got) == pytest.approx(_numpy_softmax_loss(zimg, ztxt, 5.0, img_keys, txt_keys), rel=1e-5)
    _, i2t_valid, _, t2i_valid = softmax_example_losses(zimg, ztxt, 5.0, jnp.asarray(img_keys), jnp.asarray(txt_keys))
    np.testing.assert_array_equal(i2t_valid, [True, True, True, True, False])
    np.testing.assert_array_equal(t2i_valid, [True, True, True, False])


def test_gradients_are_finite_even_at_extreme_logits():
    rng = np.random.default_rng(0)
    zimg, ztxt = _unit(rng, 6, 4), _unit(rng, 6, 4)
    ztxt[0] = zimg[0]  # a perfectly aligned pair
    for t, b in [(1.0, 0.0), (1e3, -1e3), (1e4, 50.0)]:
        grads = jax.grad(lambda zi, zt, t, b: sigmoid_loss(zi, zt, t, b), argnums=(0, 1, 2, 3))(zimg, ztxt, t, b)
        assert all(np.all(np.isfinite(g)) for g in grads)
        grads = jax.grad(lambda zi, zt, t: softmax_loss(zi, zt, t), argnums=(0, 1, 2))(zimg, ztxt, t)
        assert all(np.all(np.isfinite(g)) for g in grads)


def test_keys_are_required_for_non_square_blocks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="3x4 block needs keys"):
        sigmoid_pair_losses(_unit(rng, 3, 4), _unit(rng, 4, 4), 1.0, 0.0)
    with pytest.raises(ValueError, match="both img_keys and txt_keys"):
        sigmoid_pair_losses(_unit(rng, 3, 4), _unit(rng, 3, 4), 1.0, 0.0, jnp.arange(3), None)
