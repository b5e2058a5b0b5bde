"""The training loop: every config runs the same loop around one step function (`training_step.make_step`).

Reads top to bottom: logging → device mesh → input pipeline → model and optimizer → sharding → update step →
checkpoint restore → evaluators → train loop. A run killed at any step and started again with the same command
resumes from its last checkpoint and ends with exactly the params of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import posixpath
import signal
import sys
import threading
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from curation.shared import cli, scored_set
from curation.trainer import configs, distributed, input_pipeline, training_step, run_files
from curation.trainer.evaluate import Evaluator
from curation.trainer.metrics import MetricWriter, NoMetrics, progress_bar
from curation.trainer.training_data import TrainingData, build_tokenizer
from models import checkpoint as model_checkpoint
from models.tokenizer import tokenizer_from_dict
from models.two_towers import ModelConfig, TwoTower, count_params, init_params

log = logging.getLogger("curation.train")


def make_mesh(batch_size: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with a `data` axis over all devices; the batch must divide evenly over it."""
    devices = list(devices if devices is not None else jax.devices())
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} does not divide over {len(devices)} devices")
    return jax.sharding.Mesh(np.array(devices), ("data",))


LOSS_PARAMS = ("log_temperature", "bias")  # the top-level params of the sigmoid loss's t and b


def make_optimizer(config: configs.TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; no weight decay on biases, norms, temperature. The loss's t and b
    take steps `temperature_bias_lr_multiplier` times as long (a multiplier of 1 is plain AdamW, whose state
    checkpoints of earlier runs hold)."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.learning_rate, config.warmup_steps, max(config.total_steps, config.warmup_steps + 1)
    )
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    if config.temperature_bias_lr_multiplier == 1.0:
        return adamw
    factor = config.temperature_bias_lr_multiplier

    def scale_loss_params(updates, state, params=None):
        del params
        return {name: jax.tree_util.tree_map(lambda update: update * factor, value) if name in LOSS_PARAMS else value
                for name, value in updates.items()}, state

    return optax.chain(adamw, optax.GradientTransformation(lambda params: optax.EmptyState(), scale_loss_params))


