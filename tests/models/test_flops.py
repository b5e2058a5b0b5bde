"""Analytic FLOPs against XLA's own cost analysis of the compiled forward."""

import jax
import jax.numpy as jnp
import pytest

from models.flops import image_forward_flops, patch_resize_flops, text_forward_flops
from models.two_towers import MODEL_SIZES, ModelConfig, TwoTower, abstract_params

# (image size, stored patch size, text length) per named size: small images for the tiny sizes, 224 px otherwise.
GEOMETRY = {
    "mu": (32, 4, 32),
    "xs": (64, 8, 32),
    "sm": (64, 8, 32),
    "ti": (224, 16, 64),
    "s": (224, 16, 64),
    "b": (224, 16, 64),
}


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _config(variant: str) -> ModelConfig:
    image_size, patch_size, text_length = GEOMETRY[variant]
    return ModelConfig(
        image_variant=variant,
        text_variant=variant,
        image_size=image_size,
        patch_size=patch_size,
        text_length=text_length,
    )


@pytest.mark.parametrize("variant", sorted(MODEL_SIZES))
def test_analytic_flops_match_xla_cost_analysis(variant):
    config = _config(variant)
    params = abstract_params(config)
    model = TwoTower(config)
    size = config.image_size

    for patch_size in (config.patch_size, 2 * config.patch_size):

        def embed_images(params, images, patch_size=patch_size):
            return model.apply({"params": params}, images, None, patch_size=patch_size)[0]

        small, large = (
            _xla_flops(embed_images, params, jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32)) for n in (2, 6)
        )
        per_image = (large - small) / 4  # the marginal cost of one more image
        analytic = image_forward_flops(config, patch_size)
        assert analytic == pytest.approx(per_image, rel=0.2), (variant, patch_size)
        # What does not grow with the batch is the FlexiViT kernel resize (plus small per-call work).
        per_call = small - 2 * per_image
        assert patch_resize_flops(config, patch_size) <= max(per_call, 0) * 1.2 + 1

    def embed_texts(params, tokens):
        return model.apply({"params": params}, None, tokens)[1]

    small, large = (
        _xla_flops(embed_texts, params, jax.ShapeDtypeStruct((n, config.text_length), jnp.int32)) for n in (2, 6)
    )
    assert text_forward_flops(config) == pytest.approx((large - small) / 4, rel=0.2), variant


def test_coarse_patch_costs_about_a_quarter():
    config = _config("ti")
    fine, coarse = image_forward_flops(config, 16), image_forward_flops(config, 32)
    assert 0.2 < coarse / fine < 0.3
