"""Evaluation of a dual encoder: zero-shot classification, image↔text retrieval, held-out loss.

The metric functions are pure numpy over L2-normalized embeddings, so they are tested on hand-made embeddings;
`Evaluator` embeds the demo corpus's eval splits with a model and calls them.
"""

from __future__ import annotations

import dataclasses
import json
import posixpath
from typing import Callable, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems


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
    """Every metric of one evaluation: per-task and mean zero-shot top-1, and retrieval recall@1/@5."""
    metrics: dict[str, float] = {}
    for task in tasks:
        prompts = [template.format(name) for name in task.classes for template in task.templates]
        prompt_embeddings = embed_texts(prompts).reshape(len(task.classes), len(task.templates), -1)
        metrics[f"zeroshot/{task.name}"] = zeroshot_accuracy(
            zimg_zeroshot, class_embeddings(prompt_embeddings), task.labels
        )
    if tasks:
        metrics["zeroshot_top1"] = float(np.mean([metrics[f"zeroshot/{task.name}"] for task in tasks]))
    metrics.update(retrieval_recall(zimg_retrieval, ztxt_retrieval))
    return metrics
