"""Analytic forward FLOPs of the dual encoder (2 FLOPs per multiply-add; matmuls and convolutions only).

Elementwise work (LayerNorm, GELU, softmax, bias adds) is left out, as is customary; XLA's cost analysis of the
compiled forward agrees within 15% at every named size, and within 1-4% from `ti` up (tests/models/test_flops.py).
Per-call work that does not grow with the batch (resizing the patch kernel for FlexiViT) is counted apart.
A training step costs about 3x the forward (backward ≈ 2x forward).
"""

from __future__ import annotations

from models.two_towers import MODEL_SIZES, ModelConfig

BACKWARD_FACTOR = 3  # forward + backward ≈ 3 forwards


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
    """Transformer encoder on `tokens` tokens: QKV + output projections, attention scores and mix, MLP."""
    projections = 2 * tokens * width * (4 * width)  # Q, K, V and output: [N, W] @ [W, W] four times
    attention = 2 * 2 * tokens * tokens * width  # QKᵀ and softmax(·)V
    mlp = 2 * 2 * tokens * width * mlp_dim
    return depth * (projections + attention + mlp)


def image_forward_flops(config: ModelConfig, patch_size: int | None = None) -> int:
    """Forward FLOPs of the image tower for one image at `patch_size` (default: the config's)."""
    patch_size = patch_size or config.patch_size
    size = MODEL_SIZES[config.image_variant]
    tokens = config.tokens_per_image(patch_size)
    patch_embedding = 2 * tokens * (patch_size * patch_size * 3) * size["width"]
    head = 2 * size["width"] * config.embed_dim
    return patch_embedding + encoder_flops(tokens, size["width"], size["depth"], size["mlp_dim"]) + head


def patch_resize_flops(config: ModelConfig, patch_size: int) -> int:
    """FLOPs of resizing the stored patch kernel to `patch_size`: once per call, whatever the batch size."""
    if patch_size == config.patch_size:
        return 0
    width = MODEL_SIZES[config.image_variant]["width"]
    return 2 * patch_size**2 * config.patch_size**2 * 3 * width


def text_forward_flops(config: ModelConfig) -> int:
    """Forward FLOPs of the text tower for one caption (all `text_length` positions are computed)."""
    size = MODEL_SIZES[config.text_variant]
    head = 2 * size["width"] * config.embed_dim
    return encoder_flops(config.text_length, size["width"], size["depth"], size["mlp_dim"]) + head


def example_forward_flops(config: ModelConfig, patch_size: int | None = None) -> int:
    """Forward FLOPs to embed one image-caption pair."""
    return image_forward_flops(config, patch_size) + text_forward_flops(config)


def example_train_flops(config: ModelConfig, patch_size: int | None = None) -> int:
    """FLOPs of one example in a training step (forward and backward)."""
    return BACKWARD_FACTOR * example_forward_flops(config, patch_size)
