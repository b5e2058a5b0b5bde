"""deploy/ agrees with the job it launches (argument parsing and file checks only; no pipeline runs).

A Flex Template passes each parameter of deploy/metadata.json to deploy/launch.py as `--name=value`, which the job's
flags (`pipelines.options.build_parser()`, from its PipelineOptions classes) must accept; Dataflow refuses to launch
without every non-optional parameter, which must therefore be exactly the flags the job requires; the image must pin
the jax and Beam of requirements.txt.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import re

import pytest

from pipelines.options import build_parser

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
METADATA = json.loads((DEPLOY / "metadata.json").read_text())
PARAMETERS = {parameter["name"]: parameter for parameter in METADATA["parameters"]}

# Values a scheduled batch would pass, where a type-based guess (see `sample`) would not fit the parameter's regexes.
SAMPLES = {
    "input": "gs://my-bucket/web/*.tar",
    "output": "gs://my-bucket/scored",
    "reference": "gs://my-bucket/reference/model",
    "output_format": "parquet,tfrecord",
    "output_layout": "copied",  # the other samples (--store_image, --num_output_shards) shape the copied layout
    "key_field": "id",
    "image_field": "jpg,png",
    "caption_field": "txt",
    "max_bad_fraction": "0.25",
}


def job_flags() -> dict[str, argparse.Action]:
    """Flag name without `--` -> its argparse action, for every flag of the scoring job."""
    return {
        option[2:]: action
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def sample(name: str, action: argparse.Action) -> tuple[str, object]:
    """(text passed as `--name=text`, the value argparse should store for it)."""
    if name in SAMPLES:
        text = SAMPLES[name]
    elif action.choices:
        text = list(action.choices)[-1]
    elif action.type is int:
        text = "7"
    elif action.const is True:  # a boolean flag that takes an explicit value
        text = "true"
    else:
        text = "some-value"
    value = action.type(text) if callable(action.type) else text
    return text, [value] if isinstance(action, argparse._AppendAction) else value


def required_argv(skip: str = "") -> list[str]:
    """The smallest valid command line: every required flag with its sample value (but `skip`)."""
    flags = job_flags()
    return [f"--{name}={sample(name, action)[0]}" for name, action in flags.items() if action.required and name != skip]


def test_metadata_is_well_formed():
    names = [parameter["name"] for parameter in METADATA["parameters"]]
    assert METADATA["name"] and METADATA["description"]
    assert len(names) == len(set(names)), f"repeated parameters: {sorted(n for n in names if names.count(n) > 1)}"
    for parameter in METADATA["parameters"]:
        assert parameter.get("label") and parameter.get("helpText"), f"{parameter['name']}: label and helpText"
        assert isinstance(parameter.get("isOptional"), bool), f"{parameter['name']}: isOptional must be set"
        for regex in parameter.get("regexes", []):
            re.compile(regex)


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_every_parameter_is_a_job_flag(name):
    flags = job_flags()
    assert name in flags, f"metadata.json parameter {name!r} is not a flag of pipelines.options.build_parser()"
    action = flags[name]
    text, expected = sample(name, action)
    for regex in PARAMETERS[name].get("regexes", []):
        assert re.fullmatch(regex, text), f"{name}: the regex {regex!r} refuses a valid value {text!r}"
    argv = [*required_argv(skip=name), f"--{name}={text}"]
    try:
        args, unknown = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"build_parser() refuses --{name}={text}, the form a Flex Template passes it in")
    assert unknown == [], f"--{name}={text} was not taken as a job flag: {unknown}"
    assert getattr(args, action.dest) == expected


def test_parameters_are_optional_exactly_when_the_flag_is():
    flags = job_flags()
    required = [action for action in build_parser()._actions if action.required]  # one parameter per flag and aliases
    missing = [
        action.option_strings[0][2:]
        for action in required
        if not any(option[2:] in PARAMETERS for option in action.option_strings)
    ]
    assert not missing, f"required flags missing from metadata.json: {missing}"
    for name, parameter in PARAMETERS.items():
        if name in flags:
            assert parameter["isOptional"] == (not flags[name].required), (
                f"{name}: isOptional={parameter['isOptional']} but the flag is "
                f"{'required' if flags[name].required else 'optional'}"
            )


def test_boolean_parameters_take_a_value():
    # A template passes every parameter as --name=value; argparse's store_true refuses a value.
    flags = job_flags()
    for name in PARAMETERS:
        assert not isinstance(flags.get(name), argparse._StoreTrueAction), (
            f"{name} is a store_true flag: a Flex Template cannot pass it (--{name}=true is refused)"
        )


def pins() -> dict[str, str]:
    """requirements.txt as {distribution name without extras: version}."""
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?==(\S+)\s*(#.*)?", line)
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def test_image_pins_the_versions_of_requirements():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    jax = re.search(r"^ARG JAX_VERSION=(\S+)$", dockerfile, re.MULTILINE)
    assert jax, "deploy/Dockerfile declares no ARG JAX_VERSION"
    assert jax.group(1) == pins()["jax"], "deploy/Dockerfile's jax is not requirements.txt's"
    assert "jax[cuda12]==${JAX_VERSION}" in dockerfile
    sdk = re.search(r"^FROM apache/beam_python(\d+\.\d+)_sdk:(\S+)", dockerfile, re.MULTILINE)
    assert sdk, "deploy/Dockerfile copies no Beam SDK image"
    assert sdk.group(2) == pins()["apache-beam"], "the Beam SDK image is not requirements.txt's apache-beam"
    assert f"python3{sdk.group(1).split('.')[1]}-template-launcher-base" in dockerfile, "launcher of another Python"


def test_image_runs_the_launch_file_and_boots_workers():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    py_file = re.search(r"FLEX_TEMPLATE_PYTHON_PY_FILE=/template/(\S+)", dockerfile)
    assert py_file and (ROOT / py_file.group(1)).is_file()
    assert re.search(rf"^COPY {re.escape(py_file.group(1))} ", dockerfile, re.MULTILINE), "launch file not copied"
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in dockerfile
    calls = [
        node
        for node in ast.walk(ast.parse((ROOT / py_file.group(1)).read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "pipelines.score"
    ]
    assert any(alias.name == "main" for node in calls for alias in node.names), "launch file does not run score.main"
