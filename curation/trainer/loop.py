"""The training loop: every config runs the same loop around one step function (`training_step.make_step`).

`train` reads top to bottom: workdir → device mesh → input pipeline → model and optimizer → sharding → update step
→ checkpoint restore → evaluators → train loop (`run_steps`). A run killed at any step and started again with the
same command resumes from its last checkpoint and ends with exactly the params of an uninterrupted run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import signal
import threading
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from curation.shared import scored_set
from curation.trainer import configs, distributed, input_pipeline, training_step
from curation.trainer.checkpoints import checkpoint_manager, restore_checkpoint, save_checkpoint, save_model
from curation.trainer.evaluate import Evaluator
from curation.trainer.metrics import MetricWriter, NoMetrics, check_finite, progress_bar, train_row
from curation.trainer.training_data import TrainingData, build_tokenizer
from curation.trainer.workdir import check_workdir, write_run_config
from models.tokenizer import tokenizer_from_dict
from models.two_towers import ModelConfig, TwoTower, count_params, init_params

log = logging.getLogger(__name__)


def make_mesh(batch_size: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh with a `data` axis over all devices; the batch must divide evenly over it."""
    devices = list(devices if devices is not None else jax.devices())
    if batch_size % len(devices):
        raise ValueError(f"batch size {batch_size} does not divide over {len(devices)} devices")
    return jax.sharding.Mesh(np.array(devices), ("data",))


LOSS_PARAMS = ("log_temperature", "bias")  # the top-level params of the sigmoid loss's t and b


def learning_rate_schedule(config: configs.TrainConfig) -> optax.Schedule:
    """The learning rate at each step: 0 rising linearly to `learning_rate` over `warmup_steps`, then by
    `config.schedule` cosine decay to 0 at `total_steps`, or the peak held to the end ("constant")."""
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, config.learning_rate, config.warmup_steps, max(config.total_steps, config.warmup_steps + 1)
        )
    if config.schedule == "constant":  # joined so that warmup_steps=0 starts at the peak, as cosine does
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
                optax.constant_schedule(config.learning_rate),
            ],
            [config.warmup_steps],
        )
    raise ValueError(f"unknown schedule {config.schedule!r}; known: {', '.join(configs.SCHEDULES)}")


