"""Train a dual encoder: `python -m curation.train --config NAME --data CORPUS_DIR --workdir DIR [--smoke] [--field=value]`.

Reads top to bottom: logging → device mesh → input pipeline → model and optimizer → sharding → update step →
checkpoint restore → evaluators → train loop. A run killed at any step and started again with the same command
resumes from its last checkpoint and ends with exactly the params of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import logging
import os
import posixpath
import sys
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from curation import configs, input_pipeline, jest, scored_input, scored_shards
from curation.evaluate import evaluate_embeddings, load_zeroshot_tasks
from curation.losses import sigmoid_loss, softmax_loss
from curation.metrics import MetricWriter, progress_bar
from models import checkpoint as model_checkpoint
from models.flops import example_forward_flops
from models.tokenizer import ByteTokenizer, WordTokenizer, tokenizer_from_dict
from models.two_towers import ModelConfig, TwoTower, count_params, init_params

log = logging.getLogger("curation.train")


def make_mesh(batch_size: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with a `data` axis over all devices; the batch must divide evenly over it."""
    devices = list(devices if devices is not None else jax.devices())
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} does not divide over {len(devices)} devices")
    return jax.sharding.Mesh(np.array(devices), ("data",))


def make_optimizer(config: configs.TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; no weight decay on biases, norms, temperature."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.total_steps, config.warmup_steps + 1)
    )
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    return optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)


def contrastive_loss(loss_name: str, zimg, ztxt, aux):
    if loss_name == "sigmoid":
        return sigmoid_loss(zimg, ztxt, aux["t"], aux["b"])
    if loss_name == "softmax":
        return softmax_loss(zimg, ztxt, aux["t"])
    raise ValueError(f"unknown loss {loss_name!r}; expected 'sigmoid' or 'softmax'")


def train_step(state: dict, batch: dict, *, model: TwoTower, optimizer, loss_name: str,
               flexi_patch: int | None = None) -> tuple[dict, dict]:
    """One update on the batch: pure, jitted by the caller. With `flexi_patch`, the second half of the batch's
    images go through the image tower at that patch size (Flexi-JEST) and the first half at the model's own."""

    def loss_fn(params):
        if flexi_patch is None:
            zimg, ztxt, aux = model.apply({"params": params}, batch["image"], batch["tokens"])
        else:
            half = batch["image"].shape[0] // 2
            fine, ztxt, aux = model.apply({"params": params}, batch["image"][:half], batch["tokens"])
            coarse, _, _ = model.apply({"params": params}, batch["image"][half:], None, patch_size=flexi_patch)
            zimg = jnp.concatenate([fine, coarse])
        return contrastive_loss(loss_name, zimg, ztxt, aux), aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, {"loss": loss, "t": aux["t"], "b": aux["b"], "grad_norm": optax.global_norm(grads)}


def build_tokenizer(config: configs.TrainConfig, captions: Callable[[], Iterator[str]], workdir: str):
    """The byte tokenizer, or a word vocabulary of `captions()` (the training data's), saved in the workdir for
    resumes."""
    path = posixpath.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            return tokenizer_from_dict(json.load(f))
    if config.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    elif config.tokenizer == "words":
        tokenizer = WordTokenizer.build(captions(), max_vocab=config.max_vocab)
    else:
        raise ValueError(f"unknown tokenizer {config.tokenizer!r}; expected 'words' or 'bytes'")
    with open(path, "w") as f:
        json.dump(tokenizer.to_dict(), f)
    return tokenizer


