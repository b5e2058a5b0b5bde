"""Several processes, one run: `jax.distributed` set up from flags or the platform's environment, and the few
collective helpers the trainer needs (who writes, agreeing on a stop, sharing the tokenizer, gathering each host's
data position).

Under `jax.distributed` every process runs the same train loop on its own devices. Each reads its own part of the
corpus (`host_shards`) into its slice of every global batch; selection and the update run over the global arrays.
Process 0 alone writes the run's own files (config, tokenizer, metrics, TensorBoard, the final model's JSON); every
process takes part in orbax's checkpoint saves, which the primary process commits.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np

log = logging.getLogger(__name__)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    from_environment: bool = False,
) -> None:
    """`jax.distributed.initialize` with the three values given, or (`from_environment`) as the platform sets them
    (Cloud TPU pods, SLURM, Open MPI, Kubernetes: jax reads them itself). CPU devices talk over gloo (the default
    CPU backend has no cross-process collectives). Call before anything asks jax for its devices."""
    given = [coordinator_address, num_processes, process_id]
    if not from_environment and all(value is None for value in given):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if from_environment:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info(
        "process %d of %d: %d local devices of %d",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def check_flags(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None, from_environment: bool
) -> str | None:
    """What is wrong with the multi-process flags, in one line naming the fix; None if nothing."""
    given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes, "--process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if from_environment and len(missing) < 3:
        return "--distributed reads the processes from the platform's environment: drop " + ", ".join(
            name for name, value in given.items() if value is not None
        )
    if 0 < len(missing) < 3:
        return (
            f"a multi-process run needs all of --coordinator_address, --num_processes and --process_id: pass "
            f"{', '.join(missing)}"
        )
    if num_processes is not None and num_processes < 1:
        return f"--num_processes {num_processes}: give 1 or more"
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        return f"--process_id {process_id}: give 0 to {num_processes - 1} (one per process of --num_processes)"
    if coordinator_address is not None and ":" not in coordinator_address:
        return f"--coordinator_address {coordinator_address!r}: give HOST:PORT of process 0 (e.g. 10.0.0.2:1234)"
    return None


def is_primary() -> bool:
    """Whether this process writes the run's own files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a SIGTERM reaches one host, and every host must stop at that step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.array([int(flag)], np.int32))).any())


def share_text(text: str | None) -> str:
    """Process 0's `text` on every process (the others pass None)."""
    if jax.process_count() == 1:
        return text
    from jax.experimental import multihost_utils

    data = np.frombuffer(text.encode("utf-8"), np.uint8) if is_primary() else np.zeros([0], np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array([data.size], np.int32))[0])
    padded = np.zeros([size], np.uint8)
    padded[: data.size] = data
    return np.asarray(multihost_utils.broadcast_one_to_all(padded)).tobytes().decode("utf-8")


def share_json(value):
    """Process 0's JSON-serialisable `value` on every process."""
    return json.loads(share_text(json.dumps(value) if is_primary() else None))


def gather_positions(position: dict[str, int]) -> list[dict[str, int]]:
    """Every process's data position (a dict of ints), in process order. Values travel as two 31-bit halves
    (`to_halves`): without x64 jax arrays hold int32, and a host's raw record count passes 2^31 on a web-scale
    corpus."""
    if jax.process_count() == 1:
        return [dict(position)]
    from jax.experimental import multihost_utils

    names = sorted(position)
    gathered = np.asarray(multihost_utils.process_allgather(to_halves([position[name] for name in names])))
    return [dict(zip(names, from_halves(row))) for row in gathered]


def to_halves(values: list[int]) -> np.ndarray:
    """Non-negative ints below 2^62 as int32: [high 31 bits of each..., low 31 bits of each...]."""
    values = np.array([int(value) for value in values], np.int64)
    return np.concatenate([values >> 31, values & ((1 << 31) - 1)]).astype(np.int32)


def from_halves(halves) -> list[int]:
    halves = np.asarray(halves).astype(np.int64)
    n = halves.size // 2
    return [int(value) for value in (halves[:n] << 31) + halves[n:]]


def host_shards(shards: list, process_index: int, process_count: int) -> list:
    """The shards process `process_index` reads: every `process_count`-th, from its own index on (so reading scales
    with hosts and no two hosts read one shard). Raises when there are fewer shards than processes."""
    if len(shards) < process_count:
        raise ValueError(
            f"{len(shards)} training shards for {process_count} processes: every process reads shards of "
            "its own; write the corpus (or score it) into at least as many shards as processes"
        )
    return shards[process_index::process_count]


def local_copy(tree):
    """A replicated global tree as arrays on this process's first device, for work one process does alone
    (evaluation on process 0): a computation over global arrays would wait for every process to join it."""
    if jax.process_count() == 1:
        return tree
    return jax.tree_util.tree_map(lambda leaf: leaf.addressable_data(0), tree)