def make_optimizer(config: configs.TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup, then cosine decay or a constant rate (`learning_rate_schedule`); no weight decay on
    biases, norms, temperature. The loss's t and b take steps `temperature_bias_lr_multiplier` times as long (a
    multiplier of 1 is plain AdamW, whose state checkpoints of earlier runs hold)."""
    schedule = learning_rate_schedule(config)
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim > 1, params)  # noqa: E731
    adamw = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
    if config.temperature_bias_lr_multiplier == 1.0:
        return adamw
    factor = config.temperature_bias_lr_multiplier

    def scale_loss_params(updates, state, params=None):
        del params
        return {
            name: jax.tree_util.tree_map(lambda update: update * factor, value) if name in LOSS_PARAMS else value
            for name, value in updates.items()
        }, state

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
    data: TrainingData | None = None,
    dedup_dir: str | None = None,
) -> dict:
    """Run (or resume) training; returns the final params. `data_dir` is the corpus (its eval splits, and its
    training split unless `scored_dir` gives scored shards to train on); `data`, when the caller has opened it
    already, is that corpus and scored set; `dedup_dir`, a dedup output of the scored set (`pipelines/dedup.py`)
    whose left-out rows the run never trains on. `batches` replaces the input (tests): each process's part of every
    super-batch, as `TrainingData.batches` gives it.

    Under `jax.distributed` (`curation.trainer.distributed`) every process calls this with the same arguments; each
    reads its own shards into its slice of the global batch, and process 0 alone writes the run's files."""
    processes, process = jax.process_count(), jax.process_index()
    primary = distributed.is_primary()

    # Workdir: it holds the run's config, tokenizer, checkpoints, metrics and final model. A run resumes only its
    # own (checked before anything is written), or starts over when asked.
    check_workdir(config, workdir, scored_dir, start_over, num_processes=processes, remove=primary, dedup_dir=dedup_dir)
    distributed.barrier("workdir checked")
    if primary:
        write_run_config(workdir, config, scored_dir, processes, dedup_dir)

    # Device mesh: the super-batch and the sub-batch must both divide over it (over every process's devices).
    mesh = make_mesh(config.superbatch_size, devices)
    make_mesh(config.batch_size, devices)

    # Input pipeline, the tokenizer included (captions become tokens there).
    if data is None:
        data = TrainingData.open(config, data_dir, scored_dir, dedup_dir)
    data.check_processes(config, processes)
    tokenizer = shared_tokenizer(config, data, workdir, primary)
    model_config = config.model_config(tokenizer.vocab_size)

    # Model and optimizer.
    model = TwoTower(model_config)
    optimizer = make_optimizer(config)

    # Sharding: params and optimizer state replicated, batches split over the data axis (process p's local batch
    # is rows [p B/P, (p+1) B/P) of the global one).
    state = init_state(model_config, optimizer, config.seed, mesh)
    log.info(
        "model %s/%s, %d params, %d devices in %d process(es)",
        config.image_variant,
        config.text_variant,
        count_params(state["params"]),
        len(mesh.devices.flat),
        processes,
    )

    # Update step, the same call for every config (with selection: learner scoring, selection, update).
    step_fn = training_step.make_step(config, model, optimizer, mesh, data.scored)
    flops = {**training_step.step_flops(config, model_config), **offline_flops(config, data.scored)}

    # Checkpoint restore: the state, every process's data position and the run's counters.
    manager = checkpoint_manager(workdir)
    state, progress = restore_checkpoint(manager, state)
    writer = MetricWriter(workdir, resume_step=int(state["step"])) if primary else NoMetrics()

    # Evaluators (process 0 alone, on its own copy of the params).
    evaluator = (
        None
        if batches is not None or not primary
        else Evaluator(data_dir, model_config, tokenizer, config.loss, limit=config.eval_size)
    )

    # Train loop.
    if batches is None:
        batches = data.batches(
            tokenizer, config, input_pipeline.DataPosition(**progress["position"]), process, processes
        )
    run = Run(
        config,
        workdir,
        step_fn,
        NamedSharding(mesh, PartitionSpec("data")),
        processes,
        flops,
        writer,
        evaluator,
        manager,
        step_callback,
    )
    state = run_steps(run, state, progress, batches)
    save_model(workdir, state["params"], model_config, tokenizer)
    return state["params"]


def shared_tokenizer(config: configs.TrainConfig, data: TrainingData, workdir: str, primary: bool):
    """The run's tokenizer: process 0 builds or loads it, and the others take its copy."""
    tokenizer = build_tokenizer(config, data.captions, workdir) if primary else None
    return tokenizer_from_dict(distributed.share_json(tokenizer.to_dict() if primary else None))


@dataclasses.dataclass(frozen=True)
class Run:
    """What the train loop needs besides the state, the counters and the batches: made once by `train`."""

    config: configs.TrainConfig
    workdir: str
    step_fn: training_step.Step
    data_sharding: NamedSharding
    processes: int
    flops: dict[str, int]
    writer: MetricWriter | NoMetrics
    evaluator: Evaluator | None
    manager: ocp.CheckpointManager
    step_callback: Callable[[int], None] | None