class Evaluator:
    """Zero-shot, retrieval and held-out loss on the corpus's eval splits, embedded with jitted towers."""

    def __init__(self, corpus_dir, model_config: ModelConfig, tokenizer, loss_name, limit=0, batch=256):
        zeroshot = input_pipeline.load_examples(corpus_dir, "eval/zeroshot", model_config.image_size, limit)
        retrieval = input_pipeline.load_examples(corpus_dir, "eval/retrieval", model_config.image_size, limit)
        if not zeroshot or not retrieval:
            raise ValueError(f"no eval examples under {corpus_dir}/eval (zeroshot: {len(zeroshot)}, "
                             f"retrieval: {len(retrieval)})")
        self.tasks = load_zeroshot_tasks(corpus_dir, [meta for _, _, meta in zeroshot])
        self.zeroshot_images = np.stack([image for image, _, _ in zeroshot])
        self.retrieval_images = np.stack([image for image, _, _ in retrieval])
        self.retrieval_tokens = tokenizer.encode_batch([caption for _, caption, _ in retrieval],
                                                       model_config.text_length)
        self.tokenizer, self.text_length, self.loss_name, self.batch = tokenizer, model_config.text_length, loss_name, batch
        model = TwoTower(model_config)
        self._embed_images = jax.jit(lambda params, x: model.apply({"params": params}, x, None)[0])
        self._embed_texts = jax.jit(lambda params, t: model.apply({"params": params}, None, t)[1])

    def _batched(self, fn, params, inputs) -> np.ndarray:
        return np.concatenate([np.asarray(fn(params, inputs[i : i + self.batch]))
                               for i in range(0, len(inputs), self.batch)])

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
        metrics["held_out_loss"] = float(contrastive_loss(self.loss_name, jnp.asarray(zimg_retrieval),
                                                          jnp.asarray(ztxt_retrieval), aux))
        return metrics


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Where a run's examples come from: a corpus split, or scored shards (with reference embeddings)."""

    shards: list[str]
    format: str
    scored: scored_shards.ScoredSet | None = None
    max_ref_loss: float = float("inf")

    @classmethod
    def open(cls, config: configs.TrainConfig, data_dir: str, scored_dir: str | None) -> "TrainingData":
        if scored_dir is None:
            if config.needs_scores:
                raise ValueError(f"config {config.name!r} selects with reference scores: pass --scored "
                                 "(the output of python -m pipelines.score)")
            shards, format = input_pipeline.split_shards(data_dir, config.split)
            return cls(shards, format)
        scored = scored_shards.open_scored(scored_dir)
        no_images = [m.batch_dir for m in scored.manifests if m.options.get("store_image") == "none"]
        if no_images:
            raise ValueError(f"scored batches {no_images} were written with --store_image=none: nothing to train on")
        shards = scored.shard_paths("parquet")
        if not shards:
            raise ValueError(f"no Parquet scored shards under {scored_dir} (score with --output_format parquet)")
        return cls(shards, "parquet", scored, scored_input.ref_loss_threshold(shards, config.offline_keep))

    def captions(self) -> Iterator[str]:
        if self.scored is not None:
            for path in self.shards:
                yield from scored_shards.read_scored_parquet(path, ["caption"]).column("caption").to_pylist()
            return
        for shard in self.shards:
            for item in input_pipeline.read_shard(shard, self.format):
                if input_pipeline.has_usable_caption(item):
                    yield item.caption

    def batches(self, tokenizer, config: configs.TrainConfig, position) -> Iterator[dict]:
        """Batches of `config.superbatch_size` examples from `position` on."""
        common = dict(batch_size=config.superbatch_size, image_size=config.image_size,
                      text_length=config.text_length, seed=config.seed, start=position)
        if self.scored is None:
            dataset = input_pipeline.make_dataset(self.shards, self.format, tokenizer, **common)
        else:
            dataset = scored_input.make_scored_dataset(self.shards, tokenizer, embed_dim=self.scored.embed_dim,
                                                       max_ref_loss=self.max_ref_loss, **common)
        return dataset.as_numpy_iterator()