def train(
    config: configs.TrainConfig,
    data_dir: str,
    workdir: str,
    *,
    scored_dir: str | None = None,
    batches: Iterator[dict] | None = None,
    step_callback: Callable[[int], None] | None = None,
    devices=None,
    start_over: bool = False,
) -> dict:
    """Run (or resume) training; returns the final params. `data_dir` is the corpus (its eval splits, and its
    training split unless `scored_dir` gives scored shards to train on). `batches` replaces the input (tests): each
    process's part of every super-batch, as `TrainingData.batches` gives it.

    Under `jax.distributed` (`curation.trainer.distributed`) every process calls this with the same arguments; each reads
    its own shards into its slice of the global batch, and process 0 alone writes the run's files."""
    processes, process = jax.process_count(), jax.process_index()
    primary = distributed.is_primary()
    # The workdir holds the run's config, tokenizer, checkpoints, metrics and final model: a run resumes only its
    # own (checked before anything is written), or starts over when asked.
    check_workdir(config, workdir, scored_dir, start_over, num_processes=processes, remove=primary)
    distributed.barrier("workdir checked")
    if primary:
        write_run_config(workdir, config, scored_dir, processes)

    # Device mesh: the super-batch and the sub-batch must both divide over it (over every process's devices).
    mesh = make_mesh(config.superbatch_size, devices)
    make_mesh(config.batch_size, devices)

    # Input pipeline (the tokenizer is part of it: captions become tokens there). Process 0 builds or loads the
    # tokenizer and the others take its copy.
    data = TrainingData.open(config, data_dir, scored_dir)
    data.check_processes(config, processes)
    tokenizer = build_tokenizer(config, data.captions, workdir) if primary else None
    tokenizer = tokenizer_from_dict(distributed.share_json(tokenizer.to_dict() if primary else None))
    model_config = config.model_config(tokenizer.vocab_size)

    # Model and optimizer.
    model = TwoTower(model_config)
    optimizer = make_optimizer(config)

    # Sharding: params and optimizer state replicated, batches split over the data axis (process p's local batch
    # is rows [p B/P, (p+1) B/P) of the global one).
    state = init_state(model_config, optimizer, config.seed, mesh)
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    log.info("model %s/%s, %d params, %d devices in %d process(es)", config.image_variant, config.text_variant,
             count_params(state["params"]), len(mesh.devices.flat), processes)

    # Update step, the same call for every config (with selection: learner scoring, selection, update).
    step_fn = training_step.make_step(config, model, optimizer, mesh, data.scored)
    flops = {**training_step.step_flops(config, model_config), **offline_flops(config, data.scored)}

    # Checkpoint restore: the state, every process's data position and the run's counters.
    manager = checkpoint_manager(workdir)
    state, progress = restore_checkpoint(manager, state)
    start_step = int(state["step"])
    writer = MetricWriter(workdir, resume_step=start_step) if primary else NoMetrics()

    # Evaluators (process 0 alone, on its own copy of the params).
    evaluator = None if batches is not None or not primary else Evaluator(
        data_dir, model_config, tokenizer, config.loss, limit=config.eval_size)

    # Train loop.
    if batches is None:
        batches = data.batches(tokenizer, config, input_pipeline.DataPosition(**progress["position"]), process,
                               processes)
    pending: list[tuple[int, dict]] = []
    timings: dict[str, float] = collections.defaultdict(float)
    wall_start, wall_before = time.perf_counter(), progress["wall_s"]
    stop = StopOnSigterm()
    with stop, progress_bar(config.total_steps, start_step, config.name, enabled=primary) as bar:
        for step in range(start_step + 1, config.total_steps + 1):
            clock = time.perf_counter()
            batch = next(batches)
            position = batch.pop("position", None)
            timings["time/data"] += time.perf_counter() - clock
            inputs = {name: global_batch(data_sharding, value, processes) for name, value in batch.items()}
            state, step_metrics, seconds = step_fn(state, inputs, step)
            for name, value in seconds.items():
                timings[name] += value
            count_examples(progress, config, position)
            pending.append((step, step_metrics))
            if step_callback is not None:
                step_callback(step)

            last = step == config.total_steps
            stopping = distributed.any_process(stop.requested)  # every process stops at the same step
            if step % config.log_every == 0 or last:
                values = check_finite(pending)
                progress["wall_s"] = wall_before + time.perf_counter() - wall_start
                positions = distributed.gather_positions(progress["position"])
                writer.write(step, train_row(step, values, progress, flops, timings, steps_logged=len(pending),
                                             raw_seen=sum(position["raw_seen"] for position in positions)))
                pending = []
                timings.clear()
                bar.set_postfix(loss=f"{values['loss']:.3f}")
            if evaluator is not None and (step % config.eval_every == 0 or last):
                writer.write(step, {"examples_seen": progress["examples_seen"],
                                    **evaluator(distributed.local_copy(state["params"]))})
            if step % config.checkpoint_every == 0 or last or stopping:
                if pending:
                    check_finite(pending)  # a checkpoint never holds the state of a non-finite step
                save_checkpoint(manager, step, state, progress)
            bar.update(1)
            if stopping and not last:
                manager.wait_until_finished()
                writer.close()
                raise Preempted(f"SIGTERM: saved the checkpoint of step {step} in {workdir}/checkpoints; run the "
                                "same command again to resume")
    manager.wait_until_finished()
    writer.close()
    save_model(workdir, state["params"], model_config, tokenizer)
    return state["params"]


def global_batch(sharding: NamedSharding, local: np.ndarray, processes: int) -> jax.Array:
    """This process's rows as its slice of the global array of `processes` times as many rows."""
    return jax.make_array_from_process_local_data(sharding, local, (local.shape[0] * processes, *local.shape[1:]))