def run_steps(run: Run, state: dict, progress: dict, batches: Iterator[dict]) -> dict:
    """Steps from the state's step to `total_steps`: each step trains, then logs, evaluates and saves a checkpoint
    when due. SIGTERM finishes the step in flight, saves it and raises Preempted. Returns the final state."""
    config = run.config
    start_step = int(state["step"])
    pending: list[tuple[int, dict]] = []  # the steps' metrics not logged yet
    timings: dict[str, float] = collections.defaultdict(float)
    wall_start, wall_before = time.perf_counter(), progress["wall_s"]
    stop = StopOnSigterm()
    with stop, progress_bar(config.total_steps, start_step, config.name, enabled=distributed.is_primary()) as bar:
        for step in range(start_step + 1, config.total_steps + 1):
            state, step_metrics = take_step(run, state, progress, next_batch(batches, timings), step, timings)
            pending.append((step, step_metrics))
            if run.step_callback is not None:
                run.step_callback(step)

            last = step == config.total_steps
            stopping = distributed.any_process(stop.requested)  # every process stops at the same step
            if step % config.log_every == 0 or last:
                progress["wall_s"] = wall_before + time.perf_counter() - wall_start
                loss = log_row(run, step, pending, progress, timings)
                pending, timings = [], collections.defaultdict(float)
                bar.set_postfix(loss=f"{loss:.3f}")
            if run.evaluator is not None and (step % config.eval_every == 0 or last):
                run.writer.write(
                    step,
                    {
                        "examples_seen": progress["examples_seen"],
                        **run.evaluator(distributed.local_copy(state["params"])),
                    },
                )
            if step % config.checkpoint_every == 0 or last or stopping:
                if pending:
                    check_finite(pending)  # a checkpoint never holds the state of a non-finite step
                save_checkpoint(run.manager, step, state, progress)
            bar.update(1)
            if stopping and not last:
                run.manager.wait_until_finished()
                run.writer.close()
                raise Preempted(
                    f"SIGTERM: saved the checkpoint of step {step} in {run.workdir}/checkpoints; run the "
                    "same command again to resume"
                )
    run.manager.wait_until_finished()
    run.writer.close()
    return state


def next_batch(batches: Iterator[dict], timings: dict[str, float]) -> dict:
    """The next batch from the input, its wait counted as `time/data`."""
    clock = time.perf_counter()
    batch = next(batches)
    timings["time/data"] += time.perf_counter() - clock
    return batch


def take_step(
    run: Run, state: dict, progress: dict, batch: dict, step: int, timings: dict[str, float]
) -> tuple[dict, dict]:
    """One update on the global batch, the run's counters advanced; returns the new state and the step's metrics."""
    position = batch.pop("position", None)
    inputs = {name: global_batch(run.data_sharding, value, run.processes) for name, value in batch.items()}
    state, step_metrics, seconds = run.step_fn(state, inputs, step)
    for name, value in seconds.items():
        timings[name] += value
    count_examples(progress, run.config, position)
    return state, step_metrics


def log_row(run: Run, step: int, pending: list[tuple[int, dict]], progress: dict, timings: dict[str, float]) -> float:
    """Write the metrics row of the steps since the last one (checked finite); returns their mean loss."""
    values = check_finite(pending)
    positions = distributed.gather_positions(progress["position"])
    run.writer.write(
        step,
        train_row(
            step,
            values,
            progress,
            run.flops,
            timings,
            steps_logged=len(pending),
            raw_seen=sum(position["raw_seen"] for position in positions),
        ),
    )
    return values["loss"]


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


def init_state(
    model_config: ModelConfig, optimizer: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh
) -> dict:
    """The state a run starts from, replicated over the mesh: {params, opt_state, step, rng} (what a checkpoint
    holds)."""

    def init(rng):
        params = init_params(model_config, rng)
        return {
            "params": params,
            "opt_state": optimizer.init(params),
            "step": jnp.zeros([], jnp.int32),
            "rng": jax.random.key_data(rng),
        }

    return jax.jit(init, out_shardings=NamedSharding(mesh, PartitionSpec()))(jax.random.key(seed))


def offline_flops(config: configs.TrainConfig, scored: scored_set.ScoredSet | None) -> dict[str, int]:
    """The reference's forward per example and over every example scored: spent offline, once per corpus, and
    counted for a run only when it uses the reference's scores (the reference's training is reported apart)."""
    per_example = 0 if scored is None else scored.reference.forward_flops_per_example
    used = scored is not None and config.uses_reference_scores
    return {"reference_per_example": per_example, "offline_scoring": per_example * scored.scored if used else 0}


def count_examples(progress: dict, config: configs.TrainConfig, position) -> None:
    """Advance the run's counters by one step: b examples trained on, B drawn, and the data position after them."""
    progress["examples_seen"] += config.batch_size
    progress["superbatch_examples_seen"] = progress.get("superbatch_examples_seen", 0) + config.superbatch_size
    if position is not None:
        progress["position"] = input_pipeline.DataPosition.from_array(position[-1]).to_dict()