def train(
    config: configs.TrainConfig,
    data_dir: str,
    workdir: str,
    *,
    scored_dir: str | None = None,
    batches: Iterator[dict] | None = None,
    step_callback: Callable[[int], None] | None = None,
    devices=None,
) -> dict:
    """Run (or resume) training; returns the final params. `data_dir` is the corpus (its eval splits, and its
    training split unless `scored_dir` gives scored shards to train on). `batches` replaces the input (tests)."""
    # Logging.
    os.makedirs(workdir, exist_ok=True)
    with open(posixpath.join(workdir, "config.json"), "w") as f:
        json.dump({**config.to_dict(), "scored": scored_dir}, f, indent=2)

    # Device mesh.
    mesh = make_mesh(config.superbatch_size, devices)
    make_mesh(config.batch_size, devices)  # the sub-batch must divide too
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    # Input pipeline (the tokenizer is part of it: captions become tokens there).
    data = TrainingData.open(config, data_dir, scored_dir)
    tokenizer = build_tokenizer(config, data.captions, workdir)
    model_config = config.model_config(tokenizer.vocab_size)

    # Model and optimizer.
    model = TwoTower(model_config)
    optimizer = make_optimizer(config)
    rng = jax.random.key(config.seed)

    def init_state(rng):
        params = init_params(model_config, rng)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros([], jnp.int32),
                "rng": jax.random.key_data(rng)}

    # Sharding: params and optimizer state replicated, batches split over the data axis.
    state = jax.jit(init_state, out_shardings=replicated)(rng)
    log.info("model %s/%s, %d params, %d devices", config.image_variant, config.text_variant,
             count_params(state["params"]), len(mesh.devices.flat))

    # Update step (with selection: learner scoring, selection and update on the chosen sub-batch).
    pure_step = functools.partial(train_step, model=model, optimizer=optimizer, loss_name=config.loss,
                                  flexi_patch=config.coarse_patch_size if config.flexi else None)
    step_fn = jax.jit(pure_step, in_shardings=(replicated, data_sharding), out_shardings=(replicated, replicated),
                      donate_argnums=0)
    selecting = config.selection != "none"
    if selecting:
        if data.scored is None:
            raise ValueError("selection needs scored shards (--scored)")
        jest_fns = jest.make_jest_functions(config, model, pure_step, mesh, data.scored.reference_t,
                                            data.scored.reference_c)
    flops = jest.step_flops(config, model_config)
    reference_flops = 0
    if data.scored is not None:  # offline, once per example: reported apart from the learner's
        reference_config = ModelConfig.from_dict(data.scored.manifests[0].reference["model"])
        reference_flops = example_forward_flops(reference_config)

    # Checkpoint restore: the state, the data position and the run's counters.
    manager = ocp.CheckpointManager(
        os.path.abspath(posixpath.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler()},
    )
    progress = {"position": input_pipeline.DataPosition().to_dict(), "examples_seen": 0, "wall_s": 0.0}
    if manager.latest_step() is not None:
        restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)),
            progress=ocp.args.JsonRestore()))
        state, progress = restored["state"], restored["progress"]
        log.info("resumed from step %d", int(state["step"]))
    start_step = int(state["step"])
    writer = MetricWriter(workdir, resume_step=start_step)

    # Evaluators.
    evaluator = None if batches is not None else Evaluator(
        data_dir, model_config, tokenizer, config.loss, limit=config.eval_size)

    # Train loop.
    if batches is None:
        batches = data.batches(tokenizer, config, input_pipeline.DataPosition(**progress["position"]))
    selection_rng = jax.random.key(config.seed + 1)
    pending: list[tuple[int, dict]] = []
    timings: dict[str, float] = collections.defaultdict(float)
    step_start = time.perf_counter()
    with progress_bar(config.total_steps, start_step, config.name) as bar:
        for step in range(start_step + 1, config.total_steps + 1):
            clock = time.perf_counter()
            batch = next(batches)
            position = batch.pop("position", None)
            timings["time/data"] += time.perf_counter() - clock
            inputs = {name: jax.make_array_from_process_local_data(data_sharding, value)
                      for name, value in batch.items()}
            if selecting:
                clock = time.perf_counter()
                zimg, ztxt, t_and_b = jax.block_until_ready(
                    jest_fns.embed(state["params"], inputs["image"], inputs["tokens"]))
                scored_at = time.perf_counter()
                timings["time/scoring"] += scored_at - clock
                indices, diagnostics = jax.block_until_ready(jest_fns.choose(
                    jax.random.fold_in(selection_rng, step), zimg, ztxt, t_and_b, inputs["ref_zimg"],
                    inputs["ref_ztxt"], inputs["clean"]))
                selected_at = time.perf_counter()
                timings["time/selection"] += selected_at - scored_at
                state, step_metrics = jest_fns.update(state, inputs["image"], inputs["tokens"], indices)
                step_metrics = {**step_metrics, **diagnostics}
                jax.block_until_ready(step_metrics)
                timings["time/update"] += time.perf_counter() - selected_at
            else:
                state, step_metrics = step_fn(state, {name: inputs[name] for name in ("image", "tokens")})
            progress["examples_seen"] += config.batch_size
            progress["superbatch_examples_seen"] = progress.get("superbatch_examples_seen", 0) + config.superbatch_size
            if position is not None:
                progress["position"] = input_pipeline.DataPosition.from_array(position[-1]).to_dict()
            pending.append((step, step_metrics))
            if step_callback is not None:
                step_callback(step)

            last = step == config.total_steps
            if step % config.log_every == 0 or last:
                values = check_finite(pending)
                steps_logged = len(pending)
                pending = []
                now = time.perf_counter()
                progress["wall_s"] += now - step_start
                step_start = now
                raw_seen = progress["position"]["raw_seen"]
                drawn = progress["superbatch_examples_seen"]
                writer.write(step, {
                    **values, "examples_seen": progress["examples_seen"], "superbatch_examples_seen": drawn,
                    "train_flops": step * flops["train"], "learner_scoring_flops": step * flops["learner_scoring"],
                    "reference_scoring_flops": drawn * reference_flops,
                    "reference_flops_per_example": reference_flops,
                    "wall_s": progress["wall_s"], "skipped": max(raw_seen - drawn, 0),
                    **{name: seconds / steps_logged for name, seconds in timings.items()},
                })
                timings.clear()
                bar.set_postfix(loss=f"{values['loss']:.3f}")
            if evaluator is not None and (step % config.eval_every == 0 or last):
                writer.write(step, {"examples_seen": progress["examples_seen"], **evaluator(state["params"])})
            if step % config.checkpoint_every == 0 or last:
                if pending:
                    check_finite(pending)  # a checkpoint never holds the state of a non-finite step
                manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)
            bar.update(1)
    manager.wait_until_finished()
    writer.close()
    digest = model_checkpoint.save(posixpath.join(workdir, "model"), state["params"], model_config, tokenizer,
                                   overwrite=True)
    log.info("final model: %s (fingerprint %s)", posixpath.join(workdir, "model"), digest)
    return state["params"]


def check_finite(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Mean of the steps' metrics; raises naming the step range if a loss is not finite."""
    fetched = [(step, jax.device_get(metrics)) for step, metrics in pending]
    for step, metrics in fetched:
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"non-finite loss {float(metrics['loss'])} at step {step} (steps {fetched[0][0]}-{fetched[-1][0]} "
                f"checked; the last checkpoint before step {fetched[0][0]} is good)")
    return {name: float(np.mean([m[name] for _, m in fetched])) for name in fetched[0][1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=sorted(configs.CONFIGS))
    parser.add_argument("--data", required=True, help="corpus directory (made by pipelines.make_corpus)")
    parser.add_argument("--scored", default=None,
                        help="scored output of python -m pipelines.score to train on (needed by selection configs)")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, TensorBoard events, model/")
    parser.add_argument("--smoke", action="store_true", help="shrink the run to seconds (tests)")
    args, rest = parser.parse_known_args(argv)
    config = configs.get_config(args.config, args.smoke, configs.parse_override_flags(rest))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    train(config, args.data, args.workdir, scored_dir=args.scored)


if __name__ == "__main__":
    main(sys.argv[1:])
