"""The scoring job on Beam's portable runner scores exactly as it does in process.

This proves the job survives serialisation to a pipeline proto and runs in separate SDK worker processes, as on
Flink's and Spark's portable runners: each worker unpickles every DoFn, coder and side input and imports this
project afresh, and the batch comes out the same (keys, embeddings bit for bit, counts, manifest) as from the
in-process FnApiRunner. The job service is Beam's Python one and the workers come from an EXTERNAL worker pool, both
started here as subprocesses on loopback; their process groups, the pool's SDK workers included, are stopped
afterwards and checked to be empty.
"""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from curation.shared import scored_set
from curation.shared.manifest import Manifest
from tests.pipelines.test_score import batch_manifest, run_score

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT_S = 60  # for a service to accept connections (it imports Beam first)
JOB_TIMEOUT_S = 120  # for the portable run, submission to manifest (about 6 s here)
STOP_GRACE_S = 10  # for each step of stopping the services (clean exit, SIGTERM, SIGKILL)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: str, chars: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError as error:
        return f"({error})"


def group_members(pgid: int) -> list[str]:
    """'pid state cmdline' of each process in process group `pgid`, zombies included."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                state, _, pgrp = f.read().rpartition(")")[2].split()[:3]  # after "pid (comm)"
            if int(pgrp) != pgid:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            members.append(f"{pid} {state} {command}")
        except (OSError, ValueError):  # gone meanwhile
            continue
    return members


class Service:
    """A Beam service in a process group of its own, its stdout and stderr in a log file. `exit_signal` is the
    one it exits cleanly on."""

    def __init__(self, name: str, args: list[str], port: int, workdir: str, env: dict[str, str], exit_signal: int):
        self.name, self.port, self.exit_signal = name, port, exit_signal
        self.log = os.path.join(workdir, f"{name}.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *args],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pgid = self.process.pid  # start_new_session: the leader of a new session and process group

    def wait_until_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                pytest.fail(
                    f"{self.name} exited with code {code} before serving on port {self.port}:\n{tail(self.log)}"
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{self.name} did not accept connections on 127.0.0.1:{self.port} within "
                        f"{timeout_s} s:\n{tail(self.log)}"
                    )
                time.sleep(0.1)

    def exit_cleanly(self) -> None:
        if self.process.poll() is None:  # not reaped, so the pid is still its own
            os.kill(self.process.pid, self.exit_signal)

    def terminate_group(self) -> None:
        os.killpg(self.pgid, signal.SIGTERM)

    def kill_group(self) -> None:
        os.killpg(self.pgid, signal.SIGKILL)


def stop(services: list[Service]) -> dict[str, list[str]]:
    """Each service asked to exit, then SIGTERM to its whole process group, then SIGKILL, each step after a grace
    period while processes are left; returns those still in the groups at the end (zombies included).

    The worker pool exits cleanly on SIGINT, terminating and reaping its SDK workers: killed from under it, they
    would be orphans, left to an init that may never reap them (this machine's does not)."""
    for step in (Service.exit_cleanly, Service.terminate_group, Service.kill_group):
        for service in services:
            if group_members(service.pgid):
                try:
                    step(service)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            for service in services:
                service.process.poll()  # reaps the leader
            if not any(group_members(service.pgid) for service in services):
                return {}
            time.sleep(0.1)
    return {service.name: group_members(service.pgid) for service in services if group_members(service.pgid)}


@dataclasses.dataclass
class PortableServices:
    job_service: Service
    worker_pool: Service
    stopped: dict[str, list[str]] | None = None

    @property
    def flags(self) -> list[str]:
        return [
            "--runner=PortableRunner",
            f"--job_endpoint=127.0.0.1:{self.job_service.port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=127.0.0.1:{self.worker_pool.port}",
        ]

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} ({s.log}):\n{tail(s.log)}" for s in (self.job_service, self.worker_pool))

    def stop(self) -> dict[str, list[str]]:
        """Once; the processes left in the services' groups afterwards."""
        if self.stopped is None:
            self.stopped = stop([self.job_service, self.worker_pool])
        return self.stopped

    def give_up(self) -> str:
        """Stops the services (which fails a job waiting on them) and says what they logged."""
        left = self.stop()
        return self.logs() + (f"\nprocesses left behind: {left}" if left else "")


