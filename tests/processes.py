"""Train under `jax.distributed` on localhost in the tests: N processes × D CPU devices each, every process running
`python -m tests.processes` (this file), which records what its process read and what selection chose.

    run_training(processes=2, devices=2, **run) -> [results of process 0, results of process 1, ...]

Each process writes its results to `OUT/process_{i}.npz`: per step the rows of its local super-batch (a sample
of each image's values, and their data positions), the global super-batch's rows sampled alike as the step saw
them, and the indices selection chose; and a digest of the final params. A run killed at a step (`kill_at`)
records `killed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_training(processes: int, devices: int, out: str, **run) -> list[dict]:
    """Run the worker in `processes` processes of `devices` CPU devices; returns each process's results. `run`:
    config (TrainConfig as a dict), data, workdir, scored, kill_at, batches_from (a folder of recorded global
    batches to feed instead of reading the data: single-process runs only)."""
    import numpy as np

    os.makedirs(out, exist_ok=True)
    spec = os.path.join(out, "run.json")
    with open(spec, "w") as f:
        json.dump(run, f)
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "tests.processes", spec, out, address, str(processes)]
    workers = [
        subprocess.Popen(
            [*command, str(index)], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for index in range(processes)
    ]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=400)[0])
    finally:
        for worker in workers:
            worker.kill()
    for index, (worker, output) in enumerate(zip(workers, logs)):
        assert worker.returncode == 0, f"process {index} exited {worker.returncode}:\n{output[-4000:]}"
    results = []
    for index in range(processes):
        with np.load(os.path.join(out, f"process_{index}.npz"), allow_pickle=False) as stored:
            results.append({name: stored[name] for name in stored.files} | {"log": logs[index]})
    return results


SAMPLE_STRIDE = 97


def row_checksums(images):
    """Every 97th value of each image row, as stored (float32): a fingerprint compared exactly."""
    import numpy as np

    return np.asarray(images).reshape(len(images), -1)[:, ::SAMPLE_STRIDE]


def _worker(spec_path: str, out: str, address: str, processes: int, index: int) -> None:
    with open(spec_path) as f:
        run = json.load(f)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from curation.trainer import distributed

    if processes > 1:
        distributed.initialize(address, processes, index)
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from curation.trainer import configs, training_data, training_step
    from curation.trainer.loop import train

    config = configs.TrainConfig(**run["config"])
    record = {"local": [], "positions": [], "global": [], "indices": [], "shards": []}

    original_batches = training_data.TrainingData.batches

    def recording_batches(self, tokenizer, config, position, process_index=0, process_count=1):
        record["shards"] = [str(shard) for shard in distributed.host_shards(self.shards, process_index, process_count)]
        for batch in original_batches(self, tokenizer, config, position, process_index, process_count):
            record["local"].append(row_checksums(batch["image"]))
            record["positions"].append(batch["position"])
            yield batch

    training_data.TrainingData.batches = recording_batches

    original_functions = training_step.make_jest_functions

    def recording_functions(*args, **kwargs):
        parts = original_functions(*args, **kwargs)
        mesh = args[3]
        checksum = jax.jit(
            lambda images: images.reshape(images.shape[0], -1)[:, ::SAMPLE_STRIDE],
            out_shardings=NamedSharding(mesh, PartitionSpec()),
        )

        def choose(*choose_args):
            indices, diagnostics = parts.choose(*choose_args)
            record["indices"].append(np.asarray(indices))
            return indices, diagnostics

        def update(state, images, tokens, indices, rng):
            record["global"].append(np.asarray(checksum(images)))
            return parts.update(state, images, tokens, indices, rng)

        return training_step.JestFunctions(parts.embed, choose, update)

    training_step.make_jest_functions = recording_functions

    batches = None
    if run.get("batches_from"):
        folder = run["batches_from"]
        steps = sorted(int(name.split("_")[1].split(".")[0]) for name in os.listdir(folder))

        def recorded():
            for step in steps:
                with np.load(os.path.join(folder, f"step_{step}.npz")) as stored:
                    yield {name: stored[name] for name in stored.files}

        batches = recorded()
    elif run.get("record_batches_to"):  # each process's local batches, for a later run to feed in
        folder = os.path.join(run["record_batches_to"], f"process_{index}")
        os.makedirs(folder, exist_ok=True)
        inner = training_data.TrainingData.batches

        def saving_batches(self, *args):
            for step, batch in enumerate(inner(self, *args), start=1):
                np.savez(os.path.join(folder, f"step_{step}.npz"), **batch)
                yield batch

        training_data.TrainingData.batches = saving_batches

    def kill(step):
        if step == run.get("kill_at"):
            raise KeyboardInterrupt

    killed = False
    try:
        params = train(
            config, run["data"], run["workdir"], scored_dir=run.get("scored"), batches=batches, step_callback=kill
        )
    except KeyboardInterrupt:
        killed, params = True, None
    digest = hashlib.sha256()
    if params is not None:
        for leaf in jax.tree_util.tree_leaves(params):
            digest.update(np.asarray(jax.device_get(leaf)).tobytes())
    np.savez(
        os.path.join(out, f"process_{index}.npz"),
        local=np.array(record["local"]),
        global_rows=np.array(record["global"]),
        positions=np.array(record["positions"]),
        indices=np.array(record["indices"]),
        shards=np.array(record["shards"]),
        killed=np.array(killed),
        params=np.array(digest.hexdigest()),
        process_count=np.array(jax.process_count()),
        device_count=np.array(jax.device_count()),
    )
    sys.stdout.flush()
    if killed:  # a killed process leaves without jax.distributed's shutdown handshake
        os._exit(0)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
