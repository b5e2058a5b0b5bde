"""Evaluation metrics on hand-made embeddings with known answers."""

import numpy as np
import pytest

from curation.trainer.evaluate import (
    ZeroShotTask,
    class_embeddings,
    evaluate_embeddings,
    retrieval_recall,
    zeroshot_accuracy,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _orthonormal(n, d=32):
    return np.eye(n, d, dtype=np.float32)  # [n, d] orthonormal rows, exact zeros off the diagonal


def test_retrieval_perfect_swapped_and_random():
    z = _orthonormal(8)
    perfect = retrieval_recall(z, z)
    assert perfect == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    # Captions of pairs (0,1), (2,3), ... swapped: every top-1 is wrong, but the right one is second.
    swapped = z[[1, 0, 3, 2, 5, 4, 7, 6]]
    result = retrieval_recall(z, swapped)
    assert result["i2t_r1"] == 0.0 and result["t2i_r1"] == 0.0
    assert result["i2t_r5"] == 0.0  # orthonormal: the right caption ties with the other 6 at 0 similarity, last
    # Random embeddings: about chance (1/N, 5/N).
    rng = np.random.default_rng(1)
    n = 400
    random = retrieval_recall(_unit(rng.normal(size=(n, 64))), _unit(rng.normal(size=(n, 64))))
    assert random["i2t_r1"] < 0.02 and random["t2i_r1"] < 0.02
    assert 0.0 < random["i2t_r5"] < 0.05


def test_retrieval_ranks_ties_pessimistically():
    z = np.ones((4, 3), np.float32) / np.sqrt(3)  # everything identical: nothing is retrieved at rank 1
    result = retrieval_recall(z, z)
    assert result["i2t_r1"] == 0.0 and result["i2t_r5"] == 1.0


def test_zeroshot_perfect_swapped_and_random():
    classes = _orthonormal(3)
    labels = np.array([0, 1, 2, 2, 1, 0])
    images = classes[labels]
    assert zeroshot_accuracy(images, classes, labels) == 1.0
    assert zeroshot_accuracy(images, classes[[1, 2, 0]], labels) == 0.0  # class embeddings permuted
    rng = np.random.default_rng(0)
    many = rng.integers(0, 3, size=3000)
    accuracy = zeroshot_accuracy(_unit(rng.normal(size=(3000, 32))), classes, many)
    assert accuracy == pytest.approx(1 / 3, abs=0.05)


def test_class_embeddings_average_templates():
    base = _orthonormal(2)
    noise = 0.1 * np.random.default_rng(0).normal(size=(2, 4, 32))
    prompts = _unit(base[:, None, :] + noise)  # [C=2, T=4, d]
    result = class_embeddings(prompts)
    np.testing.assert_allclose(np.linalg.norm(result, axis=-1), 1.0, rtol=1e-6)
    assert np.all(np.sum(result * base, axis=-1) > 0.95)


def test_evaluate_embeddings_builds_prompts_and_means_tasks():
    vocabulary = {"red": 0, "blue": 1, "circle": 2, "square": 3}
    axes = _orthonormal(4)
    seen_prompts = []

    def embed_texts(prompts):
        seen_prompts.extend(prompts)
        return np.stack([axes[[vocabulary[w] for w in p.split() if w in vocabulary]].sum(0) for p in prompts])

    colour = ZeroShotTask("colour", ["red", "blue"], ["a {} thing", "{}"], labels=np.array([0, 1]))
    shape = ZeroShotTask("shape", ["circle", "square"], ["a {}"], labels=np.array([1, 1]))
    zimg = _unit(axes[[0, 1]] + axes[[3, 2]])  # image 0: red square, image 1: blue circle
    metrics = evaluate_embeddings(zimg, [colour, shape], embed_texts, axes, axes)
    assert "a red thing" in seen_prompts and "a square" in seen_prompts
    assert metrics["zeroshot/colour"] == 1.0
    assert metrics["zeroshot/shape"] == 0.5  # image 1 is a circle, labelled square
    assert metrics["zeroshot_top1"] == 0.75
    assert metrics["chance/zeroshot/colour"] == 0.5 and metrics["chance/zeroshot/shape"] == 0.5  # 2 classes each
    assert metrics["chance/retrieval_r1"] == 1 / len(axes)
    assert metrics["i2t_r1"] == 1.0 and metrics["t2i_r5"] == 1.0
