"""A user's mistakes on the command line: each is refused before any work, as one line naming the fix, and
leaves nothing written."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pathlib
import shutil

import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from curation import report as report_cli
from curation import train as train_cli
from curation.shared import batches
from curation.shared.manifest import SIDECAR_DIR
from curation.trainer import configs
from pipelines import options, preflight, score
from tests.pipelines.test_flex_template import job_flags, sample

METADATA = json.loads((pathlib.Path(__file__).resolve().parents[1] / "deploy" / "metadata.json").read_text())


def refused(capsys, main, argv: list[str]) -> str:
    """Run `main(argv)`, which must exit non-zero; returns its single line of error output."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# curation.trainer.loop


@pytest.fixture
def train_paths(tmp_path):
    return tmp_path / "corpus", tmp_path / "work"


def train_argv(paths, *flags: str) -> list[str]:
    data, workdir = paths
    return ["--data", str(data), "--workdir", str(workdir), *flags]


def test_train_score_is_the_field_not_an_abbreviation_of_scored(train_paths):
    args, config = train_cli.parse_args(
        train_argv(train_paths, "--config", "jest", "--score=hard_learner", "--scored", "x")
    )
    assert config.score == "hard_learner" and args.scored == "x"
    _, config = train_cli.parse_args(
        train_argv(train_paths, "--config", "reference", "--batch_size", "8", "--selection_noise=no", "--smoke")
    )
    assert (config.batch_size, config.selection_noise, config.total_steps) == (8, False, configs.SMOKE["total_steps"])
    assert config.loss == configs.reference().loss  # fields not given keep the config's value


def test_train_field_without_config_needing_scores(capsys, train_paths):
    line = refused(capsys, train_cli.main, train_argv(train_paths, "--config", "jest", "--score=hard_learner"))
    assert "--scored" in line
    assert not train_paths[1].exists()


def test_train_misspelt_field(capsys, train_paths):
    line = refused(capsys, train_cli.main, train_argv(train_paths, "--config", "reference", "--batch_sise=8"))
    assert "--batch_sise" in line and "did you mean --batch_size" in line
    assert not train_paths[1].exists()


@pytest.mark.parametrize("misspelt, named", [("--confg", "--config"), ("--dta", "--data"), ("--workdri", "--workdir")])
def test_train_misspelt_required_flag(capsys, train_paths, misspelt, named):
    argv = [misspelt if arg == named else arg for arg in train_argv(train_paths, "--config", "reference")]
    line = refused(capsys, train_cli.main, argv)
    assert f"unknown flag {misspelt} (did you mean {named}?)" in line
    assert not train_paths[1].exists()


def test_train_bad_field_value(capsys, train_paths):
    line = refused(capsys, train_cli.main, train_argv(train_paths, "--config", "reference", "--flexi=maybe"))
    assert "--flexi" in line
    assert not train_paths[1].exists()


def test_train_unknown_schedule(capsys, train_paths):
    line = refused(capsys, train_cli.main, train_argv(train_paths, "--config", "uniform", "--schedule", "linear"))
    assert "unknown schedule 'linear'; known: cosine, constant" in line
    assert not train_paths[1].exists()
    _, config = train_cli.parse_args(train_argv(train_paths, "--config", "uniform", "--schedule=constant"))
    assert config.schedule == "constant"


def test_train_workdir_is_a_file(capsys, tmp_path):
    workdir = tmp_path / "work"
    workdir.write_text("")
    line = refused(
        capsys, train_cli.main, ["--config", "reference", "--data", str(tmp_path), "--workdir", str(workdir)]
    )
    assert str(workdir) in line and "--workdir" in line


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num_processes=2", "--process_id=0"], "--coordinator_address"),
        (["--coordinator_address=10.0.0.2:1234", "--num_processes=2"], "--process_id"),
        (["--coordinator_address=10.0.0.2:1234", "--num_processes=2", "--process_id=2"], "--process_id 2"),
        (["--coordinator_address=10.0.0.2", "--num_processes=2", "--process_id=0"], "HOST:PORT"),
        (["--distributed", "--num_processes=2"], "drop --num_processes"),
    ],
)
def test_train_multi_process_flags(capsys, train_paths, flags, named):
    line = refused(capsys, train_cli.main, train_argv(train_paths, "--config", "reference", *flags))
    assert named in line
    assert not train_paths[1].exists()


