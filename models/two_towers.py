"""SigLIP-style dual encoder: a FlexiViT image tower and a transformer text tower.

The image tower stores one patch-embedding kernel (at `ModelConfig.patch_size`) and one position-embedding grid, and
resizes both at call time (FlexiViT), so the same params run at patch p and 2p. The model returns
`(zimg, ztxt, aux)`: L2-normalized embeddings and a dict with the temperature `t` and bias `b` of the sigmoid loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.preprocessing import ImagePreprocessing, dataclass_from_dict

# Named sizes shared by both towers: a 1-layer `mu` for tests, `xs` for CPU demos, `sm` for a CPU reference larger
# than an `xs` learner (the benchmark's larger-reference setting), then the standard ViT sizes.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, mlp_dim=128, num_heads=2),
    "xs": dict(width=64, depth=2, mlp_dim=256, num_heads=2),
    "sm": dict(width=96, depth=3, mlp_dim=384, num_heads=3),
    "ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "s": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "b": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the model; saved beside the params in every checkpoint."""

    image_variant: str = "mu"
    text_variant: str = "mu"
    image_size: int = 32
    patch_size: int = 4  # size of the stored patch-embedding kernel, and the default call-time patch size
    embed_dim: int = 64  # shared width of the two projections
    text_length: int = 32
    vocab_size: int = 259  # must match the tokenizer's
    log_temperature_init: float = math.log(10.0)
    bias_init: float = -10.0

    def __post_init__(self):
        for variant in (self.image_variant, self.text_variant):
            if variant not in MODEL_SIZES:
                raise ValueError(f"unknown model size {variant!r}; known: {sorted(MODEL_SIZES)}")
        check_patch_size(self.image_size, self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, values, "model config")

    def preprocessing(self) -> ImagePreprocessing:
        """How images reach this model: squashed to `image_size`, pixels mapped to [-1, 1]."""
        return ImagePreprocessing(self.image_size)

    def tokens_per_image(self, patch_size: int | None = None) -> int:
        patch_size = patch_size or self.patch_size
        check_patch_size(self.image_size, patch_size)
        return (self.image_size // patch_size) ** 2


def check_patch_size(image_size: int, patch_size: int) -> None:
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(f"patch size {patch_size} does not divide image size {image_size}")


@functools.lru_cache(maxsize=None)
def linear_resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] matrix of 1-D linear resampling with half-pixel centres (antialiased when shrinking)."""
    scale = size_out / size_in
    radius = max(1.0, 1.0 / scale)
    centres = (np.arange(size_out) + 0.5) / scale - 0.5
    distance = np.abs(np.arange(size_in)[None, :] - centres[:, None])
    weights = np.maximum(0.0, 1.0 - distance / radius)
    return weights / weights.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def patch_kernel_resize_matrix(patch_from: int, patch_to: int) -> np.ndarray:
    """FlexiViT's pseudo-inverse resize: [patch_to², patch_from²] matrix M with ⟨resize(x), M w⟩ ≈ ⟨x, w⟩.

    With B the bilinear resize of a patch (x ↦ B x), the resized kernel solves Bᵀ w' = w in the least-squares,
    minimum-norm sense: w' = pinv(Bᵀ) w. Growing the patch (p → 2p) this holds exactly, so a patch and its
    upsampled copy give the same token.
    """
    one_d = linear_resize_matrix(patch_from, patch_to)
    resize = np.kron(one_d, one_d)  # [patch_to², patch_from²], row-major over (row, col)
    return np.linalg.pinv(resize.T).astype(np.float32)


def resize_patch_kernel(kernel: jax.Array, patch_size: int) -> jax.Array:
    """[p, p, C, D] -> [patch_size, patch_size, C, D]."""
    stored = kernel.shape[0]
    if patch_size == stored:
        return kernel
    matrix = jnp.asarray(patch_kernel_resize_matrix(stored, patch_size))
    flat = kernel.reshape(stored * stored, -1)  # [p², C·D]
    return (matrix @ flat).reshape(patch_size, patch_size, *kernel.shape[2:])


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(x))
        return nn.Dense(width, name="fc2")(x)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block."""

    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x, mask=None):  # x: [N, L, W]; mask: [N, 1, L, L] or None
        y = nn.LayerNorm(name="ln_attention")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, name="attention")(y, y, mask=mask)
        x = x + y
        y = nn.LayerNorm(name="ln_mlp")(x)
        return x + MlpBlock(self.mlp_dim, name="mlp")(y)