class Preempted(RuntimeError):
    """SIGTERM (a preempted VM, a cluster draining a node) arrived: the step in flight was finished and saved."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a process ended by it


class StopOnSigterm:
    """While active (a context), SIGTERM sets `requested` instead of killing the process, so the train loop can
    finish its step, save a checkpoint and exit. (Only the main thread can install a handler; elsewhere it is a
    no-op.)"""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        log.warning("SIGTERM: finishing this step, saving a checkpoint, then exiting")
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# Fields a resumed run may change: what is reported, how the input is decoded (the same batches either way), and
# total_steps (a finished run extended; its learning-rate schedule then follows the new total).
MAY_CHANGE_ON_RESUME = ("log_every", "eval_every", "checkpoint_every", "eval_size", "total_steps", "input_processes")
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "checkpoints", "tensorboard", "model")


def saved_run_config(config: configs.TrainConfig, scored_dir: str | None, num_processes: int) -> dict:
    """What `config.json` records: the config, the scored data, and how many processes read the data (each
    process's data position is its own, so a run resumes with as many)."""
    return {**config.to_dict(), "scored": scored_dir, "num_processes": num_processes}


def check_workdir(config: configs.TrainConfig, workdir: str, scored_dir: str | None, start_over: bool,
                  num_processes: int = 1, remove: bool = True) -> None:
    """Refuse, naming the fields, a workdir whose saved run has another config than this one (it would silently
    resume the other run); with `start_over`, remove that run's files instead (where `remove`: process 0 of a
    multi-process run does it for all)."""
    path = run_files.join(workdir, "config.json")
    if not run_files.exists(path):
        return
    if start_over:
        if remove:
            for name in RUN_FILES:
                run_files.remove(run_files.join(workdir, name))
            log.info("starting over: removed the earlier run's files from %s", workdir)
        return
    saved = run_files.read_json(path)
    wanted = saved_run_config(config, scored_dir, num_processes)
    # A field a run of an earlier version did not save is not compared: what it was then is not known.
    differing = [name for name in sorted(wanted)
                 if name in saved and name not in MAY_CHANGE_ON_RESUME and saved[name] != wanted[name]]
    if differing:
        named = ", ".join(f"{name} (saved {saved[name]!r}, now {wanted[name]!r})" for name in differing[:6])
        raise ValueError(f"--workdir {workdir} holds a run of another config: {named}; use another --workdir, run "
                         "the same config again to resume it, or pass --start_over to discard it")


def write_run_config(workdir: str, config: configs.TrainConfig, scored_dir: str | None,
                     num_processes: int = 1) -> None:
    run_files.write_json(run_files.join(workdir, "config.json"), saved_run_config(config, scored_dir, num_processes))


def init_state(model_config: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
               mesh: jax.sharding.Mesh) -> dict:
    """The state a run starts from, replicated over the mesh: {params, opt_state, step, rng} (what a checkpoint
    holds)."""

    def init(rng):
        params = init_params(model_config, rng)
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros([], jnp.int32),
                "rng": jax.random.key_data(rng)}

    return jax.jit(init, out_shardings=NamedSharding(mesh, PartitionSpec()))(jax.random.key(seed))


