import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.two_towers import (
    MODEL_SIZES,
    ModelConfig,
    TwoTower,
    init_params,
    linear_resize_matrix,
    patch_kernel_resize_matrix,
    resize_patch_kernel,
)

CONFIG = ModelConfig(image_variant="mu", text_variant="mu", image_size=32, patch_size=4, embed_dim=24, text_length=16)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _batch(n=3, seed=1):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, size=(n, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(3, CONFIG.vocab_size, size=(n, CONFIG.text_length)).astype(np.int32)
    tokens[:, 10:] = 0  # padding
    return images, tokens


@pytest.mark.parametrize("patch_size", [4, 8])
def test_same_params_run_at_patch_p_and_2p(params, patch_size):
    images, tokens = _batch()
    model = TwoTower(CONFIG)
    zimg, ztxt, aux = model.apply({"params": params}, images, tokens, patch_size=patch_size)
    assert zimg.shape == (3, 24) and ztxt.shape == (3, 24)
    np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
    assert np.all(np.isfinite(zimg)) and np.all(np.isfinite(ztxt))
    # SigLIP's initialization: t = exp(log 10) = 10, b = -10.
    assert float(aux["t"]) == pytest.approx(10.0) and float(aux["b"]) == pytest.approx(-10.0)
    assert aux["img/norm"].shape == (3,) and aux["txt/norm"].shape == (3,)


def test_coarse_patch_has_four_times_fewer_tokens_and_differs(params):
    assert CONFIG.tokens_per_image(4) == 4 * CONFIG.tokens_per_image(8) == 64
    images, _ = _batch()
    model = TwoTower(CONFIG)
    fine = model.apply({"params": params}, images, None, patch_size=4)[0]
    coarse = model.apply({"params": params}, images, None, patch_size=8)[0]
    assert not np.allclose(fine, coarse)
    # Counted where it happens: the encoder sees [N, tokens, width].
    for patch_size, tokens in [(4, 64), (8, 16)]:
        _, state = model.apply(
            {"params": params},
            images,
            None,
            patch_size=patch_size,
            capture_intermediates=lambda module, name: module.name == "encoder" and name == "__call__",
            mutable=["intermediates"],
        )
        encoder_out = jax.tree_util.tree_leaves(state["intermediates"]["image_tower"]["encoder"])[0]
        assert encoder_out.shape == (3, tokens, MODEL_SIZES["mu"]["width"])


def test_towers_run_alone_and_match_joint_call(params):
    images, tokens = _batch()
    model = TwoTower(CONFIG)
    zimg, ztxt, _ = model.apply({"params": params}, images, tokens)
    zimg_alone, none_txt, _ = model.apply({"params": params}, images, None)
    none_img, ztxt_alone, _ = model.apply({"params": params}, None, tokens)
    assert none_txt is None and none_img is None
    np.testing.assert_array_equal(zimg, zimg_alone)
    np.testing.assert_array_equal(ztxt, ztxt_alone)


def test_padding_does_not_change_text_embedding(params):
    _, tokens = _batch(n=1)
    model = TwoTower(CONFIG)
    reference = model.apply({"params": params}, None, tokens)[1]
    # Masked pooling: the caption is its non-padding tokens, so shortening it must change the embedding.
    shorter = tokens.copy()
    shorter[:, 6:] = 0
    assert not np.allclose(reference, model.apply({"params": params}, None, shorter)[1])
    # Each caption is embedded independently of the others in the batch.
    batch = np.concatenate([tokens, shorter])
    np.testing.assert_allclose(model.apply({"params": params}, None, batch)[1][:1], reference, atol=1e-6)


def test_flexi_kernel_resize_preserves_tokens_of_upsampled_patches():
    """⟨resize(x), resize_kernel(w)⟩ = ⟨x, w⟩ exactly when the patch grows (FlexiViT's PI-resize)."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 4, 3, 5)).astype(np.float32)
    patches = rng.normal(size=(7, 4, 4, 3)).astype(np.float32)
    resized_kernel = np.asarray(resize_patch_kernel(jnp.asarray(kernel), 8))
    upsampled = np.asarray(jax.image.resize(patches, (7, 8, 8, 3), method="linear"))
    original_tokens = np.einsum("nhwc,hwcd->nd", patches, kernel)
    resized_tokens = np.einsum("nhwc,hwcd->nd", upsampled, resized_kernel)
    np.testing.assert_allclose(resized_tokens, original_tokens, rtol=1e-4, atol=1e-4)
    assert patch_kernel_resize_matrix(4, 8).shape == (64, 16)


@pytest.mark.parametrize("size_in,size_out", [(4, 8), (8, 4), (3, 7), (16, 32)])
def test_linear_resize_matrix_matches_jax_image_resize(size_in, size_out):
    expected = jax.image.resize(jnp.eye(size_in), (size_out, size_in), method="linear")
    np.testing.assert_allclose(linear_resize_matrix(size_in, size_out), expected, atol=1e-6)


def test_bad_shapes_fail_with_the_numbers(params):
    with pytest.raises(ValueError, match="patch size 5 does not divide image size 32"):
        ModelConfig(image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        ModelConfig(image_variant="huge")
    images, tokens = _batch()
    with pytest.raises(ValueError, match="patch size 6 does not divide image size 32"):
        TwoTower(CONFIG).apply({"params": params}, images, None, patch_size=6)
    with pytest.raises(ValueError, match="expected 16 tokens per caption, got 8"):
        TwoTower(CONFIG).apply({"params": params}, None, tokens[:, :8])
    with pytest.raises(ValueError, match="unknown keys in model config: \\['depth'\\]"):
        ModelConfig.from_dict({**CONFIG.to_dict(), "depth": 3})


def test_gradients_are_finite(params):
    from models.losses import sigmoid_loss

    images, tokens = _batch(n=4)
    model = TwoTower(CONFIG)

    def loss_fn(params, patch_size):
        zimg, ztxt, aux = model.apply({"params": params}, images, tokens, patch_size=patch_size)
        return sigmoid_loss(zimg, ztxt, aux["t"], aux["b"])

    for patch_size in (4, 8):
        grads = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, patch_size)
        leaves = jax.tree_util.tree_leaves(grads)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
        # The patch kernel learns at either patch size (its gradient flows through the resize).
        assert np.abs(grads["image_tower"]["patch_kernel"]).sum() > 0