class Encoder(nn.Module):
    depth: int
    mlp_dim: int
    num_heads: int

    @nn.compact
    def __call__(self, x, mask=None):
        for layer in range(self.depth):
            x = EncoderBlock(self.mlp_dim, self.num_heads, name=f"block_{layer}")(x, mask)
        return nn.LayerNorm(name="ln_final")(x)


class ImageTower(nn.Module):
    """FlexiViT: patch size chosen per call; mean-pooled tokens projected to `embed_dim`."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    image_size: int
    stored_patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, images, patch_size: int):  # images: [N, H, W, 3] in [-1, 1]
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {images.shape[1:3]}")
        check_patch_size(self.image_size, patch_size)
        stored = self.stored_patch_size
        kernel = self.param(
            "patch_kernel", nn.initializers.lecun_normal(), (stored, stored, images.shape[-1], self.width)
        )
        patch_bias = self.param("patch_bias", nn.initializers.zeros, (self.width,))
        stored_grid = self.image_size // stored
        posemb = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), (1, stored_grid, stored_grid, self.width)
        )

        kernel = resize_patch_kernel(kernel, patch_size)
        x = jax.lax.conv_general_dilated(
            images.astype(kernel.dtype),
            kernel,
            window_strides=(patch_size, patch_size),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # [N, g, g, W]
        grid = self.image_size // patch_size
        if grid != stored_grid:
            posemb = jax.image.resize(posemb, (1, grid, grid, self.width), method="bilinear")
        x = (x + patch_bias + posemb).reshape(images.shape[0], grid * grid, self.width)  # [N, g², W]
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, name="encoder")(x)
        return nn.Dense(self.embed_dim, name="head")(x.mean(axis=1))  # [N, E]


class TextTower(nn.Module):
    """Transformer over token ids (0 = padding); masked mean of the tokens projected to `embed_dim`."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    vocab_size: int
    text_length: int
    embed_dim: int

    @nn.compact
    def __call__(self, tokens):  # tokens: [N, L] int32
        if tokens.shape[1] != self.text_length:
            raise ValueError(f"expected {self.text_length} tokens per caption, got {tokens.shape[1]}")
        valid = tokens != 0  # [N, L]
        x = nn.Embed(self.vocab_size, self.width, name="token_embedding")(tokens)
        posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, self.text_length, self.width))
        x = x + posemb
        mask = nn.make_attention_mask(valid, valid)  # [N, 1, L, L]
        x = Encoder(self.depth, self.mlp_dim, self.num_heads, name="encoder")(x, mask)
        weights = valid.astype(x.dtype)[..., None]
        pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
        return nn.Dense(self.embed_dim, name="head")(pooled)  # [N, E]


def _l2_normalize(x, eps=1e-8):
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, eps), norm[..., 0]


class TwoTower(nn.Module):
    """`apply(params, images, tokens, patch_size=p)` -> (zimg [N, E] | None, ztxt [M, E] | None, aux)."""

    config: ModelConfig

    def setup(self):
        cfg = self.config
        self.image_tower = ImageTower(
            **MODEL_SIZES[cfg.image_variant],
            image_size=cfg.image_size,
            stored_patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
        )
        self.text_tower = TextTower(
            **MODEL_SIZES[cfg.text_variant],
            vocab_size=cfg.vocab_size,
            text_length=cfg.text_length,
            embed_dim=cfg.embed_dim,
        )
        self.log_temperature = self.param("log_temperature", nn.initializers.constant(cfg.log_temperature_init), (1,))
        self.bias = self.param("bias", nn.initializers.constant(cfg.bias_init), (1,))

    def __call__(self, images, tokens, patch_size: int | None = None):
        aux = {"t": jnp.exp(self.log_temperature[0]), "t/log": self.log_temperature[0], "b": self.bias[0]}
        zimg = ztxt = None
        if images is not None:
            zimg, norm = _l2_normalize(self.image_tower(images, patch_size or self.config.patch_size))
            aux["img/norm"] = norm
        if tokens is not None:
            ztxt, norm = _l2_normalize(self.text_tower(tokens))
            aux["txt/norm"] = norm
        return zimg, ztxt, aux


def _init(config: ModelConfig, rng: jax.Array) -> dict:
    images = jnp.zeros([1, config.image_size, config.image_size, 3], jnp.float32)
    tokens = jnp.zeros([1, config.text_length], jnp.int32)
    return TwoTower(config).init(rng, images, tokens)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Fresh params for `config` (float32)."""
    return jax.jit(_init, static_argnums=0)(config, rng)


def abstract_params(config: ModelConfig) -> dict:
    """Shapes and dtypes of `init_params(config, ·)` without allocating them."""
    return jax.eval_shape(functools.partial(_init, config), jax.random.key(0))


def count_params(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