def offline_flops(config: configs.TrainConfig, scored: scored_set.ScoredSet | None) -> dict[str, int]:
    """The reference's forward per example and over every example scored: spent offline, once per corpus, and
    counted for a run only when it uses the reference's scores (the reference's training is reported apart)."""
    per_example = 0 if scored is None else scored.reference.forward_flops_per_example
    used = scored is not None and config.uses_reference_scores
    return {"reference_per_example": per_example, "offline_scoring": per_example * scored.scored if used else 0}


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
    """Checkpoints under `workdir/checkpoints`, each with the items "state" and "progress"; the last two kept."""
    return ocp.CheckpointManager(
        model_checkpoint.absolute_path(run_files.join(workdir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "progress": ocp.JsonCheckpointHandler()},
    )


def restore_checkpoint(manager: ocp.CheckpointManager, state: dict) -> tuple[dict, dict]:
    """The latest checkpoint's state (laid out and sharded like `state`) and progress, or `state` and a fresh
    progress (data position, examples seen, wall seconds) when there is none. A checkpoint that cannot be restored
    (damaged, cut short) is moved aside, to `checkpoints/corrupt_step_N`, with a warning naming it, and the one
    before it is restored."""
    progress = {"position": input_pipeline.DataPosition().to_dict(), "examples_seen": 0, "wall_s": 0.0}
    target = ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)),
        progress=ocp.args.JsonRestore())
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=target)
        except Exception as error:  # orbax and tensorstore raise many kinds for damaged data
            directory = posixpath.join(str(manager.directory), str(step))
            aside = posixpath.join(str(manager.directory), f"corrupt_step_{step}")
            distributed.barrier(f"restore of step {step} failed")
            if distributed.is_primary():
                run_files.move(directory, aside)
            distributed.barrier(f"step {step} moved aside")
            manager.reload()
            earlier = [other for other in manager.all_steps() if other < step]
            log.warning("the checkpoint of step %d cannot be restored (%s: %s); moved it to %s and %s", step,
                        type(error).__name__, " ".join(str(error).split())[:200], aside,
                        f"resuming from step {max(earlier)}" if earlier else "starting from step 0")
            continue
        log.info("resumed from step %d", int(restored["state"]["step"]))
        progress = restored["progress"]
        if "positions" in progress:  # a multi-process run's: each process resumes its own position
            progress["position"] = progress.pop("positions")[jax.process_index()]
        return restored["state"], progress
    return state, progress


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: dict, progress: dict) -> None:
    """Saved by every process together (orbax: the primary writes the replicated state and the JSON); the
    progress holds every process's data position."""
    if jax.process_count() > 1:
        progress = {**{k: v for k, v in progress.items() if k != "position"},
                    "positions": distributed.gather_positions(progress["position"])}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)), force=True)


def count_examples(progress: dict, config: configs.TrainConfig, position) -> None:
    """Advance the run's counters by one step: b examples trained on, B drawn, and the data position after them."""
    progress["examples_seen"] += config.batch_size
    progress["superbatch_examples_seen"] = progress.get("superbatch_examples_seen", 0) + config.superbatch_size
    if position is not None:
        progress["position"] = input_pipeline.DataPosition.from_array(position[-1]).to_dict()


def train_row(step: int, values: dict[str, float], progress: dict, flops: dict[str, int],
              timings: dict[str, float], steps_logged: int, raw_seen: int | None = None) -> dict[str, float]:
    """One metrics row: the logged steps' mean metrics, the run's counters and FLOPs (online: the learner's
    updates and scoring passes so far; offline: the reference's pass over the scored corpus), and the mean seconds
    per step of each timed part. `raw_seen`: records read by every process (default: this one's position)."""
    drawn = progress["superbatch_examples_seen"]
    raw_seen = progress["position"]["raw_seen"] if raw_seen is None else raw_seen
    train_flops, scoring_flops = step * flops["train"], step * flops["learner_scoring"]
    return {
        **values, "examples_seen": progress["examples_seen"], "superbatch_examples_seen": drawn,
        "train_flops": train_flops, "learner_scoring_flops": scoring_flops, "online_flops": train_flops + scoring_flops,
        "offline_scoring_flops": flops["offline_scoring"], "reference_flops_per_example": flops["reference_per_example"],
        "wall_s": progress["wall_s"], "skipped": max(raw_seen - drawn, 0),
        **{name: seconds / steps_logged for name, seconds in timings.items()},
    }


def check_finite(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """Mean of the steps' metrics; raises naming the step range if a loss is not finite."""
    fetched = [(step, jax.device_get(metrics)) for step, metrics in pending]
    for step, metrics in fetched:
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(
                f"non-finite loss {float(metrics['loss'])} at step {step} (steps {fetched[0][0]}-{fetched[-1][0]} "
                f"checked; the last checkpoint before step {fetched[0][0]} is good)")
    return {name: float(np.mean([m[name] for _, m in fetched])) for name in fetched[0][1]}


def save_model(workdir: str, params: dict, model_config: ModelConfig, tokenizer) -> None:
    """The final model, as the scoring job loads it: params, model config, tokenizer and fingerprint."""
    path = posixpath.join(workdir, "model")
    digest = model_checkpoint.save(path, params, model_config, tokenizer, overwrite=True)
    log.info("final model: %s (fingerprint %s)", path, digest)