def test_train_fewer_shards_than_processes(capsys, tiny_corpus, tmp_path):
    """A corpus of 1 curated shard cannot give 2 hosts a shard each, nor 3 processes a third of a batch of 16:
    checked (and refused in one line by main) before anything is written."""
    from curation.trainer import training_data

    data = training_data.TrainingData.open(configs.get_config("reference", smoke=True), tiny_corpus, None)
    with pytest.raises(ValueError, match="1 training shards for 2 processes"):
        data.check_processes(configs.get_config("reference", smoke=True), 2)
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        data.check_processes(configs.get_config("reference", smoke=True), 3)


def test_train_help_lists_every_field_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", "jest", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split()).split("config fields:", 1)[1]
    jest = configs.jest()
    for field in dataclasses.fields(jest):
        value = getattr(jest, field.name)
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"--{field.name} " in text, field.name
        after = text.split(f"--{field.name} ", 1)[1]
        assert f"default: {shown}" in after.split("--", 1)[0], (field.name, after[:80])


# pipelines.score


@pytest.fixture
def score_paths(tmp_path, reference_checkpoint, tiny_corpus):
    return {"input": f"{tiny_corpus}/web/*.tar", "output": str(tmp_path / "scored"), "reference": reference_checkpoint}


def score_argv(paths, *flags: str, **replace: str) -> list[str]:
    paths = {**paths, **replace}
    return [f"--input={paths['input']}", f"--output={paths['output']}", f"--reference={paths['reference']}", *flags]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--max_bad_fractoin=0.01"], "--max_bad_fraction"),
        (["--output_fromat", "tfrecord"], "--output_format"),
        (["--runer=DirectRunner"], "--runner"),
    ],
)
def test_score_misspelt_flag(capsys, score_paths, flags, named):
    line = refused(capsys, score.main, score_argv(score_paths, *flags))
    assert flags[0].split("=")[0] in line and f"did you mean {named}?" in line
    assert not os.path.exists(score_paths["output"])


@pytest.mark.parametrize("required", ["--input", "--output", "--reference"])
def test_score_misspelt_required_flag(capsys, score_paths, required):
    misspelt = {"--input": "--inptu", "--output": "--ouput", "--reference": "--refrence"}[required]
    argv = [arg.replace(f"{required}=", f"{misspelt}=") for arg in score_argv(score_paths)]
    line = refused(capsys, score.main, argv)
    assert f"unknown flag {misspelt} (did you mean {required}?)" in line
    assert not os.path.exists(score_paths["output"])


def training_workdir(tmp_path, reference_checkpoint, model: bool = True) -> pathlib.Path:
    """A trainer's workdir as `python -m curation.train` leaves it: config.json (which a keras-hub preset has too),
    metrics.jsonl, checkpoints/ and, once training has ended, model/."""
    workdir = tmp_path / "work"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(configs.reference().to_dict()))
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if model:
        shutil.copytree(reference_checkpoint, workdir / "model")
    return workdir


def test_score_reference_is_a_training_workdir(capsys, score_paths, reference_checkpoint, tmp_path):
    workdir = training_workdir(tmp_path, reference_checkpoint)
    line = refused(capsys, score.main, score_argv(score_paths, reference=str(workdir)))
    assert f"did you mean --reference {workdir}/model" in line and "training workdir" in line
    assert "preset" not in line
    assert not os.path.exists(score_paths["output"])


def test_score_reference_is_a_training_workdir_without_its_model_yet(
    capsys, score_paths, reference_checkpoint, tmp_path
):
    workdir = training_workdir(tmp_path, reference_checkpoint, model=False)
    line = refused(capsys, score.main, score_argv(score_paths, reference=str(workdir)))
    assert "training workdir" in line and f"--reference {workdir}/model" in line and "preset" not in line
    assert not os.path.exists(score_paths["output"])


def test_score_unquoted_input_glob(capsys, score_paths, tiny_corpus):
    """`--input DIR/*.tar` unquoted: the shell passes the shards as separate arguments."""
    shards = sorted(str(path) for path in pathlib.Path(tiny_corpus, "web").glob("*.tar"))
    argv = ["--input", *shards, "--output", score_paths["output"], "--reference", score_paths["reference"]]
    line = refused(capsys, score.main, argv)
    assert "quote" in line and f"--input '{tiny_corpus}/web/*.tar'" in line and shards[1] in line
    assert not os.path.exists(score_paths["output"])


