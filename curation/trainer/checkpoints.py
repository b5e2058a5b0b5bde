"""The run's checkpoints (orbax, under `workdir/checkpoints`) and its final model (`workdir/model`)."""

from __future__ import annotations

import logging
import posixpath

import jax
import orbax.checkpoint as ocp

from curation.trainer import distributed, input_pipeline, run_files
from models import checkpoint as model_checkpoint
from models.two_towers import ModelConfig

log = logging.getLogger(__name__)


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
        state=ocp.args.StandardRestore(
            jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        ),
        progress=ocp.args.JsonRestore(),
    )
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
            log.warning(
                "the checkpoint of step %d cannot be restored (%s: %s); moved it to %s and %s",
                step,
                type(error).__name__,
                " ".join(str(error).split())[:200],
                aside,
                f"resuming from step {max(earlier)}" if earlier else "starting from step 0",
            )
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
        progress = {
            **{k: v for k, v in progress.items() if k != "position"},
            "positions": distributed.gather_positions(progress["position"]),
        }
    manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)),
        force=True,
    )


def save_model(workdir: str, params: dict, model_config: ModelConfig, tokenizer) -> None:
    """The final model, as the scoring job loads it: params, model config, tokenizer and fingerprint."""
    path = posixpath.join(workdir, "model")
    digest = model_checkpoint.save(path, params, model_config, tokenizer, overwrite=True)
    log.info("final model: %s (fingerprint %s)", path, digest)
