"""The run's workdir: whose run it holds (`config.json`), so a run resumes only its own or starts over when asked."""

from __future__ import annotations

import logging

from curation.trainer import configs, run_files

log = logging.getLogger(__name__)

# total_steps (a finished run extended; its learning-rate schedule then follows the new total).
MAY_CHANGE_ON_RESUME = (
    "log_every",
    "eval_every",
    "checkpoint_every",
    "eval_size",
    "total_steps",
    "input_processes",
    "decode_cache_mb",
)
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl", "checkpoints", "tensorboard", "model")
# Fields added to the config later, with the value every run saved before then had: a config.json without the
# field reads as that (a run of an earlier version trained with cosine decay).
OLDER_RUNS_HAD = {"schedule": "cosine", "dedup": None}


def saved_run_config(
    config: configs.TrainConfig, scored_dir: str | None, num_processes: int, dedup_dir: str | None = None
) -> dict:
    """What `config.json` records: the config, the scored data and the dedup output that thins it, and how many
    processes read the data (each process's data position is its own, so a run resumes with as many)."""
    return {**config.to_dict(), "scored": scored_dir, "dedup": dedup_dir, "num_processes": num_processes}


def read_run_config(path: str) -> dict:
    """A run's `config.json`, with the value of `OLDER_RUNS_HAD` for each field it predates."""
    return {**OLDER_RUNS_HAD, **run_files.read_json(path)}


def check_workdir(
    config: configs.TrainConfig,
    workdir: str,
    scored_dir: str | None,
    start_over: bool,
    num_processes: int = 1,
    remove: bool = True,
    dedup_dir: str | None = None,
) -> None:
    """Refuse, naming the fields, a workdir whose saved run has another config than this one (it would silently
    resume the other run); with `start_over`, remove that run's files instead (where `remove`: process 0 of a
    multi-process run does it for all)."""
    if start_over:
        if remove and run_files.exists(run_files.join(workdir, "config.json")):
            for name in RUN_FILES:
                run_files.remove(run_files.join(workdir, name))
            log.info("starting over: removed the earlier run's files from %s", workdir)
        return
    named = other_config(config, workdir, scored_dir, num_processes, dedup_dir)
    if named:
        raise ValueError(
            f"--workdir {workdir} holds a run of another config: {named}; use another --workdir, run "
            "the same config again to resume it, or pass --start_over to discard it"
        )


def other_config(
    config: configs.TrainConfig,
    workdir: str,
    scored_dir: str | None,
    num_processes: int = 1,
    dedup_dir: str | None = None,
) -> str:
    """How the run saved in `workdir` differs from `config` in what may not change on resume ("field (saved x, now
    y), ..."); "" when it does not, or when there is no run there."""
    path = run_files.join(workdir, "config.json")
    if not run_files.exists(path):
        return ""
    saved = read_run_config(path)
    wanted = saved_run_config(config, scored_dir, num_processes, dedup_dir)
    # Any other field a run of an earlier version did not save is not compared: what it was then is not known.
    differing = [
        name
        for name in sorted(wanted)
        if name in saved and name not in MAY_CHANGE_ON_RESUME and saved[name] != wanted[name]
    ]
    return ", ".join(f"{name} (saved {saved[name]!r}, now {wanted[name]!r})" for name in differing[:6])


def write_run_config(
    workdir: str,
    config: configs.TrainConfig,
    scored_dir: str | None,
    num_processes: int = 1,
    dedup_dir: str | None = None,
) -> None:
    run_files.write_json(
        run_files.join(workdir, "config.json"), saved_run_config(config, scored_dir, num_processes, dedup_dir)
    )