def test_score_stray_argument(capsys, score_paths):
    line = refused(capsys, score.main, [*score_argv(score_paths), "stray"])
    assert "unexpected argument(s): stray" in line
    assert not os.path.exists(score_paths["output"])


def test_score_bad_value_of_a_beam_flag(capsys, score_paths):
    line = refused(capsys, score.main, [*score_argv(score_paths), "--num_workers=many"])
    assert "--num_workers" in line and "many" in line
    assert not os.path.exists(score_paths["output"])


def test_score_reference_is_damaged(capsys, score_paths, reference_checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(reference_checkpoint, damaged)
    biggest = max((path for path in (damaged / "params").rglob("*") if path.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    line = refused(capsys, score.main, score_argv(score_paths, reference=str(damaged)))
    assert str(damaged) in line and "damaged" in line
    assert not os.path.exists(score_paths["output"])


def test_score_reference_meta_is_damaged(capsys, score_paths, reference_checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(reference_checkpoint, damaged)
    (damaged / "meta" / "metadata").write_text('{"trunc')
    line = refused(capsys, score.main, score_argv(score_paths, reference=str(damaged)))
    assert str(damaged) in line and "damaged" in line


@pytest.mark.parametrize("flag", ["--store_image=resized", "--num_output_shards=4"])
def test_score_copied_layout_flags_with_the_sidecar_layout(capsys, score_paths, flag):
    line = refused(capsys, score.main, score_argv(score_paths, "--output_layout=sidecar", flag))
    assert flag.split("=")[0] in line and "--output_layout sidecar" in line and "drop them" in line
    assert not os.path.exists(score_paths["output"])


def test_score_input_matches_no_shard(capsys, score_paths, tmp_path):
    line = refused(capsys, score.main, score_argv(score_paths, input=f"{tmp_path}/nowhere/*.tar"))
    assert f"{tmp_path}/nowhere/*.tar" in line and "--input" in line
    assert not os.path.exists(score_paths["output"])


def test_score_input_is_a_directory(capsys, score_paths, tiny_corpus):
    line = refused(capsys, score.main, score_argv(score_paths, input=f"{tiny_corpus}/web"))
    assert f"{tiny_corpus}/web" in line and "--input" in line
    assert not os.path.exists(score_paths["output"])


def test_score_gcs_without_credentials(capsys, score_paths, monkeypatch):
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_credentials(*args, **kwargs):
        raise DefaultCredentialsError("Your default credentials were not found.")

    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setattr(google.auth, "default", no_credentials)
    line = refused(capsys, score.main, score_argv(score_paths, output="gs://some-bucket/scored"))
    assert "gcloud auth application-default login" in line and "GOOGLE_APPLICATION_CREDENTIALS" in line


def test_score_max_bad_fraction_help_says_its_default():
    action = next(a for a in options.build_parser()._actions if "--max_bad_fraction" in a.option_strings)
    assert action.default == 1.0 and "default 1.0" in action.help


def test_score_accepts_template_parameters_and_launcher_flags(score_paths):
    """What a Flex Template launcher passes: every metadata.json parameter and Dataflow's own flags."""
    flags = job_flags()
    local = {"input": score_paths["input"], "output": score_paths["output"], "reference": score_paths["reference"]}
    ours = [
        f"--{name}={local.get(name, sample(name, flags[name])[0])}"
        for name in (parameter["name"] for parameter in METADATA["parameters"])
    ]
    launcher = [
        "--runner=DataflowRunner",
        "--project=p",
        "--region=r",
        "--temp_location=gs://b/t",
        "--staging_location=gs://b/s",
        "--sdk_container_image=x",
        "--setup_file=/x/setup.py",
        "--experiments=a",
        "--labels={}",
        "--service_account_email=a@b",
    ]
    args, pipeline_options = options.parse([*ours, *launcher])  # accepted: no SystemExit
    assert {
        f"--{name}={value}"
        for name, value in pipeline_options.get_all_options(drop_default=True).items()
        if name in ("runner", "project", "region", "temp_location", "sdk_container_image")
    } <= set(launcher)
    preflight.check_arguments(args)


class FullDisk:
    """A file on a disk with `room` bytes left: the write that goes past it fails as a full disk does (ENOSPC),
    having written what fitted."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            self._f.write(bytes(data[: self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._f.close()


def test_score_disk_full_while_writing_sidecars(capsys, monkeypatch, score_paths, tmp_path):
    """The disk fills up after the first sidecar: the job ends in one line naming the file and the error, leaves no
    temporary file and keeps the finished sidecar, which the same command run again (with room) adopts; its result
    equals an uninterrupted run's."""
    argv = score_argv(score_paths, "--output_layout=sidecar", "--min_image_size=4")
    create, sidecars_started = FileSystems.create, []

    def create_on_a_full_disk(path, *args, **kwargs):
        f = create(path, *args, **kwargs)
        if f"/{SIDECAR_DIR}/" not in path:
            return f
        sidecars_started.append(path)
        return f if len(sidecars_started) == 1 else FullDisk(f, room=100)

    monkeypatch.setattr(FileSystems, "create", create_on_a_full_disk)
    with pytest.raises(SystemExit) as exit_info:
        score.main(argv)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"cannot write {score_paths['output']}/batch-" in last and "No space left on device" in last
    assert "run the same command again" in last
    [unfinished] = batches.unfinished_batches(score_paths["output"])
    [kept] = os.listdir(os.path.join(unfinished, SIDECAR_DIR))  # the finished sidecar, and no temporary file
    assert os.path.basename(sidecars_started[0]).startswith(f".{kept}.")
    monkeypatch.undo()

    resumed = score.run(argv)  # the same command, with room
    uninterrupted = score.run(
        score_argv(score_paths, "--output_layout=sidecar", "--min_image_size=4", output=str(tmp_path / "uninterrupted"))
    )
    manifests = [
        next(
            m
            for m in batches.read_manifests(os.path.dirname(summary["batch_dir"]))
            if m.batch_dir == summary["batch_dir"]
        )
        for summary in (resumed, uninterrupted)
    ]
    assert manifests[0].counts == manifests[1].counts
    tables = [
        {
            shard.path: pq.read_table(os.path.join(os.path.dirname(m.batch_dir), shard.sidecar))
            for shard in m.input_shards
        }
        for m in manifests
    ]
    assert sorted(tables[0]) == sorted(tables[1])
    assert all(tables[0][path].equals(tables[1][path]) for path in tables[0])
    assert sum(shard.sidecar.startswith(os.path.basename(unfinished)) for shard in manifests[0].input_shards) == 1

    # Where a sidecar's write failed and the runner's retry succeeded, the finished batch holds the failed try's
    # temporary file if its removal failed too: --clean_unfinished removes it, and nothing else there.
    sidecar_dir = os.path.join(uninterrupted["batch_dir"], SIDECAR_DIR)
    finished = sorted(os.listdir(sidecar_dir))
    orphan = os.path.join(sidecar_dir, f".{finished[0]}.{'0123456789abcdef' * 2}.tmp")
    open(orphan, "wb").write(b"PAR1")
    score.run(
        score_argv(
            score_paths,
            "--output_layout=sidecar",
            "--min_image_size=4",
            "--incremental",
            "--clean_unfinished",
            output=str(tmp_path / "uninterrupted"),
        )
    )
    assert sorted(os.listdir(sidecar_dir)) == finished


def test_a_failed_atomic_write_leaves_nothing(tmp_path):
    def fill_up(f):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "file.parquet"
    with pytest.raises(batches.OutputWriteError, match=f"cannot write {path}: .*No space left on device"):
        batches.write_atomically(str(path), fill_up)
    assert os.listdir(tmp_path) == []


# curation.report


@pytest.mark.parametrize(
    "runs, named",
    [
        (["a={missing}"], "{missing}/metrics.jsonl"),
        (["a={workdir}", "b={missing}"], "{missing}/metrics.jsonl"),
        (["a"], "NAME=WORKDIR"),
        (["a={workdir}", "a={workdir}"], "twice"),
    ],
)
def test_report_runs_without_metrics(capsys, tmp_path, runs, named):
    workdir, missing, out = tmp_path / "work", tmp_path / "nothing", tmp_path / "report"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
    argv = [f"--run={run.format(workdir=workdir, missing=missing)}" for run in runs]
    line = refused(capsys, report_cli.main, [*argv, "--out", str(out)])
    assert named.format(missing=missing) in line
    assert not out.exists()


def test_report_reference_without_metrics(capsys, tmp_path):
    line = refused(
        capsys,
        report_cli.main,
        ["--run", f"a={tmp_path}", "--reference", str(tmp_path / "ref"), "--out", str(tmp_path / "report")],
    )
    assert "--run" in line or "--reference" in line
    assert not (tmp_path / "report").exists()