@pytest.fixture
def portable_services(tmp_path):
    """Beam's Python job service and an EXTERNAL worker pool on free loopback ports; their process groups are
    killed at the end, even when the test fails."""
    # The pool starts SDK workers as `python -c ...`: the venv's python, importing this checkout's packages.
    env = dict(
        os.environ,
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    (tmp_path / "staging").mkdir()
    job_port, pool_port = free_port(), free_port()
    started = []
    try:
        started.append(
            Service(
                "job_service",
                [
                    "apache_beam.runners.portability.local_job_service_main",
                    f"--port={job_port}",
                    f"--staging_dir={tmp_path / 'staging'}",
                ],
                job_port,
                str(tmp_path),
                env,
                signal.SIGTERM,
            )
        )
        started.append(
            Service(
                "worker_pool",
                ["apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
                pool_port,
                str(tmp_path),
                env,
                signal.SIGINT,
            )
        )
        for service in started:
            service.wait_until_serving(START_TIMEOUT_S)
        services = PortableServices(*started)
    except BaseException:
        stop(started)
        raise
    yield services
    left = services.stop()
    assert not left, f"processes left behind after SIGTERM and SIGKILL: {left}"


def bounded(timeout_s: float, what: str, on_timeout, function, *args):
    """function(*args) in a thread, failing the test after timeout_s with what on_timeout() says (it should also
    unblock the thread, which is left as a daemon)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name=what, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"{what} did not finish within {timeout_s} s\n{on_timeout()}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture(scope="module")
def in_process_run(web_corpora, reference_checkpoint, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("in_process") / "out")
    return batch_manifest(run_score(web_corpora["wds"], "wds", output, reference_checkpoint))


def scored_rows(manifest: Manifest) -> dict[str, dict]:
    table = pa.concat_tables([scored_set.read_scored_parquet(path) for path in manifest.shard_paths("parquet")])
    rows = {row["key"]: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows == manifest.counts.scored
    return rows


def dead_letter_rows(manifest: Manifest) -> dict[str, dict]:
    """The dead letter by key; a message's object addresses (PIL's "<_io.BytesIO object at 0x7f...>") masked."""
    rows = [
        row
        for name in manifest.dead_letter_shards
        for row in scored_set.read_scored_parquet(os.path.join(manifest.batch_dir, name)).to_pylist()
    ]
    return {row["key"]: {**row, "message": re.sub(r" at 0x[0-9a-f]+", " at 0x", row["message"])} for row in rows}


def meaningful(manifest: Manifest) -> dict:
    """The manifest less what differs between two runs of the same job: its folder, creation time and the names
    of its files (the input shards' outputs are checked apart)."""
    values = dataclasses.asdict(manifest)
    for name in ("batch_dir", "created", "shards", "dead_letter_shards"):
        values.pop(name)
    for shard in values["input_shards"]:
        shard["outputs"] = len(shard["outputs"]) > 0
    return values


def test_the_portable_runner_scores_exactly_as_in_process(
    portable_services, in_process_run, web_corpora, reference_checkpoint, tmp_path
):
    output = str(tmp_path / "portable")
    summary = bounded(
        JOB_TIMEOUT_S,
        "the job on the portable runner",
        portable_services.give_up,
        run_score,
        web_corpora["wds"],
        "wds",
        output,
        reference_checkpoint,
        *portable_services.flags,
    )
    portable, local = batch_manifest(summary), in_process_run

    # It ran on the job service, in an SDK worker the pool started (not in this process).
    assert "Completed job" in tail(portable_services.job_service.log, 100_000), portable_services.logs()
    assert "Starting worker with command" in tail(portable_services.worker_pool.log, 100_000)

    assert portable.counts == local.counts and portable.counts.read == 120 and portable.counts.dead_lettered > 0
    # Every stored value of every scored row, the embeddings included, bit for bit.
    assert scored_rows(portable) == scored_rows(local)
    assert dead_letter_rows(portable) == dead_letter_rows(local)
    assert len(dead_letter_rows(portable)) == portable.counts.dead_lettered
    assert meaningful(portable) == meaningful(local)
    holders = {}  # input shard -> the scored files holding its records
    for name in portable.shards:
        for source in scored_set.sources_of(os.path.join(portable.batch_dir, name)):
            holders.setdefault(source, set()).add(name)
    assert {shard.path: set(shard.outputs) for shard in portable.input_shards} == holders

    left = portable_services.stop()
    assert not left, f"processes left behind after SIGTERM and SIGKILL: {left}"
    for service in (portable_services.job_service, portable_services.worker_pool):
        with pytest.raises(ProcessLookupError):
            os.killpg(service.pgid, 0)
