"""Evaluation of a dual encoder: zero-shot classification, image↔text retrieval, held-out loss.

The metric functions are pure numpy over L2-normalized embeddings, so they are tested on hand-made embeddings;
`Evaluator` embeds a corpus's eval splits with a model (jitted towers) and calls them.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from apache_beam.io.filesystems import FileSystems

from curation.trainer import input_pipeline
from curation.trainer.metrics import CHANCE
from models.losses import contrastive_loss
from models.two_towers import ModelConfig, TwoTower


def class_embeddings(prompt_embeddings: np.ndarray) -> np.ndarray:
    """[C, T, d] embeddings of C classes × T prompt templates -> [C, d]: the normalized mean over templates."""
    mean = prompt_embeddings.mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def zeroshot_accuracy(zimg: np.ndarray, zclass: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, d] images against [C, d] class embeddings; labels [N] in [0, C)."""
    predictions = np.argmax(zimg @ zclass.T, axis=1)
    return float(np.mean(predictions == labels))


def _recall_at(similarity: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Rows are queries; the right answer of query i is column i. Ties count against the query."""
    correct = np.diag(similarity)[:, None]
    rank = (similarity > correct).sum(axis=1) + (similarity == correct).sum(axis=1) - 1  # 0 = first
    return {k: float(np.mean(rank < k)) for k in ks}


def retrieval_recall(zimg: np.ndarray, ztxt: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image→text and text→image recall@k of N paired [N, d] embeddings (pair i is image i with caption i)."""
    similarity = zimg @ ztxt.T  # [N, N]
    i2t, t2i = _recall_at(similarity, ks), _recall_at(similarity.T, ks)
    return {**{f"i2t_r{k}": i2t[k] for k in ks}, **{f"t2i_r{k}": t2i[k] for k in ks}}


@dataclasses.dataclass(frozen=True)
class ZeroShotTask:
    name: str
    classes: list[str]
    templates: list[str]
    labels: np.ndarray  # [N] class index of each eval image


def load_zeroshot_tasks(corpus_dir: str, records_metadata: list[dict]) -> list[ZeroShotTask]:
    """Tasks from `eval/classes.json`, each eval image labelled from its metadata field."""
    with FileSystems.open(posixpath.join(corpus_dir, "eval", "classes.json")) as f:
        spec = json.loads(f.read().decode("utf-8"))
    tasks = []
    for name, task in sorted(spec.items()):
        index = {class_name: i for i, class_name in enumerate(task["classes"])}
        field = task["metadata_field"]
        labels = np.array([index[meta[field]] for meta in records_metadata], np.int32)
        tasks.append(ZeroShotTask(name, list(task["classes"]), list(task["templates"]), labels))
    return tasks


def evaluate_embeddings(
    zimg_zeroshot: np.ndarray,
    tasks: list[ZeroShotTask],
    embed_texts: Callable[[list[str]], np.ndarray],
    zimg_retrieval: np.ndarray,
    ztxt_retrieval: np.ndarray,
) -> dict[str, float]:
    """Every metric of one evaluation: per-task and mean zero-shot top-1, and retrieval recall@1/@5; beside them
    each one's chance level (`chance/...`: 1 / classes of a task, 1 / candidates of retrieval's R@1), without which
    an accuracy says nothing."""
    metrics: dict[str, float] = {}
    for task in tasks:
        prompts = [template.format(name) for name in task.classes for template in task.templates]
        prompt_embeddings = embed_texts(prompts).reshape(len(task.classes), len(task.templates), -1)
        metrics[f"zeroshot/{task.name}"] = zeroshot_accuracy(
            zimg_zeroshot, class_embeddings(prompt_embeddings), task.labels
        )
        metrics[f"{CHANCE}zeroshot/{task.name}"] = 1.0 / len(task.classes)
    if tasks:
        metrics["zeroshot_top1"] = float(np.mean([metrics[f"zeroshot/{task.name}"] for task in tasks]))
    metrics.update(retrieval_recall(zimg_retrieval, ztxt_retrieval))
    metrics[f"{CHANCE}retrieval_r1"] = 1.0 / len(zimg_retrieval)
    return metrics


class Evaluator:
    """Zero-shot, retrieval and held-out loss on the corpus's eval splits, embedded with jitted towers."""

    def __init__(self, corpus_dir, model_config: ModelConfig, tokenizer, loss_name, limit=0, batch=256):
        preprocessing = model_config.preprocessing()  # eval images reach the model as training images do
        zeroshot, retrieval = (
            input_pipeline.load_examples(corpus_dir, split, model_config.image_size, limit, preprocessing=preprocessing)
            for split in ("eval/zeroshot", "eval/retrieval")
        )
        if not zeroshot or not retrieval:
            raise ValueError(
                f"no eval examples under {corpus_dir}/eval (zeroshot: {len(zeroshot)}, retrieval: {len(retrieval)})"
            )
        self.tasks = load_zeroshot_tasks(corpus_dir, [meta for _, _, meta in zeroshot])
        self.zeroshot_images = np.stack([image for image, _, _ in zeroshot])
        self.retrieval_images = np.stack([image for image, _, _ in retrieval])
        self.retrieval_tokens = tokenizer.encode_batch(
            [caption for _, caption, _ in retrieval], model_config.text_length
        )
        self.tokenizer, self.text_length = tokenizer, model_config.text_length
        self.loss_name, self.batch = loss_name, batch
        model = TwoTower(model_config)
        self._embed_images = jax.jit(lambda params, x: model.apply({"params": params}, x, None)[0])
        self._embed_texts = jax.jit(lambda params, t: model.apply({"params": params}, None, t)[1])

    def _batched(self, fn, params, inputs) -> np.ndarray:
        return np.concatenate(
            [np.asarray(fn(params, inputs[i : i + self.batch])) for i in range(0, len(inputs), self.batch)]
        )

    def __call__(self, params) -> dict[str, float]:
        def embed_tokens(tokens):
            return self._batched(self._embed_texts, params, tokens)

        def embed_texts(texts):
            return embed_tokens(self.tokenizer.encode_batch(texts, self.text_length))

        zimg_zeroshot = self._batched(self._embed_images, params, self.zeroshot_images)
        zimg_retrieval = self._batched(self._embed_images, params, self.retrieval_images)
        ztxt_retrieval = embed_tokens(self.retrieval_tokens)
        metrics = evaluate_embeddings(zimg_zeroshot, self.tasks, embed_texts, zimg_retrieval, ztxt_retrieval)
        aux = {"t": jnp.exp(params["log_temperature"][0]), "b": params["bias"][0]}  # what the model's aux holds
        metrics["held_out_loss"] = float(
            contrastive_loss(self.loss_name, jnp.asarray(zimg_retrieval), jnp.asarray(ztxt_retrieval), aux)
        )
        return metrics
