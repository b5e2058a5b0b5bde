"""A user's mistakes on the command line: each is refused before any work, as one line naming the fix, and
leaves nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil

import pytest

from curation.trainer import configs
from curation import train as train_cli
from pipelines import score
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
    args, config = train_cli.parse_args(train_argv(train_paths, "--config", "jest", "--score=hard_learner",
                                                   "--scored", "x"))
    assert config.score == "hard_learner" and args.scored == "x"
    _, config = train_cli.parse_args(train_argv(train_paths, "--config", "reference", "--batch_size", "8",
                                                "--selection_noise=no", "--smoke"))
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


def test_train_bad_field_value(capsys, train_paths):
    line = refused(capsys, train_cli.main, train_argv(train_paths, "--config", "reference", "--flexi=maybe"))
    assert "--flexi" in line
    assert not train_paths[1].exists()


def test_train_workdir_is_a_file(capsys, tmp_path):
    workdir = tmp_path / "work"
    workdir.write_text("")
    line = refused(capsys, train_cli.main, ["--config", "reference", "--data", str(tmp_path), "--workdir",
                                            str(workdir)])
    assert str(workdir) in line and "--workdir" in line


@pytest.mark.parametrize("flags, named", [
    (["--num_processes=2", "--process_id=0"], "--coordinator_address"),
    (["--coordinator_address=10.0.0.2:1234", "--num_processes=2"], "--process_id"),
    (["--coordinator_address=10.0.0.2:1234", "--num_processes=2", "--process_id=2"], "--process_id 2"),
    (["--coordinator_address=10.0.0.2", "--num_processes=2", "--process_id=0"], "HOST:PORT"),
    (["--distributed", "--num_processes=2"], "drop --num_processes"),
])
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
    return [f"--input={paths['input']}", f"--output={paths['output']}",
            f"--reference={paths['reference']}", *flags]


@pytest.mark.parametrize("flags, named", [
    (["--max_bad_fractoin=0.01"], "--max_bad_fraction"),
    (["--output_fromat", "tfrecord"], "--output_format"),
    (["--runer=DirectRunner"], "--runner"),
])
def test_score_misspelt_flag(capsys, score_paths, flags, named):
    line = refused(capsys, score.main, score_argv(score_paths, *flags))
    assert flags[0].split("=")[0] in line and f"did you mean {named}?" in line
    assert not os.path.exists(score_paths["output"])


def test_score_reference_is_a_training_workdir(capsys, score_paths, reference_checkpoint, tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(reference_checkpoint, workdir / "model")
    line = refused(capsys, score.main, score_argv(score_paths, reference=str(workdir)))
    assert f"did you mean --reference {workdir}/model" in line
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
    action = next(a for a in score.build_parser()._actions if "--max_bad_fraction" in a.option_strings)
    assert action.default == 1.0 and "default 1.0" in action.help


def test_score_accepts_template_parameters_and_launcher_flags(score_paths):
    """What a Flex Template launcher passes: every metadata.json parameter and Dataflow's own flags."""
    flags = job_flags()
    local = {"input": score_paths["input"], "output": score_paths["output"],
             "reference": score_paths["reference"]}
    ours = [f"--{name}={local.get(name, sample(name, flags[name])[0])}"
            for name in (parameter["name"] for parameter in METADATA["parameters"])]
    launcher = ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/t",
                "--staging_location=gs://b/s", "--sdk_container_image=x", "--setup_file=/x/setup.py",
                "--experiments=a", "--labels={}", "--service_account_email=a@b"]
    args, beam_args = score.build_parser().parse_known_args([*ours, *launcher])
    assert beam_args == launcher
    score.check_arguments(args, beam_args)  # accepted: no SystemExit
